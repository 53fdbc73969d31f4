"""Deciding a flow's limit from its records: the relative-plateau reading of a loss curve and
the Clopper–Pearson interval of a success frequency (the two-layer experiment's decisions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

from .._time import within
from .common import (
    finite_or_none,
)

__all__ = ["PlateauReading", "detect_plateau", "clopper_pearson", "success_interval"]


@dataclass(frozen=True)
class PlateauReading:
    """What the plateau detector read off one loss curve.

    ``rel_change`` = |L(t_from) − L(t_to)| / L(t_to) over the last doubling of t
    (t_from = the last record at or before t_to/2); ``plateaued`` when it is ≤ ``tol``.
    """

    plateaued: bool
    rel_change: float
    t_from: float
    t_to: float
    level: float
    tol: float

    def to_dict(self) -> dict[str, Any]:
        return {"plateaued": self.plateaued, "rel_change": finite_or_none(self.rel_change),
                "t_from": self.t_from, "t_to": self.t_to,
                "level": finite_or_none(self.level), "tol": self.tol}


def detect_plateau(t: np.ndarray, loss: np.ndarray, tol: float) -> PlateauReading:
    """The relative loss change over the last doubling of t, against ``tol``.

    t_from is the last record with t ≤ t_end/2 (t = 0 counts); record t_end/2 itself for the
    exact doubling. A curve with fewer than two records, or with a non-finite or non-positive
    end, is not plateaued. The change is taken in absolute value: a held-out loss that rises
    over the window has not plateaued either.
    """
    if not tol > 0:
        raise ValueError(f"the plateau tolerance must be > 0 (got {tol})")
    t = np.asarray(t, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if t.size < 2 or not t[-1] > 0:
        return PlateauReading(False, math.nan, math.nan, float(t[-1]) if t.size else math.nan,
                              float(loss[-1]) if loss.size else math.nan, tol)
    t_to, end = float(t[-1]), float(loss[-1])
    earlier = np.flatnonzero(within(t, 0.5 * t_to))
    if not earlier.size or not (math.isfinite(end) and end > 0):
        return PlateauReading(False, math.nan, math.nan, t_to, end, tol)
    i = int(earlier[-1])
    start = float(loss[i])
    rel = abs(start - end) / end if math.isfinite(start) else math.nan
    return PlateauReading(bool(rel <= tol), rel, float(t[i]), t_to, end, tol)


# ------------------------------------------------------------------ binomial intervals


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion, k successes of n."""
    if not (0 <= k <= n and n >= 1):
        raise ValueError(f"need 0 ≤ k ≤ n and n ≥ 1 (got k = {k}, n = {n})")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def success_interval(k: int, undecided: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """A 95% interval for 1 − δ when ``undecided`` of the n outcomes are unknown: the lower
    Clopper–Pearson end with them counted as failures, the upper end with them counted as
    successes (CP ends are monotone in k, so it covers every completion)."""
    return clopper_pearson(k, n, level)[0], clopper_pearson(k + undecided, n, level)[1]


# ------------------------------------------------------------------ pieces of a run
