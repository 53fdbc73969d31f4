r"""Kurdyka-Lojasiewicz desingularizers and the loss bounds they certify (THEORY.md section 3).

A desingularizer is an increasing function phi: (0, inf) -> R (phi' > 0). A loss L satisfies
the KL inequality with phi and constant mu > 0 where L > 0 if

    phi'(L) * |grad L|^2 >= mu.

Along the gradient flow d theta/dt = -grad L this integrates to

    L(t) <= phi^{-1}( phi(L(0)) - mu t ),

with equality for the scalar flow dL/dt = -mu / phi'(L). If phi is bounded below by
phi(0+) > -inf and phi(L(0)) - mu t falls below it, the bound is 0 (finite-time convergence).

Shipped: ``Log`` (PL), ``Reciprocal``, ``Power(alpha)``, ``CrossEntropy`` and ``Custom``.
Everything is numpy float64 and vectorized; scalars in give ``np.float64`` out.

>>> get_desingularizer("log").bound(2.0, 1.0, [0.0, 1.0])  # 2 e^{-t}
array([2.        , 0.73575888])
"""

from __future__ import annotations

import abc
import math
import re
import typing
from collections.abc import Callable

import numpy as np
import scipy.optimize
import scipy.special

__all__ = [
    "CrossEntropy",
    "Custom",
    "Desingularizer",
    "Log",
    "Plateau",
    "Power",
    "Reciprocal",
    "ScaledCrossEntropy",
    "get_desingularizer",
]

_ALIASES = {"pl": "log", "ce": "cross-entropy"}
_DEFAULT_CANDIDATES = ("log", "reciprocal", "power:0.5", "power:1.5", "power:3", "cross-entropy")


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _out(x: np.ndarray):
    # 0-d arrays become np.float64 so scalar in gives scalar out.
    return np.asarray(x, dtype=np.float64)[()]


def _check_start(loss0, mu, floor: float = 0.0) -> tuple[float, float]:
    out = []
    for what, value, why in (
        ("loss0", loss0, "the bound starts from the positive loss L(0) of the trajectory"),
        ("mu", mu, "a KL constant is a positive lower bound on phi'(L)|grad L|^2"),
    ):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a real number (got {value!r})") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{what} must be > 0 and finite (got {v!r}): {why}")
        out.append(v)
    if not out[0] > floor:
        raise ValueError(f"loss0 = {out[0]!r} must exceed the desingularizer's floor {floor!r}")
    return out[0], out[1]


class Desingularizer(abc.ABC):
    """KL desingularizer phi: (0, inf) -> R, increasing.

    Required: ``phi``, ``dphi``, ``phi_inv`` (vectorized). ``phi_inv`` maps values below the
    range of phi to 0 and values above it to inf. ``phi_lower`` is lim_{u->0+} phi(u)
    (-inf when unbounded). Derived: ``kl_ratio``, ``bound``, ``time_to_reach``.

    The KL inequality phi'(L) |grad L|^2 >= mu integrates along the flow to
    L(t) <= phi^{-1}(phi(L0) - mu t) (``bound``). Everything is numpy float64; L and
    |grad L|^2 are in whatever convention the caller measured them.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> class Cube(rf.Desingularizer):     # phi(u) = -1/(2u^2): KL |grad L|^2 >= mu L^3
        ...     name = "cube"
        ...     def phi(self, u): return -0.5 / np.asarray(u, float) ** 2
        ...     def dphi(self, u): return np.asarray(u, float) ** -3.0
        ...     def phi_inv(self, v): return np.sqrt(-0.5 / np.asarray(v, float))
        >>> t = np.array([0.0, 1.0, 10.0])
        >>> bool(np.allclose(Cube().bound(1.0, 1.0, t), (1 + 2 * t) ** -0.5))  # same as Power(3)
        True
        >>> round(Cube().time_to_reach(1.0, 1.0, 0.1), 9)   # (phi(1) - phi(0.1)) / mu
        49.5
    """

    name: str
    phi_lower: float = -math.inf
    #: phi' non-increasing (phi concave): needed by the discrete certificate (CERTIFICATES.md §3).
    concave: bool = True
    #: The KL inequality speaks of L > floor (0, or the plateau level of ``Plateau``).
    floor: float = 0.0

    @abc.abstractmethod
    def phi(self, u): ...

    @abc.abstractmethod
    def dphi(self, u): ...

    @abc.abstractmethod
    def phi_inv(self, v): ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def kl_ratio(self, loss, grad_sq):
        """phi'(L) |grad L|^2 elementwise; NaN where L <= floor or L is not finite (KL is silent).

        Computed in a form that cannot overflow where the true value is finite (e.g. for
        cross-entropy (|grad L| / (1 - e^{-L}))^2), so an infinite ratio is a real failure,
        never an overflow that would pass any mu.
        """
        loss, grad_sq = np.broadcast_arrays(_f64(loss), _f64(grad_sq))
        ok = np.isfinite(loss) & (loss > self.floor)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            ratio = self._kl_ratio(np.where(ok, loss, self.floor + 1.0), grad_sq)
        return _out(np.where(ok, ratio, np.nan))

    def _kl_ratio(self, loss: np.ndarray, grad_sq: np.ndarray) -> np.ndarray:
        return self.dphi(loss) * grad_sq

    def bound(self, loss0: float, mu: float, t) -> np.ndarray:
        """phi^{-1}(phi(L0) - mu t) for t >= 0 (t = inf allowed): the KL loss bound at time t.

        Clamped to [0, L0] (exact in theory, guards rounding); equals L0 exactly at t = 0.
        """
        loss0, mu = _check_start(loss0, mu, self.floor)
        t = _f64(t)
        if np.any(np.isnan(t)) or np.any(t < 0):
            raise ValueError("t must be >= 0 and not NaN; pass flow times measured from t = 0")
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            b = self._bound(loss0, mu, t)
        b = np.where(t == 0, loss0, np.clip(b, self.floor, loss0))  # NaN stays NaN
        return _out(b)

    def _bound(self, loss0: float, mu: float, t: np.ndarray) -> np.ndarray:
        # Generic path; subclasses with a better-conditioned closed form override it.
        return self.phi_inv(self.phi(loss0) - mu * t)

    def time_to_reach(self, loss0: float, mu: float, target: float) -> float:
        """Smallest t with bound(t) <= target: (phi(L0) - phi(target)) / mu; 0 if target >= L0.

        A target <= 0 is reached at (phi(L0) - phi(0+)) / mu, which is inf unless phi is
        bounded below.
        """
        loss0, mu = _check_start(loss0, mu, self.floor)
        target = float(target)
        if math.isnan(target):
            raise ValueError("target must be a number (got nan); pass the loss level to reach")
        if target >= loss0:
            return 0.0
        low = self.phi_lower if target <= self.floor else float(self.phi(target))
        return float((float(self.phi(loss0)) - low) / mu)


@typing.final
class Log(Desingularizer):
    """phi(u) = log u, phi'(u) = 1/u, phi^{-1}(v) = e^v.

    KL reads |grad L|^2 >= mu L (Polyak-Lojasiewicz); bound L0 e^{-mu t}.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> t = np.array([0.0, 1.0, 5.0])
        >>> bool(np.allclose(rf.Log().bound(2.0, 0.5, t), 2.0 * np.exp(-0.5 * t)))
        True
        >>> float(rf.Log().kl_ratio(0.5, 0.2))          # |grad L|^2 / L
        0.4
    """

    name = "log"

    def phi(self, u):
        with np.errstate(divide="ignore"):
            return _out(np.log(_f64(u)))

    def dphi(self, u):
        with np.errstate(divide="ignore"):
            return _out(1.0 / _f64(u))

    def phi_inv(self, v):
        with np.errstate(over="ignore"):
            return _out(np.exp(_f64(v)))

    def _kl_ratio(self, loss, grad_sq):
        return grad_sq / loss

    def _bound(self, loss0, mu, t):
        return loss0 * np.exp(-mu * t)


class _PowerLaw(Desingularizer):
    # Shared implementation of phi(u) = u^c / c, c = 1 - alpha (private, not a public base).
    alpha: float

    def phi(self, u):
        c = 1.0 - self.alpha
        with np.errstate(over="ignore", divide="ignore"):
            return _out(_f64(u) ** c / c)

    def dphi(self, u):
        with np.errstate(over="ignore", divide="ignore"):
            return _out(_f64(u) ** (-self.alpha))

    def _kl_ratio(self, loss, grad_sq):
        # g L^-alpha in log space: L^-alpha alone overflows for tiny L.
        return np.exp(np.log(grad_sq) - self.alpha * np.log(loss))

    def phi_inv(self, v):
        c = 1.0 - self.alpha
        w = c * _f64(v)  # > 0 exactly on the range of phi
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return _out(np.where(w > 0, w ** (1.0 / c), 0.0 if c > 0 else math.inf))

    def _bound(self, loss0, mu, t):
        # Closed form (L0^c - c mu t)_+^{1/c}, rewritten as L0 (1 - r)^{1/c} so that neither
        # L0^c nor mu t overflows and nothing cancels at small t.
        c = 1.0 - self.alpha
        if c > 0:
            # r = t / T with T = phi(L0)/mu as in time_to_reach, so bound(T) is exactly 0.
            r = t / (loss0**c / c / mu)
            return np.where(r < 1, loss0 * np.exp(np.log1p(-np.where(r < 1, r, 0.0)) / c), 0.0)
        k = -c
        # log of x = k mu t L0^k; for x > 1 factor out (k mu t)^{-1/k} instead of L0.
        d = math.log(k * mu) + np.log(t) + k * math.log(loss0)
        small = loss0 * np.exp(-np.log1p(np.exp(np.minimum(d, 0.0))) / k)
        large = (k * mu * t) ** (-1.0 / k) * np.exp(-np.log1p(np.exp(-np.maximum(d, 0.0))) / k)
        return np.where(d <= 0, small, large)


@typing.final
class Reciprocal(_PowerLaw):
    """phi(u) = -1/u, phi'(u) = 1/u^2, phi^{-1}(v) = -1/v on v < 0.

    KL reads |grad L|^2 >= mu L^2; bound L0 / (1 + mu L0 t). Same as Power(2).

    Example:
        >>> import rayleighflow as rf
        >>> rf.Reciprocal().bound(1.0, 1.0, [0.0, 1.0, 3.0])    # 1/(1 + t)
        array([1.  , 0.5 , 0.25])
    """

    name = "reciprocal"
    alpha = 2.0


@typing.final
class Power(_PowerLaw):
    """phi(u) = u^{1-a}/(1-a), phi'(u) = u^{-a}, phi^{-1}(v) = ((1-a) v)^{1/(1-a)}; a > 0, a != 1.

    KL reads |grad L|^2 >= mu L^a; bound (L0^{1-a} - (1-a) mu t)_+^{1/(1-a)}. For a < 1 phi is
    bounded below by phi(0+) = 0 and the bound reaches 0 at T = phi(L0)/mu.

    Example:
        >>> import rayleighflow as rf
        >>> half = rf.Power(0.5)                          # (1 - t/2)^2: zero at T = 2
        >>> half.bound(1.0, 1.0, [0.0, 1.0, 2.0, 3.0])
        array([1.  , 0.25, 0.  , 0.  ])
        >>> half.time_to_reach(1.0, 1.0, 0.0), half.name
        (2.0, 'power(alpha=0.5)')
    """

    def __init__(self, alpha: float):
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a real number (got {alpha!r})") from None
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f"alpha must be > 0 and finite (got {a!r}): phi' = u^-alpha decreases")
        if a == 1:
            raise ValueError("alpha = 1 is the logarithm: use Log() (or 'log') instead of Power(1)")
        self.alpha = a
        self.name = f"power(alpha={np.format_float_positional(a, trim='-')})"
        self.phi_lower = 0.0 if a < 1 else -math.inf


@typing.final
class CrossEntropy(Desingularizer):
    """phi(u) = log(e^u - 1) - 1/(e^u - 1), phi'(u) = (1 - e^{-u})^{-2}.

    phi^{-1}(v) = log(1 + 1/W0(e^{-v})) (W0: principal Lambert branch). KL reads
    |grad L|^2 >= mu (1 - e^{-L})^2 (linear softmax regression, THEORY.md R2); the bound decreases
    linearly (~ L0 - mu t) while large and like 1/(mu t) as t -> inf.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> ce = rf.CrossEntropy()
        >>> u = np.array([1e-3, 0.5, 20.0])
        >>> bool(np.allclose(ce.phi_inv(ce.phi(u)), u))   # the Lambert-W inverse
        True
        >>> b = float(ce.bound(2.0, 1.0, 1e3))
        >>> 0.9 < b * 1e3 < 1.1                           # ~ 1/(mu t) at large t
        True
    """

    name = "cross-entropy"

    def phi(self, u):
        u = _f64(u)
        big = u > 1.0
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # u > 1: log(e^u - 1) = u + log1p(-e^-u), 1/(e^u - 1) = e^-u / (1 - e^-u).
            em = np.exp(-u)
            hi = u + np.log1p(-em) - em / (-np.expm1(-u))
            lo = np.log(np.expm1(u)) - 1.0 / np.expm1(u)
        return _out(np.where(big, hi, lo))

    def dphi(self, u):
        with np.errstate(over="ignore", divide="ignore"):
            return _out((1.0 / -np.expm1(-_f64(u))) ** 2)

    def _kl_ratio(self, loss, grad_sq):
        # (|grad L| / (1 - e^{-L}))^2: phi'(L) alone overflows once L < ~1e-154.
        return (np.sqrt(grad_sq) / -np.expm1(-loss)) ** 2

    def phi_inv(self, v):
        z = -_f64(v)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            w = scipy.special.wrightomega(z)  # W0(e^z) without forming e^z
            # w + log w = z  =>  log(1 + 1/w) = w - z + log1p(w): finite when w underflows.
            small_w = w - z + np.log1p(w)
            big_w = np.log1p(1.0 / w)  # full relative precision for tiny losses
        return _out(np.where(w <= 1.0, small_w, big_w))


@typing.final
class ScaledCrossEntropy(Desingularizer):
    """phi_k(u) = k phi_CE(u/k), phi_k'(u) = (1 - e^{-u/k})^{-2}, for a scale 0 < k <= 1.

    KL reads |grad L|^2 >= mu (1 - e^{-L/k})^2: the sharp isolation form of the logistic
    theorem (CERTIFICATES.md §5) with k = min_i w_i. Bound
    L_t <= k phi_CE^{-1}(phi_CE(L0/k) - (mu/k) t); scale 1 is ``CrossEntropy``.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> k, t = 0.1, np.array([0.0, 1.0, 100.0])
        >>> scaled = rf.ScaledCrossEntropy(k)
        >>> ce_bound = k * rf.CrossEntropy().bound(2.0 / k, 1.0 / k, t)
        >>> bool(np.allclose(scaled.bound(2.0, 1.0, t), ce_bound)), scaled.name
        (True, 'cross-entropy(scale=0.1)')
    """

    def __init__(self, scale: float):
        try:
            k = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a real number (got {scale!r})") from None
        if not (math.isfinite(k) and 0 < k <= 1):
            raise ValueError(f"scale must lie in (0, 1] (got {k!r}): it is the isolation "
                             "kappa = min_i w_i")
        self.scale = k
        self.name = f"cross-entropy(scale={k:.6g})"
        self._ce = CrossEntropy()

    def phi(self, u):
        return _out(self.scale * _f64(self._ce.phi(_f64(u) / self.scale)))

    def dphi(self, u):
        return self._ce.dphi(_f64(u) / self.scale)

    def _kl_ratio(self, loss, grad_sq):
        return self._ce._kl_ratio(loss / self.scale, grad_sq)

    def phi_inv(self, v):
        return _out(self.scale * _f64(self._ce.phi_inv(_f64(v) / self.scale)))

    def _bound(self, loss0, mu, t):
        k = self.scale
        return k * self._ce.phi_inv(self._ce.phi(loss0 / k) - (mu / k) * t)


@typing.final
class Plateau(Desingularizer):
    """phi(u) = log(u - eta) on u > eta, phi'(u) = 1/(u - eta): KL above a floor eta >= 0.

    KL reads |grad L|^2 >= mu (L - eta); bound eta + (L0 - eta) e^{-mu t}: convergence to the
    plateau level eta, not to zero. Records with L <= eta are outside its scope.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> plateau, t = rf.Plateau(0.5), np.array([0.0, 1.0, 50.0])
        >>> bool(np.allclose(plateau.bound(2.0, 1.0, t), 0.5 + 1.5 * np.exp(-t)))
        True
        >>> bool(np.isnan(plateau.kl_ratio(0.4, 1.0)))     # below the plateau: KL is silent
        True
    """

    def __init__(self, eta: float):
        try:
            e = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"eta must be a real number (got {eta!r})") from None
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"eta must be >= 0 and finite (got {e!r}): the plateau level")
        self.eta = self.floor = e
        self.name = f"plateau(eta={e:.6g})"

    def phi(self, u):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _out(np.log(_f64(u) - self.eta))

    def dphi(self, u):
        with np.errstate(divide="ignore"):
            return _out(1.0 / (_f64(u) - self.eta))

    def _kl_ratio(self, loss, grad_sq):
        return grad_sq / (loss - self.eta)

    def phi_inv(self, v):
        with np.errstate(over="ignore"):
            return _out(self.eta + np.exp(_f64(v)))

    def _bound(self, loss0, mu, t):
        return self.eta + (loss0 - self.eta) * np.exp(-mu * t)


# ---------------------------------------------------------------- custom


_S_MIN, _S_MAX = math.log(1e-300), math.log(1e300)
_PROBE = np.logspace(-6, 6, 49)
_RTOL = 4 * float(np.finfo(np.float64).eps)


def _vectorize(fn: Callable) -> Callable:
    # Accept numpy-vectorized callables as they are; loop scalar-only ones.
    probe = np.array([1.0, 2.0])
    try:
        ok = np.shape(fn(probe)) == probe.shape
    except (TypeError, ValueError):
        ok = False
    return fn if ok else np.vectorize(fn, otypes=[np.float64])


@typing.final
class Custom(Desingularizer):
    """User desingularizer from callables phi and dphi (phi' > 0); phi^{-1} by root finding.

    KL reads phi'(L) |grad L|^2 >= mu. ``lower`` is lim_{u->0+} phi(u) if finite (None: -inf).
    ``concave`` declares phi' non-increasing (needed by the discrete gradient-descent
    certificate); when omitted it is read off the probe grid. phi^{-1} brackets the root in
    log u over [1e-300, 1e300], then polishes with brentq in u (relative accuracy ~1e-15).
    Checked at construction on a probe grid u in [1e-6, 1e6]:
    phi finite and increasing, dphi finite, > 0 and matching finite differences of phi.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> pl = rf.Custom(np.log, lambda u: 1 / u, label="log")   # PL through root finding
        >>> bool(np.isclose(pl.bound(2.0, 1.0, 1.0), 2 / np.e)), pl.name
        (True, 'custom:log')
    """

    def __init__(self, phi: Callable, dphi: Callable, label: str = "user", lower=None,
                 concave: bool | None = None):
        if not (callable(phi) and callable(dphi)):
            raise TypeError("Custom(phi, dphi): both must be callables u -> value")
        self._phi, self._dphi = _vectorize(phi), _vectorize(dphi)
        self.name = f"custom:{label}"
        self.phi_lower = -math.inf if lower is None else float(lower)
        if math.isnan(self.phi_lower) or self.phi_lower == math.inf:
            raise ValueError(f"lower must be lim phi(0+) (finite) or None for -inf, got {lower!r}")
        with np.errstate(all="ignore"):
            p, d = _f64(self._phi(_PROBE)), _f64(self._dphi(_PROBE))
            h = 1e-5 * _PROBE
            fd = (_f64(self._phi(_PROBE + h)) - _f64(self._phi(_PROBE - h))) / (2 * h)
        problems = [
            (not np.all(np.isfinite(p) & np.isfinite(d)), "phi or dphi is not finite"),
            (np.any(d <= 0), "dphi is not > 0"),
            (np.any(np.diff(p) < 0) or p[-1] <= p[0], "phi is not increasing"),
            (np.any(p <= self.phi_lower), "phi takes values <= lower (lower must be phi(0+))"),
            (np.any(np.abs(fd - d) > 1e-2 * np.abs(d)), "dphi does not match phi' (swapped?)"),
        ]
        for bad, what in problems:
            if bad:
                raise ValueError(
                    f"custom desingularizer {label!r}: {what} on the probe grid u in [1e-6, 1e6];"
                    " pass an increasing phi on (0, inf) and its derivative dphi > 0"
                )
        grid_concave = bool(np.all(np.diff(d) <= 1e-12 * np.abs(d[:-1])))
        if concave and not grid_concave:
            raise ValueError(f"custom desingularizer {label!r} is declared concave but dphi "
                             "increases on the probe grid u in [1e-6, 1e6]; pass concave=False")
        # Undeclared: the grid decides (the discrete certificate needs phi' non-increasing).
        self.concave = grid_concave if concave is None else bool(concave)

    def phi(self, u):
        return _out(self._phi(_f64(u)))

    def dphi(self, u):
        return _out(self._dphi(_f64(u)))

    def phi_inv(self, v):
        v = _f64(v)
        return _out(np.reshape([self._invert(float(x)) for x in v.ravel()], v.shape))

    def _g(self, u: float, v: float) -> float:
        with np.errstate(all="ignore"):
            val = float(self._phi(np.float64(u))) - v
        if math.isnan(val):
            raise ValueError(f"custom phi returned NaN at u={u:.3g}; make phi defined there")
        return val

    def _invert(self, v: float) -> float:
        if math.isnan(v) or v <= self.phi_lower:
            return math.nan if math.isnan(v) else 0.0
        # March outward in s = log u from u = 1 by doubling steps until phi(e^s) - v changes
        # sign, bisect in s to a bracket of ratio e, then brentq in u: relative accuracy in u.
        lo = hi = 0.0
        step, up = 1.0, self._g(1.0, v) < 0
        while (self._g(math.exp(hi), v) < 0) if up else (self._g(math.exp(lo), v) > 0):
            if (hi if up else lo) == (_S_MAX if up else _S_MIN):
                return math.inf if up else 0.0  # root beyond [1e-300, 1e300]
            lo, hi = (hi, min(hi + step, _S_MAX)) if up else (max(lo - step, _S_MIN), lo)
            step *= 2.0
        while hi - lo > 1.0:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self._g(math.exp(mid), v) < 0 else (lo, mid)
        a, b = math.exp(lo), math.exp(hi)
        return scipy.optimize.brentq(self._g, a, b, args=(v,), xtol=a * 1e-17, rtol=_RTOL)


# ---------------------------------------------------------------- registry and selection


def get_desingularizer(spec) -> Desingularizer:
    """A Desingularizer (returned as is) or a name: 'log' | 'pl' | 'reciprocal' |
    'power:<alpha>' (also 'power(alpha=<alpha>)', the ``name`` form) | 'cross-entropy' | 'ce' |
    'cross-entropy:<scale>' | 'plateau:<eta>' (and their ``name`` forms).

    Example:
        >>> import rayleighflow as rf
        >>> rf.get_desingularizer("pl"), rf.get_desingularizer("power:0.5")
        (<Log log>, <Power power(alpha=0.5)>)
        >>> rf.get_desingularizer(rf.Plateau(0.05).name)      # a name rebuilds the object
        <Plateau plateau(eta=0.05)>
    """
    if isinstance(spec, Desingularizer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a Desingularizer or a name string, got {type(spec)}")
    allowed = ("log, pl, reciprocal, power:<alpha> (e.g. power:0.5), cross-entropy, ce, "
               "cross-entropy:<scale>, plateau:<eta>")
    s = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if s == "log":
        return Log()
    if s == "reciprocal":
        return Reciprocal()
    if s == "cross-entropy":
        return CrossEntropy()
    if s.startswith("power"):
        m = re.fullmatch(r"power:(.+)|power\(alpha=(.+)\)", s)
        try:
            alpha = float((m.group(1) or m.group(2)) if m else "")
        except ValueError:
            raise ValueError(f"cannot read alpha from {spec!r}; write e.g. 'power:0.5'") from None
        return Power(alpha)
    m = re.fullmatch(r"(cross-entropy|plateau)(?::(.+)|\((?:scale|eta)=(.+)\))", s)
    if m:
        try:
            value = float(m.group(2) or m.group(3))
        except ValueError:
            raise ValueError(f"cannot read the parameter of {spec!r}; write e.g. "
                             "'cross-entropy:0.01' or 'plateau:0.05'") from None
        return ScaledCrossEntropy(value) if m.group(1) == "cross-entropy" else Plateau(value)
    if s.startswith("custom"):
        raise ValueError(f"{spec!r} cannot be rebuilt from its name; pass the Custom instance")
    raise ValueError(f"unknown desingularizer {spec!r}; allowed names: {allowed}")
