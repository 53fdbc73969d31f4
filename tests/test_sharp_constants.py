"""Sharp functional KL constants (CERTIFICATES.md §4) and the sharp logistic bound (§5): each
holds on random outputs and is attained in the limit the proof names."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rayleighflow as rf
from rayleighflow import Convention, Dataset, Model, Problem, certify, gradient_flow
from rayleighflow.certificate import CertificateStatus
from rayleighflow.desingularizers import CrossEntropy
from rayleighflow.losses import BinaryLogistic, SoftmaxCrossEntropy
from rayleighflow.theorems.logistic import margin_certificate, teacher_student


def _ratio(loss, f, y, w, conv):
    omega = w * w.numel() if conv is Convention.SUM else w
    value = float(loss.value(f, y, omega))
    g = loss.functional_grad(f, y)
    fgrad = float((omega * (g * g).sum(-1)).sum())
    return float(CrossEntropy().kl_ratio(value, fgrad)), value


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), k=st.integers(2, 6),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]), conv=st.sampled_from(["mean", "sum"]),
       uniform=st.booleans(), binary=st.booleans())
def test_sharp_constant_holds(seed, n, k, scale, conv, uniform, binary):
    g = torch.Generator().manual_seed(seed)
    loss = BinaryLogistic() if binary else SoftmaxCrossEntropy()
    k = 1 if binary else k
    f = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2 if binary else k, (n,), generator=g)
    w = torch.ones(n, dtype=torch.float64) if uniform else torch.rand(n, generator=g).double() + .05
    w = w / w.sum()
    c = loss.functional_kl(w, Convention(conv), n_classes=k).c
    ratio, value = _ratio(loss, f, y.long(), w, Convention(conv))
    if value <= 1e-150:
        return  # ‖∇ℓ‖² ~ ℓ² underflows
    assert ratio >= c * (1 - 1e-9)


def _one_carries_the_loss(n, k, gap, big, j):
    """Sample j has loss `big` with equal wrong-class probabilities; the others ≈ 0 loss."""
    f = torch.zeros(n, k, dtype=torch.float64)
    f[:, 0] = gap                   # class 0 wins by `gap` everywhere ...
    y = torch.zeros(n, dtype=torch.long)
    y[j] = 1                        # ... except sample j, whose label is a losing class
    f[j] = 0.0
    f[j, 1] = -big                  # true-class logit far below the k − 1 equal others
    return f, y


@pytest.mark.parametrize("k", [2, 3, 10])
def test_mean_constant_is_attained_when_one_sample_carries_the_loss(k):
    n = 7
    w = torch.tensor([0.05, 0.2, 0.15, 0.2, 0.1, 0.15, 0.15], dtype=torch.float64)
    j = 0
    f, y = _one_carries_the_loss(n, k, 60.0, 400.0, j)
    loss = SoftmaxCrossEntropy()
    c = loss.functional_kl(w, Convention.MEAN, n_classes=k).c
    assert c == pytest.approx(0.05 * k / (k - 1))
    ratio, _ = _ratio(loss, f, y, w, Convention.MEAN)
    assert ratio >= c * (1 - 1e-12) and ratio == pytest.approx(c, rel=1e-6)


def test_sum_constant_is_attained_for_small_equal_losses():
    n, k = 9, 4
    w = torch.full((n,), 1 / n, dtype=torch.float64)
    loss = SoftmaxCrossEntropy()
    c = loss.functional_kl(w, Convention.SUM, n_classes=k).c
    assert c == pytest.approx(k / ((k - 1) * n))
    f = torch.zeros(n, k, dtype=torch.float64)
    f[:, 0] = 40.0  # every sample right by the same large margin: equal tiny losses
    y = torch.zeros(n, dtype=torch.long)
    ratio, _ = _ratio(loss, f, y, w, Convention.SUM)
    assert ratio >= c * (1 - 1e-12) and ratio == pytest.approx(c, rel=1e-6)


def test_binary_logistic_constant_is_kappa_and_attained():
    w = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    loss = BinaryLogistic()
    c = loss.functional_kl(w, Convention.MEAN).c
    assert c == pytest.approx(0.1)
    f = torch.tensor([[-300.0], [50.0], [50.0]], dtype=torch.float64)
    y = torch.ones(3, dtype=torch.long)
    ratio, _ = _ratio(loss, f, y, w, Convention.MEAN)
    assert ratio >= c * (1 - 1e-12) and ratio == pytest.approx(c, rel=1e-6)


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_sharp_logistic_certificate_holds_and_is_tighter(convention):
    x, y = teacher_student(40, 3, 3, seed=2)
    data = Dataset.from_arrays(x, y)
    w0 = torch.as_tensor(np.random.default_rng(0).standard_normal((3, 3)))
    problem = Problem(Model(lambda p, x: x @ p["W"], {"W": w0}), data, "cross-entropy",
                      convention)
    loss0 = float(problem.loss_value(problem.params, data))
    cert = margin_certificate(x, y, 3, loss0, convention=convention)
    if convention == "sum":
        assert cert.mu == pytest.approx(cert.margin**2)  # uniform weights: μ = ε²
    res = gradient_flow(problem, integrator=rf.Dopri5(rtol=1e-6, atol=1e-9), t_max=1e6,
                        records=rf.LogSpaced(20))
    src = "theory"
    for phi in (cert.desingularizer(), cert.sharp_desingularizer()):
        c = certify(res.trajectory, phi, cert.mu, mu_source=src)
        assert c.status is CertificateStatus.HOLDS, c.describe()
    t = res.trajectory.t
    assert np.all(cert.sharp_bound(t) <= cert.bound(t) * (1 + 1e-12))
    assert np.all(res.trajectory["loss"] <= cert.best_bound(t) * (1 + 1e-6))
    if convention == "mean":
        assert cert.bound(t[-1]) / cert.sharp_bound(t[-1]) > 10
