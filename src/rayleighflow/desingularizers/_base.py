"""The desingularizer base class and the checks its bounds share."""

from __future__ import annotations

import abc
import math

import numpy as np

__all__ = ["Desingularizer"]


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
