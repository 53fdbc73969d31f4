"""The run folder itself: which files make one, making a folder ready for a new run, and the
lock a running run holds on it.

Standard library only: the CLI and every producer check a folder before anything heavy loads.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

__all__ = ["LOCK_FILE", "RUN_FILES", "is_run_folder", "out_path", "prepare_out",
           "release_lock"]

#: What makes a folder a run folder (``--overwrite`` empties only run folders).
RUN_FILES = ("config.toml", "summary.json", "trajectories", "report.html", "checkpoints",
             "figures.json")
#: Held (created with O_CREAT | O_EXCL) by a run for its whole life; names its PID and host.
#: It never makes a folder a run folder, and a folder holding only a stale one counts as empty.
LOCK_FILE = ".rayleighflow.lock"

# resolved folder -> (this process's token in its lock, whether this run created the folder)
_HELD: dict[Path, tuple[str, bool]] = {}


def out_path(out: str | Path) -> Path:
    if isinstance(out, str) and not out.strip():
        raise ValueError("the run folder (--out) is an empty string: give a folder name, e.g. "
                         "--out runs/mine")
    return Path(out).expanduser()


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def _entries(path: Path) -> list[Path]:
    """What ``path`` holds besides its lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


def _read_lock(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (being written, or damaged): no PID to check
    return d if isinstance(d, dict) else {}


def _alive(pid: object, host: object) -> bool | None:
    """Whether the lock's process still runs (None: it runs on another machine, or the lock
    names no PID, so this machine cannot tell)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 \
            or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return None
    return True


def _check_lock(out: Path) -> dict | None:
    """Refuse a folder whose lock names a live (or unknowable) process; return a stale lock's
    contents (None when there is no lock)."""
    lock = out / LOCK_FILE
    info = _read_lock(lock)
    if info is None:
        return None
    pid, host = info.get("pid"), info.get("host")
    alive = _alive(pid, host)
    if alive is False:
        return info
    who = f"PID {pid} on {host}" if pid is not None else "a process"
    since = f", since {info['started']}" if info.get("started") else ""
    if alive:
        raise ValueError(f"the run folder {str(out)!r} is in use by a running rayleighflow run "
                         f"({who}{since}): wait for it to end or stop it (kill {pid}), or "
                         "choose another --out")
    raise ValueError(f"the run folder {str(out)!r} is locked by {who}{since}, which this "
                     f"machine cannot check: if no run is using it, delete {str(lock)!r}; or "
                     "choose another --out")


def _acquire(out: Path, created: bool) -> bool:
    """Create the lock (atomically); False when another process holds it."""
    token = uuid.uuid4().hex
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "token": token}) + "\n"
    try:
        fd = os.open(out / LOCK_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ValueError(f"cannot write into the run folder {str(out)!r}: "
                         f"{exc.strerror or exc}; choose another --out") from None
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        os.close(fd)
        (out / LOCK_FILE).unlink(missing_ok=True)
        raise ValueError(f"cannot write into the run folder {str(out)!r}: "
                         f"{exc.strerror or exc}; choose another --out") from None
    os.close(fd)
    _HELD[out.resolve()] = (token, created)
    return True


def release_lock(out: str | Path) -> bool:
    """Remove the lock this process holds on ``out`` (only if it is still ours); return
    whether this run created the folder (the caller may remove it when nothing was kept)."""
    out = Path(out)
    held = _HELD.pop(out.resolve(), None)
    if held is None:
        return False
    info = _read_lock(out / LOCK_FILE)
    if info and info.get("token") == held[0]:
        (out / LOCK_FILE).unlink(missing_ok=True)
    return held[1]


def prepare_out(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                lock: bool = False, next_free: bool = False) -> Path:
    """Check (and create) the run folder before anything is written into it.

    A new run needs ``out`` absent or empty; an existing non-empty folder is refused unless
    ``overwrite`` (which empties it first, and only if it looks like a run folder) or
    ``resume``. A folder locked by a running run (:data:`LOCK_FILE`) is refused. Every refusal
    is a one-line ValueError naming the way out.

    ``lock``: take the folder's lock for this process (a stale one, of a process that no longer
    runs, is taken over, said in one line on stderr); the caller ends with
    :func:`release_lock`. ``next_free`` (a new run into a default folder): when ``out`` is
    taken, claim ``out-2``, ``out-3``, ... instead (an atomic mkdir or lock decides a race)
    and return the folder claimed.
    """
    out = out_path(out)
    if next_free and not resume and not overwrite:
        return _claim_next_free(out, lock=lock)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the run folder {str(out)!r} exists and is a file, not a folder: "
                         "choose another --out")
    stale = _check_lock(out) if out.is_dir() else None
    if resume:
        if not (out / "config.toml").is_file():
            raise ValueError(f"{str(out)!r} is not a run folder (no config.toml): nothing to "
                             "resume")
    elif out.exists() and _entries(out):
        if not overwrite:
            raise ValueError(f"the run folder {str(out)!r} already holds files: add --overwrite "
                             f"to replace them, use --resume {out} to continue that run, or "
                             "choose another --out")
        _check_emptiable(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rayleighflow-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write into the run folder {str(out)!r}: "
                         f"{exc.strerror or exc}; choose another --out") from None
    if lock:
        if stale is not None:
            (out / LOCK_FILE).unlink(missing_ok=True)
        if not _acquire(out, created):  # another run took it since the check
            _check_lock(out)
            raise ValueError(f"the run folder {str(out)!r} was claimed by another run just now: "
                             "choose another --out")
        if stale is not None:
            print(f"warning: {str(out)!r} was locked by PID {stale.get('pid')} on "
                  f"{stale.get('host')}, which no longer runs: took the stale lock over",
                  file=sys.stderr)
    if overwrite and not resume and _entries(out):
        try:
            _empty_run_folder(out)
        except BaseException:
            if lock:
                release_lock(out)
            raise
    return out


def _claim_next_free(base: Path, *, lock: bool) -> Path:
    """The first of ``base``, ``base-2``, ... that this process claims: made by its mkdir, or
    found empty and locked by it (a folder that holds anything, a lock included, is passed)."""
    i = 1
    while True:
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        i += 1
        if candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
            continue
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            try:
                candidate.mkdir()
                created = True
            except FileExistsError:  # empty, or another run's mkdir came first
                if not candidate.is_dir():
                    continue
                created = False
        except OSError as exc:
            raise ValueError(f"cannot write into the run folder {str(candidate)!r}: "
                             f"{exc.strerror or exc}; choose another --out") from None
        if not _acquire(candidate, created):
            continue  # another run locked it first
        if _entries(candidate):  # another run (without a lock) wrote into it meanwhile
            release_lock(candidate)
            continue
        if not lock:
            release_lock(candidate)
        return candidate


def _check_emptiable(out: Path) -> None:
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        raise ValueError(f"--overwrite refuses to empty {str(out)!r}: it is the current "
                         "folder, one of its parents or the home folder; choose another --out")
    if not is_run_folder(out):
        raise ValueError(f"{str(out)!r} is not empty and is not a run folder (no config.toml, "
                         "summary.json or trajectories/): --overwrite only replaces run "
                         "folders; choose another --out")


def _empty_run_folder(out: Path) -> None:
    _check_emptiable(out)
    for child in _entries(out):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
