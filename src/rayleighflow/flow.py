"""Gradient flow θ̇ = −∇L(θ), recorded at flow times t (never iteration counts).

Two integrators:

* ``EULER``: θ_{k+1} = θ_k − η ∇L(θ_k) at t = kη — exactly full-batch gradient descent. With a
  sampler, each step draws ``batch_size`` fresh samples (stochastic flow on the population
  loss); diagnostics use a fixed evaluation sample.
* ``ADAPTIVE``: Dormand–Prince Runge–Kutta from torchdiffeq with ``rtol``/``atol``, run segment
  by segment between record times. With a sampler it integrates the loss on a fixed large
  sample.

The run stops at ``t_max``, at ``loss_target`` (checked at records), at ``max_steps`` gradient
evaluations (the adaptive integrator has a default budget, ``DEFAULT_MAX_EVALS``), when the
adaptive step stalls (the last ``stall_window`` gradient evaluations advanced the flow by less
than ``stall_rtol`` of the time elapsed since the start — or of the first record interval — and
at that rate reaching ``t_max`` would take more evaluations than the budget has left: a
collapsed step, as for a stiff or exploding model), at a non-finite loss, or on Ctrl-C;
``FlowResult.status`` says which and where.

Every gradient evaluation of a full-batch integrator (each gradient-descent iterate, each
Runge–Kutta stage) is logged in the trajectory (``Trajectory.evaluations``: t, L, ‖∇L‖²) at
the cost of one reduction, so certificates can check the KL ratio along the whole computed path
(CERTIFICATES.md §2–3), not only at the records.

Example:
    >>> result = gradient_flow(problem, t_max=100.0)          # doctest: +SKIP
    >>> result.status, result.trajectory["loss"][-1]           # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, final

import numpy as np
import torch
from torch import Tensor

from . import _lean_gd
from ._types import Params
from .data import Dataset, Sampler
from .integrators import (
    DEFAULT_MAX_EVALS,
    Dopri5,
    Every,
    GradientDescent,
    LogSpaced,
    LossBelow,
    MaxEvals,
    Stall,
    StochasticGD,
    Times,
    log_record_times,
)
from .problem import Problem
from .rayleigh import Measurement, _measurement, loss_and_grad
from .rounding import float64_start
from .trajectory import Trajectory

__all__ = ["Integrator", "FlowStatus", "FlowResult", "gradient_flow", "log_record_times",
           "Diagnostic", "DEFAULT_MAX_EVALS"]

Diagnostic = Callable[[Problem, Params, Dataset, int], Mapping[str, float]]
"""Extra per-record columns: called as fn(problem, params, eval_data, record_index)."""


class Integrator(str, Enum):
    """The integrator families by name, as stored in trajectory headers (``method``):
    ``euler`` (θ_{k+1} = θ_k − η∇L(θ_k) at t = kη: :class:`GradientDescent`,
    :class:`StochasticGD`) and ``adaptive`` (:class:`Dopri5`). Certificates read it to pick
    the exact discrete certificate for ``euler`` runs.

    Example:
        >>> import rayleighflow as rf
        >>> Integrator(rf.GradientDescent(0.1).name), Integrator(rf.Dopri5().name).value
        (<Integrator.EULER: 'euler'>, 'adaptive')
    """

    EULER = "euler"
    ADAPTIVE = "adaptive"


class FlowStatus(str, Enum):
    """Why a flow stopped: ``t_max`` reached; ``loss_target`` (a :class:`LossBelow` met at a
    record); ``step_budget`` (:class:`MaxEvals` spent); ``non_finite`` (L or ∇L not finite);
    ``solver_failed`` (the adaptive step underflowed); ``stalled`` (:class:`Stall`);
    ``interrupted`` (Ctrl-C, records kept).

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
    STEP_BUDGET = "step_budget"
    NON_FINITE = "non_finite"
    SOLVER_FAILED = "solver_failed"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"


@final
@dataclass
class FlowResult:
    """What a flow returns: the recorded :class:`Trajectory`, θ at ``t_final`` (``params``),
    the :class:`FlowStatus` and its ``message``, the gradient evaluations spent and the wall
    time. The model itself is not changed unless ``gradient_flow(..., update_model=True)`` or
    :meth:`load_into` is used.

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(1)
        >>> net = torch.nn.Linear(1, 1).double()
        >>> run = rf.gradient_flow(rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, 3 * x),
        ...                                   "square"), rf.GradientDescent(0.5), t_max=100.0)
        >>> run.t_final, run.n_grad_evals, round(float(run.params["weight"]), 6)
        (100.0, 201, 3.0)
        >>> round(float(run.load_into(net).weight.detach()), 6)      # θ back in the module
        3.0
    """

    trajectory: Trajectory
    params: Params
    status: FlowStatus
    t_final: float
    n_grad_evals: int
    message: str
    wall_time: float

    def load_into(self, module: torch.nn.Module) -> torch.nn.Module:
        """Copy the final parameters into ``module`` in place (names as in ``named_parameters``);
        returns the module."""
        named = dict(module.named_parameters())
        missing = sorted(set(self.params) - set(named))
        if missing:
            raise ValueError(f"the module has no parameters named {missing}: load into the "
                             "module the flow was run on")
        with torch.no_grad():
            for name, value in self.params.items():
                named[name].copy_(value)
        return module


class _Stop(Exception):
    def __init__(self, status: FlowStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _flatten(params: Params) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def _unflatten(vec: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


@final
class _Recorder:
    """Evaluates the diagnostics on the evaluation data and appends rows."""

    def __init__(self, problem, eval_data, traj, diagnostics, on_record, progress,
                 groups: bool) -> None:
        self.problem, self.eval_data, self.traj, self.groups = problem, eval_data, traj, groups
        self.diagnostics, self.on_record, self.progress = diagnostics, on_record, progress
        self.start = time.perf_counter()
        self.count = len(traj)

    def record(self, t: float, params: Params, n_evals: int,
               evaluated: tuple[Tensor, Params, Tensor] | None = None,
               measured: Measurement | None = None) -> float:
        """Append the row at θ; ``evaluated`` = (L, ∇L, ∇ℓ) already computed at θ on the
        evaluation data (gradient descent reuses its step's evaluation: no extra backward), or
        ``measured``, the measurement made of it."""
        if measured is not None:
            m = measured
        else:
            m = self.measure(t, params, evaluated)
        row: dict[str, Any] = {"t": t, "grad_evals": n_evals, **m.as_row(self.groups)}
        for diag in self.diagnostics:
            row.update(diag(self.problem, params, self.eval_data, self.count))
        row["wall"] = time.perf_counter() - self.start
        self.traj.append(row)
        self.count += 1
        if self.on_record is not None:
            self.on_record(row, params)
        if self.progress is not None:
            self.progress(t, m.loss)
        return m.loss

    def measure(self, t: float, params: Params,
                evaluated: tuple[Tensor, Params, Tensor] | None = None) -> Measurement:
        """The measurement at θ (``evaluated`` reused when given), refusing a non-finite L."""
        if evaluated is None:
            loss, grad, _, g = loss_and_grad(self.problem, params, self.eval_data)
        else:
            loss, grad, g = evaluated
        if not torch.isfinite(loss):
            raise _Stop(FlowStatus.NON_FINITE, f"non-finite loss {float(loss)} at t = {t:.6g}")
        return _measurement(self.problem, self.eval_data, loss, grad, g)


_LEGACY = ("method", "step", "rtol", "atol", "batch_size", "record_times", "n_records",
           "loss_target", "max_steps", "stall_window", "stall_rtol")


def gradient_flow(
    problem: Problem,
    integrator: GradientDescent | StochasticGD | Dopri5 | None = None,
    *,
    t_max: float,
    records: LogSpaced | Times | Every | None = None,
    stops: Sequence[LossBelow | MaxEvals | Stall] = (),
    eval_data: Dataset | None = None,
    eval_size: int = 4096,
    generator: torch.Generator | None = None,
    params: Params | None = None,
    t_start: float = 0.0,
    grad_evals_start: int = 0,
    path: str | Path | None = None,
    append: bool = False,
    meta: Mapping[str, Any] | None = None,
    diagnostics: Sequence[Diagnostic] = (),
    on_record: Callable[[dict, Params], None] | None = None,
    progress: Callable[[float, float], None] | None = None,
    group_quotients: bool = True,
    update_model: bool = False,
    **legacy: Any,
) -> FlowResult:
    """Integrate θ̇ = −∇L(θ) from ``params`` (default the model's) at ``t_start`` to ``t_max``
    with ``integrator`` (default :class:`Dopri5`), recording at ``records`` (default
    :class:`LogSpaced`) and stopping at t_max or at the first of ``stops``.

    Each record holds L, ‖∇L‖², ‖∇ℓ‖²_D, R(K; ∇ℓ) = ‖∇L‖²/‖∇ℓ‖²_D and per-group quotients, plus
    the columns of each ``diagnostics`` callable. ``eval_data``/``eval_size``: the fixed sample
    records evaluate for sampler data (default ``eval_size`` fresh samples). ``path`` streams
    the trajectory to JSONL as it grows (``append`` continues one); ``on_record(row, params)``
    and ``progress(t, loss)`` see every record. A resumed run passes ``params``, ``t_start``
    and ``grad_evals_start`` so that times and evaluation counts carry over. ``update_model``
    copies the final θ into the wrapped ``nn.Module`` (see :meth:`FlowResult.load_into`).

    The flat keywords of earlier versions (``method``, ``step``, ``rtol``, ``atol``,
    ``batch_size``, ``record_times``, ``n_records``, ``loss_target``, ``max_steps``,
    ``stall_window``, ``stall_rtol``) still work, with a DeprecationWarning naming the objects
    that replace them.

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, 2 * x), "square")
        >>> run = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=50.0,
        ...                        records=rf.Every(10))
        >>> run.status.value, run.n_grad_evals, bool(run.trajectory["loss"][-1] < 1e-8)
        ('t_max', 101, True)
    """
    if legacy:
        integrator, records, stops = _from_legacy(legacy, integrator, records, stops)
    if not isinstance(problem, Problem):
        raise TypeError(f"gradient_flow needs a rayleighflow.Problem (got {type(problem).__name__})"
                        ": wrap the model, e.g. Problem(Model(net), data, 'square')")
    integrator = Dopri5() if integrator is None else integrator
    if not isinstance(integrator, GradientDescent | StochasticGD | Dopri5):
        raise TypeError(f"integrator must be GradientDescent(step), StochasticGD(step, "
                        f"batch_size) or Dopri5(rtol, atol) (got {integrator!r})")
    if not (isinstance(t_max, int | float) and math.isfinite(t_max)):
        raise ValueError(f"t_max must be a finite number (got {t_max!r})")
    if not t_max > t_start:
        raise ValueError(f"t_max ({t_max}) must exceed the start time ({t_start})")
    target, max_steps, stall = _read_stops(stops, integrator, grad_evals_start)
    step = getattr(integrator, "step", None)
    batch_size = getattr(integrator, "batch_size", None)
    method = Integrator(integrator.name)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    train_data, eval_data = _resolve_data(problem, batch_size, eval_data, eval_size, generator,
                                          method)
    records = LogSpaced() if records is None else records
    if not isinstance(records, LogSpaced | Times | Every):
        raise TypeError(f"records must be LogSpaced(n), Times(values) or Every(steps) (got "
                        f"{records!r})")
    times = records.times(t_start, t_max, step)
    header = {"convention": problem.convention.value, "loss": problem.loss.name,
              "method": method.value, "integrator": integrator.describe(), "step": step,
              "rtol": getattr(integrator, "rtol", None), "atol": getattr(integrator, "atol", None),
              "n_params": problem.model.n_params, "groups": list(problem.model.groups),
              "batch_size": batch_size, "eval_size": eval_data.n,
              **(meta or {})}
    theta = {k: v.detach().clone() for k, v in (params or problem.params).items()}
    if not append:   # below float64: L(θ₀) in float64, where the certificates' bounds start
        header.update(float64_start(problem, theta, eval_data))
    traj = Trajectory(header, path, append=append)
    rec = _Recorder(problem, eval_data, traj, diagnostics, on_record, progress,
                    group_quotients)
    # The path log is a full-batch object: fresh batches or a separate evaluation set break it.
    log = traj if (train_data is eval_data) else None
    state = {"t": t_start, "evals": grad_evals_start, "theta": theta}
    begin = time.perf_counter()
    try:
        resumed_here = bool(append and len(traj) and traj.rows[-1].get("t") == t_start)
        if method is Integrator.EULER and log is not None:
            _run_gd(problem, state, times, step, train_data, rec, target, max_steps, log,
                    record_start=not resumed_here)
        elif method is Integrator.EULER:
            if not resumed_here:
                _check_target(rec.record(t_start, theta, 0), target, t_start)
            _run_euler(problem, state, times, step, train_data, generator, batch_size, rec,
                       target, max_steps, log)
        else:
            if not resumed_here:
                _check_target(rec.record(t_start, theta, 0), target, t_start)
            scale = float(times[0]) - t_start  # the first record interval
            _run_adaptive(problem, state, times, train_data, integrator.rtol, integrator.atol,
                          rec, target, max_steps, log, (stall, t_start, scale))
        status, message = FlowStatus.T_MAX, f"reached t_max = {t_max:g}"
    except _Stop as stop:
        status, message = stop.status, stop.message
    except KeyboardInterrupt:
        status, message = FlowStatus.INTERRUPTED, f"interrupted at t = {state['t']:.6g}"
    traj.close(status.value, message)
    result = FlowResult(traj, state["theta"], status, state["t"], state["evals"], message,
                        time.perf_counter() - begin)
    if update_model and problem.model.module is not None:
        result.load_into(problem.model.module)
    return result


def _from_legacy(legacy: dict[str, Any], integrator, records, stops):
    """Map the flat keywords of earlier versions onto integrator, record and stop objects."""
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"gradient_flow() got unexpected keyword argument(s) {unknown}")
    solver = {k: legacy[k] for k in ("method", "step", "rtol", "atol", "batch_size")
              if k in legacy}
    timing = {k: legacy[k] for k in ("record_times", "n_records") if k in legacy}
    stop = {k: legacy[k] for k in ("loss_target", "max_steps", "stall_window", "stall_rtol")
            if k in legacy}
    for given, old, what in ((integrator, solver, "integrator"), (records, timing, "records"),
                             (stops, stop, "stops")):
        if given and old:
            raise TypeError(f"pass either {what}= or the flat keywords {sorted(old)}, not both")
    if solver:
        method = _parse_method(solver.get("method", Integrator.ADAPTIVE))
        step = solver.get("step")
        if method is Integrator.EULER:
            if not (isinstance(step, int | float) and step > 0):
                raise ValueError("the Euler integrator needs a step > 0 (it is gradient "
                                 "descent, t = kη)")
            size = solver.get("batch_size")
            integrator = GradientDescent(step) if size is None else StochasticGD(step, size)
        else:
            if solver.get("batch_size") is not None:
                raise ValueError("fresh samples per step need the Euler integrator "
                                 "(method='euler')")
            integrator = Dopri5(solver.get("rtol", 1e-7), solver.get("atol", 1e-9))
    if timing:
        given_times = timing.get("record_times")
        records = (LogSpaced(timing.get("n_records", 60)) if given_times is None
                   else _legacy_times(given_times))
    if stop:
        stops = []
        if stop.get("loss_target") is not None:
            target = stop["loss_target"]
            if not (isinstance(target, int | float) and target > 0):
                raise ValueError(f"loss_target must be > 0 (got {target})")
            stops.append(LossBelow(target))
        if stop.get("max_steps") is not None:
            stops.append(MaxEvals(stop["max_steps"]))
        if "stall_window" in stop or "stall_rtol" in stop:
            stops.append(Stall(stop.get("stall_window", 200), stop.get("stall_rtol", 1e-3)))
    replaced = ", ".join(sorted(legacy))
    warnings.warn(f"gradient_flow's flat keywords ({replaced}) are deprecated: pass integrator="
                  "GradientDescent(step) | StochasticGD(step, batch_size) | Dopri5(rtol, atol), "
                  "records=LogSpaced(n) | Times(values) | Every(steps), stops=[LossBelow(target),"
                  " MaxEvals(n), Stall(window, rtol)]", DeprecationWarning, stacklevel=3)
    return integrator, records, stops


def _legacy_times(values) -> Times:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or np.any(np.diff(arr) <= 0):
        raise ValueError("record_times must be a strictly increasing 1-D sequence")
    return Times(arr)


def _read_stops(stops, integrator, grad_evals_start: int):
    """(loss target, evaluation budget, stall rule) from the stop objects."""
    target = budget = stall = None
    for rule in stops:
        if isinstance(rule, LossBelow):
            target = rule.target if target is None else max(target, rule.target)
        elif isinstance(rule, MaxEvals):
            budget = rule.n if budget is None else min(budget, rule.n)
        elif isinstance(rule, Stall):
            if not isinstance(integrator, Dopri5):
                raise ValueError("Stall applies to the adaptive integrator (Dopri5): a fixed "
                                 "step cannot collapse; use MaxEvals to bound the run")
            stall = rule
        else:
            raise TypeError(f"stops take LossBelow(target), MaxEvals(n) and Stall(window, "
                            f"rtol) (got {rule!r})")
    if isinstance(integrator, Dopri5):
        budget = grad_evals_start + DEFAULT_MAX_EVALS if budget is None else budget
        stall = Stall() if stall is None else stall
    return target, budget, stall


def _check_stall(recent: deque[float], t_max: float, budget_left: int, floor: float) -> None:
    """Stop when the recent evaluations advanced the flow by less than ``floor`` and, at their
    rate, t_max is out of the budget's reach."""
    t_now = max(recent)  # stage times of rejected steps may run ahead of the last one
    advance = t_now - recent[0]
    needed = math.inf if advance <= 0 else (t_max - t_now) / advance * len(recent)
    if advance < floor and needed > budget_left:
        raise _Stop(FlowStatus.STALLED, (
            f"stalled near t = {t_now:.6g}: the last {len(recent)} gradient evaluations advanced "
            f"the flow by {advance:.3g}; at that rate reaching t_max = {t_max:g} needs ~"
            f"{needed:.2g} more, beyond the {budget_left} left in the budget. The adaptive step "
            "collapsed, as for a stiff or exploding model (outputs or weights at a huge scale): "
            "rescale the model, raise max_steps, or use method='euler' with a small step"))


def _parse_method(method: Integrator | str) -> Integrator:
    try:
        return Integrator(method)
    except ValueError:
        raise ValueError(f"unknown integrator {method!r}: use 'euler' or 'adaptive'") from None


def _resolve_data(problem, batch_size, eval_data, eval_size, generator, method):
    if isinstance(problem.data, Sampler):
        if eval_data is None:
            eval_data = problem.data.sample(eval_size, generator)
        problem.validate(eval_data)
        if batch_size is not None and method is not Integrator.EULER:
            raise ValueError("fresh samples per step need the Euler integrator (method='euler')")
        return (None if batch_size is not None else eval_data), eval_data
    if batch_size is not None:
        raise ValueError("batch_size (fresh samples per step) applies only to sampler data")
    eval_data = eval_data if eval_data is not None else problem.data
    problem.validate(eval_data)
    return problem.data, eval_data


def _check_target(loss: float, target: float | None, t: float) -> None:
    if target is not None and loss <= target:
        raise _Stop(FlowStatus.LOSS_TARGET, f"loss {loss:.6g} ≤ target {target:g} at t = {t:.6g}")


def _evaluate(problem: Problem, theta: Params, data: Dataset, t: float,
              log: Trajectory | None) -> tuple[Tensor, Params, Tensor]:
    """L, ∇L and the functional gradient at θ (one forward, one backward through the model).

    Logs (t, L, ‖∇L‖², ‖∇ℓ‖²_D) in ``log``: one reduction over the gradient and one O(nk)
    functional gradient at the detached outputs, so that R(K; ∇ℓ) is known at every evaluation.
    """
    loss, grad, _, fg = loss_and_grad(problem, theta, data)
    grad_sq = float(sum((g * g).sum() for g in grad.values()))
    value = float(loss)
    if not (math.isfinite(value) and math.isfinite(grad_sq)):
        raise _Stop(FlowStatus.NON_FINITE, f"non-finite loss or gradient near t = {t:.6g}")
    if log is not None:
        fgrad_sq = float((problem.omega(data) * (fg * fg).sum(-1)).sum())
        log.add_evaluation(t, value, grad_sq, fgrad_sq)
    return loss, grad, fg


def _grad(problem: Problem, theta: Params, data: Dataset, t: float,
          log: Trajectory | None) -> Params:
    return _evaluate(problem, theta, data, t, log)[1]


def _run_gd(problem, state, times, step, data, rec, target, max_steps, log, *,
            record_start: bool) -> None:
    """Full-batch gradient descent on the lean path (:mod:`rayleighflow._lean_gd`), or the
    generic one for a model the lean path cannot run."""
    try:
        lean = _lean_gd.LeanGD(problem, state["theta"], data)
    except _lean_gd.LeanUnavailable:
        _run_gd_generic(problem, state, times, step, data, rec, target, max_steps, log,
                        record_start=record_start)
        return
    state["theta"] = lean.views
    try:
        _run_gd_lean(lean, state, times, step, rec, target, max_steps, log, record_start)
    finally:
        state["theta"] = lean.params()


def _run_gd_lean(lean, state, times, step, rec, target, max_steps, log, record_start) -> None:
    t0, k, next_idx = state["t"], 0, 0
    ts: list[float] = []
    losses: list[float] = []
    gnorms: list[Tensor] = []
    fstored: list[Tensor] = []
    # the engine call behind Tensor.backward, without its per-call argument checks
    run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)

    def flush() -> None:
        if not ts:
            return
        g = torch.stack(gnorms)
        bad = _lean_gd.log_evaluations(log, ts, losses, (g * g).tolist(),
                                       lean.fgrad_sq(fstored))
        at = t0 + (k - len(ts) + (bad or 0)) * step
        for pending in (ts, losses, gnorms, fstored):
            pending.clear()
        if bad is not None:
            raise _Stop(FlowStatus.NON_FINITE, f"non-finite loss or gradient near t = {at:.6g}")

    def due_time(i: int) -> float:
        return float(times[i] - 1e-12 * max(1.0, times[i])) if i < len(times) else math.inf

    next_due = due_time(0)
    while True:
        t = t0 + k * step  # t = t_start + kη, also for an off-grid resume time
        if max_steps is not None and state["evals"] >= max_steps:
            flush()
            raise _Stop(FlowStatus.STEP_BUDGET, f"step budget {max_steps} spent at t = {t:.6g}")
        # Records snap to the step grid: the first iterate at or after each requested time.
        due = k == 0 and record_start
        if t >= next_due:
            due = True
            while next_idx < len(times) and times[next_idx] <= t * (1 + 1e-12):
                next_idx += 1
            next_due = due_time(next_idx)
        f = lean.outputs()
        fd = f.detach()
        if k == 0 and not due:  # a record sets it after its measurement
            lean.set_floor(fd)
        stored = None  # what ‖∇ℓ‖²_D is read from at the next flush (fast path: its norm)
        if not due and lean.fast:
            value, seed, stored = lean.fast_terms(fd)
            if value < lean.floor:  # tiny cross-entropy: the precise forms from now on
                lean.fast, stored = False, None
        if stored is None:
            loss, g, seed = lean.precise_terms(fd)
            value = float(loss)
        if not math.isfinite(value):
            flush()
            raise _Stop(FlowStatus.NON_FINITE, f"non-finite loss or gradient near t = {t:.6g}")
        lean.grad.zero_()
        if run_backward is not None:
            run_backward((f,), (seed,), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)
        else:
            f.backward(seed)
        state["evals"] += 1
        if due:  # the record's own measurement is this iterate's log entry: one value each
            flush()
            m = rec.measure(t, lean.views, (loss, lean.grads, g))
            log.add_evaluation(t, m.loss, m.grad_sq, m.fgrad_sq)
            _check_target(rec.record(t, lean.views, state["evals"], measured=m), target, t)
            lean.set_floor(fd)
        else:
            ts.append(t)
            losses.append(value)
            gnorms.append(torch.linalg.vector_norm(lean.grad))
            fstored.append(stored if stored is not None else lean.precise_stored(g, seed))
        if next_idx >= len(times):
            flush()
            return
        # θ − (η·∇L) in two roundings, as `p -= lr * p.grad` does (add_ with alpha fuses them)
        lean.flat.sub_(lean.grad * step)
        k += 1
        state["t"] = t0 + k * step


def _run_gd_generic(problem, state, times, step, data, rec, target, max_steps, log, *,
                    record_start: bool) -> None:
    """Full-batch gradient descent: each record reuses the evaluation of its iterate."""
    t0, k, next_idx = state["t"], 0, 0
    while True:
        t = t0 + k * step  # t = t_start + kη, also for an off-grid resume time
        if max_steps is not None and state["evals"] >= max_steps:
            raise _Stop(FlowStatus.STEP_BUDGET, f"step budget {max_steps} spent at t = {t:.6g}")
        # Records snap to the step grid: the first iterate at or after each requested time.
        due = k == 0 and record_start
        if t >= times[next_idx] - 1e-12 * max(1.0, times[next_idx]):
            due = True
            while next_idx < len(times) and times[next_idx] <= t * (1 + 1e-12):
                next_idx += 1
        loss, grad, fg = _evaluate(problem, state["theta"], data, t, log)
        state["evals"] += 1
        if due:
            _check_target(rec.record(t, state["theta"], state["evals"], (loss, grad, fg)),
                          target, t)
        if next_idx >= len(times):
            return
        state["theta"] = {n: p - step * grad[n] for n, p in state["theta"].items()}
        k += 1
        state["t"] = t0 + k * step


def _run_euler(problem, state, times, step, data, generator, batch_size, rec, target,
               max_steps, log) -> None:
    """Gradient descent on fresh batches (or a separate evaluation set): records evaluate on
    the evaluation data after the step."""
    t0, k, next_idx = state["t"], 0, 0
    while next_idx < len(times):
        if max_steps is not None and state["evals"] >= max_steps:
            raise _Stop(FlowStatus.STEP_BUDGET, f"step budget {max_steps} spent at "
                                                f"t = {state['t']:.6g}")
        batch = data if batch_size is None else problem.data.sample(batch_size, generator)
        grad = _grad(problem, state["theta"], batch, state["t"],
                     log if batch_size is None else None)
        state["theta"] = {n: p - step * grad[n] for n, p in state["theta"].items()}
        state["evals"] += 1
        k += 1
        state["t"] = t0 + k * step  # t = t_start + kη, also for an off-grid resume time
        # Records snap to the step grid: the first step at or after each requested time.
        if state["t"] >= times[next_idx] - 1e-12 * max(1.0, times[next_idx]):
            while next_idx < len(times) and times[next_idx] <= state["t"] * (1 + 1e-12):
                next_idx += 1
            _check_target(rec.record(state["t"], state["theta"], state["evals"]), target,
                          state["t"])


def _run_adaptive(problem, state, times, data, rtol, atol, rec, target, max_steps, log,
                  stall: tuple[Stall, float, float]) -> None:
    from torchdiffeq import odeint

    like = state["theta"]
    rule, t_start, scale = stall
    window, stall_rtol = rule.window, rule.rtol
    recent: deque[float] = deque(maxlen=window)  # flow times of the last `window` evaluations
    t_max = float(times[-1])

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        t_now = float(t)
        if state["evals"] >= max_steps:
            raise _Stop(FlowStatus.STEP_BUDGET, f"gradient-evaluation budget {max_steps} "
                                                f"spent near t = {t_now:.6g}")
        state["evals"] += 1
        recent.append(t_now)
        if len(recent) == window and state["evals"] % window == 0:
            floor = stall_rtol * max(t_now - t_start, scale)
            _check_stall(recent, t_max, max_steps - state["evals"], floor)
        grad = _grad(problem, _unflatten(y, like), data, t_now, log)
        return -_flatten(grad)

    y = _flatten(like)
    for t_next in times:
        span = torch.tensor([state["t"], float(t_next)], dtype=torch.float64, device=y.device)
        try:
            y = odeint(rhs, y, span, rtol=rtol, atol=atol, method="dopri5")[-1]
        except AssertionError as err:  # torchdiffeq's step-size underflow
            raise _Stop(FlowStatus.SOLVER_FAILED,
                        f"adaptive solver failed after t = {state['t']:.6g}: {err}") from None
        state["t"], state["theta"] = float(t_next), _unflatten(y.clone(), like)
        if not math.isfinite(float(y.abs().max())):
            raise _Stop(FlowStatus.NON_FINITE, f"non-finite parameters at t = {state['t']:.6g}")
        _check_target(rec.record(state["t"], state["theta"], state["evals"]), target,
                      state["t"])
