"""Shared type aliases, the inner-product convention and the probability-weights rule."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

E = TypeVar("E", bound=Enum)

Params = dict[str, Tensor]
"""Model parameters by name, as returned by ``nn.Module.named_parameters``."""


class Convention(str, Enum):
    """Inner product on function space F (THEORY.md §1).

    ``MEAN``: L²(D), ⟨u, v⟩ = Σ_i w_i u_i·v_i and ℓ = Σ_i w_i ℓ_i (the default; survives n → ∞).
    ``SUM``: Euclidean, ⟨u, v⟩ = Σ_i n w_i u_i·v_i and ℓ = Σ_i n w_i ℓ_i (= Σ_i ℓ_i for uniform
    weights). With uniform weights R_sum = n · R_mean.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> rf.Convention.parse("sum") is rf.Convention.SUM
        True
        >>> data = rf.Dataset.from_arrays(torch.randn(4, 2), torch.randn(4, 1))
        >>> net = torch.nn.Linear(2, 1).double()
        >>> mean = rf.measure(rf.Problem(rf.Model(net), data, "square", "mean"))
        >>> total = rf.measure(rf.Problem(rf.Model(net), data, "square", "sum"))
        >>> abs(total.rayleigh - data.n * mean.rayleigh) < 1e-9 * total.rayleigh  # R_sum = n·R_mean
        True
    """

    MEAN = "mean"
    SUM = "sum"

    @classmethod
    def parse(cls, value: str | Convention) -> Convention:
        return parse_enum(cls, value, "inner-product convention")


def parse_enum(cls: type[E], value: str | E, what: str) -> E:
    """``cls(value)``, or a ValueError naming ``what`` and the allowed values."""
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(c.value) for c in cls)
        raise ValueError(f"unknown {what} {value!r}: use one of {allowed}") from None


def effective_weights(weights: Tensor, convention: Convention) -> Tensor:
    """Weights ω_i of the chosen convention: w_i for MEAN, n·w_i for SUM."""
    if convention is Convention.SUM:
        return weights * weights.shape[0]
    return weights


#: Tolerance on |Σ w_i − 1| for probability weights (every checker uses this one, via
#: :func:`check_weights`): loose enough for float32 weights, whose sum rounds at ~1e-7.
WEIGHT_SUM_TOL = 1e-6


def check_weights(weights: Any, n: int | None = None) -> None:
    """Refuse anything but probability weights: a non-empty 1-D array (of length ``n`` when
    given) of finite values w_i > 0 with |Σ w_i − 1| ≤ :data:`WEIGHT_SUM_TOL` (summed in
    float64). Each refusal is a one-line ValueError saying what to change.

    Example:
        >>> check_weights([0.25, 0.75])
        >>> check_weights([0.5, 0.6])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: weights sum to 1.1, not 1: ...
    """
    w = np.asarray(weights.detach().cpu() if isinstance(weights, Tensor) else weights,
                   dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array; got shape {w.shape}")
    if n is not None and w.shape != (n,):
        raise ValueError(f"weights must have length {n} (one per sample), got shape "
                         f"{tuple(w.shape)}")
    bad = int((~np.isfinite(w)).sum())
    if bad:
        raise ValueError(f"weights contains {bad} NaN/Inf value(s): weights must be finite")
    if not np.all(w > 0):
        raise ValueError(f"weights must be > 0 (strictly positive; smallest is {w.min()!r}): "
                         "drop zero-weight samples instead")
    total = math.fsum(w.tolist())
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(f"weights sum to {total:.15g}, not 1: pass weights normalized to a "
                         "probability distribution (or omit them for uniform weights)")


def flatten(params: Params) -> Tensor:
    """The parameters as one vector, in the dict's order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """A vector back into views shaped like ``like`` (the inverse of :func:`flatten`)."""
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out
