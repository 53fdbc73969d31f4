"""Adaptive Dormand–Prince Runge–Kutta (torchdiffeq) on θ̇ = −∇L(θ), segment by segment
between record times; every stage's gradient evaluation is logged and counted against the
budget, and the stall rule watches the step."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Integrator, Run, State, evaluate, flatten, unflatten
from .stops import FlowStatus, Stop
from .times import _positive

__all__ = ["Dopri5"]


@dataclass(frozen=True)
class Dopri5(Integrator):
    """Adaptive Dormand–Prince 5(4) Runge–Kutta on θ̇ = −∇L(θ) (torchdiffeq), local error
    ≤ atol + rtol·|θ| per step; every stage's gradient evaluation is logged.

    Example:
        >>> Dopri5(rtol=1e-6).describe()
        'adaptive Runge–Kutta (dopri5), rtol 1e-06, atol 1e-09'
    """

    rtol: float = 1e-7
    atol: float = 1e-9
    name: ClassVar[str] = "adaptive"
    step: ClassVar[None] = None   # no fixed step

    def __post_init__(self) -> None:
        _positive("rtol", self.rtol, "Dopri5")
        if isinstance(self.atol, bool) or not isinstance(self.atol, int | float) \
                or not (math.isfinite(self.atol) and self.atol >= 0):
            raise ValueError(f"Dopri5: atol must be a finite number >= 0 (got {self.atol!r})")

    def describe(self) -> str:
        return f"adaptive Runge–Kutta (dopri5), rtol {self.rtol:g}, atol {self.atol:g}"

    def init(self, run: Run) -> State:
        state = State(run.theta, run.t_start, run.evals_start)
        like, train = run.theta, run.train
        assert train is not None   # adaptive integrators step on fixed data
        limits = run.limits
        window = limits.stall.window if limits.stall is not None else 1
        recent: deque[float] = deque(maxlen=window)  # flow times of the last evaluations

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            t_now = float(t)
            limits.spend(state.evals, t_now)
            state.evals += 1
            recent.append(t_now)
            limits.watch(recent, state.evals, t_now)
            grad = evaluate(run.problem, unflatten(y, like), train, t_now, run.log)[1]
            return -flatten(grad)

        state.work = (rhs, flatten(like), like)
        return state

    def advance(self, state: State, t_next: float) -> None:
        from torchdiffeq import odeint

        rhs, y, like = state.work
        span = torch.tensor([state.t, float(t_next)], dtype=torch.float64, device=y.device)
        try:
            y = odeint(rhs, y, span, rtol=self.rtol, atol=self.atol, method="dopri5")[-1]
        except AssertionError as err:  # torchdiffeq's step-size underflow
            raise Stop(FlowStatus.SOLVER_FAILED,
                       f"adaptive solver failed after t = {state.t:.6g}: {err}") from None
        state.t, state.theta = float(t_next), unflatten(y.clone(), like)
        state.work = (rhs, y, like)
        if not math.isfinite(float(y.abs().max())):
            raise Stop(FlowStatus.NON_FINITE, f"non-finite parameters at t = {state.t:.6g}")
