"""Losses: closed-form functional gradients vs autograd, stability, functional KL facts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayleighflow._types import Convention
from rayleighflow.desingularizers import get_desingularizer
from rayleighflow.losses import BinaryLogistic, SoftmaxCrossEntropy, SquareLoss, get_loss


def _targets(loss, n, k, g):
    if loss.name == "square":
        return torch.randn(n, k, generator=g, dtype=torch.float64)
    return torch.randint(0, 2 if loss.name == "logistic" else k, (n,), generator=g)


@pytest.mark.parametrize("loss", [SquareLoss(), SoftmaxCrossEntropy(), BinaryLogistic()])
def test_functional_grad_matches_autograd(loss):
    g = torch.Generator().manual_seed(0)
    k = 1 if loss.name == "logistic" else 3
    f = torch.randn(6, k, generator=g, dtype=torch.float64, requires_grad=True)
    y = loss.check_targets(f.detach(), _targets(loss, 6, k, g))
    (auto,) = torch.autograd.grad(loss.per_sample(f, y).sum(), f)
    assert torch.allclose(loss.functional_grad(f.detach(), y), auto, rtol=1e-12, atol=1e-14)


def test_cross_entropy_is_stable_for_huge_logits():
    f = torch.tensor([[1e10, -1e10, 0.0], [-1e10, 1e10, 3.0]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    ce = SoftmaxCrossEntropy()
    vals = ce.per_sample(f, y)
    assert torch.isfinite(vals).all()
    assert vals[0] == pytest.approx(2e10) and vals[1] == 0.0
    assert torch.isfinite(ce.functional_grad(f, y)).all()
    lg = BinaryLogistic()
    vals = lg.per_sample(torch.tensor([[1e10], [-1e10]], dtype=torch.float64), torch.tensor([0, 0]))
    assert vals[0] == pytest.approx(1e10) and vals[1] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 20),
    k=st.integers(2, 5),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
    convention=st.sampled_from(["mean", "sum"]),
    uniform=st.booleans(),
    name=st.sampled_from(["square", "cross-entropy", "logistic"]),
)
def test_functional_kl_inequality_holds(seed, n, k, scale, convention, uniform, name):
    """φ'(ℓ) ‖∇ℓ‖² ≥ c for random outputs, weights and both conventions (rtol 1e-9)."""
    loss = get_loss(name)
    k = 1 if name == "logistic" else k
    g = torch.Generator().manual_seed(seed)
    f = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = loss.check_targets(f, _targets(loss, n, k, g))
    w = torch.rand(n, generator=g).double() + 0.05
    if uniform:
        w = torch.ones(n, dtype=torch.float64)
    w = w / w.sum()
    conv = Convention(convention)
    omega = w * n if conv is Convention.SUM else w
    value = float(loss.value(f, y, omega))
    if value <= 1e-150:
        return  # ‖∇ℓ‖² ~ ℓ² underflows float64 below this: nothing left to compare
    gf = loss.functional_grad(f, y)
    fgrad_sq = float((omega * (gf * gf).sum(-1)).sum())
    fkl = loss.functional_kl(w, conv, n_classes=k)
    phi = get_desingularizer(fkl.desingularizer)
    assert float(phi.kl_ratio(np.float64(value), fgrad_sq)) >= fkl.c * (1 - 1e-9)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*square"):
        get_loss("hinge")


def test_cross_entropy_keeps_relative_precision_for_tiny_losses():
    ce = SoftmaxCrossEntropy()
    for gap in (20.0, 40.0, 300.0):
        f = torch.tensor([[gap, 0.0, 0.0]], dtype=torch.float64)
        y = torch.tensor([0])
        exact = np.log1p(2 * np.exp(-gap))  # log(1 + 2e^{−gap})
        assert float(ce.per_sample(f, y)[0]) == pytest.approx(exact, rel=1e-14)
        g = ce.functional_grad(f, y)
        assert float(g[0, 0]) == pytest.approx(-2 * np.exp(-gap) / (1 + 2 * np.exp(-gap)),
                                               rel=1e-14)
