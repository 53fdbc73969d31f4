"""Issue 19, item 2 (faithfulness): the implicit integrator equals the closed-form flow of linear
least squares up to t = 1e8 and a tight Dopri5 flow on a small network; its log holds accepted
points of the flow only, and its certificates claim what Dopri5's do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.certificate import Scope


def _least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    x[:, 2] *= 1e-3                      # one slow mode: a stiff flow
    y = torch.randn(12, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = nn.Linear(3, 1, bias=False).double()
    return rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square"), x, y


def test_linear_least_squares_equals_the_closed_form_flow_up_to_1e8():
    problem, x, y = _least_squares()
    theta0 = problem.params["weight"].reshape(-1).numpy()
    X, Y = x.numpy(), y.numpy().reshape(-1)
    H = X.T @ X / len(X)                 # L = (1/2n)‖Xθ − y‖²
    star = np.linalg.solve(X.T @ X, X.T @ Y)
    lam, V = np.linalg.eigh(H)
    assert lam.min() / lam.max() < 1e-5  # stiff: explicit steps would need ~1e5 per slow time

    def closed(t):
        return star + V @ (np.exp(-lam * t) * (V.T @ (theta0 - star)))

    times = [1.0, 1e3, 1e6, 1e8]
    run = rf.gradient_flow(problem, rf.Implicit(), t_max=1e8, records=rf.Times(times))
    assert run.status is rf.FlowStatus.T_MAX
    np.testing.assert_allclose(run.params["weight"].reshape(-1).numpy(), closed(1e8),
                               rtol=1e-6, atol=1e-9)
    loss_star = 0.5 * np.mean((X @ star - Y) ** 2)
    assert run.trajectory["loss"][-1] == pytest.approx(loss_star, rel=1e-9)
    assert run.n_grad_evals < 5_000      # reaching 1e8, where GD at its stable step needs ~1e8


def test_a_small_network_equals_a_tight_dopri5_flow():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x[:, :1])
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square")
    records = rf.LogSpaced(8)
    stiff = rf.gradient_flow(problem, rf.Implicit(rtol=1e-10, atol=1e-13), t_max=20.0,
                             records=records)
    tight = rf.gradient_flow(problem, rf.Dopri5(rtol=1e-10, atol=1e-13), t_max=20.0,
                             records=records)
    np.testing.assert_allclose(stiff.trajectory["loss"], tight.trajectory["loss"], rtol=1e-6)
    for name in stiff.params:
        np.testing.assert_allclose(stiff.params[name].numpy(), tight.params[name].numpy(),
                                   rtol=1e-5, atol=1e-7)
    # the log: accepted points only, strictly increasing in t (no Newton or trial states)
    ev = stiff.trajectory.evaluations
    assert ev is not None and ev["t"].size > 0 and np.all(np.diff(ev["t"]) > 0)
    cert = rf.certify(stiff.trajectory, "log")
    assert cert.scope in (Scope.PATH, Scope.RECORDS) and cert.scope is not Scope.PROVEN
    assert stiff.trajectory.meta["integrator"].startswith("implicit LSODA")


def test_implicit_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="method must be one of"):
        rf.Implicit("RK45")
    with pytest.raises(ValueError, match="Newton–Krylov"):
        rf.Implicit(jacobian="hvp")
    big = rf.Problem(rf.Model(nn.Linear(100, 50).double()),
                     rf.Dataset.from_arrays(torch.randn(4, 100, dtype=torch.float64),
                                            torch.randn(4, 50, dtype=torch.float64)), "square")
    with pytest.raises(ValueError, match="P = 5050 > 4096"):
        rf.gradient_flow(big, rf.Implicit(), t_max=1.0)


def test_implicit_from_toml():
    from rayleighflow.experiments.config import parse_config

    cfg = parse_config({"model": {"kind": "mlp", "widths": [4]},
                        "data": {"kind": "sklearn", "name": "iris", "n_samples": 30},
                        "loss": {"name": "cross-entropy"},
                        "flow": {"t_max": 1e4, "integrator": {"kind": "implicit",
                                                              "method": "BDF"}}})
    assert cfg.flow.kwargs()["integrator"] == rf.Implicit("BDF")


def test_an_rtol_below_what_float32_gradients_resolve_is_refused():
    x = torch.linspace(-1, 1, 8).unsqueeze(1)
    problem = rf.Problem(rf.Model(nn.Linear(1, 1)), rf.Dataset.from_arrays(x, 2 * x,
                                                                            dtype=torch.float32),
                         "square")
    with pytest.raises(ValueError, match=r"below what torch.float32 gradients resolve"):
        rf.gradient_flow(problem, rf.Implicit(rtol=1e-8), t_max=1.0)
    floor = rf.Implicit.rtol_floor(torch.float32)
    run = rf.gradient_flow(problem, rf.Implicit(rtol=floor, atol=1e-8), t_max=1e4)
    assert run.status is rf.FlowStatus.T_MAX and run.trajectory["loss"][-1] < 1e-6


def test_an_implicit_certificate_names_its_solver_and_refines_with_it():
    problem, _, _ = _least_squares()
    run = rf.gradient_flow(problem, rf.Implicit("BDF"), t_max=1e6, records=rf.LogSpaced(30))
    cert = rf.certify(run.trajectory, "log")
    assert cert.holds and cert.scope is Scope.PATH          # PATH at most, never PROVEN
    assert any("numerical solution of implicit BDF (scipy)" in n for n in cert.notes)
    refined = rf.certify(run.trajectory, "log", refine=problem)  # by BDF at rtol/100: Dopri5
    assert refined.holds and refined.scope is Scope.PATH        # could not reach t = 1e6
    assert any("re-integrated at rtol = 1e-10" in a.detail for a in refined.assumptions)
