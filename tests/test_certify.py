"""Certificates: KL checks, composition, and the certified bound never below the loss."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rayleighflow as rf
from rayleighflow.certify import CertificateStatus, certify, kl_ratios
from rayleighflow.composition import compose
from rayleighflow.data import Dataset
from rayleighflow.flow import gradient_flow
from rayleighflow.problem import Model, Problem


def _mlp_problem(seed, n, width, loss, depth=1, activation=nn.Tanh):
    torch.manual_seed(seed)
    d, k = 3, 2
    layers, last = [], d
    for _ in range(depth):
        layers += [nn.Linear(last, width), activation()]
        last = width
    net = nn.Sequential(*layers, nn.Linear(last, k)).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, k, dtype=torch.float64) if loss == "square" else torch.randint(0, k, (n,))
    return Problem(Model(net), Dataset.from_arrays(x, y), loss)


@pytest.fixture(scope="module")
def square_run():
    pb = _mlp_problem(0, 12, 32, "square")
    return pb, gradient_flow(pb, t_max=200.0, records=rf.LogSpaced(80))


def test_observed_certificate_holds_and_is_tight(square_run):
    pb, res = square_run
    cert = certify(res.trajectory, "log")
    assert cert.status is CertificateStatus.HOLDS
    ratios = kl_ratios(res.trajectory, "log")
    ev = res.trajectory.evaluations  # μ* is the minimum over every gradient evaluation too
    inside = ev["t"] <= res.trajectory.t[-1]  # not the last step's stages past t_max
    assert cert.mu == pytest.approx(
        min(np.nanmin(ratios), np.min(ev["grad_sq"][inside] / ev["loss"][inside])))
    assert cert.n_grad_evals == int(inside.sum()) and inside.sum() > 0.9 * res.n_grad_evals
    assert cert.max_bound_violation <= 0
    # L0 e^{-μ t} by hand.
    t, loss = res.trajectory.t, res.trajectory["loss"]
    assert np.allclose(cert.bound, loss[0] * np.exp(-cert.mu * (t - t[0])), rtol=1e-12)


def test_stated_mu_reports_first_violation(square_run):
    _, res = square_run
    ratios = kl_ratios(res.trajectory, "log")
    mu = float(np.nanmedian(ratios))
    cert = certify(res.trajectory, "log", mu=mu)
    assert cert.status is CertificateStatus.VIOLATED
    first = int(np.flatnonzero(ratios < mu)[0])
    assert cert.first_violation[0] == pytest.approx(res.trajectory.t[first])
    ok = certify(res.trajectory, "log", mu=0.5 * float(np.nanmin(ratios)))
    assert ok.status is CertificateStatus.HOLDS


def test_composition_square_loss_c_times_rayleigh(square_run):
    pb, res = square_run
    cert = compose(res.trajectory, pb.loss.functional_kl(pb.data.weights, pb.convention))
    ev = res.trajectory.evaluations  # R is known at every gradient evaluation too
    r_min = min(float(np.nanmin(res.trajectory["rayleigh"])),
                float(np.min(ev["grad_sq"] / ev["fgrad_sq"])))
    assert cert.mu == pytest.approx(2.0 * r_min)
    assert cert.status is CertificateStatus.HOLDS, cert.assumptions
    # The composed constant is a valid, weaker, KL constant: c·R_min ≤ μ*.
    assert cert.mu <= certify(res.trajectory, "log").mu * (1 + 1e-9)
    assert all(a.holds for a in cert.assumptions)


def test_composition_user_rayleigh_lower_bound_checked(square_run):
    pb, res = square_run
    fkl = pb.loss.functional_kl(pb.data.weights, pb.convention)
    too_big = 10 * float(np.nanmax(res.trajectory["rayleigh"]))
    cert = compose(res.trajectory, fkl, rayleigh_lower=too_big)
    assert cert.status is CertificateStatus.VIOLATED
    assert not cert.assumptions[1].holds


def test_time_to_target_is_consistent_with_bound(square_run):
    _, res = square_run
    cert = certify(res.trajectory, "log")
    target = float(res.trajectory["loss"][0]) * 1e-3
    t_hit = cert.time_to(target)
    exact = math.log(1e3) / cert.mu
    assert cert.forecast_time_to(target) == pytest.approx(exact, rel=1e-12)
    if exact <= cert.horizon:
        assert t_hit == pytest.approx(exact, rel=1e-12)
    else:  # beyond the last record nothing is certified
        assert t_hit is None


def test_cross_entropy_functional_kl_holds_on_records():
    pb = _mlp_problem(1, 10, 16, "cross-entropy")
    res = gradient_flow(pb, t_max=300.0, records=rf.LogSpaced(40))
    fkl = pb.loss.functional_kl(pb.data.weights, pb.convention, n_classes=2)
    assert fkl.c == pytest.approx(0.1 * 2)  # κ·k/(k−1), κ = 1/n
    cert = compose(res.trajectory, fkl)
    assert cert.assumptions[0].holds and cert.status is CertificateStatus.HOLDS


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_impossible_mu_rejected(square_run, bad):
    _, res = square_run
    with pytest.raises(ValueError, match="mu must be"):
        certify(res.trajectory, "log", mu=bad)


def test_unknown_desingularizer_rejected(square_run):
    _, res = square_run
    with pytest.raises(ValueError, match="unknown|allowed|choose"):
        certify(res.trajectory, "quadratic")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 12),
    width=st.sampled_from([2, 4, 16]),
    depth=st.integers(1, 2),
    loss=st.sampled_from(["square", "cross-entropy"]),
    desing=st.sampled_from(["log", "reciprocal", "power:1.5", "power:0.5", "cross-entropy"]),
)
def test_observed_bound_never_below_loss(seed, n, width, depth, loss, desing):
    """On random problems the μ*-certified bound stays above the recorded loss (rtol 1e-6)."""
    pb = _mlp_problem(seed, n, width, loss, depth=depth)
    res = gradient_flow(pb, integrator=rf.Dopri5(rtol=1e-9, atol=1e-12), t_max=20.0,
                        records=rf.LogSpaced(50))
    cert = certify(res.trajectory, desing, rtol=1e-6, atol=1e-12)
    if cert.status is CertificateStatus.UNAVAILABLE:
        assert not cert.mu_star > 0
        return
    loss_rec = res.trajectory["loss"]
    assert np.all(loss_rec <= cert.bound * (1 + 1e-6) + 1e-12), cert.max_bound_violation


def _traj(loss, grad_sq, **cols):
    from rayleighflow.trajectory import Trajectory

    traj = Trajectory({"convention": "mean"})
    for i, (lv, gv) in enumerate(zip(loss, grad_sq, strict=True)):
        traj.append({"t": float(i), "loss": lv, "grad_sq": gv,
                     **{k: v[i] for k, v in cols.items()}})
    return traj


def test_zero_gradient_at_positive_loss_is_not_skipped():
    # ∞·0 must not turn into a skipped record: no μ > 0 holds there.
    traj = _traj([1.0, 0.5, 1e-200], [1.0, 0.5, 0.0])
    assert kl_ratios(traj, "reciprocal")[-1] == 0.0
    assert certify(traj, "reciprocal").status is CertificateStatus.UNAVAILABLE
    assert certify(traj, "log", mu=0.1).status is CertificateStatus.VIOLATED


def test_non_finite_records_fail_the_certificate():
    traj = _traj([1.0, 0.5, float("nan"), 0.1], [1.0, 0.5, float("nan"), 0.1])
    cert = certify(traj, "log")
    assert cert.status is CertificateStatus.VIOLATED
    assert cert.reason.code == "non_finite"
    assert not next(a for a in cert.assumptions if a.name == "every checked point finite").holds


def test_spectral_certificate_needs_a_known_threshold():
    from rayleighflow.composition import spectral
    from rayleighflow.losses import FunctionalKL

    traj = _traj([1.0, 0.5], [2.0, 1.0], lambda_min=[1e-30, 1e-30],
                 rank_threshold=[float("nan"), float("nan")], rayleigh=[1.0, 1.0],
                 fgrad_sq=[2.0, 1.0], spectrum_samples=[4.0, 4.0])
    traj.meta["eval_size"] = 4
    cert = spectral(traj, FunctionalKL("log", 2.0, "mean", "test"))
    assert cert.status is CertificateStatus.UNAVAILABLE
    assert cert.reason.code == "kernel_not_definite"
