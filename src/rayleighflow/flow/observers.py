"""What sees every record of a flow: extra columns, callbacks, progress and checkpoints.

An observer may add columns to a record (``columns``) and sees each finished row with the θ it
was measured at (``on_record``); both run in the order given, columns before the row is
stored, callbacks after.

"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write
from .._types import Params
from ..data import Dataset
from ..problem import Problem

__all__ = ["Observer", "Columns", "OnRecord", "Progress", "Checkpoint", "Sinks", "Diagnostic"]

Diagnostic = Callable[[Problem, Params, Dataset, int], Mapping[str, float]]
"""Extra per-record columns: called as fn(problem, params, eval_data, record_index)."""


class Observer:
    """The base: no columns, no callback. Subclass and override either method.

    Example:
        >>> import torch, rayleighflow as rf
        >>> class Count(rf.Observer):
        ...     n = 0
        ...     def on_record(self, row, params):
        ...         self.n += 1
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> count = Count()
        >>> _ = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=2.0,
        ...                      records=rf.Every(2), observers=[count])
        >>> count.n                                      # t = 0, 1, 2
        3
    """

    def columns(self, problem: Problem, params: Params, data: Dataset,
                index: int) -> Mapping[str, float]:
        return {}

    def on_record(self, row: dict[str, Any], params: Params) -> None:
        return None

    def on_end(self, result: Any) -> None:
        """Called once with the :class:`~rayleighflow.FlowResult` when the run has ended."""
        return None


class Columns(Observer):
    """Columns from ``fn(problem, params, eval_data, record_index) -> {name: value}``.

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1, bias=False).double()),
        ...                      rf.Dataset.from_arrays(x, 2 * x), "square")
        >>> weight = rf.Columns(lambda problem, params, data, i: {"w": float(params["weight"])})
        >>> run = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=40.0,
        ...                        records=rf.Every(40), observers=[weight])
        >>> round(float(run.trajectory["w"][-1]), 6)      # w → 2
        2.0
    """

    def __init__(self, fn: Diagnostic) -> None:
        self.fn = fn

    def columns(self, problem, params, data, index):
        return self.fn(problem, params, data, index)


class OnRecord(Observer):
    """Calls ``fn(row, params)`` after each record is stored.

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> evals = []
        >>> log = rf.OnRecord(lambda row, params: evals.append(row["grad_evals"]))
        >>> _ = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=2.0,
        ...                      records=rf.Every(2), observers=[log])
        >>> evals                                         # iterates 0, 2, 4 (one evaluation each)
        [1, 3, 5]
    """

    def __init__(self, fn: Callable[[dict[str, Any], Params], None]) -> None:
        self.fn = fn

    def on_record(self, row, params):
        self.fn(row, params)


class Progress(Observer):
    """Calls ``fn(t, loss)`` after each record (a progress bar, a log line).

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> seen = []
        >>> _ = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=2.0, records=rf.Every(2),
        ...                      observers=[rf.Progress(lambda t, loss: seen.append(t))])
        >>> seen
        [0.0, 1.0, 2.0]
    """

    def __init__(self, fn: Callable[[float, float], None]) -> None:
        self.fn = fn

    def on_record(self, row, params):
        self.fn(row["t"], row["loss"])


class Checkpoint(Observer):
    """Writes {"params", "t", "evals"} to ``path`` at each record (torch.save, atomically:
    a crash never leaves a half-written file); resume with ``Start.load(path)``.

    Example:
        >>> import tempfile, pathlib, torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> ckpt = pathlib.Path(tempfile.mkdtemp()) / "theta.pt"
        >>> first = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=2.0,
        ...                          observers=[rf.Checkpoint(ckpt)])
        >>> start = rf.Start.load(ckpt)
        >>> start.t, start.evals
        (2.0, 5)
        >>> more = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=4.0,
        ...                         start=rf.Start(start.params, start.t, start.evals))
        >>> more.n_grad_evals
        10
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_record(self, row, params):
        state = {"params": {k: v.detach().clone() for k, v in params.items()},
                 "t": row["t"], "evals": row["grad_evals"]}
        atomic_write(self.path, lambda fh: torch.save(state, fh), binary=True)


class Sinks(Observer):
    """Streams the flow's records into the monitor's sinks (:class:`~rayleighflow.monitor.CSV`,
    :class:`~rayleighflow.monitor.TensorBoard`, :class:`~rayleighflow.monitor.RichTable` or
    your own :class:`~rayleighflow.monitor.Sink`): opened at the first record with the
    trajectory's header, each record written as a ``main`` row with ``step`` = its index, closed
    with the run's status at the end.

    Example:
        >>> import tempfile, pathlib, torch, rayleighflow as rf
        >>> from rayleighflow.monitor import CSV
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, x), "square")
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=2.0,
        ...                      records=rf.Every(2), observers=[rf.Sinks(CSV(folder / "f.csv"))])
        >>> lines = (folder / "f.csv").read_text().splitlines()
        >>> len(lines), lines[0].split(",")[:3]          # a header and one line per record
        (4, ['t', 'grad_evals', 'loss'])
    """

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks
        self.meta: dict[str, Any] | None = None
        self.index = 0

    def on_record(self, row, params):
        if self.meta is None:
            self.meta = {"columns": {"main": [*row, "step"]}, "groups": [],
                         "desingularizers": [], "source": "gradient_flow"}
            for s in self.sinks:
                s.open(self.meta)
        out = {**row, "step": self.index}
        self.index += 1
        for s in self.sinks:
            s.write("main", [out])

    def on_end(self, result):
        if self.meta is None:
            return
        for s in self.sinks:
            s.close({"status": "complete" if result.status.value == "t_max"
                     else result.status.value, "stop_detail": result.message})

