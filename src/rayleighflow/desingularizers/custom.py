"""A user desingularizer from φ (and optionally φ′ and φ⁻¹), checked on a grid."""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import numpy as np
import scipy.optimize
import scipy.special

from ._base import Desingularizer, _f64, _out

__all__ = ["Custom"]


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
