"""Dense references: slow, obviously correct, used by the tests to check every fast path.

J is formed in full with ``torch.func.jacrev``; nothing here is meant for real networks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev

from ._types import Params
from .problem import Model

__all__ = ["dense_jacobian", "dense_gram", "dense_rayleigh"]


def dense_jacobian(model: Model, params: Params, x: Tensor) -> Tensor:
    """J with J[i, c, p] = ∂f_θ(x_i)_c / ∂θ_p, shape (n, k, P), parameters in dict order."""
    names = list(params)

    def f(*flat: Tensor) -> Tensor:
        return model(dict(zip(names, flat, strict=True)), x)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    n, k = jac[0].shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in jac], dim=-1)


def dense_gram(model: Model, params: Params, x1: Tensor, x2: Tensor | None = None) -> Tensor:
    """Euclidean Gram G = J(x1) J(x2)ᵀ as an (n1·k, n2·k) matrix, sample-major."""
    j1 = dense_jacobian(model, params, x1)
    j2 = j1 if x2 is None else dense_jacobian(model, params, x2)
    return j1.reshape(-1, j1.shape[-1]) @ j2.reshape(-1, j2.shape[-1]).T


def dense_rayleigh(model: Model, params: Params, x: Tensor, u: Tensor, omega: Tensor) -> Tensor:
    """R(K; u) = ⟨u, K u⟩_ω / ‖u‖²_ω with (K u)_i = Σ_j ω_j J_i J_jᵀ u_j, from the dense Gram."""
    g = dense_gram(model, params, x)
    n, k = u.shape
    wu = (omega.unsqueeze(-1) * u).reshape(-1)
    return (wu @ g @ wu) / (omega * (u**2).sum(-1)).sum()
