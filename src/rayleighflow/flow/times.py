"""When a flow records: the save-time objects, and the one time tolerance.

:class:`LogSpaced` (the start, then log-spaced times, the default), :class:`Times` (explicit
flow times) and :class:`Every` (every k-th step of a fixed-step integrator) give the record
times after the start; t_max is always recorded. ``groups=False`` leaves out the per-group
Rayleigh quotients (one backward pass less per record on models with many groups).

Times are compared with one relative tolerance, :data:`TIME_RTOL`: a fixed-step record snaps
to the first iterate at or after each requested time (:func:`due`), and one iterate covers
every requested time up to its own (:func:`covered`). Every module that compares flow times
uses these functions.

Example:
    >>> import numpy as np
    >>> np.round(Every(10).times(0.0, 5.0, step=0.1), 6).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]
    >>> due(0.3 - 1e-14, 0.3), covered(0.3, 0.3 - 1e-14)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._time import TIME_RTOL, covered, due, within

__all__ = ["TIME_RTOL", "due", "covered", "within", "LogSpaced", "Times", "Every", "Records",
           "log_record_times"]

def _positive(name: str, value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: {name} must be a finite number > 0 (got {value!r})")


#: The most records a run keeps (each is a row of every column, in memory and on disk).
MAX_RECORDS = 1_000_000


def _count(name: str, value: int, what: str, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what}: {name} must be an integer >= {least} (got {value!r})")


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
    groups: bool = True

    def __post_init__(self) -> None:
        _count("n", self.n, "LogSpaced", least=2)
        if self.n > MAX_RECORDS:
            raise ValueError(f"LogSpaced: n = {self.n} records > {MAX_RECORDS}: record fewer "
                             "times (a log-spaced record per 1e-5 of the run's decades is "
                             "plenty)")
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
    groups: bool = True

    def __init__(self, values: Sequence[float] | np.ndarray, groups: bool = True) -> None:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or np.any(np.diff(arr) <= 0) \
                or not np.all(np.isfinite(arr)):
            raise ValueError("Times: record times must be a non-empty, finite, strictly "
                             "increasing 1-D sequence")
        object.__setattr__(self, "values", tuple(float(v) for v in arr))
        object.__setattr__(self, "groups", bool(groups))

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
    groups: bool = True

    def __post_init__(self) -> None:
        _count("steps", self.steps, "Every")

    def times(self, t_start: float, t_max: float, step: float | None = None) -> np.ndarray:
        if step is None:
            raise ValueError("Every(steps) needs a fixed-step integrator (GradientDescent or "
                             "StochasticGD); with Dopri5 use LogSpaced or Times")
        gap = self.steps * step
        count = (t_max - t_start) / gap
        if count > MAX_RECORDS:
            raise ValueError(f"Every({self.steps}) records {count:.3g} times to t_max = "
                             f"{t_max:g} > {MAX_RECORDS}: record every more steps, or use "
                             "LogSpaced(n)")
        n = int(math.floor(count * (1 + TIME_RTOL)))
        return _clip(t_start + gap * np.arange(1, n + 1, dtype=np.float64), t_start, t_max)


def _clip(times: np.ndarray, t_start: float, t_max: float) -> np.ndarray:
    times = times[(times > t_start) & (times <= t_max * (1 + TIME_RTOL))]
    times = np.minimum(times, t_max)
    if times.size == 0 or times[-1] < t_max:
        times = np.append(times, t_max)
    return times


Records = LogSpaced | Times | Every
