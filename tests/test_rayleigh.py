"""R(K; ∇ℓ) from one backward pass against the dense Gram-matrix quotient (float64, 1e-10)."""

import pytest
import torch
from torch import nn

from rayleighflow.data import Dataset
from rayleighflow.problem import Model, Problem
from rayleighflow.rayleigh import loss_and_grad, measure, witness_bound
from rayleighflow.reference import dense_jacobian, dense_rayleigh


def _mlp():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        x = x.view(-1, 1, 6, 6)
        return self.fc(torch.relu(nn.functional.max_pool2d(self.conv(x), 2)).flatten(1))


MODELS = {
    "mlp": (_mlp, 3),
    "cnn": (_SmallCNN, 36),
    "linear": (lambda: nn.Linear(4, 3, bias=False), 4),
}


def _problem(model_name, loss, convention, n=7, weights=None, seed=0):
    torch.manual_seed(seed)
    factory, d = MODELS[model_name]
    module = factory().double()
    x = torch.randn(n, d, dtype=torch.float64)
    if loss == "square":
        y = torch.randn(n, 3, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (n,))
    return Problem(Model(module), Dataset.from_arrays(x, y, weights), loss, convention)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss", ["square", "cross-entropy"])
@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_one_backward_quotient_matches_gram(model_name, loss, convention):
    pb = _problem(model_name, loss, convention)
    m = measure(pb)
    _, _, _, g = loss_and_grad(pb, pb.params, pb.data)
    ref = float(dense_rayleigh(pb.model, pb.params, pb.data.x, g, pb.omega(pb.data)))
    assert m.rayleigh == pytest.approx(ref, rel=1e-10)
    assert sum(m.group_rayleigh.values()) == pytest.approx(m.rayleigh, rel=1e-12)
    assert m.grad_sq == pytest.approx(m.rayleigh * m.fgrad_sq, rel=1e-12)


def test_sum_convention_is_n_times_mean():
    mean = measure(_problem("mlp", "square", "mean"))
    total = measure(_problem("mlp", "square", "sum"))
    assert total.rayleigh == pytest.approx(7 * mean.rayleigh, rel=1e-12)
    assert total.loss == pytest.approx(7 * mean.loss, rel=1e-12)


def test_nonuniform_weights_match_gram():
    w = torch.rand(7, dtype=torch.float64) + 0.1
    pb = _problem("mlp", "cross-entropy", "mean", weights=w / w.sum())
    _, _, _, g = loss_and_grad(pb, pb.params, pb.data)
    ref = float(dense_rayleigh(pb.model, pb.params, pb.data.x, g, pb.omega(pb.data)))
    assert measure(pb).rayleigh == pytest.approx(ref, rel=1e-10)


def test_group_quotients_are_per_block_grams():
    pb = _problem("mlp", "square", "mean")
    m = measure(pb)
    _, _, _, g = loss_and_grad(pb, pb.params, pb.data)
    jac = dense_jacobian(pb.model, pb.params, pb.data.x)
    omega = pb.omega(pb.data)
    sizes = [p.numel() for p in pb.params.values()]
    blocks = dict(zip(pb.params, torch.split(jac, sizes, dim=-1), strict=True))
    for group, names in pb.model.groups.items():
        jb = torch.cat([blocks[n] for n in names], dim=-1)
        jstar_u = torch.einsum("i,ikp,ik->p", omega, jb, g)
        ref = float(jstar_u @ jstar_u / (omega * (g * g).sum(-1)).sum())
        assert m.group_rayleigh[group] == pytest.approx(ref, rel=1e-10)


def test_witness_bound_is_below_quotient_and_tight_along_gradient():
    pb = _problem("mlp", "square", "mean")
    m = measure(pb)
    v = {k: torch.randn_like(p) for k, p in pb.params.items()}
    assert witness_bound(pb, v) <= m.rayleigh * (1 + 1e-12)
    # v = ∇L = J*∇ℓ attains ⟨g, J J* g⟩² / (‖g‖² ‖J* g‖²) = R exactly.
    _, grad, _, _ = loss_and_grad(pb, pb.params, pb.data)
    assert witness_bound(pb, grad) == pytest.approx(m.rayleigh, rel=1e-10)


def test_homogeneous_witness_t5():
    # Bias-free linear model is 1-homogeneous: J_θ θ = f_θ (T5).
    pb = _problem("linear", "square", "mean")
    _, _, f, g = loss_and_grad(pb, pb.params, pb.data)
    omega = pb.omega(pb.data)
    theta_sq = sum((p * p).sum() for p in pb.params.values())
    t5 = float((omega * (g * f).sum(-1)).sum() ** 2 / ((omega * (g * g).sum(-1)).sum() * theta_sq))
    assert witness_bound(pb, pb.params) == pytest.approx(t5, rel=1e-10)
