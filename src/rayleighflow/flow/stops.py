"""When a flow stops, besides t_max: the stop rules and the statuses a run ends with.

:class:`LossBelow` and :class:`LimitReached` are checked at records (``check(state, row)``);
:class:`MaxEvals` and :class:`Stall` act at every gradient evaluation, inside the integrator
(a budget spent or a collapsed step must stop the run mid-interval), and are handed to it as
:class:`Limits`.
:class:`~rayleighflow.Dopri5` runs get ``MaxEvals(DEFAULT_MAX_EVALS)`` and ``Stall()`` unless
given.

Example:
    >>> LossBelow(1e-6)
    LossBelow(target=1e-06)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .times import _count, _positive

__all__ = ["FlowStatus", "Stop", "LossBelow", "LimitReached", "MaxEvals", "Stall", "StopRule",
           "Limits", "DEFAULT_MAX_EVALS"]

#: Gradient-evaluation budget of :class:`~rayleighflow.Dopri5` runs when no MaxEvals is given.
DEFAULT_MAX_EVALS = 1_000_000


class FlowStatus(str, Enum):
    """Why a flow stopped: ``t_max`` reached; ``loss_target`` (a :class:`LossBelow` met at a
    record); ``limit`` (a :class:`LimitReached` met at a record); ``step_budget``
    (:class:`MaxEvals` spent); ``non_finite`` (L or ∇L not finite); ``solver_failed`` (the
    adaptive step underflowed); ``stalled`` (:class:`Stall`); ``interrupted`` (Ctrl-C, records
    kept).

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, -x), "square")
        >>> rf.gradient_flow(problem, rf.GradientDescent(0.1), t_max=1e3,
        ...                  stops=[rf.MaxEvals(5)]).status
        <FlowStatus.STEP_BUDGET: 'step_budget'>
    """

    T_MAX = "t_max"
    LOSS_TARGET = "loss_target"
    LIMIT = "limit"
    STEP_BUDGET = "step_budget"
    NON_FINITE = "non_finite"
    SOLVER_FAILED = "solver_failed"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"


class Stop(Exception):
    """Raised inside a run to end it with ``status`` and ``message``."""

    def __init__(self, status: FlowStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class LossBelow:
    """Stop at the first record with L ≤ ``target``.

    Example:
        >>> LossBelow(0.0)
        Traceback (most recent call last):
        ...
        ValueError: LossBelow: target must be a finite number > 0 (got 0.0)
    """

    target: float

    def __post_init__(self) -> None:
        _positive("target", self.target, "LossBelow")

    def check(self, state: Any, row: dict[str, Any]) -> None:
        loss = row["loss"]
        if loss <= self.target:
            raise Stop(FlowStatus.LOSS_TARGET,
                       f"loss {loss:.6g} ≤ target {self.target:g} at t = {row['t']:.6g}")


@dataclass(frozen=True)
class LimitReached:
    """Stop at the first record where the flow sits at its limit to working precision:
    ‖∇L‖² ≤ ``grad_rtol``·L (the flow has stopped moving: along it dL/dt = −‖∇L‖²), or
    L ≤ ``loss_floor`` (a zero-loss limit reached). What the limit *is* (a strict minimum, a
    plateau) is for the caller to read off the run, e.g. with the Hessian at the final θ.

    Example:
        >>> rule = LimitReached(grad_rtol=1e-12)
        >>> rule.check(None, {"t": 10.0, "loss": 0.5, "grad_sq": 1e-3})   # still moving
        >>> rule.check(None, {"t": 20.0, "loss": 0.5, "grad_sq": 1e-14})
        Traceback (most recent call last):
        ...
        rayleighflow.flow.stops.Stop: limit reached at t = 20: ‖∇L‖² = 1e-14 ≤ 1e-12·L (L = 0.5)
    """

    grad_rtol: float = 1e-12
    loss_floor: float = 0.0

    def __post_init__(self) -> None:
        _positive("grad_rtol", self.grad_rtol, "LimitReached")
        if not (math.isfinite(self.loss_floor) and self.loss_floor >= 0):
            raise ValueError(f"LimitReached: loss_floor must be a finite number ≥ 0 (got "
                             f"{self.loss_floor!r})")

    def check(self, state: Any, row: dict[str, Any]) -> None:
        loss, grad_sq, t = row["loss"], row["grad_sq"], row["t"]
        if grad_sq <= self.grad_rtol * loss:
            raise Stop(FlowStatus.LIMIT, f"limit reached at t = {t:.6g}: ‖∇L‖² = {grad_sq:.3g} "
                                         f"≤ {self.grad_rtol:g}·L (L = {loss:.6g})")
        if loss <= self.loss_floor:
            raise Stop(FlowStatus.LIMIT, f"limit reached at t = {t:.6g}: L = {loss:.6g} ≤ "
                                         f"floor {self.loss_floor:g}")


@dataclass(frozen=True)
class MaxEvals:
    """Stop after ``n`` gradient evaluations (counted from the run's first, across resumes).

    Example:
        >>> MaxEvals(1000).n
        1000
    """

    n: int

    def __post_init__(self) -> None:
        _count("n", self.n, "MaxEvals")

    def check(self, state: Any, row: dict[str, Any]) -> None:
        """Nothing at records: the integrator enforces the budget at every evaluation."""


@dataclass(frozen=True)
class Stall:
    """Adaptive integrators: stop when the last ``window`` gradient evaluations advanced the
    flow by less than ``rtol`` of the time elapsed since the start (or of the first record
    interval) and, at that rate, t_max is beyond the evaluation budget.

    Example:
        >>> Stall().window, Stall().rtol
        (200, 0.001)
    """

    window: int = 200
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        _count("window", self.window, "Stall", least=2)
        _positive("rtol", self.rtol, "Stall")

    def check(self, state: Any, row: dict[str, Any]) -> None:
        """Nothing at records: the adaptive integrator watches its step at every evaluation."""


StopRule = LossBelow | LimitReached | MaxEvals | Stall


@dataclass
class Limits:
    """What an integrator enforces at every gradient evaluation: the budget (total count) and,
    for adaptive integrators, the stall rule with the times it is measured against."""

    budget: int | None = None
    stall: Stall | None = None
    t_start: float = 0.0
    t_max: float = math.inf
    scale: float = 0.0   # the first record interval (the stall floor's scale at the start)

    def spend(self, evals: int, t: float, *, steps: bool = False) -> None:
        """Raise :class:`Stop` when ``evals`` evaluations exhaust the budget (before one more);
        ``steps``: say it of a fixed-step integrator (one evaluation per step)."""
        if self.budget is not None and evals >= self.budget:
            if steps:
                raise Stop(FlowStatus.STEP_BUDGET,
                           f"step budget {self.budget} spent at t = {t:.6g}")
            raise Stop(FlowStatus.STEP_BUDGET, f"gradient-evaluation budget {self.budget} "
                                               f"spent near t = {t:.6g}")

    def watch(self, recent: deque[float], evals: int, t_eval: float) -> None:
        """The stall rule on the flow times of the last ``window`` evaluations (``t_eval``: the
        time of the one just made)."""
        rule = self.stall
        if rule is None or len(recent) != rule.window or evals % rule.window:
            return
        floor = rule.rtol * max(t_eval - self.t_start, self.scale)
        t_now = max(recent)  # stage times of rejected steps may run ahead of the last one
        advance = t_now - recent[0]
        left = (self.budget or 0) - evals
        needed = math.inf if advance <= 0 else (self.t_max - t_now) / advance * len(recent)
        if advance < floor and needed > left:
            step = advance / len(recent)
            typical = (t_now - self.t_start) / max(evals, 1)   # the run's mean step so far
            reach = t_now + step * left
            if step < 1e-3 * typical:
                cause = (f"the adaptive step collapsed (steps of ~{step:.2g} against "
                         f"{typical:.2g} earlier), "
                         "as for a stiff or exploding model (outputs or weights at a huge "
                         "scale): rescale the model, or integrate it with rf.Implicit "
                         "([flow.integrator] kind = 'implicit')")
            else:
                cause = (f"the step did not collapse (steps of ~{step:.2g} throughout): t_max "
                         f"is beyond what the budget reaches (about t = {reach:.3g}); lower "
                         "t_max ([flow] t_max), raise the budget (rf.MaxEvals(n); [flow.stop] "
                         "max_evals), or integrate with rf.Implicit ([flow.integrator] kind = "
                         "'implicit'), which takes long steps")
            raise Stop(FlowStatus.STALLED, (
                f"stopped at t = {t_now:.6g} of t_max = {self.t_max:g}: the last "
                f"{len(recent)} gradient evaluations advanced the flow by {advance:.3g}; at "
                f"that rate t_max needs ~{needed:.2g} more, beyond the {left} left in the "
                f"budget; {cause}"))


def read_stops(stops, adaptive: bool,
               evals_start: int) -> tuple[list[LossBelow | LimitReached], Limits]:
    """The record-time rules and the per-evaluation limits from a list of stop rules."""
    at_records: list[LossBelow | LimitReached] = []
    limits = Limits()
    for rule in stops:
        if isinstance(rule, LossBelow | LimitReached):
            at_records.append(rule)
        elif isinstance(rule, MaxEvals):
            limits.budget = rule.n if limits.budget is None else min(limits.budget, rule.n)
        elif isinstance(rule, Stall):
            if not adaptive:
                raise ValueError("Stall applies to the adaptive integrator (Dopri5): a fixed "
                                 "step cannot collapse; use MaxEvals to bound the run")
            limits.stall = rule
        else:
            raise TypeError(f"stops take LossBelow(target), LimitReached(grad_rtol, "
                            f"loss_floor), MaxEvals(n) and Stall(window, rtol) (got {rule!r})")
    if adaptive:
        if limits.budget is None:
            limits.budget = evals_start + DEFAULT_MAX_EVALS
        if limits.stall is None:
            limits.stall = Stall()
    return at_records, limits
