"""The one driver loop of :func:`gradient_flow`: init → advance to the next record time →
record → observers → stop rules, until t_max or a stop."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

import torch
from torch import Tensor

from .._types import Params
from ..data import Dataset, Sampler
from ..problem import Problem
from ..rayleigh import Measurement, _measurement, loss_and_grad
from ..rounding import float64_start
from ..seeding import generator as seeded_generator
from ..trajectory import Trajectory
from .base import Integrator, Run, State
from .observers import Observer
from .stops import FlowStatus, Stop, StopRule, read_stops
from .times import Every, LogSpaced, Records, Times, covered

__all__ = ["gradient_flow", "FlowResult", "Start", "MAX_STEPS"]

#: The most steps a fixed-step run takes without an explicit MaxEvals (it is refused before
#: the first step, with the estimate).
MAX_STEPS = 10**8


@final
@dataclass(frozen=True)
class Start:
    """Where a run starts: θ (default the model's), the flow time and the evaluations already
    spent (a resumed run), and whether ``path`` already holds its earlier records (``append``).

    Example:
        >>> Start().t, Start(t=2.5, evals=40, append=True).evals
        (0.0, 40)
    """

    params: Params | None = None
    t: float = 0.0
    evals: int = 0
    append: bool = False

    @staticmethod
    def load(path: str | Path) -> Start:
        """The start saved by a :class:`~rayleighflow.Checkpoint` observer."""
        state = torch.load(path, weights_only=True)
        return Start(state["params"], float(state["t"]), int(state["evals"]), append=True)


@final
@dataclass
class FlowResult:
    """What a flow returns: the recorded :class:`Trajectory`, θ at ``t_final`` (``params``),
    the :class:`FlowStatus` and its ``message``, the gradient evaluations spent and the wall
    time. The model itself is not changed; :meth:`load_into` copies θ into it.

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

    def _repr_html_(self) -> str:
        from ..tables import flow_result_html

        return flow_result_html(self)

    def load_into(self, module: torch.nn.Module) -> torch.nn.Module:
        """Copy the final parameters into ``module`` in place (names as in ``named_parameters``);
        returns the module."""
        named = dict(module.named_parameters())
        missing = sorted(set(self.params) - set(named))
        if missing:
            raise ValueError(f"the module has no parameters named {missing}: load into the "
                             "module the flow was run on")
        wrong = [f"{k}: {tuple(named[k].shape)} ≠ {tuple(v.shape)}" for k, v in self.params.items()
                 if named[k].shape != v.shape]
        if wrong:  # copy_ would broadcast a smaller tensor into it without a word
            raise ValueError(f"the module's parameters have other shapes ({'; '.join(wrong)}): "
                             "load into the module the flow was run on")
        with torch.no_grad():
            for name, value in self.params.items():
                named[name].copy_(value)
        return module


@final
class _Recorder:
    """Measures at θ on the evaluation data and appends rows; observers add columns and see
    every stored row."""

    def __init__(self, problem: Problem, eval_data: Dataset, traj: Trajectory,
                 observers: Sequence[Observer], groups: bool) -> None:
        self.problem, self.eval_data, self.traj, self.groups = problem, eval_data, traj, groups
        self.observers = observers
        self.start = time.perf_counter()
        self.count = len(traj)

    def record(self, t: float, params: Params, n_evals: int, m: Measurement) -> dict[str, Any]:
        row: dict[str, Any] = {"t": t, "grad_evals": n_evals, **m.as_row(self.groups)}
        for obs in self.observers:
            row.update(obs.columns(self.problem, params, self.eval_data, self.count))
        row["wall"] = time.perf_counter() - self.start
        self.traj.append(row)
        self.count += 1
        for obs in self.observers:
            obs.on_record(row, params)
        return row

    def measure(self, t: float, params: Params,
                evaluated: tuple[Tensor, Params, Tensor] | None = None) -> Measurement:
        """The measurement at θ (``evaluated`` = (L, ∇L, ∇ℓ) already computed at θ on the
        evaluation data: reused, no extra backward), refusing a non-finite L."""
        if evaluated is None:
            loss, grad, _, g = loss_and_grad(self.problem, params, self.eval_data)
        else:
            loss, grad, g = evaluated
        if not torch.isfinite(loss):
            raise Stop(FlowStatus.NON_FINITE, f"non-finite loss {float(loss)} at t = {t:.6g}")
        return _measurement(self.problem, self.eval_data, loss, grad, g)


def gradient_flow(
    problem: Problem,
    integrator: Integrator | None = None,
    *,
    t_max: float,
    records: Records | None = None,
    stops: Sequence[StopRule] = (),
    observers: Sequence[Observer] = (),
    start: Start | Params | None = None,
    eval_data: Dataset | int | None = None,
    generator: torch.Generator | None = None,
    path: str | Path | None = None,
    meta: Mapping[str, Any] | None = None,
) -> FlowResult:
    """Integrate θ̇ = −∇L(θ) from ``start`` to ``t_max`` with ``integrator`` (default
    :class:`Dopri5`), recording at ``records`` (default :class:`LogSpaced`) and stopping at
    t_max or at the first of ``stops``.

    Each record holds L, ‖∇L‖², ‖∇ℓ‖²_D, R(K; ∇ℓ) = ‖∇L‖²/‖∇ℓ‖²_D and per-group quotients
    (``records=LogSpaced(n, groups=False)`` leaves them out), plus the columns of
    ``observers`` (:class:`Columns`), which also see every row (:class:`OnRecord`,
    :class:`Progress`, :class:`Checkpoint`). ``start``: θ₀ as a dict, or a :class:`Start`
    (θ, t, evaluations spent, ``append`` to ``path``) to resume. ``eval_data``: the fixed
    sample records evaluate for sampler data (a Dataset, or its size; default 4096 fresh
    samples). ``path`` streams the trajectory to JSONL as it grows.

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
    if not isinstance(problem, Problem):
        raise TypeError(f"gradient_flow needs a rayleighflow.Problem (got {type(problem).__name__})"
                        ": wrap the model, e.g. Problem(Model(net), data, 'square')")
    from .adaptive import Dopri5

    integrator = Dopri5() if integrator is None else integrator
    if not isinstance(integrator, Integrator):
        raise TypeError(f"integrator must be an Integrator: GradientDescent(step), "
                        f"StochasticGD(step, batch_size) or Dopri5(rtol, atol) (got "
                        f"{integrator!r})")
    start = start if isinstance(start, Start) else Start(start)
    if not (isinstance(t_max, int | float) and math.isfinite(t_max)):
        raise ValueError(f"t_max must be a finite number (got {t_max!r})")
    if not t_max > start.t:
        raise ValueError(f"t_max ({t_max}) must exceed the start time ({start.t})")
    at_records, limits = read_stops(stops, integrator.adaptive, start.evals)
    step = getattr(integrator, "step", None)
    n_steps = math.inf if step is None else (t_max - start.t) / step
    if step is not None and limits.budget is None and n_steps > MAX_STEPS:
        # estimated before running: a fixed step cannot get there faster
        many = f"{n_steps:.3g}" if math.isfinite(n_steps) else "more than 1e308"
        raise ValueError(f"t_max = {t_max:g} at step {step:g} is {many} steps > {MAX_STEPS:.0e}: "
                         "lower t_max, raise the step, or allow it with stops=[rf.MaxEvals(n)] "
                         "(rf.Implicit reaches long horizons in few steps)")
    generator = generator if generator is not None else seeded_generator(0)
    train, evals_on = _resolve_data(problem, integrator, eval_data, generator)
    records = LogSpaced() if records is None else records
    if not isinstance(records, LogSpaced | Times | Every):
        raise TypeError(f"records must be LogSpaced(n), Times(values) or Every(steps) (got "
                        f"{records!r})")
    times = records.times(start.t, t_max, getattr(integrator, "step", None))
    limits.t_start, limits.t_max = start.t, float(times[-1])
    limits.scale = float(times[0]) - start.t  # the first record interval
    own = integrator.header()
    header = {"convention": problem.convention.value, "loss": problem.loss.name,
              **{k: own[k] for k in ("method", "integrator", "step", "rtol", "atol")},
              "n_params": problem.model.n_params, "groups": list(problem.model.groups),
              "batch_size": own["batch_size"], "eval_size": evals_on.n, **(meta or {})}
    theta = {k: v.detach().clone() for k, v in (start.params or problem.params).items()}
    if not start.append:   # below float64: L(θ₀) in float64, where the certificates' bounds start
        header.update(float64_start(problem, theta, evals_on))
    traj = Trajectory(header, path, append=start.append)
    rec = _Recorder(problem, evals_on, traj, observers, records.groups)
    # The path log is a full-batch object: fresh batches or a separate evaluation set break it.
    log = traj if train is evals_on else None
    resumed_here = bool(start.append and len(traj) and traj.rows[-1].get("t") == start.t)
    run = Run(problem, train, evals_on, log, generator, limits, theta, start.t, start.evals,
              resumed_here)
    begin = time.perf_counter()
    state = State(theta, start.t, start.evals)
    try:
        state = integrator.init(run)
        if not resumed_here:
            m = integrator.start(state, rec)
            _after(integrator, state, rec.record(state.t, state.theta, state.evals, m),
                   at_records)
        i = 0
        while i < len(times):
            integrator.advance(state, float(times[i]))
            row = rec.record(state.t, state.theta, state.evals, integrator.measure(state, rec))
            while i < len(times) and covered(times[i], state.t):
                i += 1
            _after(integrator, state, row, at_records)
        status, message = FlowStatus.T_MAX, f"reached t_max = {t_max:g}"
    except Stop as stop:
        status, message = stop.status, stop.message
    except KeyboardInterrupt:
        status, message = FlowStatus.INTERRUPTED, f"interrupted at t = {state.t:.6g}"
    try:
        integrator.finish(state)
    except Stop as stop:
        if status is FlowStatus.T_MAX:
            status, message = stop.status, stop.message
    traj.close(status.value, message)
    result = FlowResult(traj, state.theta, status, state.t, state.evals, message,
                        time.perf_counter() - begin)
    for obs in observers:
        obs.on_end(result)
    return result


def _after(integrator: Integrator, state: State, row: dict[str, Any], rules) -> None:
    integrator.after_record(state)
    for rule in rules:
        rule.check(state, row)


def _resolve_data(problem: Problem, integrator: Integrator, eval_data, generator):
    """(the data steps use, None for fresh batches; the evaluation data of the records)."""
    batch_size = getattr(integrator, "batch_size", None)
    if isinstance(problem.data, Sampler):
        if eval_data is None or isinstance(eval_data, int):
            size = 4096 if eval_data is None else eval_data
            eval_data = problem.data.sample(size, generator)
        problem.validate(eval_data)
        return (None if batch_size is not None else eval_data), eval_data
    if batch_size is not None:
        raise ValueError("StochasticGD (fresh samples per step) applies only to sampler data; "
                         "use GradientDescent(step) on a finite dataset")
    if isinstance(eval_data, int):
        raise ValueError("eval_data as a sample size applies to sampler data; pass a Dataset")
    eval_data = eval_data if eval_data is not None else problem.data
    problem.validate(eval_data)
    return problem.data, eval_data
