"""Two small rules every writer shares: atomic file writes, and "a finite float or None".

Standard library only, so every layer (trajectories, run folders, the report, the monitor's
sinks, proofs) may import it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_text(path, "hello\\n")
    >>> path.read_text()
    'hello\\n'
    >>> finite_or_none(float("nan")), finite_or_none(2), finite_or_none(True)
    (None, 2.0, None)
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["WriteError", "atomic_write", "atomic_write_text", "finite_or_none", "write_error"]


class WriteError(OSError):
    """A file could not be written (a full disk, a folder gone): ``filename`` names it, and
    ``str()`` is one line, "cannot write 'PATH': No space left on device"."""

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror or 'unknown error'}"


def write_error(exc: OSError, path: str | Path) -> WriteError:
    """``exc`` (raised while writing ``path``) as a :class:`WriteError` naming ``path``."""
    if isinstance(exc, WriteError):
        return exc
    err = WriteError(exc.errno, exc.strerror or str(exc), str(path))
    err.__cause__ = exc
    return err


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = False,
                 fsync: bool = False) -> Path:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    A killed writer leaves the old file (or none), never a half-written one; a failing
    ``write`` leaves no temporary file behind. The file gets the permissions the umask gives
    ordinary files. ``fsync``: flush to disk before the rename (for files read after a crash).
    An OSError (a full disk...) is raised as a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path) from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; match the folder's other files
        with (os.fdopen(fd, "wb") if binary else
              os.fdopen(fd, "w", encoding="utf-8")) as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text), fsync=fsync)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a finite real number, else None (None, NaN, ±inf, booleans,
    strings and anything without a float value): the JSON-safe form of a measurement."""
    if x is None or isinstance(x, bool | str | bytes) or type(x).__name__ == "bool_":
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
