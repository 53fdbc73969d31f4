"""The checks every certificate of a run shares (certify.py's flow certificate, composition.py
and discrete.py's gradient-descent certificate): the KL ratio at checked points, its minimum,
and the points that are not finite."""

from __future__ import annotations

import math

import numpy as np

from .desingularizers import Desingularizer

__all__ = ["_ratios", "_min_at", "_bad_points"]


def _ratios(phi: Desingularizer, loss: np.ndarray, grad_sq: np.ndarray) -> np.ndarray:
    ratios = np.asarray(phi.kl_ratio(loss, grad_sq), dtype=np.float64).reshape(loss.shape)
    above = np.isfinite(loss) & (loss > phi.floor)
    ratios[above & (grad_sq <= 0)] = 0.0
    ratios[above & ~np.isfinite(grad_sq)] = np.nan  # _bad_points fails such a point
    return ratios


def _min_at(values: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    ok = ~np.isnan(values)
    if not ok.any():
        return math.nan, math.nan
    i = int(np.argmin(np.where(ok, values, np.inf)))
    return float(values[i]), float(t[i])


def _bad_points(loss: np.ndarray, grad_sq: np.ndarray, ratios: np.ndarray,
                phi: Desingularizer) -> np.ndarray:
    """Checked points where something is not finite: a non-finite loss or gradient norm, or a
    non-finite ratio above the floor. Such a point fails the certificate."""
    above = np.isfinite(loss) & (loss > phi.floor)
    return (~np.isfinite(loss) | ~np.isfinite(grad_sq)
            | (above & ~np.isfinite(ratios)))
