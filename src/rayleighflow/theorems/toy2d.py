"""R4: the toy counter-example in dimension two (THEORY.md §6).

Two samples (F = R², Euclidean), one parameter s: f(s) = γ(s), a lemniscate of Bernoulli
through the target at the origin,

    γ(s) = a (cos s, sin s cos s) / (1 + sin² s),     L(s) = ½‖γ(s)‖² = a² cos² s / (2(1 + sin² s)).

K = γ'γ'ᵀ has rank one, so λ_min(K) = 0 everywhere, yet R(K; γ) = ⟨γ, Kγ⟩/‖γ‖² =
(γ'·γ)²/‖γ‖² > 0 away from the two tips s ∈ {0, π}, and the flow from s₀ ∈ (0, π/2)
converges to s = π/2 where γ = 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data import Dataset
from ..problem import Model

__all__ = ["lemniscate", "lemniscate_velocity", "toy_model", "toy_data", "toy_rayleigh"]


def lemniscate(s: Tensor, a: float = 1.0) -> Tensor:
    """γ(s), shape (..., 2)."""
    den = 1.0 + torch.sin(s) ** 2
    return a * torch.stack([torch.cos(s), torch.sin(s) * torch.cos(s)], dim=-1) / den[..., None]


def lemniscate_velocity(s: Tensor, a: float = 1.0) -> Tensor:
    """γ'(s) in closed form (quotient rule), shape (..., 2)."""
    sn, cs = torch.sin(s), torch.cos(s)
    den = 1.0 + sn**2
    dden = 2.0 * sn * cs
    num = torch.stack([cs, sn * cs], dim=-1)
    dnum = torch.stack([-sn, cs**2 - sn**2], dim=-1)
    return a * (dnum * den[..., None] - num * dden[..., None]) / (den**2)[..., None]


def toy_model(s0: float = 0.3, a: float = 1.0, dtype: torch.dtype = torch.float64) -> Model:
    """f_s(x_i) = γ(s)_i for the two inputs x ∈ {0, 1}: one parameter, two outputs in F."""

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        gamma = lemniscate(params["s"], a)
        return gamma[x[:, 0].long()].unsqueeze(-1)

    return Model(f, {"s": torch.tensor(s0, dtype=dtype)})


def toy_data(dtype: torch.dtype = torch.float64) -> Dataset:
    """The two samples x₁ = 0, x₂ = 1 with target 0 (the origin of F = R²)."""
    return Dataset.from_arrays(torch.tensor([[0.0], [1.0]]), torch.zeros(2, 1), dtype=dtype)


def toy_rayleigh(s: Tensor, a: float = 1.0) -> Tensor:
    """R(K_s; ∇ℓ) = (γ'·γ)²/‖γ‖² in the Euclidean convention (∇ℓ = γ for ℓ = ½‖f‖²)."""
    g, v = lemniscate(s, a), lemniscate_velocity(s, a)
    return (g * v).sum(-1) ** 2 / (g * g).sum(-1)


TIPS = (0.0, math.pi)
