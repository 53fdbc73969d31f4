"""The rounding of a loss computed below float64, for the certificates of such runs.

A float32 run records float32 losses. Two things follow (CERTIFICATES.md §3):

* the bound must start from the loss of θ₀ itself, not from its float32 rounding, which can
  lie below it by far more than a certificate's rtol (targets ≈ 100 with residuals ≈ 1e-2: the
  float32 L₀ is off by ~1e-3 relative). The flow records L(θ₀) recomputed in float64
  (``loss0_float64``) and the bound starts from the larger of the two;
* a step whose recorded loss changes by less than the loss's rounding error tells nothing about
  the step size: α_k ≤ 0 there is the loss's resolution, not "step too large". The level is
  estimated at θ₀ (``loss0_rounding``) as the larger of the observed |L₃₂ − L₆₄| and the
  first-order bound u·max|f|·‖∇ℓ‖_D·√(kΣω) (each output rounded by u·|f|), and carried to a
  loss L as level·√(L/L₀) + 4u·L (the residuals shrink like √L; the sum itself rounds by u·L).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._types import Params
from .data import Dataset
from .problem import Problem

__all__ = ["float64_start", "start_loss", "rounding_level"]


def float64_start(problem: Problem, theta: Params, data: Dataset) -> dict[str, float]:
    """Meta entries for a run whose model computes below float64 (empty for float64 runs or
    models that cannot be evaluated in float64)."""
    dtype = problem.model.dtype
    if dtype is None or dtype == torch.float64 or not isinstance(data, Dataset):
        return {}
    try:
        f, loss64 = problem.evaluate_float64(theta, data)
        (grad_f,) = torch.autograd.grad(loss64, f)
    except (RuntimeError, TypeError):  # a function that fixes its own dtype
        return {}
    with torch.no_grad():
        recorded = float(problem.loss_value(theta, data))
    w = problem.omega(data).detach().to("cpu", torch.float64)
    # ∇_f L = ω_j ∇ℓ_j, so ‖∇ℓ‖²_D = Σ_j ‖(∇_f L)_j‖²/ω_j
    s = float(torch.sqrt(((grad_f ** 2).sum(1) / w.clamp_min(1e-300)).sum()))
    u = torch.finfo(dtype).eps / 2
    k = f.shape[1]
    first_order = u * float(f.detach().abs().max()) * s * math.sqrt(k * float(w.sum()))
    l64 = float(loss64.detach())
    return {"dtype": str(dtype).removeprefix("torch."), "loss0_float64": l64,  # type: ignore[dict-item]
            "loss0_rounding": max(abs(recorded - l64), first_order), "loss_unit_roundoff": u}


def start_loss(meta: Mapping[str, Any], loss0: float) -> float:
    """Where a bound starts: the recorded L₀, or L(θ₀) in float64 when that is larger."""
    ref = meta.get("loss0_float64")
    if isinstance(ref, int | float) and math.isfinite(ref) and ref > loss0:
        return float(ref)
    return float(loss0)


def rounding_level(meta: Mapping[str, Any], loss: np.ndarray) -> np.ndarray | None:
    """The estimated rounding error of recorded losses (None for a float64 run)."""
    level, u, l0 = (meta.get("loss0_rounding"), meta.get("loss_unit_roundoff"),
                    meta.get("loss0_float64"))
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (level, u, l0)):
        return None
    loss = np.maximum(np.asarray(loss, dtype=np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.sqrt(loss / l0) if l0 > 0 else np.ones_like(loss)  # type: ignore[operator]
    return level * scale + 4 * u * loss  # type: ignore[operator]
