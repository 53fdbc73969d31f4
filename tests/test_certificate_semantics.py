"""What a certificate may claim (issue 7, CERTIFICATES.md): each reproduction of the review is
a test here, plus the scopes, the delayed check and the exact gradient-descent certificate."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.certificate import CertificateStatus, Reason, Scope
from rayleighflow.certify import certify, rank_desingularizers
from rayleighflow.composition import compose, spectral
from rayleighflow.data import Dataset
from rayleighflow.desingularizers import CrossEntropy, Custom
from rayleighflow.experiments.common import spectrum_diagnostic
from rayleighflow.experiments.registry import run_experiment
from rayleighflow.flow import gradient_flow
from rayleighflow.ntk import ntk_spectrum
from rayleighflow.ntk.spectrum import NUMERICAL_ZERO, STRUCTURAL_ZERO, VALUE
from rayleighflow.problem import Model, Problem
from rayleighflow.theorems.two_layer import TwoLayer
from rayleighflow.trajectory import Trajectory


def _traj(t, loss, grad_sq, **meta) -> Trajectory:
    traj = Trajectory({"convention": "mean", **meta})
    for ti, li, gi in zip(t, loss, grad_sq, strict=True):
        traj.append({"t": float(ti), "loss": float(li), "grad_sq": float(gi)})
    return traj


# -- 1. certified time never extrapolates -------------------------------------------------------

@pytest.fixture(scope="module")
def stuck_two_layer():
    """Width 2 on a target it cannot fit: the loss plateaus far above 1e-3·L₀."""
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(64, 2, generator=g, dtype=torch.float64) - 2
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:])
    net = TwoLayer(2, 2, generator=torch.Generator().manual_seed(1))
    return Problem(Model(net), Dataset.from_arrays(x, y), "square")


def test_certified_time_stays_inside_the_checked_horizon(stuck_two_layer):
    short = gradient_flow(stuck_two_layer, t_max=2.0, records=rf.LogSpaced(20))
    cert = certify(short.trajectory, "log")
    assert cert.status is CertificateStatus.HOLDS
    target = 1e-3 * cert.loss_initial
    assert cert.time_to(target) is None          # beyond t = 2: not certified
    forecast = cert.forecast_time_to(target)
    assert forecast is not None and forecast > cert.horizon
    d = cert.to_dict(target=target)
    assert d["certified_time_to"] is None and d["forecast_time_to"] == pytest.approx(forecast)
    # Inside the horizon the certified time is where the bound meets the target.
    inside = float(cert.bound[-1]) * 1.001
    t_in = cert.time_to(inside)
    assert t_in is not None and t_in <= cert.horizon
    assert float(cert.desingularizer.bound(cert.loss_initial, cert.mu, t_in)) == pytest.approx(
        inside, rel=1e-9)
    # And the forecast was indeed wrong: the long run never reaches the target.
    long = gradient_flow(stuck_two_layer, integrator=rf.Dopri5(rtol=1e-5, atol=1e-8), t_max=300.0,
                         records=rf.LogSpaced(10))
    assert long.trajectory["loss"].min() > 10 * target


def test_violated_certificates_certify_no_time():
    t = np.arange(4.0)
    loss = np.array([1.0, 0.9, 0.5, np.exp(-3)])
    cert = certify(_traj(t, loss, loss), "log")  # ratio 1 at records, bound e^{-t} < L(1)
    assert cert.status is CertificateStatus.VIOLATED
    assert cert.reason is Reason.BOUND_BELOW_LOSS
    assert cert.time_to(0.1) is None and cert.forecast_time_to(0.1) is None


# -- 2. a subset spectrum never certifies the full kernel ----------------------------------------

def test_spectral_certificate_refuses_a_subset_spectrum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.randn(60, 1, generator=g, dtype=torch.float64)
    net = TwoLayer(2, 6, generator=torch.Generator().manual_seed(4))   # P = 24 < n = 60
    problem = Problem(Model(net), Dataset.from_arrays(x, y), "square")
    assert problem.model.n_params == 24
    fkl = problem.loss.functional_kl(problem.data.weights, problem.convention)
    sub = gradient_flow(problem, t_max=5.0, records=rf.LogSpaced(6),
                        observers=[rf.Columns(spectrum_diagnostic(1, max_samples=12))])
    assert np.nanmin(sub.trajectory["lambda_min"]) > 0  # the 12-point kernel looks definite
    cert = spectral(sub.trajectory, fkl)
    assert cert.status is CertificateStatus.UNAVAILABLE
    assert cert.reason is Reason.SUBSET_SPECTRUM
    full = gradient_flow(problem, t_max=5.0, records=rf.LogSpaced(6),
                         observers=[rf.Columns(spectrum_diagnostic(1))])
    cert = spectral(full.trajectory, fkl)
    assert cert.status is CertificateStatus.UNAVAILABLE
    assert cert.reason is Reason.KERNEL_NOT_DEFINITE
    assert np.all(full.trajectory["lambda_min"] == 0.0)
    assert np.all(full.trajectory["lambda_min_structural"] == 1.0)


# -- 3 and 9. notes built from the numbers --------------------------------------------------------

def test_demo_note_follows_the_measured_spectrum(tmp_path):
    s = run_experiment("demo", tmp_path / "w60", quick=True, overrides={"width": 60})
    assert s["P"] == 13 * 60 + 60 + 60 * 3 + 3 and s["P"] >= s["nk"]
    note = s["notes"][0]
    assert f"P = {s['P']} ≥ nk = {s['nk']}" in note
    assert "rank K ≤ P" not in note and "< nk" not in note
    assert f"max rank {s['rank']} of {s['nk']}" in note
    assert s["lambda_min_label"] in note and s["lambda_min_label"] != STRUCTURAL_ZERO
    composed = s["certificates"][-1]
    assert f"composed Rayleigh certificate {composed['status']}" in note
    assert f"scope {composed['scope']}" in note
    if composed["status"] != "holds":
        assert "certifies" not in note


# -- 4. between records: the delayed check and evaluation-level ratios ----------------------------

def _dip_rate(t):
    """KL ratio (φ = log) of a scalar flow: 1, a dip to 1e-3 on [1.2, 1.9], 8 on (1.9, 2.05)."""
    return np.where((t >= 1.2) & (t <= 1.9), 1e-3, np.where((t > 1.9) & (t < 2.05), 8.0, 1.0))


def _dip_loss(t):
    grid = np.linspace(0, t, 20001)
    r = _dip_rate(grid)
    return math.exp(-float(np.sum((r[1:] + r[:-1]) / 2 * np.diff(grid))))


def _dip_traj(with_evaluations: bool) -> Trajectory:
    records = [0.0, 0.5, 1.0, 1.1, 2.0, 3.0, 4.0]
    traj = Trajectory({"convention": "mean", "method": "adaptive"})
    last = 0.0
    for tr in records:
        if with_evaluations:  # an integrator's evaluations between records
            for te in np.linspace(last, tr, 12)[1:-1]:
                loss = _dip_loss(te)
                traj.add_evaluation(float(te), loss, float(_dip_rate(np.array(te))) * loss)
        loss = _dip_loss(tr)
        traj.append({"t": tr, "loss": loss, "grad_sq": float(_dip_rate(np.array(tr))) * loss})
        last = tr
    return traj


def test_ratio_dip_between_records_is_not_a_path_certificate():
    rec = certify(_dip_traj(False), "log")
    assert rec.mu_star == pytest.approx(1.0)
    # The records alone cannot see the dip: the bound holds at every record ...
    assert rec.max_bound_violation <= 0
    # ... but at t = 1.9 the loss is twice that bound, so the scope must stay RECORDS.
    assert _dip_loss(1.9) > 1.9 * float(rec.desingularizer.bound(1.0, rec.mu_star, 1.9))
    assert rec.scope is Scope.RECORDS
    assert rec.delayed_check is not None and not rec.delayed_check.passed
    ev = certify(_dip_traj(True), "log")
    assert ev.mu_star <= 1e-3 and ev.n_grad_evals > 0
    assert ev.status is CertificateStatus.HOLDS
    stated = certify(_dip_traj(True), "log", mu=0.5)
    assert stated.status is CertificateStatus.VIOLATED and stated.reason is Reason.KL_BELOW_MU
    assert 1.2 <= stated.first_violation[0] <= 1.9
    assert certify(_dip_traj(False), "log", mu=0.5).status is CertificateStatus.HOLDS


def test_adaptive_flow_logs_every_stage_and_checks_them(stuck_two_layer):
    res = gradient_flow(stuck_two_layer, t_max=3.0, records=rf.LogSpaced(8))
    ev = res.trajectory.evaluations
    assert ev is not None and ev["t"].size == res.n_grad_evals
    # Logged values are the loss and ‖∇L‖² at each stage: R = ‖∇L‖²/‖∇ℓ‖² ≥ 0, ‖∇ℓ‖² = 2L.
    assert np.allclose(ev["fgrad_sq"], 2 * ev["loss"], rtol=1e-12)
    cert = certify(res.trajectory, "log")
    rec_only = certify(res.trajectory, "log", use_evaluations=False)
    inside = int((ev["t"] <= res.trajectory.t[-1]).sum())  # stages past t_max are not checked
    assert cert.n_grad_evals == inside > 0 and rec_only.n_grad_evals == 0
    assert cert.mu_star <= rec_only.mu_star
    # The log survives a round trip through the file.
    path_traj = Trajectory.load(_saved(res.trajectory))
    assert np.array_equal(path_traj.evaluations["loss"], ev["loss"])


def _saved(traj: Trajectory):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "t.jsonl"
    traj.save(path)
    return path


# -- 5. overflow accepts nothing ----------------------------------------------------------------

def test_overflowing_ratio_is_not_a_pass():
    traj = _traj([0.0, 1.0], [1.0, 1e-160], [0.5, 1e-320])
    cert = certify(traj, "cross-entropy", mu=5.0)
    assert cert.status is CertificateStatus.VIOLATED and cert.reason is Reason.KL_BELOW_MU
    assert CrossEntropy().kl_ratio(1e-160, 1e-320) == pytest.approx(1.0, rel=1e-3)
    inf = certify(_traj([0.0, 1.0], [1.0, 0.5], [0.5, math.inf]), "log", mu=1e-3)
    assert inf.status is CertificateStatus.VIOLATED and inf.reason is Reason.NON_FINITE


# -- 6. checks that cannot fail -------------------------------------------------------------------

def test_compose_with_nothing_to_check_is_unavailable():
    traj = _traj([0.0, 1.0, 2.0], [1.0, 0.5, 0.25], [1.0, 0.5, 0.25])
    for row in traj.rows:
        row.update(fgrad_sq=None, rayleigh=None)
    fkl = rf.SquareLoss().functional_kl(torch.full((4,), 0.25), rf.Convention.MEAN)
    cert = compose(traj, fkl)
    assert cert.status is CertificateStatus.UNAVAILABLE
    assert cert.reason is Reason.NO_CHECKED_POINT
    assert not any(a.holds for a in cert.assumptions)


# -- 7. ranking ---------------------------------------------------------------------------------

def test_ranking_never_puts_a_violated_bound_first():
    t = np.arange(4.0)
    loss = np.array([1.0, 0.9, 0.5, np.exp(-3)])
    # log's bound e^{-t} ends exactly at the last loss but is violated at t = 1, 2.
    ranked = rank_desingularizers(_traj(t, loss, loss), ["log", "power:0.1"])
    assert [r["name"] for r in ranked] == ["power(alpha=0.1)", "log"]
    assert ranked[1]["status"] == "violated" and ranked[1]["rank"] is None


def test_custom_desingularizer_certificate_has_a_time(stuck_two_layer):
    res = gradient_flow(stuck_two_layer, t_max=2.0, records=rf.LogSpaced(10))
    cert = certify(res.trajectory, Custom(np.log, lambda u: 1 / u, label="mylog"))
    assert cert.status is CertificateStatus.HOLDS
    target = float(cert.bound[-1]) * 1.01
    assert cert.time_to(target) == pytest.approx(
        certify(res.trajectory, "log").time_to(target), rel=1e-6)


# -- 8. spectra say what they are -----------------------------------------------------------------

def test_lambda_min_is_never_negative_and_carries_its_label():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # P = 26
    x = torch.randn(20, 3, dtype=torch.float64)                                # nk = 40
    dense = ntk_spectrum(net, x, route="dense")
    assert dense.eigenvalues[0] < 0 or dense.eigenvalues[0] < dense.threshold
    assert dense.lambda_min == 0.0 and dense.lambda_min_label == STRUCTURAL_ZERO
    assert dense.samples == 20 and dense.convention == "mean"
    dual = ntk_spectrum(net, x, route="dual")
    assert dual.lambda_min == 0.0 and dual.lambda_min_label == STRUCTURAL_ZERO


def test_float32_spectrum_accumulates_in_float64():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2))      # float32, P = 386
    x = torch.randn(20, 3)
    x[1] = x[0] + 1e-3  # two near-duplicate inputs: λ_min ≪ λ_max, well above float64 noise
    ref = ntk_spectrum(net.double(), x.double())                             # float64 model
    net.float()
    with pytest.warns(UserWarning, match="the dtype decides the answer"):
        acc = ntk_spectrum(net, x)
    assert acc.computed_dtype == "float64" and acc.lambda_min_label == VALUE
    assert acc.rank == ref.rank == 40
    assert acc.lambda_min == pytest.approx(ref.lambda_min, rel=1e-6)
    raw = ntk_spectrum(net, x, accumulate_float64=False)                     # float32 threshold
    assert raw.computed_dtype == "float32" and raw.rank < 40
    assert raw.lambda_min_label == NUMERICAL_ZERO and raw.lambda_min >= 0


# -- the exact gradient-descent certificate --------------------------------------------------------

def _mlp_problem(seed: int, loss: str = "square") -> Problem:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64) if loss == "square" else torch.randint(0, 2, (10,))
    return Problem(Model(net), Dataset.from_arrays(x, y), loss)


def test_gradient_descent_certificate_matches_its_definition():
    problem = _mlp_problem(0)
    eta = 0.2
    res = gradient_flow(problem, integrator=rf.GradientDescent(eta), t_max=40 * eta,
                        records=rf.LogSpaced(8))
    cert = certify(res.trajectory, "log")
    assert cert.discrete and cert.scope is Scope.PATH and cert.holds
    # Replay gradient descent by hand: the iterates, α_k and the bound.
    theta = {k: v.clone() for k, v in problem.params.items()}
    losses, grads = [], []
    for _ in range(41):
        loss = problem.loss_value(
            {k: v.requires_grad_(True) for k, v in theta.items()}, problem.data)
        g = torch.autograd.grad(loss, list(theta.values()))
        losses.append(float(loss.detach()))
        grads.append(float(sum((gi * gi).sum() for gi in g)))
        theta = {k: (v - eta * gi).detach() for (k, v), gi in zip(theta.items(), g, strict=True)}
    losses, grads = np.array(losses), np.array(grads)
    assert np.allclose(cert.loss, losses, rtol=1e-12)
    alpha = (losses[:-1] - losses[1:]) / (eta * grads[:-1])
    mu = np.min(grads[:-1] / losses[:-1])
    assert cert.mu == pytest.approx(mu, rel=1e-10)
    assert cert.alpha_min == pytest.approx(alpha.min(), rel=1e-8)
    bound = losses[0] * np.exp(-mu * eta * np.concatenate([[0.0], np.cumsum(alpha)]))
    assert np.allclose(cert.bound, bound, rtol=1e-10)
    assert np.all(losses <= bound * (1 + 1e-12))


def test_gradient_descent_step_too_large_is_violated():
    res = gradient_flow(_mlp_problem(1), integrator=rf.GradientDescent(6.0), t_max=60.0,
                        records=rf.LogSpaced(5))
    cert = certify(res.trajectory, "log")
    assert cert.status is CertificateStatus.VIOLATED
    assert cert.reason is Reason.NO_SUFFICIENT_DECREASE
    assert cert.alpha_min <= 0 and "step too large" in cert.reason.cause
    assert cert.time_to(1e-9) is None


def test_gd_certificates_flow_into_run_summaries(tmp_path):
    s = run_experiment("logistic", tmp_path / "lg", quick=True,
                       overrides={"datasets": ["iris"]})
    gd = [c for c in s["certificates"] if " GD " in c["label"]]
    assert len(gd) == 2 and all(c["scope"] == "path" and c["discrete"] for c in gd)
    assert all(c["alpha_min"] > 0 and c["status"] == "holds" for c in gd)
    flows = [c for c in s["certificates"] if " flow," in c["label"]]
    assert {c["desingularizer"] for c in flows} == {"cross-entropy", "cross-entropy(scale=0.01)"}
    r = s["datasets"]["iris"]
    assert r["flow_sharp_tightening_at_end"] >= 10
    assert r["flow_bound_final"]["sharp"] * r["flow_sharp_tightening_at_end"] == pytest.approx(
        r["flow_bound_final"]["classical"], rel=1e-9)
    assert json.dumps(s)  # everything serializable
