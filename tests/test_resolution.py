"""Issue 17: what a flow or gradient-descent certificate rests on.

* An adaptive flow's checks see the numerical solution only: a narrow dip of the KL ratio
  that Dopri5 steps over at rtol 1e-7 fools both the stage-level and the delayed check. The
  exact flow is computed here by quadrature (t(θ) = ∫ dθ/(g g′), independent of any
  integrator) and shows the certificate false; the refinement check must downgrade it.
* A float32 run's bound must start from L(θ₀) in float64, and a step whose decrease is below
  the loss's rounding error is not "step too large".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.certificate import CertificateStatus, Reason, Scope

W, C, DEPTH, CURV = 1e-4, 0.25, 1 - 1e-10, 0.3


def _g(th):
    """g(θ) with g′(θ) = (1 + 0.6θ)(1 − (1 − 1e-10)e^(−((θ − C)/W)²)): θ + 0.3θ² whose
    derivative dips to 1e-10·(1 + 0.6C) over a width W = 1e-4 around θ = C = 0.25."""
    erf, exp = (torch.erf, torch.exp) if isinstance(th, torch.Tensor) else (math.erf, math.exp)
    u = (th - C) / W
    dip = (1 + 2 * CURV * C) * W * math.sqrt(math.pi) / 2 * erf(u) - CURV * W ** 2 * exp(-u * u)
    return th + CURV * th ** 2 - DEPTH * dip


def _dip_problem() -> rf.Problem:
    def f(p, x):
        return _g(p["theta"]).reshape(1, 1).expand(x.shape[0], 1)

    zero = torch.zeros(1, 1, dtype=torch.float64)
    return rf.Problem(rf.Model(f, {"theta": torch.tensor([1.0], dtype=torch.float64)}),
                      rf.Dataset.from_arrays(zero, zero), "square")


@pytest.fixture(scope="module")
def dip():
    problem = _dip_problem()
    run = rf.gradient_flow(problem, rf.Dopri5(rtol=1e-7), t_max=4.0, records=rf.LogSpaced(40))
    return problem, run.trajectory


def test_the_dip_fools_the_unrefined_checks_and_the_exact_flow_breaks_them(dip):
    _, traj = dip
    stated = rf.certify(traj, "log", mu=1.0)
    observed = rf.certify(traj, "log")
    assert stated.holds and stated.scope is Scope.PATH
    assert observed.holds
    assert any("not re-integrated" in n and "rtol = 1e-07" in n for n in stated.notes)
    # The exact flow θ̇ = −g g′ (L = ½g², g > 0 on [0, 1]) crosses [C, C + δ] no faster than
    # δ/max(g·g′) there, and 1 − (1 − 1e-10)e^(−u) ≤ 1e-10 + u gives g′ ≤ (1 + 0.6(C + δ))
    # (1e-10 + δ²/W²): with δ = 1e-5·W that crossing alone outlasts the run.
    delta = 1e-5 * W
    g_top = (1 + 2 * CURV * (C + delta)) * (1e-10 + (delta / W) ** 2)
    crossing = delta / (_g(C + delta) * g_top)
    t_end = float(traj.t[-1])
    assert crossing > t_end        # the exact flow is still above θ = C at the last record
    assert _g(0.0) > 0 and _g(C) > 0
    exact_floor = 0.5 * _g(C) ** 2   # so its loss there is at least ½g(C)²
    assert exact_floor > 2 * stated.bound[-1]
    assert exact_floor > 2 * observed.bound[-1]


def test_refinement_downgrades_the_dip(dip):
    problem, traj = dip
    for mu in (1.0, None):
        cert = rf.certify(traj, "log", mu=mu, refine=problem)
        assert cert.status in (CertificateStatus.VIOLATED, CertificateStatus.UNAVAILABLE)
        assert cert.reason is Reason.NOT_RESOLVED and cert.scope is Scope.RECORDS
        assert cert.notes[0].startswith("not resolved at rtol = 1e-07")
        failed = cert.assumptions[-1]
        assert not failed.holds and "rtol = 1e-09" in failed.name


def _smooth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.randn(12, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    return rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square")


def test_refinement_keeps_a_resolved_certificate_and_says_by_how_much():
    problem = _smooth()
    run = rf.gradient_flow(problem, rf.Dopri5(rtol=1e-7), t_max=5.0, records=rf.LogSpaced(20))
    plain = rf.certify(run.trajectory, "log")
    cert = rf.certify(run.trajectory, "log", refine=problem)
    assert plain.holds and cert.holds and cert.scope is plain.scope
    assert cert.mu == plain.mu
    resolved = cert.assumptions[-1]
    assert resolved.holds and "rtol = 1e-09" in resolved.name
    moved = float(resolved.detail.split("moves by up to ")[1].split(" ")[0])
    assert moved < 1e-5
    assert any("a dip narrower than both runs' steps" in n for n in cert.notes)
    fkl = problem.loss.functional_kl(problem.data.weights, problem.convention)
    composed = rf.compose(run.trajectory, fkl, refine=problem)
    assert composed.holds and composed.assumptions[-1].holds
    # a problem that does not start the run is refused, not compared
    other = _smooth()
    with torch.no_grad():
        for p in other.params.values():
            p.add_(0.1)
    with pytest.raises(ValueError, match="do not start this trajectory"):
        rf.certify(run.trajectory, "log", refine=other)


# -- float32 runs --------------------------------------------------------------------------

def _offset_problem(seed: int, offset: float) -> tuple[rf.Problem, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, generator=g)
    torch.manual_seed(seed)
    net = nn.Linear(3, 1)
    with torch.no_grad():
        net.bias.fill_(offset)
        y = net(x) + 1e-2 * torch.randn(20, 1, generator=g)
    return rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square"), x, y


def _loss64(problem: rf.Problem, x: torch.Tensor, y: torch.Tensor) -> float:
    w = problem.params["weight"].double()
    b = problem.params["bias"].double()
    return float(0.5 * ((x.double() @ w.T + b - y.double()) ** 2).sum(-1).mean())


def test_float32_bounds_never_start_below_the_float64_loss():
    held = 0
    for seed in range(35):
        problem, x, y = _offset_problem(seed, 100.0)
        run = rf.gradient_flow(problem, rf.GradientDescent(0.1), t_max=5.0)
        cert = rf.certify(run.trajectory, "log")
        l64 = _loss64(problem, x, y)
        assert math.isclose(run.trajectory.meta["loss0_float64"], l64, rel_tol=1e-12)
        if cert.holds:
            held += 1
            assert cert.bound[0] >= l64
        else:   # every α ≤ 0 here is a change within the float32 loss's rounding
            assert cert.reason is Reason.LOSS_ROUNDING, cert.describe()
    assert held >= 1
    flow = rf.gradient_flow(_offset_problem(3, 100.0)[0], rf.Dopri5(), t_max=2.0)
    problem, x, y = _offset_problem(3, 100.0)
    assert rf.certify(flow.trajectory, "log").bound[0] >= _loss64(problem, x, y)


def test_rounding_limited_steps_have_their_own_reason_and_large_steps_keep_theirs():
    for seed in range(3):
        problem, _, _ = _offset_problem(seed, 5e3)
        run = rf.gradient_flow(problem, rf.GradientDescent(1e-3), t_max=1.0)
        cert = rf.certify(run.trajectory, "log")
        assert cert.reason is Reason.LOSS_ROUNDING, cert.describe()
        assert "rounding error" in cert.first_violation[1]
        assert "step too large" not in cert.describe()
    # a genuinely too large step (the loss grows by far more than its rounding) in float32
    problem, _, _ = _offset_problem(0, 0.0)
    run = rf.gradient_flow(problem, rf.GradientDescent(5.0), t_max=20.0)
    cert = rf.certify(run.trajectory, "log")
    assert cert.reason is Reason.NO_SUFFICIENT_DECREASE, cert.describe()
    assert np.all(np.diff(run.trajectory["loss"][:3]) > 0)
