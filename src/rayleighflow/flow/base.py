"""The integrator protocol of :func:`~rayleighflow.gradient_flow` and what the driver hands it.

An integrator is a frozen configuration object (GradientDescent(step), Dopri5(rtol, atol), …)
that owns its step. The driver calls, in order:

* ``init(run) -> state``: the :class:`State` at the start (θ, t, evaluation count);
* ``start(state, recorder) -> Measurement``: the measurement recorded at the start (fixed-step
  integrators reuse the first iterate's evaluation: no extra backward pass);
* ``advance(state, t_next)``: move the state to the first time the integrator reaches at or
  after ``t_next`` (flow.times.due), logging every full-batch gradient evaluation in
  ``run.log`` and enforcing ``run.limits`` (budget, stall) at each;
* ``measure(state, recorder)`` and ``after_record(state)`` around each record;
* ``finish(state)``: flush what is pending and leave plain tensors in ``state.theta``.

Example:
    >>> import rayleighflow as rf
    >>> isinstance(rf.GradientDescent(0.1), rf.Integrator), rf.Dopri5().name
    (True, 'adaptive')
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._types import Params, flatten, unflatten
from ..data import Dataset
from ..problem import Problem
from ..rayleigh import Measurement, loss_and_grad
from ..trajectory import Trajectory
from .stops import FlowStatus, Limits, Stop

__all__ = ["Integrator", "Run", "State", "evaluate", "flatten", "unflatten"]


@dataclass
class Run:
    """What the driver gives an integrator: the problem, the data it steps on (None: fresh
    batches each step), the evaluation data of the records, the per-evaluation log (None when
    steps do not see the evaluation data), the random generator, the limits."""

    problem: Problem
    train: Dataset | None
    eval_data: Dataset
    log: Trajectory | None
    generator: torch.Generator
    limits: Limits
    theta: Params
    t_start: float
    evals_start: int
    resumed: bool = False   # the start is already recorded (and logged) in the trajectory


@dataclass
class State:
    """Where a run is: θ, the flow time, the gradient evaluations so far, and the
    integrator's own working data (``work``)."""

    theta: Params
    t: float
    evals: int
    work: Any = None


class Integrator(ABC):
    """The base class of the integrators (see the module docstring for the protocol).

    ``name`` is the family stored in trajectory headers (``method``): ``"euler"`` for the
    fixed-step ones (certified by the exact discrete certificate), ``"adaptive"`` for Dopri5.

    Example:
        >>> import rayleighflow as rf
        >>> [isinstance(i, rf.Integrator) for i in (rf.GradientDescent(0.1), rf.Dopri5())]
        [True, True]
        >>> rf.GradientDescent(0.1).header()["method"], rf.Dopri5().header()["rtol"]
        ('euler', 1e-07)
    """

    name: ClassVar[str]

    @abstractmethod
    def describe(self) -> str:
        """One line: what integrates, with its settings."""

    def header(self) -> dict[str, Any]:
        """The trajectory-header entries of this integrator."""
        return {"method": self.name, "integrator": self.describe(),
                "step": getattr(self, "step", None),
                "rtol": getattr(self, "rtol", None), "atol": getattr(self, "atol", None),
                "batch_size": getattr(self, "batch_size", None)}

    @property
    def adaptive(self) -> bool:
        return self.name == "adaptive"

    @abstractmethod
    def init(self, run: Run) -> State:
        """The state at the start."""

    def start(self, state: State, recorder: Any) -> Measurement:
        """The measurement recorded at the start (default: a fresh evaluation)."""
        return recorder.measure(state.t, state.theta)

    @abstractmethod
    def advance(self, state: State, t_next: float) -> None:
        """Integrate until the first time at or after ``t_next``."""

    def measure(self, state: State, recorder: Any) -> Measurement:
        """The measurement of a record (default: a fresh evaluation on the evaluation data)."""
        return recorder.measure(state.t, state.theta)

    def after_record(self, state: State) -> None:
        """Called after each record (default: nothing)."""
        return None

    def finish(self, state: State) -> None:
        """Flush and leave plain tensors in ``state.theta`` (also after a stop; default:
        nothing to flush)."""
        return None


def evaluate(problem: Problem, theta: Params, data: Dataset, t: float,
             log: Trajectory | None) -> tuple[Tensor, Params, Tensor]:
    """L, ∇L and the functional gradient at θ (one forward, one backward through the model).

    Logs (t, L, ‖∇L‖², ‖∇ℓ‖²_D) in ``log``: one reduction over the gradient and one O(nk)
    functional gradient at the detached outputs, so that R(K; ∇ℓ) is known at every evaluation.
    """
    loss, grad, _, fg = loss_and_grad(problem, theta, data)
    grad_sq = float(sum((g * g).sum() for g in grad.values()))
    value = float(loss)
    if not (math.isfinite(value) and math.isfinite(grad_sq)):
        raise Stop(FlowStatus.NON_FINITE, f"non-finite loss or gradient near t = {t:.6g}")
    if log is not None:
        fgrad_sq = float((problem.omega(data) * (fg * fg).sum(-1)).sum())
        log.add_evaluation(t, value, grad_sq, fgrad_sq)
    return loss, grad, fg
