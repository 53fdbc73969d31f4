"""The dense Hessian of L and what it says about where a flow stopped.

:func:`loss_hessian` is the P × P matrix ∇²L(θ) (torch.func, float64 on small models): the
Jacobian the stiff integrator (:class:`~rayleighflow.Implicit`) hands its solver, and the
matrix :func:`strict_minimum` reads. :func:`strict_minimum` is the evidence that θ sits at a
strict local minimum of L and how low that minimum can be: ∇²L positive definite, the Newton
step ‖∇²L⁻¹∇L‖ negligible, and the quadratic model's lower bound L − ‖∇L‖²/(2λ_min(∇²L)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import hessian

from ._types import Params, flatten, unflatten
from .data import Dataset
from .problem import Problem
from .rayleigh import loss_and_grad

__all__ = ["MAX_DENSE_PARAMS", "loss_hessian", "hessian_of_flat", "StrictMinimum",
           "strict_minimum"]

#: The largest P whose dense Hessian (P² float64 values) is formed.
MAX_DENSE_PARAMS = 4096


def hessian_of_flat(problem: Problem, like: Params, data: Dataset) -> Callable[[Tensor], Tensor]:
    """θ (flat, in the order of ``like``) ↦ ∇²L(θ) on ``data``; refuses P > MAX_DENSE_PARAMS."""
    n_params = sum(p.numel() for p in like.values())
    if n_params > MAX_DENSE_PARAMS:
        raise ValueError(f"the dense Hessian is P × P: P = {n_params} > {MAX_DENSE_PARAMS}; use "
                         "Dopri5 or GradientDescent for this model")

    def loss_of(flat: Tensor) -> Tensor:
        return problem.loss_value(unflatten(flat, like), data)

    return hessian(loss_of)


def loss_hessian(problem: Problem, params: Params, data: Dataset | None = None) -> Tensor:
    """∇²L(θ) as a P × P matrix (parameters flattened in the order of ``params``).

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1, bias=False).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> float(loss_hessian(problem, problem.params)[0, 0])     # Σ w_i x_i² = (1 + 4)/2
        2.5
    """
    finite = _finite_data(problem, data)
    flat = flatten({k: v.detach() for k, v in params.items()})
    return hessian_of_flat(problem, params, finite)(flat).detach()


def _finite_data(problem: Problem, data: Dataset | None) -> Dataset:
    chosen = problem.data if data is None else data
    if not isinstance(chosen, Dataset):
        raise TypeError("the Hessian needs a finite Dataset: pass data= for sampler problems")
    return chosen


@dataclass(frozen=True)
class StrictMinimum:
    """What the Hessian says at θ: L, ‖∇L‖, λ_min and λ_max of ∇²L, the Newton step's norm
    and ‖θ‖, and the quadratic model's lower bound L − ‖∇L‖²/(2λ_min) (−inf when ∇²L is not
    positive definite). ``positive_definite``: λ_min > ``eig_rtol``·λ_max; ``newton_negligible``:
    ‖step‖ ≤ ``newton_rtol``·max(1, ‖θ‖)."""

    loss: float
    grad_norm: float
    lambda_min: float
    lambda_max: float
    newton_step: float
    theta_norm: float
    lower_bound: float
    eig_rtol: float
    newton_rtol: float

    @property
    def positive_definite(self) -> bool:
        return self.lambda_min > self.eig_rtol * max(self.lambda_max, 0.0) and \
            self.lambda_min > 0

    @property
    def newton_negligible(self) -> bool:
        return self.newton_step <= self.newton_rtol * max(1.0, self.theta_norm)

    @property
    def is_strict_minimum(self) -> bool:
        return self.positive_definite and self.newton_negligible

    def at_or_above(self, level: float) -> bool:
        """A strict minimum whose quadratic-model lower bound is ≥ ``level``."""
        return self.is_strict_minimum and self.lower_bound >= level

    def describe(self) -> str:
        if not self.positive_definite:
            return (f"not a strict minimum: λ_min(∇²L) = {self.lambda_min:.3g} against "
                    f"λ_max = {self.lambda_max:.3g} (positive definite needs λ_min > "
                    f"{self.eig_rtol:g}·λ_max)")
        if not self.newton_negligible:
            return (f"not yet at the minimum: Newton step {self.newton_step:.3g} > "
                    f"{self.newton_rtol:g}·max(1, ‖θ‖)")
        return (f"strict minimum: λ_min(∇²L) = {self.lambda_min:.3g} > 0, Newton step "
                f"{self.newton_step:.3g}, L − ‖∇L‖²/(2λ_min) = {self.lower_bound:.6g}")

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}
        out.update(positive_definite=self.positive_definite,
                   newton_negligible=self.newton_negligible,
                   strict_minimum=self.is_strict_minimum, summary=self.describe())
        return out


def strict_minimum(problem: Problem, params: Params, data: Dataset | None = None, *,
                   eig_rtol: float = 1e-9, newton_rtol: float = 1e-6) -> StrictMinimum:
    """The evidence that θ is a strict local minimum of L, and the level it can reach.

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> net = torch.nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)                  # y = x: the minimum, L = 0
        >>> problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, x), "square")
        >>> ev = strict_minimum(problem, problem.params)
        >>> ev.is_strict_minimum, ev.lambda_min, ev.lower_bound
        (True, 2.5, 0.0)
    """
    finite = _finite_data(problem, data)
    params = {k: v.detach() for k, v in params.items()}
    h = loss_hessian(problem, params, finite).to(torch.float64)
    theta = flatten(params).to(torch.float64)
    loss_t, grads, _, _ = loss_and_grad(problem, params, finite)
    loss, grad = float(loss_t), flatten(grads).to(torch.float64)
    eig = torch.linalg.eigvalsh(0.5 * (h + h.T))
    lam_min, lam_max = float(eig[0]), float(eig[-1])
    g_norm = float(grad.norm())
    if lam_min > 0:
        step = float(torch.linalg.solve(h, grad).norm())
        lower = loss - g_norm ** 2 / (2.0 * lam_min)
    else:
        step, lower = math.inf, -math.inf
    return StrictMinimum(loss, g_norm, lam_min, lam_max, step, float(theta.norm()), lower,
                         eig_rtol, newton_rtol)

