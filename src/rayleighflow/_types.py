"""Shared type aliases and the inner-product convention."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

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
