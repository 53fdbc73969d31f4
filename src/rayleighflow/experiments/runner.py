"""The experiment runner: a run folder (docs/RUN_FOLDER.md), checkpoints, resume, summary.

An experiment is a function ``run(ctx) -> dict`` that declares its figures up front (so an
interrupted run still renders), runs flows through :meth:`RunContext.flow` (streamed
trajectories, a checkpoint at every record, resumable) and returns its summary keys. The runner
adds the common keys, writes ``summary.json`` atomically and renders the report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import numpy as np
import torch

from ..flow import FlowResult, FlowStatus, gradient_flow
from ..problem import Problem
from ..trajectory import Trajectory

__all__ = ["RunContext", "RunInterrupted", "Experiment", "execute", "DONE_STATUSES"]

DONE_STATUSES = {s.value for s in FlowStatus} - {FlowStatus.INTERRUPTED.value}


class RunInterrupted(Exception):
    """Raised after a flow was interrupted: the runner keeps what was recorded."""


@final
@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    run: Callable[[RunContext], dict[str, Any]]
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]


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
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

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
        tmp = self.out / "arrays.tmp.npz"
        np.savez(tmp, **self._arrays)
        os.replace(tmp, self.out / "arrays.npz")

    def save_figures(self, figures: list[dict[str, Any]]) -> None:
        _atomic_text(self.out / "figures.json", json.dumps(figures, indent=1))

    def trajectory_path(self, name: str) -> Path:
        return self.out / "trajectories" / f"{name}.jsonl"

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    # -- flows -----------------------------------------------------------------------------
    def flow(self, name: str, problem: Problem, *, label: str | None = None,
             **kwargs: Any) -> FlowResult:
        """Run (or, on resume, reload or continue) the flow named ``name``.

        A checkpoint of θ_t is saved at every record, so a killed run resumes at its last
        record. Raises :class:`RunInterrupted` after Ctrl-C, once the records are safe.
        """
        path = self.trajectory_path(name)
        ckpt = self.out / "checkpoints" / f"{name}.pt"
        ckpt.parent.mkdir(exist_ok=True)
        start: dict[str, Any] = {}
        if self.resume and path.exists() and ckpt.exists():
            saved = Trajectory.load(path)
            state = torch.load(ckpt, weights_only=True)
            if saved.status in DONE_STATUSES:
                return FlowResult(saved, state["params"], FlowStatus(saved.status),
                                  float(state["t"]), int(state["evals"]),
                                  saved.detail or "", 0.0)
            saved = _truncate_to(path, saved, float(state["t"]))
            start = {"params": state["params"], "t_start": float(state["t"]), "append": True,
                     "grad_evals_start": int(state["evals"])}

        def on_record(row: dict, params) -> None:
            _atomic_torch({"params": params, "t": row["t"], "evals": row["grad_evals"]}, ckpt)

        task = None
        if self.progress is not None:
            task = self.progress.add_task(label or name, total=float(kwargs["t_max"]))
            if start:
                self.progress.update(task, completed=start["t_start"])

        def progress(t: float, loss: float) -> None:
            if task is not None:
                self.progress.update(task, completed=t, description=f"{label or name} "
                                     f"L={loss:.3g}")

        result = gradient_flow(problem, path=path, on_record=on_record, progress=progress,
                               generator=kwargs.pop("generator", self.generator()),
                               **start, **kwargs)
        if task is not None:
            self.progress.update(task, completed=float(kwargs["t_max"]))
        if result.status is FlowStatus.INTERRUPTED:
            raise RunInterrupted(result.message)
        return result


def _truncate_to(path: Path, traj: Trajectory, t: float) -> Trajectory:
    """Drop records after the checkpoint time (written after the last checkpoint)."""
    keep = [r for r in traj.rows if r["t"] <= t * (1 + 1e-12)]
    if len(keep) != len(traj.rows) or traj.status is not None:
        traj.rows, traj.status, traj.detail = keep, None, None
        traj.save(path)
    return traj


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def execute(experiment: Experiment, ctx: RunContext, config_text: str) -> dict[str, Any]:
    """Run ``experiment`` in ``ctx``; write config.toml, summary.json and the report."""
    from ..report import render_report, versions, write_summary

    _atomic_text(ctx.out / "config.toml", config_text)
    begin = time.perf_counter()
    previous = _previous_run_time(ctx.out) if ctx.resume else 0.0
    status, notes = "complete", []
    try:
        summary = experiment.run(ctx)
    except RunInterrupted as stop:
        status, summary = "interrupted", {}
        notes.append(f"interrupted: {stop}; `rayleighflow run --resume {ctx.out}` continues")
    summary = {**_placeholders(), **summary}
    summary.update(
        experiment=experiment.name, status=status,
        run_time_s=previous + time.perf_counter() - begin,
        versions=versions(), created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    summary.setdefault("description", experiment.description)
    summary["notes"] = list(summary.get("notes", [])) + notes
    write_summary(ctx.out, summary)
    render_report(ctx.out)
    return summary


def _previous_run_time(out: Path) -> float:
    try:
        return float(json.loads((out / "summary.json").read_text()).get("run_time_s") or 0.0)
    except (OSError, ValueError):
        return 0.0


def _placeholders() -> dict[str, Any]:
    keys = ("P", "nk", "loss_initial", "loss_final", "t_final", "rank", "lambda_min",
            "lambda_max", "rayleigh_min")
    return {"convention": "mean", "certificates": [], **dict.fromkeys(keys)}
