"""The run folder's one owner (docs/RUN_FOLDER.md): its files, the summary.json schema and
writer, :func:`versions`, reading a run back, and the mark a failed run leaves.

This package sits below both the producers (the experiment runner, the monitor) and the report
layer: it imports numpy and the trajectory format, never matplotlib, jinja2 or torch, so a
producer can write a valid run folder without loading the report.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from rayleighflow.trajectory import Trajectory
    >>> out = prepare_out(Path(tempfile.mkdtemp()) / "run")
    >>> Trajectory({"convention": "mean"}, out / "trajectories" / "f.jsonl").append({"t": 0.0})
    >>> mark_failed(out, "ValueError: bad data")
    >>> Trajectory.load(out / "trajectories" / "f.jsonl").status
    'failed'
"""

from __future__ import annotations

from pathlib import Path

from ..trajectory import Trajectory, end_line
from .contents import (
    RunContents,
    TrajectoryInfo,
    check_run_dir,
    load_run,
    natural_key,
    recorded_summary,
)
from .folder import LOCK_FILE, RUN_FILES, is_run_folder, out_path, prepare_out, release_lock
from .summary import (
    CERTIFICATE_KEYS,
    REQUIRED_SUMMARY_KEYS,
    STATUSES,
    SUMMARY_FILE,
    json_safe,
    read_summary,
    validate_summary,
    versions,
    write_summary,
)

__all__ = ["CERTIFICATE_KEYS", "LOCK_FILE", "REQUIRED_SUMMARY_KEYS", "RUN_FILES", "STATUSES",
           "SUMMARY_FILE",
           "RunContents", "TrajectoryInfo", "check_run_dir", "is_run_folder", "json_safe",
           "load_run", "mark_failed", "natural_key", "out_path", "prepare_out", "read_summary",
           "recorded_summary", "release_lock", "validate_summary", "versions", "write_summary"]


def mark_failed(run_dir: str | Path, error: str) -> None:
    """Give every trajectory of ``run_dir`` that has no end record a ``"failed"`` one carrying
    ``error`` (the run raised before its flows could close them)."""
    for path in sorted((Path(run_dir) / "trajectories").glob("*.jsonl")):
        try:
            if Trajectory.load(path).status is not None:
                continue
            text = path.read_text()
            with open(path, "a") as fh:
                if text and not text.endswith("\n"):
                    fh.write("\n")
                fh.write(end_line("failed", error))
        except (OSError, ValueError):
            continue
