"""R2 (linear softmax regression): margins, the global KL inequality and the Lambert bound.

Every check compares against an independent reference written here: a hand-computed SVM margin,
an SLSQP primal SVM, a numpy softmax cross-entropy (itself checked against torch autograd) and
an adaptive ODE solution of the gradient flow. Bounds are one-sided with stated slack.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special

from rayleighflow.theorems.logistic import (
    LogisticCertificate,
    SeparationStatus,
    adversarial,
    isolation,
    margin_certificate,
    max_margin_separator,
    normalized_margin,
    sklearn_separable,
    softmax_cross_entropy,
    teacher_student,
)

KL_RTOL = 1e-9  # slack of the global KL inequality check
FLOW_RTOL = 1e-8  # slack of L(W_t) <= bound(t): ODE solved at rtol 1e-10


# --- independent references --------------------------------------------------------------------


def ref_loss_grad(X, y, W, w):
    """Σ w_i CE_i and its gradient, written from scratch (log1p form keeps tiny losses exact)."""
    Z = X @ W
    rows = np.arange(len(y))
    s = Z - Z[rows, y][:, None]  # s_y = 0; CE_i = log Σ_j e^{s_j}
    m = s.max(axis=1, keepdims=True)
    ex = np.exp(s - m)
    # Σ_j e^{s_j − m} = 1 + rest, with the 1 from one argmax entry.
    am = s.argmax(axis=1)
    rest = np.array([np.sum(np.delete(ex[r], am[r])) for r in rows])
    ce = m[:, 0] + np.log1p(rest)
    p = ex / ex.sum(axis=1, keepdims=True)
    g = p.copy()
    g[rows, y] = -(p.sum(axis=1) - p[rows, y])  # p_y − 1 without cancellation
    return float(np.dot(w, ce)), X.T @ (w[:, None] * g)


def ref_primal_margin(X, y, k):
    """Primal multiclass hard-margin SVM by SLSQP from W = 0: ε = 1/‖W‖_F."""
    n, d = X.shape
    pairs = [(i, j) for i in range(n) for j in range(k) if j != y[i]]
    J = np.zeros((len(pairs), d, k))
    for r, (i, j) in enumerate(pairs):
        J[r, :, y[i]] += X[i]
        J[r, :, j] -= X[i]
    J = J.reshape(len(pairs), -1)
    res = optimize.minimize(
        lambda v: 0.5 * v @ v,
        np.zeros(d * k),
        jac=lambda v: v,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda v: J @ v - 1.0, "jac": lambda v: J}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert np.all(J @ res.x >= 1.0 - 1e-8), res.message
    return 1.0 / np.linalg.norm(res.x)


@functools.cache
def _ts_problem():
    X, y = teacher_student(n=30, d=4, k=3, seed=7)
    return X, y, max_margin_separator(X, y, 3)


# --- separator ---------------------------------------------------------------------------------


def test_two_points_margin_by_hand():
    # x_1 = a (class 0), x_2 = −a (class 1): W = [a, −a]/(√2‖a‖), ε = √2‖a‖.
    a = np.array([3.0, 4.0])
    sep = max_margin_separator(np.stack([a, -a]), [0, 1], 2)
    assert sep.status is SeparationStatus.SEPARATED
    assert sep.margin == pytest.approx(5 * math.sqrt(2), rel=1e-10)
    expected = np.stack([a, -a], axis=1) / (5 * math.sqrt(2))
    np.testing.assert_allclose(sep.W, expected, atol=1e-10)
    assert np.linalg.norm(sep.W) == pytest.approx(1.0, rel=1e-14)


def test_binary_margin_is_sqrt2_times_hull_distance():
    # Binary: ε = √2 · dist(0, hull{s_i x_i}); here the hull is a triangle whose nearest
    # point to 0 is (1/2, 1/2), so ε = 1. The third point is not a support vector.
    X = np.array([[1.0, 0.0], [0.0, -1.0], [-2.0, -2.0]])
    sep = max_margin_separator(X, [0, 1, 1], 2)
    assert sep.margin == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_matches_primal_reference(seed):
    X, y = teacher_student(n=12, d=3, k=3, seed=seed)
    sep = max_margin_separator(X, y, 3)
    assert sep.margin == pytest.approx(ref_primal_margin(X, y, 3), rel=1e-6)
    assert sep.margin == pytest.approx(normalized_margin(X, y, sep.W), rel=1e-15)


def test_margin_scales_linearly_with_inputs():
    X, y, sep = _ts_problem()
    for scale in (1e6, 1e-6):
        scaled = max_margin_separator(X * scale, y, 3)
        assert scaled.margin == pytest.approx(sep.margin * scale, rel=1e-7)


@pytest.mark.parametrize("name", ["iris", "wine", "digits01"])
def test_sklearn_datasets_are_separable(name):
    X, y, description = sklearn_separable(name)
    k = int(y.max()) + 1
    assert X.dtype == np.float64 and y.dtype == np.int64 and description
    assert set(np.unique(y)) == set(range(k))
    np.testing.assert_array_equal(X[:, -1], 1.0)
    sep = max_margin_separator(X, y, k)
    assert sep.status is SeparationStatus.SEPARATED and sep.margin > 0.1


def test_non_separable_data_is_refused():
    from sklearn.datasets import load_iris

    iris = load_iris()  # versicolor and virginica overlap: 3-class iris is not separable
    X = np.hstack([iris.data, np.ones((150, 1))])
    sep = max_margin_separator(X, iris.target, 3)
    assert sep.status is SeparationStatus.NOT_SEPARABLE and sep.margin <= 0
    with pytest.raises(ValueError, match="not linearly separable.*bias.*separable"):
        margin_certificate(X, iris.target, 3, loss0=1.0)
    # Without a bias, points on both sides of 0 with one label cannot be separated.
    with pytest.raises(ValueError, match="bias"):
        margin_certificate([[1.0], [-1.0]], [0, 0], 2, loss0=1.0)


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("X", "y", "k", "match"),
    [
        ([[1.0], [2.0]], [0, 2], 2, r"labels must lie in \[0, n_classes\)"),
        ([[1.0], [2.0]], [-1, 0], 2, r"labels must lie"),
        ([[1.0], [2.0]], [0, 1, 1], 2, "mismatched lengths"),
        ([[1.0], [2.0]], [0.5, 1.0], 2, "integer labels"),
        ([[1.0], [np.nan]], [0, 1], 2, "NaN"),
        ([1.0, 2.0], [0, 1], 2, "2-D"),
        ([[1.0], [2.0]], [0, 0], 1, "at least 2"),
    ],
)
def test_bad_data_raises(X, y, k, match):
    with pytest.raises(ValueError, match=match):
        max_margin_separator(X, y, k)
    with pytest.raises(ValueError, match=match):
        margin_certificate(X, y, k, loss0=1.0)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.6], "sum to 1"),
        ([1.0, 0.0], "strictly positive"),
        ([1.5, -0.5], "strictly positive"),
        ([np.nan, 0.5], "finite"),
        ([[0.5, 0.5]], "1-D"),
        ([], "non-empty"),
    ],
)
def test_bad_weights_raise(weights, match):
    with pytest.raises(ValueError, match=match):
        isolation(weights)


def test_isolation_and_certificate_weights():
    assert isolation(np.full(7, 1 / 7)) == pytest.approx(1 / 7, rel=1e-15)
    assert isolation([0.2, 0.3, 0.5]) == 0.2
    X, y, _ = _ts_problem()
    with pytest.raises(ValueError, match="length 30"):
        margin_certificate(X, y, 3, loss0=1.0, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="loss0"):
        margin_certificate(X, y, 3, loss0=0.0)


# --- loss and the global KL inequality ---------------------------------------------------------


def test_reference_loss_matches_torch_and_library():
    torch = pytest.importorskip("torch")
    X, y, _ = _ts_problem()
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(len(y)))
    for W in (rng.standard_normal((4, 3)), 50.0 * rng.standard_normal((4, 3))):
        Wt = torch.tensor(W, requires_grad=True)
        logp = torch.log_softmax(torch.tensor(X) @ Wt, dim=1)
        loss = -(torch.tensor(w) * logp[torch.arange(len(y)), torch.tensor(y)]).sum()
        loss.backward()
        ref_L, ref_g = ref_loss_grad(X, y, W, w)
        assert ref_L == pytest.approx(loss.item(), rel=1e-12)
        np.testing.assert_allclose(ref_g, Wt.grad.numpy(), rtol=1e-9, atol=1e-14)
        lib_L, lib_g = softmax_cross_entropy(X, y, W, w)
        assert lib_L == pytest.approx(ref_L, rel=1e-12)
        np.testing.assert_allclose(lib_g, ref_g, rtol=1e-9, atol=1e-300)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-3.0, 10.0),
    toward=st.floats(-1.0, 1.0),
    uniform=st.booleans(),
)
def test_global_kl_inequality(seed, log_scale, toward, uniform):
    # ‖∇L(W)‖² >= κ²ε²(1 − e^{−L})² for every W: random directions mixed with ±W*, norms
    # from 1e-3 up to 1e10 (logits ~1e10).
    X, y, sep = _ts_problem()
    rng = np.random.default_rng(seed)
    w = np.full(len(y), 1 / len(y)) if uniform else rng.dirichlet(np.ones(len(y)))
    w /= w.sum()
    direction = toward * sep.W + (1 - abs(toward)) * rng.standard_normal(sep.W.shape)
    W = 10.0**log_scale * direction / np.linalg.norm(direction)
    L, g = ref_loss_grad(X, y, W, w)
    cert = margin_certificate(X, y, 3, loss0=1.0, weights=w, separator=sep)
    lower = cert.local_decrease_lower(L)
    assert np.isfinite(L) and np.sum(g * g) >= lower * (1 - KL_RTOL)


# --- the bound along the exact gradient flow ---------------------------------------------------


def test_derived_bound_holds_along_flow_and_slide_form_fails():
    X, y = teacher_student(n=8, d=3, k=3, seed=1)
    X = 2.0 * X
    n = len(y)
    w = np.full(n, 1 / n)
    sep = max_margin_separator(X, y, 3)
    W0 = -2.0 * sep.W / sep.margin  # points away from the separator: loss0 > 4
    L0, _ = ref_loss_grad(X, y, W0, w)
    cert = margin_certificate(X, y, 3, loss0=L0, separator=sep)
    assert cert.bound(0.0) == pytest.approx(L0, rel=1e-12)

    t_fail = cert.slide_failure_time
    times = np.concatenate([[0.0], np.geomspace(1e-3, 10 * t_fail, 120)])
    sol = integrate.solve_ivp(
        lambda t, v: -ref_loss_grad(X, y, v.reshape(3, 3), w)[1].ravel(),
        (0.0, times[-1]),
        W0.ravel(),
        method="DOP853",
        t_eval=times,
        rtol=1e-10,
        atol=1e-12,
    )
    assert sol.success, sol.message
    losses, grad_sq = np.empty(len(times)), np.empty(len(times))
    for i, v in enumerate(sol.y.T):
        losses[i], g = ref_loss_grad(X, y, v.reshape(3, 3), w)
        grad_sq[i] = np.sum(g * g)

    bound = cert.bound(times)
    assert np.all(losses <= bound * (1 + FLOW_RTOL)), np.max(losses / bound)
    assert np.all(grad_sq >= cert.local_decrease_lower(losses) * (1 - KL_RTOL))

    # The slide form: a negative "bound" on a positive loss past (C + 1)/μ.
    slide = cert.slide_bound(times)
    late = times > t_fail
    assert late.any() and np.all(slide[late] < 0) and np.all(losses[late] > 0)
    assert np.all(slide[times < t_fail] >= 0)
    assert cert.first_slide_failure(times) == times[late].min()
    assert cert.first_slide_failure(times[~late]) is None


def test_slide_and_derived_forms_agree_at_large_loss():
    cert = margin_certificate(*teacher_student(n=20, d=3, k=3, seed=3), 3, loss0=60.0)
    # While ω = W0(exp(μt − C)) << 1 (losses from 60 down to ~15) the two agree.
    t = np.linspace(0.0, (cert.C - 15.0) / cert.mu, 50)
    np.testing.assert_allclose(cert.slide_bound(t), cert.bound(t), rtol=1e-6)
    assert np.all(cert.bound(t) > 15.0)
    # And they separate once the loss is O(1).
    t_late = (cert.C + 0.5) / cert.mu
    assert cert.bound(t_late) > 0 and abs(cert.slide_bound(t_late) - cert.bound(t_late)) > 0.1


def test_forms_match_lambert_w_reference():
    # Moderate z = μt − C, where exp(z) and scipy.special.lambertw are safe to use directly.
    cert = LogisticCertificate(margin=0.5, isolation=0.1, C=2.0, mu=0.0025, loss0=2.2)
    t = np.linspace(0.0, 4000.0, 41)
    omega = special.lambertw(np.exp(cert.mu * t - cert.C)).real
    np.testing.assert_allclose(cert.slide_bound(t), np.log(1 / omega), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cert.local_decrease_lower(2.0), 0.0025 * (1 - math.exp(-2)) ** 2)
    assert cert.slide_failure_time == pytest.approx(1200.0)
    assert cert.slide_bound(1200.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="margin"):
        LogisticCertificate(margin=0.0, isolation=0.1, C=2.0, mu=0.0025, loss0=2.2)


def test_bound_is_the_lambert_form_from_loss0():
    cert = margin_certificate(*teacher_student(n=20, d=3, k=3, seed=4), 3, loss0=3.0)
    t = np.linspace(0.0, 50.0 / cert.mu, 41)
    omega = special.lambertw(np.exp(cert.mu * t - cert.C)).real
    np.testing.assert_allclose(cert.bound(t), np.log(1 + 1 / omega), rtol=1e-10)
    c_ref = math.log(math.expm1(3.0)) - 1 / math.expm1(3.0)
    assert cert.C == pytest.approx(c_ref, rel=1e-14)
    assert cert.mu == pytest.approx((cert.isolation * cert.margin) ** 2, rel=1e-15)
    assert cert.isolation == pytest.approx(1 / 20, rel=1e-15)


# --- adversarial scale -------------------------------------------------------------------------


def test_adversarial_problem_has_finite_certificate():
    prob = adversarial(seed=0)
    assert prob.X.dtype == np.float64 and prob.y.dtype == np.int64
    assert np.linalg.norm(prob.W0) == pytest.approx(1e5, rel=1e-12)
    n = len(prob.y)
    L0, _ = ref_loss_grad(prob.X, prob.y, prob.W0, np.full(n, 1 / n))
    assert L0 >= 1e9
    assert softmax_cross_entropy(prob.X, prob.y, prob.W0)[0] == pytest.approx(L0, rel=1e-12)
    cert = margin_certificate(prob.X, prob.y, 4, loss0=L0)
    assert cert.margin > 1e4  # inputs ~1e6
    assert all(np.isfinite(v) for v in (cert.margin, cert.isolation, cert.C, cert.mu))
    t = np.concatenate([[0.0], np.geomspace(1e-6, 1e12, 400)])
    b = cert.bound(t)
    assert np.all(np.isfinite(b)) and np.all(b > 0) and np.all(np.diff(b) <= 0)
    assert b[0] == pytest.approx(L0, rel=1e-12)
    assert np.all(np.isfinite(cert.slide_bound(t)))


def test_generators_are_deterministic():
    a, b = teacher_student(seed=5), teacher_student(seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = teacher_student(seed=np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], c[0])
    assert a[0].shape == (100, 5) and a[1].shape == (100,) and a[1].max() < 4
    p, q = adversarial(seed=2), adversarial(seed=2)
    np.testing.assert_array_equal(p.W0, q.W0)
    np.testing.assert_array_equal(p.X, q.X)
