"""The one time tolerance of flow times, and the comparisons made with it.

Flow times t = t₀ + kη accumulate rounding, so every comparison of flow times (a record
snapping to the step grid, an evaluation inside a checked horizon, a checkpoint's time) uses
:data:`TIME_RTOL` through these functions (re-exported by :mod:`rayleighflow.flow`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TIME_RTOL", "due", "covered", "within"]

#: The relative tolerance of every comparison of flow times (t = t₀ + kη accumulates rounding).
TIME_RTOL = 1e-12


def due(t: float, target: float) -> bool:
    """Has an iterate at ``t`` reached the requested time ``target``?"""
    return t >= target - TIME_RTOL * max(1.0, target)


def covered(target: float, t: float) -> bool:
    """Is the requested time ``target`` covered by the record made at ``t``?"""
    return target <= t * (1 + TIME_RTOL)


def within(t: np.ndarray | float, horizon: float) -> np.ndarray | bool:
    """``t`` ≤ ``horizon`` up to the tolerance (evaluations inside a checked horizon)."""
    return t <= horizon * (1 + TIME_RTOL) + 1e-300
