"""Gradient flow θ̇ = −∇L(θ), recorded at flow times t (never iteration counts).

One driver loop (:mod:`.driver`) runs any :class:`Integrator`: :class:`GradientDescent` (θ_{k+1} =
θ_k − η∇L(θ_k) at t = kη, exactly full-batch gradient descent), :class:`StochasticGD` (fresh samples
of a sampler per step), :class:`Dopri5` (adaptive Runge–Kutta) and :class:`Implicit` (scipy's stiff
solvers, exact Hessian). Records come at the times of :class:`LogSpaced`, :class:`Times` or
:class:`Every`; the run stops at t_max or at the first of its stop rules (:class:`LossBelow`,
:class:`LimitReached`, :class:`MaxEvals`, :class:`Stall`), at a non-finite loss, or on Ctrl-C, and
``FlowResult.status`` says which and where. Observers (:class:`Columns`, :class:`OnRecord`,
:class:`Progress`, :class:`Checkpoint`) add columns and see every record.

Every gradient evaluation of a full-batch integrator (each gradient-descent iterate, each
Runge–Kutta stage) is logged in the trajectory (``Trajectory.evaluations``: t, L, ‖∇L‖²) at
the cost of one reduction, so certificates can check the KL ratio along the whole computed path
(CERTIFICATES.md §2–3), not only at the records.
"""

from .adaptive import Dopri5
from .base import Integrator, Run, State
from .driver import FlowResult, Start, gradient_flow
from .gd import GradientDescent, StochasticGD
from .implicit import Implicit
from .observers import Checkpoint, Columns, Diagnostic, Observer, OnRecord, Progress, Sinks
from .stops import (
           DEFAULT_MAX_EVALS,
           FlowStatus,
           LimitReached,
           Limits,
           LossBelow,
           MaxEvals,
           Stall,
           Stop,
)
from .times import TIME_RTOL, Every, LogSpaced, Times, covered, due, log_record_times, within

__all__ = ["Integrator", "GradientDescent", "StochasticGD", "Dopri5", "Implicit", "Run", "State",
           "gradient_flow", "FlowResult", "FlowStatus", "Start", "LogSpaced", "Times", "Every",
           "LossBelow", "LimitReached", "MaxEvals", "Stall", "Stop", "Limits",
           "DEFAULT_MAX_EVALS", "Observer",
           "Columns", "OnRecord", "Progress", "Checkpoint", "Sinks", "Diagnostic", "TIME_RTOL",
           "due", "covered", "within", "log_record_times"]
