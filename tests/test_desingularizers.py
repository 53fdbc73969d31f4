"""Tests for rayleighflow.desingularizers (THEORY.md section 3).

Tolerance policy (float64): round trips phi^{-1}(phi(u)) = u to rtol 1e-12; phi' against
central finite differences (relative step 1e-6) to rtol 1e-6; closed-form bounds to rtol 1e-12;
bounds against an ODE solve of dL/dt = -mu/phi'(L) (the KL equality case) to rtol 1e-6.
"""

import contextlib
import doctest
import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from rayleighflow import desingularizers as mod
from rayleighflow.certify import rank_desingularizers
from rayleighflow.desingularizers import (
    CrossEntropy,
    Custom,
    Desingularizer,
    Log,
    Power,
    Reciprocal,
    get_desingularizer,
)
from rayleighflow.trajectory import Trajectory

BUILTINS = [
    Log(),
    Reciprocal(),
    Power(0.25),
    Power(0.5),
    Power(1.5),
    Power(2.0),
    Power(3.0),
    CrossEntropy(),
]
# No closed-form inverse (phi^{-1} is a Lambert function): exercises the root finder.
LOG_PLUS_U = Custom(lambda u: np.log(u) + u, lambda u: 1.0 / u + 1.0, label="log+u")
ALL = [*BUILTINS, LOG_PLUS_U]
U_WIDE = np.logspace(-12, 6, 361)
U_MODERATE = np.logspace(-6, 6, 25)


def ids(ds):
    return [d.name for d in ds]


@contextlib.contextmanager
def strict():
    """Any floating-point warning not suppressed inside the module becomes an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with np.errstate(divide="raise", over="raise", invalid="raise"):
            yield


def assert_close(actual, expected, rtol, atol=0.0, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    assert not bad.any(), f"{what}: {bad.sum()} entries off, e.g. {actual[bad][:3]} vs " + str(
        expected[bad][:3]
    )


# ---------------------------------------------------------------- phi, phi', phi^{-1}


@pytest.mark.parametrize("d", ALL, ids=ids(ALL))
def test_phi_inv_inverts_phi(d):
    u = U_MODERATE if isinstance(d, Custom) else U_WIDE
    with strict():
        assert_close(d.phi_inv(d.phi(u)), u, rtol=1e-12, what=d.name)


def test_cross_entropy_round_trip_over_extreme_range():
    u = np.logspace(-300, 300, 601)
    d = CrossEntropy()
    with strict():
        v = d.phi(u)
        assert np.all(np.isfinite(v)) and np.all(np.diff(v) > 0)
        assert_close(d.phi_inv(v), u, rtol=1e-12, what="cross-entropy")


@pytest.mark.parametrize("d", ALL, ids=ids(ALL))
def test_dphi_matches_finite_differences(d):
    u = U_MODERATE if isinstance(d, Custom) else U_WIDE
    h = 1e-6 * u
    fd = (d.phi(u + h) - d.phi(u - h)) / (2 * h)
    with strict():
        assert_close(d.dphi(u), fd, rtol=1e-6, what=d.name)
        assert np.all(d.dphi(u) > 0)


def test_cross_entropy_phi_matches_naive_formula_where_naive_is_safe():
    u = np.logspace(-3, 2, 51)
    naive = np.log(np.exp(u) - 1) - 1 / (np.exp(u) - 1)
    assert_close(CrossEntropy().phi(u), naive, rtol=1e-12, atol=1e-14)
    assert_close(CrossEntropy().dphi(u), (1 - np.exp(-u)) ** -2, rtol=1e-12)


def test_scalar_in_scalar_out():
    for d in ALL:
        for value in (d.phi(2.0), d.dphi(2.0), d.phi_inv(0.3), d.bound(2.0, 1.0, 0.5)):
            assert isinstance(value, np.float64), d.name
        assert d.bound(2.0, 1.0, np.zeros((2, 3))).shape == (2, 3)


# ---------------------------------------------------------------- bound: closed forms and ODE

T_GRID = np.concatenate([[0.0], np.logspace(-6, 12, 49)])


@pytest.mark.parametrize("loss0", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("mu", [1e-3, 1.0, 1e3])
def test_closed_form_bounds(loss0, mu):
    t = T_GRID
    with strict():
        assert_close(Log().bound(loss0, mu, t), loss0 * np.exp(-mu * t), rtol=1e-12)
        expected = loss0 / (1 + mu * loss0 * t)
        assert_close(Reciprocal().bound(loss0, mu, t), expected, rtol=1e-12)
        assert_close(Power(2.0).bound(loss0, mu, t), expected, rtol=1e-12)
        for alpha in (0.25, 0.5, 1.5, 3.0):
            c = 1 - alpha
            expected = np.maximum(loss0**c - c * mu * t, 0.0) ** (1 / c)
            # alpha < 1: both forms lose digits next to the finite hitting time (cancellation).
            atol = 1e-9 * loss0 if alpha < 1 else 0.0
            assert_close(Power(alpha).bound(loss0, mu, t), expected, rtol=1e-12, atol=atol)


@pytest.mark.parametrize("d", ALL, ids=ids(ALL))
def test_bound_solves_the_kl_equality_ode(d):
    # With equality in KL, |grad L|^2 = mu/phi'(L), so the flow is dL/dt = -mu/phi'(L) and the
    # bound is its exact solution. Integrate in log L for relative accuracy.
    loss0, mu = 5.0, 0.7
    t_zero = d.time_to_reach(loss0, mu, 0.0)
    t_end = 0.8 * t_zero if math.isfinite(t_zero) else d.time_to_reach(loss0, mu, 1e-3 * loss0)
    t = np.linspace(0.0, t_end, 21)

    def rhs(_, y):
        u = math.exp(y[0])
        return [-mu / (u * float(d.dphi(u)))]

    sol = scipy.integrate.solve_ivp(
        rhs, (0.0, t_end), [math.log(loss0)], t_eval=t, method="DOP853", rtol=1e-12, atol=1e-12
    )
    assert sol.success
    assert_close(d.bound(loss0, mu, t), np.exp(sol.y[0]), rtol=1e-6, what=d.name)


def test_cross_entropy_bound_at_huge_loss():
    d, loss0, mu = CrossEntropy(), 1e10, 2.0
    t = np.array([0.0, 1.0, 1e3, 1e6, 1e9, 4.9e9, 5e9, 6e9, 1e12])
    with strict():
        b = d.bound(loss0, mu, t)
    assert np.all(np.isfinite(b)) and np.all(b > 0)
    # phi(u) = u up to e^{-u} for large u, so the bound is linear while it stays large.
    large = loss0 - mu * t > 50
    assert_close(b[large], (loss0 - mu * t)[large], rtol=1e-15)
    # Everywhere: phi(bound) = phi(L0) - mu t, checked relative to the terms' size.
    v = d.phi(loss0) - mu * t
    assert_close(d.phi(b), v, rtol=1e-14, atol=1e-12)
    # Far tail: L ~ 1/(mu t) (phi(u) ~ -1/u as u -> 0).
    assert b[-1] == pytest.approx(1 / (mu * t[-1] - loss0), rel=1e-6)


def test_cross_entropy_bound_differs_from_slide_form():
    # THEORY.md R2: the slides print log(1/W0(exp(mu t - C))), which turns negative once
    # W0 > 1; the derived log(1 + 1/W0(...)) stays positive and is what bound() returns.
    d, loss0, mu = CrossEntropy(), 1.0, 1.0
    t = np.array([0.1, 1.0, 10.0, 100.0])
    w = scipy.special.wrightomega(mu * t - float(d.phi(loss0)))
    slide, derived = -np.log(w), np.log1p(1 / w)
    assert np.any(w > 1) and np.all(slide[w > 1] < 0)
    assert_close(d.bound(loss0, mu, t), derived, rtol=1e-14)
    assert np.all(d.bound(loss0, mu, t) > 0)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_power_below_one_converges_in_finite_time(alpha):
    d, loss0, mu = Power(alpha), 2.0, 0.3
    hit = float(d.phi(loss0)) / mu
    assert d.time_to_reach(loss0, mu, 0.0) == pytest.approx(hit, rel=1e-15)
    with strict():
        b = d.bound(loss0, mu, np.array([0.5, 1 - 1e-6, 1.0, 1.5, 1e12]) * hit)
    assert np.all(b[:2] > 0)
    assert np.array_equal(b[2:], np.zeros(3))  # exactly 0, never negative or NaN


def test_extreme_arguments_are_finite_and_warning_free():
    t = np.array([0.0, 1e-300, 1e-3, 1.0, 1e3, 1e6, 1e12, 1e300, np.inf])
    for d in ALL:
        for loss0 in (1e-300, 1e-12, 1.0, 1e10, 1e300):
            for mu in (1e-300, 1e-6, 1e3, 1e300):
                with strict():
                    b = d.bound(loss0, mu, t)
                assert np.all(np.isfinite(b)) and np.all(b >= 0), (d.name, loss0, mu, b)
                assert b[0] == loss0 and np.all(np.diff(b) <= 0), (d.name, loss0, mu, b)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(0, len(ALL) - 1),
    loss0=st.floats(1e-6, 1e6),
    mu=st.floats(1e-6, 1e3),
    t=st.lists(st.floats(0.0, 1e12), min_size=1, max_size=8),
)
def test_bound_properties(k, loss0, mu, t):
    d = ALL[k]
    t = np.sort(np.array([0.0, *t]))
    b = d.bound(loss0, mu, t)
    assert np.all(np.isfinite(b)) and np.all(b >= 0)
    assert b[0] == loss0 and np.all(b <= loss0 * (1 + 1e-12))
    assert np.all(np.diff(b) <= 0), (d.name, t, b)


# ---------------------------------------------------------------- time_to_reach, kl_ratio


@pytest.mark.parametrize("d", ALL, ids=ids(ALL))
def test_time_to_reach_inverts_bound(d):
    loss0, mu = 3.0, 0.4
    for target in (1.0, 1e-3, 1e-8):
        t_star = d.time_to_reach(loss0, mu, target)
        assert t_star > 0
        assert float(d.bound(loss0, mu, t_star)) == pytest.approx(target, rel=1e-8)
    assert d.time_to_reach(loss0, mu, loss0) == 0.0
    assert d.time_to_reach(loss0, mu, 10.0) == 0.0
    assert math.isfinite(d.time_to_reach(loss0, mu, 0.0)) == math.isfinite(d.phi_lower)


def test_kl_ratio():
    d = Log()
    ratio = d.kl_ratio([1.0, 2.0, 0.0, -1.0, np.nan], 2.0)
    assert_close(ratio[:2], [2.0, 1.0], rtol=0)
    assert np.all(np.isnan(ratio[2:]))
    assert isinstance(CrossEntropy().kl_ratio(1.0, 1.0), np.float64)
    l = np.array([0.5, 3.0])
    assert_close(Power(3).kl_ratio(l, l**3), [1.0, 1.0], rtol=1e-15)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: get_desingularizer("foo"), "unknown desingularizer.*allowed names"),
        (lambda: get_desingularizer("power:abc"), "cannot read alpha"),
        (lambda: get_desingularizer("power"), "cannot read alpha"),
        (lambda: get_desingularizer("custom:x"), "pass the Custom instance"),
        (lambda: Log().bound(1.0, 0.0, 1.0), r"mu must be > 0.*KL constant"),
        (lambda: Log().bound(1.0, -1.0, 1.0), r"mu must be > 0 and finite \(got -1.0\)"),
        (lambda: Log().bound(1.0, np.nan, 1.0), "mu must be > 0"),
        (lambda: Log().bound(1.0, np.inf, 1.0), "mu must be > 0"),
        (lambda: Log().bound(1.0, "x", 1.0), "mu must be a real number"),
        (lambda: Log().bound(0.0, 1.0, 1.0), "loss0 must be > 0"),
        (lambda: Log().bound(-1.0, 1.0, 1.0), "loss0 must be > 0"),
        (lambda: Log().bound(np.nan, 1.0, 1.0), "loss0 must be > 0"),
        (lambda: Log().bound(1.0, 1.0, [0.0, -1.0]), "t must be >= 0"),
        (lambda: Log().bound(1.0, 1.0, np.nan), "t must be >= 0"),
        (lambda: Log().time_to_reach(1.0, -1.0, 0.5), "mu must be > 0"),
        (lambda: Log().time_to_reach(1.0, 1.0, np.nan), "target must be a number"),
        (lambda: Power(1), "use Log"),
        (lambda: Power(0), "alpha must be > 0"),
        (lambda: Power(-2), "alpha must be > 0"),
        (lambda: Power(np.nan), "alpha must be > 0"),
        (lambda: Custom(lambda u: -np.log(u), lambda u: 1 / u), "phi is not increasing"),
        (lambda: Custom(np.log, lambda u: -1 / u), r"dphi is not > 0"),
        (lambda: Custom(np.log, lambda u: 2 / u), "does not match"),
        (lambda: Custom(lambda u: np.sqrt(u), lambda u: 0.5 / np.sqrt(u), lower=1.0), "lower"),
        (lambda: Custom(np.log, lambda u: 1 / u, lower=np.nan), "lower"),
    ],
)
def test_bad_input_raises_with_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_type_errors():
    with pytest.raises(TypeError):
        get_desingularizer(3)
    with pytest.raises(TypeError):
        Custom(1.0, np.log)


# ---------------------------------------------------------------- registry


def test_get_desingularizer_names_and_aliases():
    assert isinstance(get_desingularizer("log"), Log)
    assert isinstance(get_desingularizer("PL"), Log)
    assert isinstance(get_desingularizer("reciprocal"), Reciprocal)
    assert isinstance(get_desingularizer(" cross-entropy "), CrossEntropy)
    assert isinstance(get_desingularizer("ce"), CrossEntropy)
    p = get_desingularizer("power:0.5")
    assert isinstance(p, Power) and p.alpha == 0.5 and p.name == "power(alpha=0.5)"
    assert Power(3).name == "power(alpha=3)"
    assert LOG_PLUS_U.name == "custom:log+u"
    for d in BUILTINS:  # every built-in name round-trips
        again = get_desingularizer(d.name)
        assert type(again) is type(d) and getattr(again, "alpha", 0) == getattr(d, "alpha", 0)
    assert get_desingularizer(LOG_PLUS_U) is LOG_PLUS_U
    assert all(isinstance(d, Desingularizer) for d in ALL)


def test_custom_matches_builtin_and_accepts_scalar_callables():
    as_log = Custom(math.log, lambda u: 1.0 / u, label="scalar-log")
    t = np.array([0.0, 0.5, 3.0, 40.0])
    assert_close(as_log.bound(2.0, 1.5, t), Log().bound(2.0, 1.5, t), rtol=1e-13)
    sqrt = Custom(lambda u: 2 * np.sqrt(u), lambda u: 1 / np.sqrt(u), label="sqrt", lower=0.0)
    assert_close(sqrt.bound(2.0, 1.5, t), Power(0.5).bound(2.0, 1.5, t), rtol=1e-12, atol=1e-15)
    assert sqrt.phi_inv(-1.0) == 0.0 and LOG_PLUS_U.phi_inv(1e301) == np.inf


# ---------------------------------------------------------------- rank_desingularizers


def _as_trajectory(t, loss, grad_sq):
    traj = Trajectory({"convention": "mean"})
    for ti, li, gi in zip(t, loss, grad_sq, strict=True):
        traj.append({"t": float(ti), "loss": float(li), "grad_sq": float(gi)})
    return traj


def _trajectory(d, loss0=4.0, mu=0.3, t_end=60.0, n=200):
    t = np.linspace(0.0, t_end, n)
    loss = d.bound(loss0, mu, t)
    return loss, mu / d.dphi(loss), t  # KL equality: |grad L|^2 = mu / phi'(L)


@pytest.mark.parametrize("d", [Log(), Reciprocal(), CrossEntropy()], ids=["log", "rec", "ce"])
def test_ranking_recovers_the_true_desingularizer(d):
    loss, grad_sq, t = _trajectory(d)
    rows = rank_desingularizers(_as_trajectory(t, loss, grad_sq))
    assert len(rows) == 6
    assert rows[0]["name"] == d.name and rows[0]["rank"] == 1
    assert rows[0]["mu_star"] == pytest.approx(0.3, rel=1e-10)
    assert rows[0]["final_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert rows[0]["tightness"] == pytest.approx(0.0, abs=1e-9)
    ranked = [r for r in rows if r["rank"] is not None]
    tight = [r["tightness"] for r in ranked]
    assert tight == sorted(tight) and [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))


def test_ranking_reports_the_argmin_and_takes_candidates():
    loss, grad_sq, t = _trajectory(Log(), n=50)
    grad_sq = grad_sq.copy()
    grad_sq[10] *= 0.5  # the KL ratio dips here
    traj = _as_trajectory(t, loss, grad_sq)
    log_row = next(r for r in rank_desingularizers(traj) if r["name"] == "log")
    assert log_row["t_at_min"] == t[10] and log_row["mu_star"] == pytest.approx(0.15)
    rows = rank_desingularizers(traj, candidates=[LOG_PLUS_U, "power:2"])
    assert {r["name"] for r in rows} == {"custom:log+u", "power(alpha=2)"}


def test_module_docstring_examples():
    assert doctest.testmod(mod).failed == 0
