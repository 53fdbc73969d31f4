"""Fixed-step integrators: θ_{k+1} = θ_k − η∇L(θ_k) at t = t₀ + kη.

:class:`GradientDescent` on the full data runs the lean path (:mod:`.lean`: θ and ∇L in one
flat buffer each, the model's own call), or the generic one for a model the lean path cannot
run; both log every iterate and reuse the iterate's evaluation at a record (the record is the
first iterate at or after the requested time). With a separate evaluation set, and for
:class:`StochasticGD` (fresh samples per step), records evaluate the evaluation data after the
step and no per-iterate log is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..data import Sampler
from . import lean as _lean
from .base import Integrator, Run, State, evaluate
from .stops import FlowStatus, Stop
from .times import _count, _positive, due

__all__ = ["GradientDescent", "StochasticGD"]


@dataclass(frozen=True)
class GradientDescent(Integrator):
    """Full-batch gradient descent θ_{k+1} = θ_k − η ∇L(θ_k), recorded at t = kη.

    Runs the lean path: one forward and one backward per step, θ updated in place in one
    flat buffer; each iterate's (t, L, ‖∇L‖², ‖∇ℓ‖²_D) is logged for the discrete certificate.

    Example:
        >>> GradientDescent(0.5)
        GradientDescent(step=0.5)
        >>> GradientDescent(step=0.1).describe()
        'gradient descent, step η = 0.1'
    """

    step: float
    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        _positive("step", self.step, "GradientDescent")

    def describe(self) -> str:
        return f"gradient descent, step η = {self.step:g}"

    def init(self, run: Run) -> State:
        state = State(run.theta, run.t_start, run.evals_start)
        if run.log is None:
            state.work = _FreshBatches(run, self.step, None)
            return state
        assert run.train is not None   # full batches when a log is kept
        try:
            lean = _lean.LeanGD(run.problem, run.theta, run.train)
        except _lean.LeanUnavailable:
            state.work = _Generic(run, self.step)
        else:
            state.work = _Lean(run, self.step, lean)
            state.theta = lean.views
        return state

    def start(self, state: State, recorder: Any):
        work = state.work
        if isinstance(work, _FreshBatches):
            return recorder.measure(state.t, state.theta)
        work.advance(state, state.t)
        return work.measure(state, recorder)

    def advance(self, state: State, t_next: float) -> None:
        state.work.advance(state, t_next)

    def measure(self, state: State, recorder: Any):
        return state.work.measure(state, recorder)

    def after_record(self, state: State) -> None:
        state.work.after_record()

    def finish(self, state: State) -> None:
        state.work.finish(state)


@dataclass(frozen=True)
class StochasticGD(Integrator):
    """θ_{k+1} = θ_k − η ∇L_B(θ_k) on ``batch_size`` fresh samples of a :class:`Sampler` per
    step (t = kη); records evaluate the fixed evaluation sample after the step.

    Example:
        >>> StochasticGD(0.1, batch_size=32).describe()
        'stochastic gradient descent, step η = 0.1, 32 fresh samples per step'
    """

    step: float
    batch_size: int
    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        _positive("step", self.step, "StochasticGD")
        _count("batch_size", self.batch_size, "StochasticGD")

    def describe(self) -> str:
        return (f"stochastic gradient descent, step η = {self.step:g}, {self.batch_size} fresh "
                "samples per step")

    def init(self, run: Run) -> State:
        state = State(run.theta, run.t_start, run.evals_start)
        state.work = _FreshBatches(run, self.step, self.batch_size)
        return state

    def advance(self, state: State, t_next: float) -> None:
        state.work.advance(state, t_next)


class _Generic:
    """Full-batch gradient descent through ``functional_call``; a record reuses the
    evaluation of its iterate."""

    def __init__(self, run: Run, step: float) -> None:
        assert run.train is not None
        self.run, self.step, self.train = run, step, run.train
        self.t0, self.k = run.t_start, 0
        self.held: tuple | None = None   # the recorded iterate's (L, ∇L, ∇ℓ): step off it next

    def advance(self, state: State, t_next: float) -> None:
        run, step = self.run, self.step
        if self.held is not None:
            grad = self.held[1]
            state.theta = {n: p - step * grad[n] for n, p in state.theta.items()}
            self.held = None
            self.k += 1
            state.t = self.t0 + self.k * step
        while True:
            t = self.t0 + self.k * step  # t = t_start + kη, also for an off-grid resume time
            run.limits.spend(state.evals, t, steps=True)
            # a resumed start is already in the log: its gradient is recomputed, not re-logged
            log = None if run.resumed and self.k == 0 else run.log
            evaluated = evaluate(run.problem, state.theta, self.train, t, log)
            state.evals += 1
            if due(t, t_next):
                self.held = evaluated
                return
            grad = evaluated[1]
            state.theta = {n: p - step * grad[n] for n, p in state.theta.items()}
            self.k += 1
            state.t = self.t0 + self.k * step

    def measure(self, state: State, recorder: Any):
        return recorder.measure(state.t, state.theta, self.held)

    def after_record(self) -> None:
        pass

    def finish(self, state: State) -> None:
        pass


class _Lean:
    """Full-batch gradient descent on :class:`.lean.LeanGD`: the per-iterate log is kept as
    tensors and flushed at each record."""

    def __init__(self, run: Run, step: float, lean: _lean.LeanGD) -> None:
        self.run, self.step, self.lean = run, step, lean
        self.t0, self.k = run.t_start, 0
        self.ts: list[float] = []
        self.losses: list[float] = []
        self.gnorms: list[Tensor] = []
        self.fstored: list[Tensor] = []
        self.held: tuple | None = None   # (L, g, f) of the recorded iterate
        # the engine call behind Tensor.backward, without its per-call argument checks
        self.run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)

    def flush(self) -> None:
        if not self.ts:
            return
        g = torch.stack(self.gnorms)
        bad = _lean.log_evaluations(self.run.log, self.ts, self.losses, (g * g).tolist(),
                                    self.lean.fgrad_sq(self.fstored))
        at = self.t0 + (self.k - len(self.ts) + (bad or 0)) * self.step
        for pending in (self.ts, self.losses, self.gnorms, self.fstored):
            pending.clear()
        if bad is not None:
            raise Stop(FlowStatus.NON_FINITE, f"non-finite loss or gradient near t = {at:.6g}")

    def _step(self, state: State) -> None:
        # θ − (η·∇L) in two roundings, as `p -= lr * p.grad` does (add_ with alpha fuses them)
        self.lean.flat.sub_(self.lean.grad * self.step)
        self.k += 1
        state.t = self.t0 + self.k * self.step

    def advance(self, state: State, t_next: float) -> None:
        lean, step = self.lean, self.step
        if self.held is not None:
            self.held = None
            self._step(state)
        while True:
            t = self.t0 + self.k * step  # t = t_start + kη, also for an off-grid resume time
            if self.run.limits.budget is not None and state.evals >= self.run.limits.budget:
                self.flush()
                self.run.limits.spend(state.evals, t, steps=True)
            is_due = due(t, t_next)
            f = lean.outputs()
            fd = f.detach()
            if self.k == 0 and not is_due:  # a record sets it after its measurement
                lean.set_floor(fd)
            stored = None  # what ‖∇ℓ‖²_D is read from at the next flush (fast path: its norm)
            if not is_due and lean.fast:
                value, seed, stored = lean.fast_terms(fd)
                if value < lean.floor:  # tiny cross-entropy: the precise forms from now on
                    lean.fast, stored = False, None
            if stored is None:
                loss, g, seed = lean.precise_terms(fd)
                value = float(loss)
            if not math.isfinite(value):
                self.flush()
                raise Stop(FlowStatus.NON_FINITE,
                           f"non-finite loss or gradient near t = {t:.6g}")
            lean.grad.zero_()
            if self.run_backward is not None:
                self.run_backward((f,), (seed,), False, False, (), allow_unreachable=True,
                                  accumulate_grad=True)
            else:
                f.backward(seed)
            state.evals += 1
            if is_due:
                self.held = (loss, g, fd)
                return
            if self.run.resumed and self.k == 0:   # already in the log (see _Generic)
                self._step(state)
                continue
            self.ts.append(t)
            self.losses.append(value)
            self.gnorms.append(torch.linalg.vector_norm(lean.grad))
            self.fstored.append(stored if stored is not None else lean.precise_stored(g, seed))
            self._step(state)

    def measure(self, state: State, recorder: Any):
        # the record's own measurement is this iterate's log entry: one value each
        self.flush()
        assert self.held is not None and self.run.log is not None
        loss, g, _ = self.held
        m = recorder.measure(state.t, self.lean.views, (loss, self.lean.grads, g))
        self.run.log.add_evaluation(state.t, m.loss, m.grad_sq, m.fgrad_sq)
        return m

    def after_record(self) -> None:
        assert self.held is not None
        self.lean.set_floor(self.held[2])

    def finish(self, state: State) -> None:
        try:
            self.flush()
        finally:
            state.theta = self.lean.params()


class _FreshBatches:
    """Gradient descent on fresh batches (``batch_size``) or on the training data with a
    separate evaluation set (None): records evaluate the evaluation data after the step."""

    def __init__(self, run: Run, step: float, batch_size: int | None) -> None:
        self.run, self.step, self.batch_size = run, step, batch_size
        self.t0, self.k = run.t_start, 0

    def advance(self, state: State, t_next: float) -> None:
        run = self.run
        while True:
            run.limits.spend(state.evals, state.t, steps=True)
            if self.batch_size is None:
                assert run.train is not None
                batch = run.train
            else:
                assert isinstance(run.problem.data, Sampler)
                batch = run.problem.data.sample(self.batch_size, run.generator)
            grad = evaluate(run.problem, state.theta, batch, state.t, None)[1]
            state.theta = {n: p - self.step * grad[n] for n, p in state.theta.items()}
            state.evals += 1
            self.k += 1
            state.t = self.t0 + self.k * self.step  # t = t_start + kη, also off-grid
            if due(state.t, t_next):
                return

    def measure(self, state: State, recorder: Any):
        return recorder.measure(state.t, state.theta)

    def after_record(self) -> None:
        pass

    def finish(self, state: State) -> None:
        pass
