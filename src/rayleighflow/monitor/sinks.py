"""Where monitor records go: a run folder for ``rayleighflow report``, TensorBoard, CSV, or a
live terminal table. A sink receives rows in batches (one batch per flush) by kind: ``main``
(one row per optimizer step), ``full`` (full-data estimates), ``probe`` (probe-set spectra).
"""

from __future__ import annotations

import abc
import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, final

from .._io import atomic_write_text
from .._optional import require_extra
from ..rundir.folder import is_run_folder
from ..trajectory import Trajectory
from ._rundir import monitor_figures
from .diagnose import Diagnosis

__all__ = ["Sink", "RunFolder", "TensorBoard", "CSV", "RichTable", "Callback", "metric_name"]

KINDS = ("main", "full", "probe")


class Sink(abc.ABC):
    """Receives the monitor's records. Required: :meth:`write`; the rest default to no-ops."""

    def open(self, meta: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once, before any row, with the run's metadata (columns, groups, ...)."""

    @abc.abstractmethod
    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        """Rows of one kind (``main``, ``full`` or ``probe``), oldest first."""

    def message(self, diagnosis: Diagnosis) -> None:  # noqa: B027 - optional hook
        """A diagnosis the monitor just made."""

    def close(self, summary: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once at the end with the run's summary (status, forecast, notes)."""


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@final
class RunFolder(Sink):
    """A run folder that ``rayleighflow report RUN_DIR`` renders: trajectories/*.jsonl streamed
    as they grow, figures.json at the start (an interrupted run still renders), summary.json at
    the end. ``render=True`` renders figures and report.html at close (extra ``[report]``,
    checked here, before training; without it ``rayleighflow report RUN_DIR`` renders later)."""

    def __init__(self, path: str | os.PathLike, *, render: bool = False) -> None:
        if render:
            require_extra("report", "RunFolder(render=True) (figures and report.html)")
        self.path = Path(path)
        if is_run_folder(self.path):   # refused before training, as `rayleighflow run` does
            raise ValueError(
                f"the run folder {str(self.path)!r} already holds a run (trajectories/, "
                "summary.json): a second run would mix with it; choose another log= folder or "
                "delete that one")
        self.render = render
        self._meta: dict[str, Any] = {}
        self._trajs: dict[str, Trajectory] = {}

    def open(self, meta: dict[str, Any]) -> None:
        self._meta = dict(meta)
        (self.path / "trajectories").mkdir(parents=True, exist_ok=True)
        figures = monitor_figures(meta["groups"], meta["desingularizers"],
                                  meta.get("full_every") is not None,
                                  meta.get("probe_every") is not None)
        atomic_write_text(self.path / "figures.json",
                          json.dumps(figures, indent=1, ensure_ascii=False))
        self._traj("main")

    def _traj(self, kind: str) -> Trajectory:
        if kind not in self._trajs:
            meta = {k: v for k, v in self._meta.items() if k != "columns"}
            self._trajs[kind] = Trajectory({**meta, "rows": kind},
                                           self.path / "trajectories" / f"{kind}.jsonl")
        return self._trajs[kind]

    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        traj = self._traj(kind)
        for r in rows:
            traj.append(r)

    def close(self, summary: dict[str, Any]) -> None:
        from ..rundir import write_summary

        status = summary.get("status", "complete")
        for traj in self._trajs.values():
            traj.close("complete" if status == "complete" else status,
                       summary.get("stop_detail", ""))
        write_summary(self.path, summary)
        if self.render:
            from ..report import render_report

            render_report(self.path)


@final
class TensorBoard(Sink):
    """Scalars through ``torch.utils.tensorboard`` (extra ``[tensorboard]``) under the names
    the :class:`Callback` sink gives loggers (:func:`metric_name`): ``rayleigh/R``,
    ``rayleigh/layer/<group>``, ``rayleigh/kl/<φ>``, ``rayleigh/<column>`` per step, and the
    same under ``rayleigh/full/`` and ``rayleigh/probe/`` for full-data and probe rows;
    diagnoses as text (``diagnosis/<kind>``)."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None) -> None:
        if writer is None:
            if log_dir is not None and Path(log_dir).is_dir() \
                    and any(Path(log_dir).glob("events.out.tfevents.*")):
                raise ValueError(
                    f"the TensorBoard folder {os.fspath(log_dir)!r} already holds event files "
                    "of another run: TensorBoard would show both runs' scalars and every "
                    "diagnosis twice; choose another folder or delete those files")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("the TensorBoard sink needs the tensorboard package: "
                                  "pip install 'rayleighflow[tensorboard]'") from e
            writer = SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))
        self.writer = writer

    @staticmethod
    def tag(kind: str, column: str) -> str:
        return metric_name(kind, column)

    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            step = int(r["step"])
            for col, v in r.items():
                if col not in ("t", "step") and _numeric(v):
                    self.writer.add_scalar(self.tag(kind, col), v, step)

    def message(self, diagnosis: Diagnosis) -> None:
        self.writer.add_text(f"diagnosis/{diagnosis.kind}", diagnosis.message, diagnosis.step)

    def close(self, summary: dict[str, Any]) -> None:
        self.writer.flush()
        self.writer.close()


def metric_name(kind: str, column: str) -> str:
    """The name a logger gets: ``rayleigh/R`` (the quotient), ``rayleigh/layer/<group>``,
    ``rayleigh/kl/<φ>``, ``rayleigh/<column>`` for the rest of a step's row, and
    ``rayleigh/full/...`` or ``rayleigh/probe/...`` for the full-data and probe rows.

    Example:
        >>> metric_name("main", "rayleigh"), metric_name("main", "rayleigh[fc1]")
        ('rayleigh/R', 'rayleigh/layer/fc1')
        >>> metric_name("full", "kl[log]"), metric_name("probe", "lambda_min")
        ('rayleigh/full/kl/log', 'rayleigh/probe/lambda_min')
    """
    if column == "rayleigh":
        name = "R"
    elif column.startswith("rayleigh["):
        name = f"layer/{column[9:-1]}"
    elif column.startswith("kl["):
        name = f"kl/{column[3:-1]}"
    else:
        name = column
    return f"rayleigh/{name}" if kind == "main" else f"rayleigh/{kind}/{name}"


@final
class Callback(Sink):
    """Every finite recorded scalar handed to ``log_fn(metrics, step)``, one call per row, the
    names from :func:`metric_name`: the way into a logger of your own (W&B's ``wandb.log``
    with ``step=``, MLflow's ``log_metrics``, a dict). Rows arrive at each read-back, so a
    call may carry an earlier step than the optimizer's current one.

    Example:
        >>> got = []
        >>> sink = Callback(lambda metrics, step: got.append((step, metrics)))
        >>> sink.write("main", [{"t": 3, "step": 3, "rayleigh": 0.5, "loss": float("nan")}])
        >>> got
        [(3, {'rayleigh/R': 0.5})]
    """

    def __init__(self, log_fn: Any) -> None:
        if not callable(log_fn):
            raise TypeError(f"Callback needs a callable log_fn(metrics, step), got "
                            f"{type(log_fn).__name__}")
        self.log_fn = log_fn

    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            metrics = {metric_name(kind, c): float(v) for c, v in r.items()
                       if c not in ("t", "step") and _numeric(v)}
            if metrics:
                self.log_fn(metrics, int(r["step"]))


@final
class CSV(Sink):
    """``path`` gets the per-step rows; full-data and probe rows go to ``<stem>.full.csv`` and
    ``<stem>.probe.csv`` beside it. Columns are fixed at open; missing values are empty."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._files: dict[str, tuple[IO[str], csv.DictWriter]] = {}
        self._columns: dict[str, list[str]] = {}

    def open(self, meta: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns = {k: list(v) for k, v in meta["columns"].items()}

    def _writer(self, kind: str) -> csv.DictWriter:
        if kind not in self._files:
            path = self.path if kind == "main" else self.path.with_name(
                f"{self.path.stem}.{kind}{self.path.suffix or '.csv'}")
            fh = open(path, "w", newline="", encoding="utf-8")
            w = csv.DictWriter(fh, fieldnames=self._columns[kind], extrasaction="ignore")
            w.writeheader()
            self._files[kind] = (fh, w)
        return self._files[kind][1]

    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        w = self._writer(kind)
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v))
                            else v) for k, v in r.items()})
        self._files[kind][0].flush()

    def close(self, summary: dict[str, Any]) -> None:
        for fh, _ in self._files.values():
            fh.close()
        self._files.clear()


@final
class RichTable(Sink):
    """A live terminal table (rich) of the latest step, full-data and probe values and the
    latest diagnoses."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(console=console or Console(), auto_refresh=False, transient=False)
        self._last: dict[str, dict[str, Any]] = {}
        self._messages: list[str] = []
        self._groups: list[str] = []

    def open(self, meta: dict[str, Any]) -> None:
        self._groups = list(meta["groups"])
        self._live.start()

    def _table(self):
        from rich.table import Table

        table = Table(title="rayleighflow monitor (diagnostics)")
        for col in ("", "step", "L", "‖∇L‖²", "‖∇ℓ‖²_D", "R(K; ∇ℓ)"):
            table.add_column(col)
        for kind, label in (("main", "batch"), ("full", "full data"), ("probe", "probe set")):
            r = self._last.get(kind)
            if r is not None:
                table.add_row(label, str(r.get("step")),
                              *(_fmt(r.get(c)) for c in ("loss", "grad_sq", "fgrad_sq",
                                                         "rayleigh")))
        main = self._last.get("main", {})
        for g in self._groups:
            table.add_row(f"  layer {g}", "", "", "", "", _fmt(main.get(f"rayleigh[{g}]")))
        for m in self._messages[-3:]:
            table.add_row("note", "", m, "", "", "")
        return table

    def write(self, kind: str, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self._last[kind] = rows[-1]
            self._live.update(self._table(), refresh=True)

    def message(self, diagnosis: Diagnosis) -> None:
        self._messages.append(diagnosis.message)

    def close(self, summary: dict[str, Any]) -> None:
        self._live.update(self._table(), refresh=True)
        self._live.stop()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if _numeric(v) else "—"
