"""The run folder itself: which files make one, and making a folder ready for a new run.

Standard library only: the CLI and every producer check a folder before anything heavy loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RUN_FILES", "is_run_folder", "out_path", "prepare_out"]

#: What makes a folder a run folder (``--overwrite`` empties only run folders).
RUN_FILES = ("config.toml", "summary.json", "trajectories", "report.html", "checkpoints",
             "figures.json")


def out_path(out: str | Path) -> Path:
    if isinstance(out, str) and not out.strip():
        raise ValueError("the run folder (--out) is an empty string: give a folder name, e.g. "
                         "--out runs/mine")
    return Path(out).expanduser()


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def prepare_out(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check (and create) the run folder before anything is written into it.

    A new run needs ``out`` absent or empty; an existing non-empty folder is refused unless
    ``overwrite`` (which empties it first, and only if it looks like a run folder) or
    ``resume``. Every refusal is a one-line ValueError naming the way out.
    """
    out = out_path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the run folder {str(out)!r} exists and is a file, not a folder: "
                         "choose another --out")
    if resume:
        if not (out / "config.toml").is_file():
            raise ValueError(f"{str(out)!r} is not a run folder (no config.toml): nothing to "
                             "resume")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"the run folder {str(out)!r} already holds files: add --overwrite "
                             f"to replace them, use --resume {out} to continue that run, or "
                             "choose another --out")
        _empty_run_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rayleighflow-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write into the run folder {str(out)!r}: "
                         f"{exc.strerror or exc}; choose another --out") from None
    return out


def _empty_run_folder(out: Path) -> None:
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        raise ValueError(f"--overwrite refuses to empty {str(out)!r}: it is the current "
                         "folder, one of its parents or the home folder; choose another --out")
    if not is_run_folder(out):
        raise ValueError(f"{str(out)!r} is not empty and is not a run folder (no config.toml, "
                         "summary.json or trajectories/): --overwrite only replaces run "
                         "folders; choose another --out")
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
