"""Rayleigh quotient of the tangent kernel along the loss gradient, at the cost of one backward.

Key identity (THEORY.md §1): ∇L = J*∇ℓ, hence ‖∇L(θ)‖² = R(K_θ; ∇ℓ) · ‖∇ℓ‖²_D, so

    R(K_θ; ∇ℓ) = ‖∇L(θ)‖² / ‖∇ℓ(f_θ)‖²_D,      ‖u‖²_D = Σ_i ω_i ‖u_i‖².

No kernel is formed. Per-group quotients R(K_b; ∇ℓ) = ‖∇_b L‖² / ‖∇ℓ‖²_D sum to R (T2); the
witness bound R ≥ ⟨∇ℓ, J v⟩²_D / (‖∇ℓ‖²_D ‖v‖²) costs one JVP (T3).

Example:
    >>> m = measure(problem)            # doctest: +SKIP
    >>> m.rayleigh, m.group_rayleigh    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor
from torch.func import jvp

from ._types import Convention, Params
from .data import Dataset
from .problem import Problem

__all__ = ["Measurement", "measure", "loss_and_grad", "witness_bound"]


@final
@dataclass(frozen=True)
class Measurement:
    """Diagnostics at one parameter point, in the named convention.

    ``rayleigh`` is NaN only when ∇ℓ = 0 exactly (a functional minimizer: nothing to bound).
    Fields: ``loss`` = L(θ), ``grad_sq`` = ‖∇L‖², ``fgrad_sq`` = ‖∇ℓ‖²_D,
    ``rayleigh`` = R(K; ∇ℓ) = ‖∇L‖²/‖∇ℓ‖²_D and ``group_rayleigh`` (they sum to ``rayleigh``).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> m = rf.measure(rf.Problem(rf.Model(net), data, "square"))
        >>> abs(m.grad_sq - m.rayleigh * m.fgrad_sq) <= 1e-12 * m.grad_sq   # ‖∇L‖² = R·‖∇ℓ‖²
        True
        >>> sorted(m.as_row())
        ['fgrad_sq', 'grad_sq', 'loss', 'rayleigh', 'rayleigh[0]', 'rayleigh[2]']
    """

    loss: float
    grad_sq: float
    fgrad_sq: float
    rayleigh: float
    group_rayleigh: dict[str, float]
    convention: Convention

    def as_row(self, groups: bool = True) -> dict[str, float]:
        row = {"loss": self.loss, "grad_sq": self.grad_sq, "fgrad_sq": self.fgrad_sq,
               "rayleigh": self.rayleigh}
        if groups:
            row.update({f"rayleigh[{g}]": r for g, r in self.group_rayleigh.items()})
        return row


def loss_and_grad(
    problem: Problem, params: Params, data: Dataset
) -> tuple[Tensor, Params, Tensor, Tensor]:
    """One forward and one backward: (L, ∇L by name, outputs f (n, k), functional gradient g).

    The backward runs through the model only, seeded with ∂L/∂f_i = ω_i g_i (the chain rule
    ∇L = J*∇ℓ): the loss itself is evaluated without a graph, in its precise form, and the
    functional gradient the diagnostics need is the one that drives the backward.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        f = problem.model(leaves, data.x)
    fd = f.detach()
    y = problem.targets(data, fd)
    omega = problem.omega(data)
    with torch.no_grad():
        loss = problem.loss.value(fd, y, omega)
        g = problem.loss.functional_grad(fd, y)
    seed = (omega.to(g.dtype).unsqueeze(-1) * g).to(f.dtype)
    grads = torch.autograd.grad(f, list(leaves.values()), grad_outputs=seed, allow_unused=True)
    grad = {
        k: (gr if gr is not None else torch.zeros_like(leaves[k]))
        for k, gr in zip(leaves, grads, strict=True)
    }
    return loss, grad, fd, g


def _sq(t: Tensor) -> Tensor:
    return (t * t).sum()


def measure(
    problem: Problem, params: Params | None = None, data: Dataset | None = None
) -> Measurement:
    """L, ‖∇L‖², ‖∇ℓ‖²_D, R(K; ∇ℓ) and per-group quotients at θ (one backward pass).

    R(K_θ; ∇ℓ) = ⟨∇ℓ, K∇ℓ⟩_D/‖∇ℓ‖²_D = ‖∇L(θ)‖²/‖∇ℓ(f_θ)‖²_D (the chain rule ∇L = J*∇ℓ), in
    the problem's convention; no kernel is formed. ``params`` defaults to the problem's θ₀,
    ``data`` to its dataset.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> problem = rf.Problem(rf.Model(net), data, "square")
        >>> m = rf.measure(problem)
        >>> from rayleighflow.ntk import empirical_ntk, kernel_matrix
        >>> K = kernel_matrix(empirical_ntk(net, data.x))        # the L²(D) operator, nk × nk
        >>> g = (net(data.x) - data.y).detach().reshape(-1)      # ∇ℓ for the square loss
        >>> R = float(g @ K @ g / g.square().sum())              # ⟨g, Kg⟩_D / ‖g‖²_D, w = 1/n
        >>> abs(R - m.rayleigh) <= 1e-10 * R
        True
        >>> abs(sum(m.group_rayleigh.values()) - m.rayleigh) <= 1e-12 * m.rayleigh
        True
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"measure needs a rayleighflow.Problem (got {type(problem).__name__}): "
                        "wrap the model, e.g. rf.measure(rf.Problem(rf.Model(net), data, "
                        "'square'))")
    params = problem.params if params is None else params
    data = _finite_data(problem, data)
    loss, grad, _, g = loss_and_grad(problem, params, data)
    return _measurement(problem, data, loss, grad, g)


def _measurement(problem: Problem, data: Dataset, loss: Tensor, grad: Params,
                 g: Tensor) -> Measurement:
    omega = problem.omega(data)
    fgrad_sq = float((omega * (g * g).sum(-1)).sum())
    group_sq = {
        name: float(sum(_sq(grad[p]) for p in members))
        for name, members in problem.model.groups.items()
    }
    grad_sq = float(sum(group_sq.values()))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is not finite ({float(loss)}) at these parameters")
    if fgrad_sq > 0:
        rayleigh = grad_sq / fgrad_sq
        groups = {k: v / fgrad_sq for k, v in group_sq.items()}
    else:
        rayleigh, groups = float("nan"), {k: float("nan") for k in group_sq}
    return Measurement(float(loss), grad_sq, fgrad_sq, rayleigh, groups, problem.convention)


def witness_bound(
    problem: Problem, direction: Params, params: Params | None = None,
    data: Dataset | None = None,
) -> float:
    """T3: R(K; ∇ℓ) ≥ ⟨∇ℓ, J v⟩²_D / (‖∇ℓ‖²_D ‖v‖²) for a direction v in parameter space.

    One JVP; equality for v = ∇L (Cauchy–Schwarz). In the problem's convention.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> problem = rf.Problem(rf.Model(net), data, "square")
        >>> v = {k: torch.randn_like(p) for k, p in problem.params.items()}
        >>> m = rf.measure(problem)
        >>> rf.witness_bound(problem, v) <= m.rayleigh                # a lower bound
        True
        >>> from rayleighflow.rayleigh import loss_and_grad
        >>> grad = loss_and_grad(problem, problem.params, data)[1]   # v = ∇L: equality
        >>> abs(rf.witness_bound(problem, grad) - m.rayleigh) <= 1e-10 * m.rayleigh
        True
    """
    params = problem.params if params is None else params
    data = _finite_data(problem, data)
    missing = set(params) - set(direction)
    if missing:
        raise ValueError(f"the direction lacks parameters {sorted(missing)}: give all of them")
    names = list(params)

    def f(*flat: Tensor) -> Tensor:
        return problem.model(dict(zip(names, flat, strict=True)), data.x)

    out, jv = jvp(f, tuple(params[k] for k in names), tuple(direction[k] for k in names))  # type: ignore[misc]
    g = problem.loss.functional_grad(out, problem.targets(data, out))
    omega = problem.omega(data)
    inner = (omega * (g * jv).sum(-1)).sum()
    g_sq = (omega * (g * g).sum(-1)).sum()
    v_sq = sum(_sq(direction[k]) for k in names)
    if float(g_sq) == 0 or float(v_sq) == 0:
        raise ValueError("the witness bound needs ∇ℓ ≠ 0 and a nonzero direction v")
    return float(inner**2 / (g_sq * v_sq))


def _finite_data(problem: Problem, data: Dataset | None) -> Dataset:
    if data is None:
        if not isinstance(problem.data, Dataset):
            raise ValueError(
                "this problem's data is a sampler: pass a finite Dataset (e.g. "
                "problem.data.sample(n, generator)) to evaluate at"
            )
        data = problem.data
    problem.validate(data)
    return data
