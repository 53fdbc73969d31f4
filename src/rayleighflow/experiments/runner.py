"""The experiment runner: a run folder (docs/RUN_FOLDER.md), checkpoints, resume, summary.

An experiment is a function ``run(ctx) -> dict`` that declares its figures up front (so an
interrupted run still renders), runs flows through :meth:`RunContext.flow` (streamed
trajectories, a checkpoint at every record, resumable) and returns its summary keys. The runner
adds the common keys, writes ``summary.json`` atomically and renders the report.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import numpy as np
import torch

from .._io import WriteError, atomic_write, atomic_write_text, write_error
from .._optional import require_extra
from .._time import covered
from ..flow import FlowResult, FlowStatus, OnRecord, Progress, Start, gradient_flow
from ..problem import Problem
from ..rundir import mark_failed, recorded_summary, release_lock, versions, write_summary
from ..rundir.summary import SUMMARY_FILE
from ..seeding import generator as seeded_generator
from ..trajectory import Trajectory
from .threads import active_policy, apply_threads

__all__ = ["RunContext", "RunInterrupted", "RunFailed", "Experiment", "execute",
           "execute_locked", "check_extras", "config_sha256", "DONE_STATUSES", "EARLY_STOPS"]

#: Flow statuses that end a flow for good (a resumed run reloads it instead of continuing).
DONE_STATUSES = {s.value for s in FlowStatus} - {FlowStatus.INTERRUPTED.value}
#: Flow statuses that finish a flow without reaching what was asked (t_max, the loss target or
#: the limit):
#: the run completes, and says so in the terminal, summary.json ``stopped_early`` and the report.
EARLY_STOPS = DONE_STATUSES - {FlowStatus.T_MAX.value, FlowStatus.LOSS_TARGET.value,
                               FlowStatus.LIMIT.value}


class RunInterrupted(Exception):
    """Raised after a flow was interrupted: the runner keeps what was recorded."""


class RunFailed(RuntimeError):
    """The experiment raised: summary.json (status "failed") holds the error and what was
    recorded; ``summary`` is that dict, ``out`` the run folder; ``summary_written`` is False
    when summary.json could not be written either (a full disk)."""

    def __init__(self, message: str, out: Path, summary: dict[str, Any], *,
                 summary_written: bool = True) -> None:
        super().__init__(message)
        self.out, self.summary, self.summary_written = out, summary, summary_written


def config_sha256(text: str | bytes) -> str:
    """The hash of a run's config.toml text, kept in summary.json and the checkpoints so
    ``--resume`` can tell that the file was edited."""
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


#: what each optional extra does for a run (the error's wording)
_EXTRA_USE = {"report": "its figures and report.html", "prove": "its proofs",
              "data": "its dataset"}


def check_extras(name: str, extras: Sequence[str] = ()) -> None:
    """Before a run touches its folder: the [report] extra (every run renders its report) and
    ``extras``, or :class:`~rayleighflow._optional.MissingExtra` naming the missing one."""
    for extra in ("report", *extras):
        require_extra(extra, f"rayleighflow run {name} ({_EXTRA_USE[extra]})")


@final
@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    run: Callable[[RunContext], dict[str, Any]]
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]
    #: the optional extras it needs besides [report] (rayleighflow._optional.EXTRAS)
    extras: tuple[str, ...] = ()


@final
@dataclass
class RunContext:
    """Where an experiment writes, with its resolved parameters ``params``."""

    out: Path
    params: dict[str, Any]
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    resume: bool = False
    progress: Any = None  # a rich.progress.Progress or None
    #: run time of earlier segments (resumes), so checkpoints carry the accumulated run time
    run_time_before: float = 0.0
    #: sha256 of config.toml's text (kept in the checkpoints and summary.json)
    config_sha256: str | None = None
    #: name -> (status, message) of every flow run or reloaded, in order
    flows: dict[str, tuple[str, str]] = field(default_factory=dict)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)
    _begin: float = field(default_factory=time.perf_counter)

    def run_time(self) -> float:
        """Seconds of run time so far, earlier segments included."""
        return self.run_time_before + time.perf_counter() - self._begin

    def __post_init__(self) -> None:
        (self.out / "trajectories").mkdir(parents=True, exist_ok=True)
        arrays = self.out / "arrays.npz"
        if self.resume and arrays.exists():
            with np.load(arrays) as z:
                self._arrays = {k: z[k] for k in z.files}

    # -- data files ------------------------------------------------------------------------
    def save_arrays(self, **arrays: Any) -> None:
        """Merge named arrays into arrays.npz (rewritten atomically)."""
        self._arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
        atomic_write(self.out / "arrays.npz", lambda fh: np.savez(fh, **self._arrays),
                     binary=True)

    def save_figures(self, figures: list[dict[str, Any]]) -> None:
        atomic_write_text(self.out / "figures.json", json.dumps(figures, indent=1))

    def trajectory_path(self, name: str) -> Path:
        return self.out / "trajectories" / f"{name}.jsonl"

    def generator(self, offset: int = 0) -> torch.Generator:
        return seeded_generator(self.seed, offset)

    # -- flows -----------------------------------------------------------------------------
    def flow(self, name: str, problem: Problem, *, label: str | None = None,
             **kwargs: Any) -> FlowResult:
        """Run (or, on resume, reload or continue) the flow named ``name``.

        A checkpoint of θ_t is saved at every record, so a killed run resumes at its last
        record. ``start`` (a :class:`Start`, not appended) continues another flow from where it
        stopped, in a trajectory of its own. Raises :class:`RunInterrupted` after Ctrl-C, once
        the records are safe.
        """
        path = self.trajectory_path(name)
        ckpt = self.out / "checkpoints" / f"{name}.pt"
        ckpt.parent.mkdir(exist_ok=True)
        start: Start | None = kwargs.pop("start", None)
        if self.resume and path.exists() and ckpt.exists():
            saved = Trajectory.load(path)
            state = torch.load(ckpt, weights_only=True)
            if saved.status in DONE_STATUSES:
                self.flows[name] = (saved.status, saved.detail or "")
                return FlowResult(saved, state["params"], FlowStatus(saved.status),
                                  float(state["t"]), int(state["evals"]),
                                  saved.detail or "", 0.0)
            saved = _truncate_to(path, saved, float(state["t"]))
            start = Start(state["params"], float(state["t"]), int(state["evals"]),
                          append=True)

        def on_record(row: dict, params) -> None:
            _atomic_torch({"params": params, "t": row["t"], "evals": row["grad_evals"],
                           "run_time": self.run_time(), "config_sha256": self.config_sha256},
                          ckpt)

        task = None
        if self.progress is not None:
            task = self.progress.add_task(label or name, total=float(kwargs["t_max"]))
            if start:
                self.progress.update(task, completed=start.t)

        def progress(t: float, loss: float) -> None:
            if task is not None:
                self.progress.update(task, completed=t, description=f"{label or name} "
                                     f"L={loss:.3g}")

        observers = [*kwargs.pop("observers", ()), OnRecord(on_record), Progress(progress)]
        apply_threads(problem, kwargs.get("eval_data"))
        result = gradient_flow(problem, path=path, observers=observers, start=start,
                               generator=kwargs.pop("generator", self.generator()), **kwargs)
        self.flows[name] = (result.status.value, result.message)
        if task is not None:  # the bar stops where the flow stopped, and says why
            how = "" if result.status is FlowStatus.T_MAX else f" [{result.status.value}]"
            self.progress.update(task, completed=float(result.t_final),
                                 description=f"{label or name}{how}")
        if result.status is FlowStatus.INTERRUPTED:
            raise RunInterrupted(result.message)
        return result


def _truncate_to(path: Path, traj: Trajectory, t: float) -> Trajectory:
    """Drop records after the checkpoint time (written after the last checkpoint)."""
    keep = [r for r in traj.rows if covered(r["t"], t)]
    if len(keep) != len(traj.rows) or traj.status is not None:
        traj.rows, traj.status, traj.detail = keep, None, None
        traj.save(path)
    return traj


def _atomic_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def resume_command(out: Path) -> str:
    return f"rayleighflow run --resume {_quote(str(out))}"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def execute(experiment: Experiment, ctx: RunContext, config_text: str) -> dict[str, Any]:
    """Run ``experiment`` in ``ctx``; write config.toml, summary.json and the report.

    Every ending writes summary.json: "complete"; "interrupted" (Ctrl-C, SIGTERM), with the
    resume command in the notes; "failed" (the experiment raised, or a file could not be
    written), with ``error`` and ``traceback``, after which :class:`RunFailed` is raised. An
    interrupted or failed summary carries the values recorded so far (read from the
    trajectories). ``run_time_s`` accumulates across resumes (summary.json or, after a kill,
    the checkpoints). summary.json's ``config_sha256`` is the hash of config.toml's text (a
    resumed run keeps the file it was started with).
    """
    from ..report import render_report

    config = ctx.out / "config.toml"
    if ctx.resume and config.is_file():
        ctx.config_sha256 = config_sha256(config.read_bytes())
    else:
        atomic_write_text(config, config_text)
        ctx.config_sha256 = config_sha256(config_text)
    ctx.run_time_before = previous_run_time(ctx.out) if ctx.resume else 0.0
    ctx._begin = time.perf_counter()
    status, notes, error, tb = "complete", [], None, None
    try:
        summary = experiment.run(ctx)
    except (RunInterrupted, KeyboardInterrupt) as stop:
        status, summary = "interrupted", {}
        where = str(stop) or "interrupted outside a flow"
        notes.append(f"interrupted: {where}; `{resume_command(ctx.out)}` continues")
    except Exception as exc:  # the experiment (a user's model, data) raised: record, then report
        import traceback

        status, summary = "failed", {}
        error = str(exc) if isinstance(exc, WriteError) else \
            _one_line(f"{type(exc).__name__}: {exc}")
        tb = traceback.format_exc()
        mark_failed(ctx.out, error)
        notes.append(f"failed: {error}")
    if status != "complete":
        summary = {**recorded_summary(ctx.out), **summary}
    summary = {**_placeholders(), **summary}
    summary.update(
        experiment=experiment.name, status=status, run_time_s=ctx.run_time(),
        versions=versions(), created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        config_sha256=ctx.config_sha256,
    )
    if error is not None:
        summary.update(error=error, traceback=tb)
    policy = active_policy()
    if policy is not None and policy.lines:  # the timings depend on it: say what was chosen
        summary["threads"] = {"requested": policy.requested, "count": policy.current,
                              "lines": list(policy.lines)}
    stopped = [{"flow": n, "status": st, "message": msg} for n, (st, msg) in ctx.flows.items()
               if st in EARLY_STOPS]
    if stopped:
        summary["stopped_early"] = stopped
    # the trajectories this run wrote: `rayleighflow report` says when one has gone missing
    summary["flows"] = sorted({*summary.get("flows", []), *ctx.flows})
    summary.setdefault("description", experiment.description)
    summary["notes"] = list(summary.get("notes", [])) + notes
    try:
        write_summary(ctx.out, summary)
    except OSError as exc:  # a full disk: a "failed" summary where it can still be written
        _write_failed(ctx, summary, write_error(exc, ctx.out / SUMMARY_FILE), error)
    try:
        render_report(ctx.out)
    except Exception as exc:  # noqa: BLE001 - the summary is written; a report bug must not hide it
        if isinstance(exc, OSError) and error is None:  # a write error: the run failed
            _write_failed(ctx, summary, write_error(exc, ctx.out / "report.html"), None)
        if error is None:
            raise
        summary["notes"].append(f"report.html could not be rendered: {exc}")
    if error is not None:
        raise RunFailed(error, ctx.out, summary)
    return summary


def _write_failed(ctx: RunContext, summary: dict[str, Any], exc: WriteError,
                  error: str | None) -> None:
    """A file of the run could not be written: summary.json says "failed" (when it can still
    be written), and :class:`RunFailed` names the file."""
    import traceback

    message = str(exc) if error is None else f"{error}; then {exc}"
    summary.update(status="failed", error=message,
                   traceback="".join(traceback.format_exception(exc)))
    summary["notes"] = [*summary.get("notes", []), f"failed: {message}"]
    try:
        write_summary(ctx.out, summary)
        written = True
    except OSError:
        written = False
    raise RunFailed(message, ctx.out, summary, summary_written=written) from exc


def execute_locked(experiment: Experiment, out: Path, make_context: Callable[[Path], RunContext],
                   config_text: str, *, resume: bool = False,
                   on_folder: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """:func:`execute` in ``out``, locked by :func:`~rayleighflow.rundir.prepare_out`
    (``lock=True``): the lock goes on every ending. A new run stopped before config.toml was
    written (Ctrl-C or SIGTERM at start-up, a full disk) leaves nothing: what it created is
    removed, so the folder never looks like a run that cannot be resumed."""
    try:
        if on_folder is not None:
            on_folder(out)
        return execute(experiment, make_context(out), config_text)
    except BaseException as exc:
        if resume or (out / "config.toml").exists():
            raise
        where = _remove_startup_files(out, created=release_lock(out))
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted during start-up, before anything was "
                                    f"recorded: {where}; run the command again to start "
                                    "the run") from None
        raise
    finally:
        release_lock(out)


def _remove_startup_files(out: Path, *, created: bool) -> str:
    """Remove the empty folders a run makes before its config.toml (and ``out`` itself when
    this run created it); say what was left."""
    for name in ("checkpoints", "trajectories"):
        try:
            (out / name).rmdir()
        except OSError:
            pass
    if created:
        try:
            out.rmdir()
            return f"{out} was removed"
        except OSError:
            pass
    try:
        left = any(out.iterdir())
    except OSError:
        left = True
    return f"{out} was left as it was" if left else f"{out} was left empty"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def previous_run_time(out: Path) -> float:
    """Run time of the earlier segments of a run: the largest of summary.json's
    ``run_time_s`` and the checkpoints' (a killed segment writes no summary)."""
    best = 0.0
    try:
        best = float(json.loads((out / "summary.json").read_text()).get("run_time_s") or 0.0)
    except (OSError, ValueError, TypeError, AttributeError):
        best = 0.0
    for ckpt in sorted((out / "checkpoints").glob("*.pt")):
        try:
            best = max(best, float(torch.load(ckpt, weights_only=True).get("run_time", 0.0)))
        except Exception:  # noqa: BLE001 - a torn checkpoint only loses its time
            continue
    return best


def _placeholders() -> dict[str, Any]:
    keys = ("P", "nk", "loss_initial", "loss_final", "t_final", "rank", "lambda_min",
            "lambda_max", "rayleigh_min")
    return {"convention": "mean", "certificates": [], **dict.fromkeys(keys)}
