"""The built-in desingularizers: log (PL), the power laws, cross-entropy and the plateau."""

from __future__ import annotations

import math
import typing

import numpy as np
import scipy.optimize
import scipy.special

from ._base import Desingularizer, _f64, _out

__all__ = ["Log", "Reciprocal", "Power", "CrossEntropy", "ScaledCrossEntropy", "Plateau"]


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
