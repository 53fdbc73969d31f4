"""Read a run folder: summary.json, or what the trajectories recorded.

A run killed before its end never writes summary.json (it is written last). Its report is built
from the trajectories instead: every value there is read from recorded rows (first and last
loss, last flow time, smallest recorded Rayleigh quotient), never recomputed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import numpy as np

from ..trajectory import Trajectory
from .summary import SUMMARY_FILE, read_summary, validate_summary

__all__ = ["RunContents", "TrajectoryInfo", "load_run", "check_run_dir", "recorded_summary",
           "natural_key"]


@final
@dataclass(frozen=True)
class TrajectoryInfo:
    """What one trajectories/NAME.jsonl holds, for the report's data table."""

    name: str
    records: int
    t_first: float | None
    t_last: float | None
    status: str | None
    detail: str | None
    columns: tuple[str, ...]
    loss_first: float | None = None
    loss_last: float | None = None
    rayleigh_min: float | None = None


@final
@dataclass(frozen=True)
class RunContents:
    """Everything the report shows that is not a figure."""

    run_dir: Path
    summary: dict[str, Any]
    from_trajectories: bool          # summary.json was absent or unreadable
    problems: tuple[str, ...]        # ways the saved files break the contract
    config_text: str | None
    trajectories: tuple[TrajectoryInfo, ...] = field(default=())


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: m16 before m128, seed2 before seed10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


def _trajectory_files(run_dir: Path) -> list[Path]:
    folder = run_dir / "trajectories"
    files = folder.glob("*.jsonl") if folder.is_dir() else []
    return sorted(files, key=lambda p: natural_key(p.stem))


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, or a clear error if it cannot hold a run."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is not a folder; pass the run folder "
                         "(the one holding summary.json and trajectories/)")
    if not (run_dir / SUMMARY_FILE).exists() and not _trajectory_files(run_dir):
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run folder: it has neither summary.json nor "
            "trajectories/*.jsonl (nothing was recorded)")
    return run_dir


def _finite(values: np.ndarray | None) -> np.ndarray:
    if values is None:
        return np.empty(0)
    return values[np.isfinite(values)]


def _first(values: np.ndarray | None) -> float | None:
    v = _finite(values)
    return float(v[0]) if v.size else None


def _last(values: np.ndarray | None) -> float | None:
    v = _finite(values)
    return float(v[-1]) if v.size else None


def _config(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    path = run_dir / "config.toml"
    if not path.exists():
        return None, {}
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text, {}


def _latest(run_dir: Path, trajs: dict[str, Trajectory]) -> str | None:
    """The trajectory written last: the flow that was running when the run stopped."""
    if "main" in trajs:
        return "main"
    open_ = [n for n, t in trajs.items() if t.status is None or t.status == "failed"]
    names = open_ or list(trajs)
    if not names:
        return None
    folder = run_dir / "trajectories"
    return max(names, key=lambda n: (folder / f"{n}.jsonl").stat().st_mtime_ns
               if (folder / f"{n}.jsonl").exists() else 0)


def _values(traj: Trajectory) -> dict[str, Any]:
    rank = _last(traj.get("rank"))
    rayleigh = _finite(traj.get("rayleigh"))
    lam_min = _finite(traj.get("lambda_min"))
    lam_max = _finite(traj.get("lambda_max"))
    return {
        "loss_initial": _first(traj.get("loss")), "loss_final": _last(traj.get("loss")),
        "t_final": _last(traj.get("t")),
        "rank": int(rank) if rank is not None else None,
        "lambda_min": float(lam_min.min()) if lam_min.size else None,
        "lambda_max": float(lam_max.max()) if lam_max.size else None,
        "rayleigh_min": float(rayleigh.min()) if rayleigh.size else None,
    }


def recorded_summary(run_dir: str | Path) -> dict[str, Any]:
    """Summary keys read off the recorded rows of the flow that was running last (the one an
    interrupt or a failure stopped): L₀, L, t, rank, λ's, min R, P and the convention, with a
    note naming the flow. Empty when nothing was recorded."""
    run_dir = Path(run_dir)
    trajs: dict[str, Trajectory] = {}
    for path in _trajectory_files(run_dir):
        try:
            trajs[path.stem] = Trajectory.load(path)
        except (OSError, ValueError):
            continue
    name = _latest(run_dir, trajs)
    if name is None or not len(trajs[name]):
        return {}
    traj = trajs[name]
    out = _values(traj)
    meta = traj.meta
    if isinstance(meta.get("n_params"), int):
        out["P"] = meta["n_params"]
    if meta.get("convention") in ("mean", "sum"):
        out["convention"] = meta["convention"]
    done = sum(t.status is not None and t.status not in ("interrupted", "failed")
               for t in trajs.values())
    where = (f"flow {name!r}" if len(trajs) == 1 else
             f"flow {name!r}, the one running when the run stopped ({done} of {len(trajs)} "
             "flows had finished)")
    out["notes"] = [f"values recorded by {where}, up to t = {out['t_final']:.6g}; no certificate "
                    "was issued"] if out["t_final"] is not None else []
    out["recorded_flow"] = name
    return out


def _from_trajectories(run_dir: Path, trajs: dict[str, Trajectory],
                       config: dict[str, Any]) -> dict[str, Any]:
    """A summary with the contract's keys, filled from recorded rows (null where unknown)."""
    name = _latest(run_dir, trajs)
    traj = trajs[name] if name is not None else Trajectory()
    meta = traj.meta
    section = config.get("experiment") if isinstance(config.get("experiment"), dict) else {}

    def pick(*keys: str) -> Any:
        for source in (meta, section, config):
            for k in keys:
                if isinstance(source.get(k), str | int | float) and not isinstance(
                        source.get(k), bool):
                    return source[k]
        return None

    experiment = pick("experiment", "name")
    walls = [_last(t.get("wall")) for t in trajs.values()]
    walls = [w for w in walls if w is not None]
    summary = {
        "experiment": str(experiment) if experiment is not None else run_dir.name,
        "status": "interrupted",
        "convention": pick("convention"),
        "P": pick("P", "n_params"), "nk": pick("nk"),
        **_values(traj),
        "certificates": [],
        # every flow's recorded time (the last segment of each, after a resume)
        "run_time_s": sum(walls) if walls else None,
        "versions": meta.get("versions") if isinstance(meta.get("versions"), dict) else {},
        "created": None,
    }
    description = pick("description")
    if description is not None:
        summary["description"] = str(description)
    notes = ["summary.json was not written: the run stopped before its end (killed?). The "
             f"values here are read from the recorded rows of trajectories/{name}.jsonl"
             + (f", the flow running last ({len(trajs)} flows in all)" if len(trajs) > 1 else "")
             + "; no certificate was issued. The run time is the sum of the flows' recorded "
             "times. `rayleighflow run --resume` continues the run."]
    if traj.status is not None:
        notes.append(f"trajectory {name!r} ended with status {traj.status!r}"
                     + (f": {traj.detail}" if traj.detail else ""))
    summary["notes"] = notes
    return summary


def load_run(run_dir: str | Path) -> RunContents:
    """Read what the report needs from ``run_dir`` (see :func:`check_run_dir` for errors)."""
    run_dir = check_run_dir(run_dir)
    config_text, config = _config(run_dir)
    trajs: dict[str, Trajectory] = {}
    problems: list[str] = []
    for path in _trajectory_files(run_dir):
        try:
            trajs[path.stem] = Trajectory.load(path)
        except (OSError, ValueError) as e:
            problems.append(f"trajectories/{path.name} could not be read: {e}")
    infos = tuple(_info(n, t) for n, t in trajs.items())
    summary: dict[str, Any] | None = None
    if (run_dir / SUMMARY_FILE).exists():
        try:
            summary = read_summary(run_dir)
            problems += [f"summary.json: {p}" for p in validate_summary(summary)]
        except (OSError, ValueError) as e:
            problems.append(f"summary.json could not be read ({e}); "
                            "showing what the trajectories recorded")
    if summary is not None:
        for name in summary.get("flows", []):
            if name not in trajs and not any(p.startswith(f"trajectories/{name}.jsonl")
                                             for p in problems):
                problems.append(f"trajectories/{name}.jsonl is missing (summary.json lists it)")
            elif name in trajs and trajs[name].status is None and \
                    summary.get("status") == "complete":
                problems.append(f"trajectories/{name}.jsonl has no end line (truncated?) "
                                "though the run completed")
    if summary is None:
        if not trajs:
            raise ValueError(f"{str(run_dir)!r}: summary.json is unreadable and no trajectory "
                             "could be read; nothing to report")
        return RunContents(run_dir, _from_trajectories(run_dir, trajs, config), True,
                           tuple(problems), config_text, infos)
    return RunContents(run_dir, summary, False, tuple(problems), config_text, infos)


def _info(name: str, traj: Trajectory) -> TrajectoryInfo:
    t = _finite(traj.get("t"))
    return TrajectoryInfo(
        name=name, records=len(traj),
        t_first=float(t[0]) if t.size else None, t_last=float(t[-1]) if t.size else None,
        status=traj.status, detail=traj.detail, columns=tuple(traj.columns),
        loss_first=_first(traj.get("loss")), loss_last=_last(traj.get("loss")),
        rayleigh_min=float(r.min()) if (r := _finite(traj.get("rayleigh"))).size else None)
