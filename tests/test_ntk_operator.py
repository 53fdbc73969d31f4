"""Kernel operator: products equal the materialized kernel; SciPy export; per-group operators."""

import importlib.util

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from cases import CASES, assert_close, inputs
from rayleighflow.data import Dataset
from rayleighflow.ntk import NTKOperator, contrast_report, empirical_ntk, kernel_matrix
from rayleighflow.problem import Problem

# nn.MultiheadAttention (the "attention" case) warns from inside torch about vmap fallbacks.
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]



def _weights(n: int, seed: int = 0) -> torch.Tensor:
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.2
    return w / w.sum()


@pytest.mark.parametrize("convention", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "tokens_layernorm", "attention",
                                  "callable"])
def test_symmetric_products_equal_the_materialized_kernel(name, convention):
    case = CASES[name]
    model, x, w = case.build(), inputs(case, 7), _weights(7)
    m = kernel_matrix(empirical_ntk(model, x, weights1=w, convention=convention))
    op = NTKOperator(model, x, weights=w, convention=convention, batch_size=3)
    v = torch.randn(m.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(op.matvec(v), m @ v, what="M v")


def test_l2_operator_is_self_adjoint_in_the_weighted_inner_product():
    case = CASES["mlp_relu"]
    model, x, w = case.build(), inputs(case, 6), _weights(6, 3)
    op = NTKOperator(model, x, weights=w)
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))

    def inner(a, b):
        return float((w[:, None] * a * b).sum())

    Ku, Kv = op.weighted_matvec(u), op.weighted_matvec(v)
    assert inner(u, Kv) == pytest.approx(inner(Ku, v), rel=1e-12)
    blocks = empirical_ntk(model, x, convention="sum")  # raw J_i J_jᵀ
    want = torch.einsum("ijab,j,jb->ia", blocks, w, v)
    assert_close(op.weighted_matvec(v), want, what="(K v)_i = Σ_j w_j K_ij v_j")
    assert op.n_products == 3


def test_linear_operator_export_gives_extreme_eigenvalues():
    case = CASES["cnn"]
    model, x = case.build(), inputs(case, 12)
    lam = torch.linalg.eigvalsh(kernel_matrix(empirical_ntk(model, x)))
    lo = NTKOperator(model, x).as_linear_operator()
    assert lo.shape == (36, 36) and lo.dtype == np.float64
    top = eigsh(lo, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), lam[-2:].numpy(), rtol=1e-9)


def test_group_operators_sum_to_the_full_operator():
    case = CASES["tokens_layernorm"]
    model, x = case.build(), inputs(case, 5)
    v = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = NTKOperator(model, x).matvec(v)
    parts = sum(NTKOperator(model, x, param_names=names).matvec(v)
                for names in model.groups.values())
    assert_close(parts, full, what="Σ_b K_b v")


@pytest.mark.parametrize("convention", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["square", "cross-entropy"])
def test_rayleigh_quotient_matches_kernel_and_one_backward_measure(loss, convention):
    case = CASES["mlp_tanh"]
    model, x, w = case.build(), inputs(case, 8), _weights(8, 5)
    g = torch.Generator().manual_seed(6)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64) if loss == "square" else \
        torch.randint(0, 3, (8,), generator=g)
    data = Dataset.from_arrays(x, y, w)
    problem = Problem(model, data, loss, convention)
    rep = contrast_report(problem)
    with torch.no_grad():
        f = model(model.params, x)
    fg = problem.loss.functional_grad(f, problem.targets(data, f))
    omega = problem.omega(data)
    root = omega.sqrt()[:, None]
    m = kernel_matrix(empirical_ntk(model, x, weights1=w, convention=convention))
    u = (root * fg).reshape(-1)  # ⟨g, K g⟩_ω / ‖g‖²_ω = uᵀ M u / uᵀ u with u = Ω^{1/2} g
    assert rep.rayleigh == pytest.approx(float(u @ m @ u / (u @ u)), rel=1e-10)
    assert rep.lambda_min - 1e-12 <= rep.rayleigh <= rep.lambda_max * (1 + 1e-12)
    if importlib.util.find_spec("rayleighflow.rayleigh") is not None:
        from rayleighflow.rayleigh import measure

        assert rep.rayleigh == pytest.approx(measure(problem).rayleigh, rel=1e-10)


def test_operator_tags_describe_matvec_and_gate_the_eigensolver():
    from rayleighflow.ntk import KernelOperator, extreme_eigenpairs

    case = CASES["mlp_relu"]
    model, x = case.build(), inputs(case, 5)
    w = _weights(5, 4)
    op = NTKOperator(model, x, weights=w)
    assert isinstance(op, KernelOperator) and op.is_symmetric and op.is_psd
    n = op.shape[0]
    M = torch.stack([op.matvec(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    assert_close(M, M.T, what="matvec is symmetric (tag is_symmetric)")
    assert float(torch.linalg.eigvalsh(M)[0]) >= -1e-10 * float(M.diagonal().max())
    # the L²(D) operator K = GΩ is not a symmetric matrix under non-uniform weights
    K = torch.stack([op.weighted_matvec(e.reshape(op.n, op.k)).reshape(-1)
                     for e in torch.eye(n, dtype=torch.float64)], dim=1)
    assert not torch.allclose(K, K.T)

    class Weighted:  # K = GΩ behind the protocol, honestly tagged
        is_symmetric, is_psd = False, True
        shape = op.shape

        def matvec(self, v):
            return op.weighted_matvec(v.reshape(op.n, op.k)).reshape(-1)

        def as_linear_operator(self):
            return op.as_linear_operator()

    assert isinstance(Weighted(), KernelOperator)
    with pytest.raises(ValueError, match="is_symmetric=False"):
        extreme_eigenpairs(Weighted())
    with pytest.raises(TypeError, match="LinearOperator"):
        extreme_eigenpairs(M.numpy())
