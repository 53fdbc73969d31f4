"""What :func:`rayleighflow.gradient_flow` integrates with, when it records and when it stops.

Integrators (θ̇ = −∇L(θ), flow time t):

* :class:`GradientDescent` — θ_{k+1} = θ_k − η∇L(θ_k) at t = kη on the full data: exactly
  full-batch gradient descent, certified by the exact discrete certificate (CERTIFICATES.md §3).
* :class:`StochasticGD` — the same step on ``batch_size`` fresh samples of a sampler per step
  (the stochastic flow on the population loss); records evaluate a fixed evaluation sample.
* :class:`Dopri5` — adaptive Dormand–Prince Runge–Kutta (torchdiffeq) with ``rtol``/``atol``.

Record times: :class:`LogSpaced` (0 then log-spaced times, the default), :class:`Times`
(explicit flow times), :class:`Every` (every k-th step of a fixed-step integrator). A fixed-step
record snaps to the first iterate at or after each requested time.

Stop rules (besides ``t_max``): :class:`LossBelow` (checked at records), :class:`MaxEvals`
(gradient evaluations; :class:`Dopri5` runs get ``MaxEvals(DEFAULT_MAX_EVALS)`` unless given),
:class:`Stall` (the adaptive step collapsed; on by default for :class:`Dopri5`).

Example:
    >>> import numpy as np
    >>> GradientDescent(step=0.1).describe()
    'gradient descent, step η = 0.1'
    >>> np.round(Every(10).times(0.0, 5.0, step=0.1), 6).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]
    >>> LossBelow(1e-6)
    LossBelow(target=1e-06)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["GradientDescent", "StochasticGD", "Dopri5", "LogSpaced", "Times", "Every",
           "LossBelow", "MaxEvals", "Stall", "DEFAULT_MAX_EVALS", "log_record_times"]

#: Gradient-evaluation budget of :class:`Dopri5` runs when no :class:`MaxEvals` is given.
DEFAULT_MAX_EVALS = 1_000_000


def _positive(name: str, value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: {name} must be a finite number > 0 (got {value!r})")


def _count(name: str, value: int, what: str, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what}: {name} must be an integer >= {least} (got {value!r})")


# ----------------------------------------------------------------------------- integrators


@dataclass(frozen=True)
class GradientDescent:
    """Full-batch gradient descent θ_{k+1} = θ_k − η ∇L(θ_k), recorded at t = kη.

    Runs the lean path: one forward and one backward per step, θ updated in place in one
    flat buffer; each iterate's (t, L, ‖∇L‖², ‖∇ℓ‖²_D) is logged for the discrete certificate.

    Example:
        >>> GradientDescent(0.5)
        GradientDescent(step=0.5)
    """

    step: float
    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        _positive("step", self.step, "GradientDescent")

    def describe(self) -> str:
        return f"gradient descent, step η = {self.step:g}"


@dataclass(frozen=True)
class StochasticGD:
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


@dataclass(frozen=True)
class Dopri5:
    """Adaptive Dormand–Prince 5(4) Runge–Kutta on θ̇ = −∇L(θ) (torchdiffeq), local error
    ≤ atol + rtol·|θ| per step; every stage's gradient evaluation is logged.

    Example:
        >>> Dopri5(rtol=1e-6).describe()
        'adaptive Runge–Kutta (dopri5), rtol 1e-06, atol 1e-09'
    """

    rtol: float = 1e-7
    atol: float = 1e-9
    name: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        _positive("rtol", self.rtol, "Dopri5")
        if isinstance(self.atol, bool) or not isinstance(self.atol, int | float) \
                or not (math.isfinite(self.atol) and self.atol >= 0):
            raise ValueError(f"Dopri5: atol must be a finite number >= 0 (got {self.atol!r})")

    def describe(self) -> str:
        return f"adaptive Runge–Kutta (dopri5), rtol {self.rtol:g}, atol {self.atol:g}"


Integrators = GradientDescent | StochasticGD | Dopri5


# ----------------------------------------------------------------------------- record times


def log_record_times(t_max: float, n: int = 60, t_min: float | None = None) -> np.ndarray:
    """0 followed by n−1 log-spaced times from t_min (default t_max·1e-4) to t_max.

    Example:
        >>> log_record_times(100.0, 3).tolist()
        [0.0, 0.01, 100.0]
    """
    if not t_max > 0 or n < 2:
        raise ValueError(f"need t_max > 0 and at least 2 records (got {t_max}, {n})")
    t_min = t_max * 1e-4 if t_min is None else t_min
    return np.concatenate([[0.0], np.geomspace(t_min, t_max, n - 1)])


@dataclass(frozen=True)
class LogSpaced:
    """Records at t_start, then ``n − 1`` log-spaced times from ``t_min`` (default
    (t_max − t_start)·1e-4 after the start) to t_max.

    Example:
        >>> LogSpaced(3).times(0.0, 100.0).tolist()
        [0.01, 100.0]
    """

    n: int = 60
    t_min: float | None = None

    def __post_init__(self) -> None:
        _count("n", self.n, "LogSpaced", least=2)
        if self.t_min is not None:
            _positive("t_min", self.t_min, "LogSpaced")

    def times(self, t_start: float, t_max: float, step: float | None = None) -> np.ndarray:
        return _clip(t_start + log_record_times(t_max - t_start, self.n, self.t_min),
                     t_start, t_max)


@dataclass(frozen=True)
class Times:
    """Records at the given flow times (strictly increasing); t_max is always recorded.

    Example:
        >>> Times([1.0, 2.0]).times(0.0, 3.0).tolist()
        [1.0, 2.0, 3.0]
    """

    values: tuple[float, ...]

    def __init__(self, values: Sequence[float] | np.ndarray) -> None:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or np.any(np.diff(arr) <= 0) \
                or not np.all(np.isfinite(arr)):
            raise ValueError("Times: record times must be a non-empty, finite, strictly "
                             "increasing 1-D sequence")
        object.__setattr__(self, "values", tuple(float(v) for v in arr))

    def times(self, t_start: float, t_max: float, step: float | None = None) -> np.ndarray:
        return _clip(np.asarray(self.values), t_start, t_max)


@dataclass(frozen=True)
class Every:
    """A record every ``steps`` steps of a fixed-step integrator: t = t_start + j·steps·η.

    Example:
        >>> Every(2).times(0.0, 1.0, step=0.25).tolist()
        [0.5, 1.0]
    """

    steps: int

    def __post_init__(self) -> None:
        _count("steps", self.steps, "Every")

    def times(self, t_start: float, t_max: float, step: float | None = None) -> np.ndarray:
        if step is None:
            raise ValueError("Every(steps) needs a fixed-step integrator (GradientDescent or "
                             "StochasticGD); with Dopri5 use LogSpaced or Times")
        gap = self.steps * step
        n = int(math.floor((t_max - t_start) / gap * (1 + 1e-12)))
        return _clip(t_start + gap * np.arange(1, n + 1, dtype=np.float64), t_start, t_max)


def _clip(times: np.ndarray, t_start: float, t_max: float) -> np.ndarray:
    times = times[(times > t_start) & (times <= t_max * (1 + 1e-15))]
    times = np.minimum(times, t_max)
    if times.size == 0 or times[-1] < t_max:
        times = np.append(times, t_max)
    return times


Records = LogSpaced | Times | Every


# ----------------------------------------------------------------------------- stop rules


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


StopRule = LossBelow | MaxEvals | Stall
