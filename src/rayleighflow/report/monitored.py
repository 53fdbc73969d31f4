"""A monitored run (``rayleighflow.Monitor`` on a user's training loop) in the report.

Its x axis is the optimizer step, not flow time, and it holds diagnoses, not certificates. This
module recognizes such a run folder and adapts the figures the monitor declared: its diagnoses
become marker lines at their steps on every panel, exact zeros (a dead layer's R = 0) sit on a
row marked 0 of the log axes, and the learning rate and gradient norm get their own figure
when the run recorded them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MONITOR_SOURCE", "is_monitored", "adapt_monitor_figures",
           "diagnosis_events"]

#: the ``source`` the monitor writes in its trajectories' meta record
MONITOR_SOURCE = "rayleighflow.Monitor"
_X = "optimizer step"


def _main_meta(run_dir: Path) -> dict[str, Any]:
    """The meta record (first line) of trajectories/main.jsonl, or {} when unreadable."""
    try:
        with open(run_dir / "trajectories" / "main.jsonl", encoding="utf-8") as fh:
            meta = json.loads(fh.readline())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("type") == "meta" else {}


def is_monitored(run_dir: str | Path, summary: Mapping[str, Any]) -> bool:
    """Whether the folder was written by the monitor (its trajectories say so, or its summary
    carries the monitor's ``steps`` and ``diagnoses``)."""
    if _main_meta(Path(run_dir)).get("source") == MONITOR_SOURCE:
        return True
    return "diagnoses" in summary and "steps" in summary


def diagnosis_events(summary: Mapping[str, Any]) -> list[list[Any]]:
    """[step, kind] for each diagnosis of the summary; the setup notes the monitor gives at
    step 0 before any step (update rule, distributed set-up) are not events of the run."""
    out = []
    for d in summary.get("diagnoses") or []:
        if not isinstance(d, Mapping):
            continue
        step, kind = d.get("step"), d.get("kind")
        if isinstance(step, int | float) and not isinstance(step, bool) and isinstance(kind, str) \
                and kind not in ("update-rule", "distributed"):
            out.append([step, kind])
    return out


def _training_figure(columns: tuple[str, ...]) -> dict[str, Any] | None:
    """Learning rate and batch gradient norm per step, for the columns the monitor recorded."""
    panels = []
    if "lr" in columns:
        panels.append({"title": "learning rate (parameter group 0)",
                       "xlabel": _X, "ylabel": "η", "series": [
                           {"kind": "line", "x": "traj:main:t", "y": "traj:main:lr",
                            "label": "η", "color": "k"}]})
    if "grad_sq" in columns:
        panels.append({"title": "squared gradient norm of each batch", "xlabel": _X,
                       "ylabel": "‖∇L_B‖²", "yscale": "log", "series": [
                           {"kind": "line", "x": "traj:main:t", "y": "traj:main:grad_sq",
                            "label": "‖∇L_B‖² (from .grad)", "color": "C0"}]})
    if not panels:
        return None
    return {"name": "training", "title": "Learning rate and gradient norm (monitor)",
            "panels": panels}


def adapt_monitor_figures(spec: list[Any], summary: Mapping[str, Any],
                          columns: tuple[str, ...]) -> list[Any]:
    """The monitor's figures.json with the diagnoses marked on every panel, exact zeros on a
    zero row of the log axes and, unless declared already, the learning-rate and
    gradient-norm figure."""
    events = diagnosis_events(summary)
    out: list[Any] = []
    for fig in spec:
        if isinstance(fig, Mapping) and isinstance(fig.get("panels"), list):
            fig = {**fig, "panels": [
                {**p, "events": events, "zero_row": True} if isinstance(p, Mapping) else p
                for p in fig["panels"]]}
        out.append(fig)
    names = {f.get("name") for f in out if isinstance(f, Mapping)}
    training = _training_figure(columns)
    if training is not None and training["name"] not in names:
        training["panels"] = [{**p, "events": events, "zero_row": True}
                              for p in training["panels"]]
        out.append(training)
    return out
