"""Spectra and rank in float64: dense, dual (JᵀΩJ) and Lanczos/LOBPCG routes agree."""

import numpy as np
import pytest
import torch
from torch import nn

from cases import CASES, inputs
from rayleighflow.data import Dataset
from rayleighflow.ntk import (
    NTKOperator,
    contrast_report,
    dual_gram,
    empirical_ntk,
    extreme_eigenpairs,
    kernel_matrix,
    kernel_spectrum,
    ntk_spectrum,
)
from rayleighflow.problem import Model
from rayleighflow.reference import dense_jacobian


def _small_net() -> Model:
    torch.manual_seed(0)  # P = 3·3 + 3 + 3·2 + 2 = 20
    return Model(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double())


def _x(n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rank_at_most_p_on_an_under_parameterized_model():
    model, x = _small_net(), _x(25)  # nk = 50 > P = 20
    s = ntk_spectrum(model, x, route="dense")
    assert s.size == 50 and s.n_params == 20
    assert s.rank <= 20
    assert s.rank == 20  # generic weights: J has full column rank
    assert s.eigenvalues.shape == (50,)
    assert abs(s.lambda_min) <= s.threshold
    assert s.lambda_min_nonzero > s.threshold
    assert s.rtol == pytest.approx(50 * np.finfo(np.float64).eps)
    assert s.threshold == pytest.approx(s.rtol * s.lambda_max)


def test_rank_counts_a_structurally_deficient_jacobian():
    # f = v · tanh(w · x) with a zero output weight: the hidden layer gets no gradient,
    # so rank J = #nonzero columns' span, strictly below min(nk, P).
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        net[2].weight[0, :2] = 0.0  # two dead hidden units: their 6 input parameters vanish
    s = ntk_spectrum(net, _x(30, 2), route="dense")
    p = sum(p.numel() for p in net.parameters())
    assert s.rank == p - 6


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_dense_dual_and_lanczos_routes_agree(convention):
    model, x = _small_net(), _x(25)
    w = torch.rand(25, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    w /= w.sum()
    dense = ntk_spectrum(model, x, weights=w, convention=convention, route="dense")
    dual = ntk_spectrum(model, x, weights=w, convention=convention, route="dual")
    lanc = ntk_spectrum(model, x, weights=w, convention=convention, route="lanczos")
    auto = ntk_spectrum(model, x, weights=w, convention=convention)
    assert auto.method == "dual"
    assert dual.rank == dense.rank and dual.lambda_min == 0.0
    np.testing.assert_allclose(dual.eigenvalues[-20:], dense.eigenvalues[-20:], rtol=1e-9,
                               atol=1e-12 * dense.lambda_max)
    assert dual.lambda_min_nonzero == pytest.approx(dense.lambda_min_nonzero, rel=1e-8)
    assert lanc.lambda_max == pytest.approx(dense.lambda_max, rel=1e-10)
    assert lanc.rank is None and lanc.lambda_min == 0.0


def test_dual_gram_is_jt_omega_j():
    model, x = _small_net(), _x(6)
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    jac = dense_jacobian(model, model.params, x)  # (n, k, P)
    want = torch.einsum("i,icp,icq->pq", w, jac, jac)
    got = dual_gram(model, x, max_memory=10_000)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_lobpcg_and_lanczos_smallest_on_a_full_rank_kernel():
    case = CASES["mlp_tanh"]  # P = 83 > nk = 12: K is generically definite
    model, x = case.build(), inputs(case, 4)
    lam = torch.linalg.eigvalsh(kernel_matrix(empirical_ntk(model, x))).numpy()
    op = NTKOperator(model, x)
    for method in ("lanczos", "lobpcg"):
        vals, vecs = extreme_eigenpairs(op, 1, which="smallest", method=method, tol=1e-10)
        assert vals[0] == pytest.approx(lam[0], rel=1e-6)
        assert vecs.shape == (12, 1)
    vals, _ = extreme_eigenpairs(op, 2, which="largest")
    np.testing.assert_allclose(vals, lam[-2:], rtol=1e-9)
    s = ntk_spectrum(model, x, route="lanczos")
    assert s.lambda_min == pytest.approx(lam[0], rel=1e-5)


def test_kernel_spectrum_accepts_blocks_and_reports_threshold():
    model, x = _small_net(), _x(12)
    blocks = empirical_ntk(model, x)
    s1, s2 = kernel_spectrum(blocks, n_params=20), kernel_spectrum(kernel_matrix(blocks))
    np.testing.assert_array_equal(s1.eigenvalues, s2.eigenvalues)
    assert s1.rtol == pytest.approx(24 * np.finfo(np.float64).eps)
    s3 = kernel_spectrum(kernel_matrix(blocks), rtol=1e-3, eigenvectors=True)
    assert s3.threshold == pytest.approx(1e-3 * s3.lambda_max)
    assert s3.eigenvectors.shape == (24, 24)
    f32 = kernel_spectrum(kernel_matrix(blocks).float())
    assert f32.rtol == pytest.approx(24 * np.finfo(np.float32).eps)


def test_contrast_report_shows_zero_lambda_min_and_positive_rayleigh():
    model, x = _small_net(), _x(40)
    y = torch.sin(x[:, :2])
    rep = contrast_report(model, Dataset.from_arrays(x, y), loss="square")
    assert rep.n_params == 20 and rep.nk == 80 and rep.rank_deficient
    assert rep.rank == 20 and rep.lambda_min == 0.0
    assert rep.rayleigh > rep.lambda_min_nonzero > 0
    assert rep.convention.value == "mean" and rep.method == "dual"
    text = str(rep)
    assert "R(K; ∇ℓ)" in text and "rank" in text
    dense = contrast_report(model, Dataset.from_arrays(x, y), loss="square", route="dense")
    assert dense.rank == 20 and dense.rayleigh == pytest.approx(rep.rayleigh, rel=1e-12)
    assert dense.lambda_max == pytest.approx(rep.lambda_max, rel=1e-10)
