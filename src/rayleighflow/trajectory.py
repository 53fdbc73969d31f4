"""Trajectory: diagnostics recorded at flow times t, as columns, streamed to disk as JSON lines.

File format (append-only, one JSON object per line, so an interrupted run keeps every record
it wrote and a truncated last line is ignored on load)::

    {"type": "meta", ...}                     # once, first line
    {"type": "evals", "row": 1, "t": [...], "loss": [...], "grad_sq": [...], "fgrad_sq": [...]}
    {"type": "row", "t": 0.0, "loss": ..., ...}
    {"type": "end", "status": "t_max", "detail": "..."}   # last "end" wins (resumed runs)

An "evals" line holds the integrator's gradient evaluations (each gradient-descent iterate, each
Runge–Kutta stage) since the previous record: flow time, L, ‖∇L‖² and ‖∇ℓ‖²_D at each. It is written
just before the record row with index ``row``, so truncating rows drops its evaluations too.

Non-finite floats are written as null and read back as NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, final

import numpy as np

from ._io import atomic_write, write_error

__all__ = ["Trajectory", "end_line"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.floating):
        return _clean(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


_EVAL_KEYS = ("t", "loss", "grad_sq", "fgrad_sq")


def end_line(status: str, detail: str | None = "") -> str:
    """The "end" line that says why a trajectory stopped (the last one wins on load)."""
    return json.dumps({"type": "end", "status": status, "detail": detail}) + "\n"


def _chunk_line(index: int, chunk: Mapping[str, list]) -> str:
    clean = {k: [None if x is None else _clean(float(x)) for x in v] for k, v in chunk.items()}
    return json.dumps({"type": "evals", "row": index, **clean}) + "\n"


@final
class Trajectory:
    """Columns of diagnostics indexed by record; optionally mirrored to a JSONL file.

    ``traj["loss"]`` is a float64 array (NaN where a row lacks the column); ``traj.t`` the flow
    times. ``status``/``detail`` say why the run stopped (None while running).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import rayleighflow as rf
        >>> path = Path(tempfile.mkdtemp()) / "trajectory.jsonl"
        >>> traj = rf.Trajectory({"convention": "mean"}, path)     # streamed as JSON lines
        >>> traj.append({"t": 0.0, "loss": 1.0, "grad_sq": 2.0})
        >>> traj.append({"t": 1.0, "loss": 0.5, "grad_sq": float("nan")})
        >>> traj.close("t_max")
        >>> back = rf.Trajectory.load(path)
        >>> len(back), back.columns, back["loss"], back.status
        (2, ['t', 'loss', 'grad_sq'], array([1. , 0.5]), 't_max')
        >>> back["grad_sq"]                                         # NaN written as null
        array([ 2., nan])
    """

    def __init__(self, meta: Mapping[str, Any] | None = None, path: str | Path | None = None,
                 *, append: bool = False) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self.rows: list[dict[str, Any]] = []
        self.status: str | None = None
        self.detail: str | None = None
        self.path = Path(path) if path is not None else None
        self._fh: IO[str] | None = None
        # (index of the row that follows, {"t": [...], "loss": [...], "grad_sq": [...]})
        self._eval_chunks: list[tuple[int, dict[str, list[float]]]] = []
        self._pending: dict[str, list[float]] = {k: [] for k in _EVAL_KEYS}
        if self.path is not None:
            if append and self.path.exists():
                loaded = Trajectory.load(self.path)
                self.meta, self.rows = loaded.meta, loaded.rows
                self._eval_chunks = loaded._eval_chunks
                self._fh = self._open("a")
            else:
                self._fh = self._open("w")
                self._write({"type": "meta", **self.meta})

    # -- writing ---------------------------------------------------------------------------
    def _open(self, mode: str) -> IO[str]:
        assert self.path is not None
        try:
            if mode == "w":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, mode)
        except OSError as exc:
            raise write_error(exc, self.path) from exc

    def _put(self, text: str) -> None:
        """Write ``text`` and flush; an OSError (a full disk) names the file."""
        if self._fh is None:
            return
        try:
            self._fh.write(text)
            self._fh.flush()
        except OSError as exc:
            raise write_error(exc, self.path or "trajectory") from exc

    def _write(self, obj: Mapping[str, Any]) -> None:
        self._put(json.dumps({k: _clean(v) for k, v in obj.items()}) + "\n")

    def add_evaluation(self, t: float, loss: float, grad_sq: float,
                       fgrad_sq: float = math.nan) -> None:
        """Buffer one gradient evaluation of the integrator; written with the next record."""
        for key, value in zip(_EVAL_KEYS, (t, loss, grad_sq, fgrad_sq), strict=True):
            self._pending[key].append(value)

    def _flush_evaluations(self) -> None:
        if not self._pending["t"]:
            return
        chunk, index = self._pending, len(self.rows)
        self._pending = {k: [] for k in _EVAL_KEYS}
        self._eval_chunks.append((index, chunk))
        self._write_chunk(index, chunk)

    def _write_chunk(self, index: int, chunk: Mapping[str, list[float]]) -> None:
        if self._fh is not None:
            try:
                self._fh.write(_chunk_line(index, chunk))
            except OSError as exc:
                raise write_error(exc, self.path or "trajectory") from exc

    def append(self, row: Mapping[str, Any]) -> None:
        self._flush_evaluations()
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        self._write({"type": "row", **row})

    @property
    def evaluations(self) -> dict[str, np.ndarray] | None:
        """Every logged gradient evaluation up to the last record, as float64 arrays ``t``,
        ``loss``, ``grad_sq``, ``fgrad_sq`` (None when the integrator logged none)."""
        chunks = [c for i, c in self._eval_chunks if i < len(self.rows)]
        if not chunks:
            return None
        return {k: np.array([np.nan if x is None else x for c in chunks
                             for x in c.get(k, [None] * len(c["t"]))], dtype=np.float64)
                for k in _EVAL_KEYS}

    def close(self, status: str, detail: str = "") -> None:
        """Record why the run stopped and close the file (idempotent)."""
        self.status, self.detail = status, detail
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.write(end_line(status, detail))
                fh.flush()
            except OSError as exc:
                raise write_error(exc, self.path or "trajectory") from exc
            finally:
                try:
                    fh.close()
                except OSError:
                    pass

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory file; a truncated final line (killed writer) is skipped."""
        traj = cls()
        traj.path = Path(path)
        with open(path) as fh:
            lines = fh.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i >= len(lines) - 2:
                    break  # the writer was killed mid-line
                raise ValueError(f"{path}:{i + 1}: corrupt trajectory line") from None
            kind = obj.pop("type", "row")
            if kind == "meta":
                traj.meta = obj
            elif kind == "row":
                traj.rows.append(obj)
            elif kind == "evals":
                traj._eval_chunks.append((int(obj.pop("row")), obj))
            elif kind == "end":
                traj.status, traj.detail = obj.get("status"), obj.get("detail")
        return traj

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; available: {self.columns}")
        return np.array(
            [np.nan if r.get(name) is None else r[name] for r in self.rows], dtype=np.float64
        )

    def get(self, name: str) -> np.ndarray | None:
        return self[name] if name in self.columns else None

    @property
    def t(self) -> np.ndarray:
        return self["t"]

    def to_pandas(self, evaluations: bool = False) -> Any:
        """A pandas DataFrame: one row per record (``evaluations=True``: per logged gradient
        evaluation); the header in ``attrs["meta"]`` (needs pandas)."""
        from .tables import trajectory_frame

        return trajectory_frame(self, evaluations)

    def iter_rows(self) -> Iterable[dict[str, Any]]:
        return iter(self.rows)

    def save(self, path: str | Path) -> None:
        """Write the whole trajectory to a new file (atomically)."""
        def write(fh: IO[str]) -> None:
            fh.write(json.dumps({"type": "meta", **self.meta}) + "\n")
            chunks = {i: c for i, c in self._eval_chunks if i < len(self.rows)}
            for i, r in enumerate(self.rows):
                if i in chunks:
                    fh.write(_chunk_line(i, chunks[i]))
                fh.write(json.dumps({"type": "row", **r}) + "\n")
            if self.status is not None:
                fh.write(end_line(self.status, self.detail))

        atomic_write(path, write)
