"""summary.json: the machine-readable result of a run (docs/RUN_FOLDER.md): its schema
(:data:`REQUIRED_SUMMARY_KEYS`, :func:`validate_summary`), its writer and reader, and
:func:`versions`.

The experiment builds a plain dict and hands it to :func:`write_summary`, which checks it
against the contract, turns numpy scalars and arrays into JSON values and non-finite floats into
``null``, and writes it atomically (a killed writer leaves either the old file or none, never a
half-written one). Example::

    >>> d = {"experiment": "toy", "status": "complete", "convention": "mean", "P": 3, "nk": 4,
    ...      "loss_initial": 1.0, "loss_final": 1e-3, "t_final": 10.0, "rank": 3,
    ...      "lambda_min": 0.1, "lambda_max": 2.0, "rayleigh_min": 0.2, "certificates": [],
    ...      "run_time_s": 0.5, "versions": versions(), "created": "2024-01-01T00:00:00"}
    >>> validate_summary(d)
    []
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text, finite_or_none

__all__ = ["REQUIRED_SUMMARY_KEYS", "CERTIFICATE_KEYS", "STATUSES", "validate_summary",
           "write_summary", "read_summary", "versions", "json_safe"]

SUMMARY_FILE = "summary.json"

#: Keys every summary.json carries, whatever the experiment.
REQUIRED_SUMMARY_KEYS: tuple[str, ...] = (
    "experiment", "status", "convention", "P", "nk", "loss_initial", "loss_final", "t_final",
    "rank", "lambda_min", "lambda_max", "rayleigh_min", "certificates", "run_time_s",
    "versions", "created",
)
#: Keys every entry of ``certificates`` carries.
CERTIFICATE_KEYS: tuple[str, ...] = ("desingularizer", "mu", "status", "bound_final")
STATUSES: tuple[str, ...] = ("complete", "interrupted", "failed")
CONVENTIONS: tuple[str, ...] = ("mean", "sum")
VERSION_KEYS: tuple[str, ...] = ("rayleighflow", "torch", "numpy", "python")


# -- type predicates (bool is an int in Python but never a valid count or measurement) ---------
def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool | np.bool_)


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool | np.bool_)


def _is_num_or_null(v: Any) -> bool:
    return v is None or _is_num(v)


def _is_int_or_null(v: Any) -> bool:
    return v is None or _is_int(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


# key -> (predicate, what the contract expects)
_TYPES: dict[str, tuple[Any, str]] = {
    "experiment": (_is_str, "a string"),
    "P": (_is_int, "an int (null only for an interrupted or failed run)"),
    "nk": (_is_int, "an int (null only for an interrupted or failed run)"),
    "loss_initial": (_is_num_or_null, "a number or null"),
    "loss_final": (_is_num_or_null, "a number or null"),
    "t_final": (_is_num_or_null, "a number or null"),
    "rank": (_is_int_or_null, "an int or null"),
    "lambda_min": (_is_num_or_null, "a number or null"),
    "lambda_max": (_is_num_or_null, "a number or null"),
    "rayleigh_min": (_is_num_or_null, "a number or null"),
    "run_time_s": (_is_num_or_null, "a number or null"),
    "created": (_is_str, "an ISO time string"),
    # optional keys: checked only when present
    "description": (_is_str, "a string"),
    "rank_threshold": (_is_num_or_null, "a number or null"),
    "max_bound_violation": (_is_num_or_null, "a number or null"),
}


def validate_summary(d: Any) -> list[str]:
    """Problems that keep ``d`` from being a valid summary.json (empty list: valid)."""
    if not isinstance(d, Mapping):
        return [f"summary must be an object, got {type(d).__name__}"]
    problems = [f"missing key {k!r}" for k in REQUIRED_SUMMARY_KEYS if k not in d]
    for key, (ok, expected) in _TYPES.items():
        # A run stopped before it measured anything may not know P or nk yet.
        if key in ("P", "nk") and d.get(key) is None and d.get("status") != "complete":
            continue
        if key in d and not ok(d[key]):
            problems.append(f"{key!r} must be {expected}, got {d[key]!r}")
    if "status" in d and d["status"] not in STATUSES:
        problems.append(f"'status' must be one of {list(STATUSES)}, got {d['status']!r}")
    if "convention" in d and d["convention"] not in CONVENTIONS:
        problems.append(f"'convention' must be one of {list(CONVENTIONS)}, "
                        f"got {d['convention']!r}")
    if _is_str(d.get("created")):
        try:
            datetime.fromisoformat(d["created"])
        except ValueError:
            problems.append(f"'created' must be an ISO time, got {d['created']!r}")
    if "versions" in d:
        v = d["versions"]
        if not isinstance(v, Mapping):
            problems.append(f"'versions' must be an object, got {v!r}")
        else:
            problems += [f"'versions' lacks {k!r}" for k in VERSION_KEYS if k not in v]
    if "notes" in d and not (isinstance(d["notes"], list | tuple)
                             and all(_is_str(n) for n in d["notes"])):
        problems.append("'notes' must be a list of strings")
    if "certificates" in d:
        problems += _validate_certificates(d["certificates"])
    return problems


def _validate_certificates(certs: Any) -> list[str]:
    if not isinstance(certs, list | tuple):
        return [f"'certificates' must be a list, got {type(certs).__name__}"]
    problems = []
    for i, c in enumerate(certs):
        if not isinstance(c, Mapping):
            problems.append(f"certificates[{i}] must be an object")
            continue
        problems += [f"certificates[{i}] lacks {k!r}" for k in CERTIFICATE_KEYS if k not in c]
        for k in ("mu", "bound_final", "max_bound_violation"):
            if k in c and not _is_num_or_null(c[k]):
                problems.append(f"certificates[{i}].{k} must be a number or null, got {c[k]!r}")
        if "assumptions" in c:
            a = c["assumptions"]
            if not isinstance(a, list | tuple) or not all(
                    isinstance(x, Mapping) and "name" in x and "holds" in x for x in a):
                problems.append(f"certificates[{i}].assumptions must be a list of objects "
                                "with 'name', 'holds' (and 'detail')")
    return problems


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts.

    numpy scalars become Python scalars, arrays and tuples become lists, enums their value,
    paths strings, and non-finite floats ``None``.
    """
    if isinstance(value, Enum):
        return json_safe(value.value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return finite_or_none(value)
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_summary(run_dir: str | Path, d: Mapping[str, Any]) -> Path:
    """Validate ``d`` and write ``RUN_DIR/summary.json`` atomically; return its path.

    Raises ValueError listing every problem (and writes nothing) when ``d`` is invalid.
    """
    problems = validate_summary(d)
    if problems:
        raise ValueError("invalid summary.json:\n  " + "\n  ".join(problems))
    text = json.dumps(json_safe(d), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SUMMARY_FILE
    atomic_write_text(path, text, fsync=True)
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """Load ``RUN_DIR/summary.json`` (FileNotFoundError if absent, ValueError if corrupt)."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """Versions of the software that produced a run, for summary.json.

    Read from the installed distributions' metadata, so torch is never imported here.
    """
    rf = _dist_version("rayleighflow")
    if rf is None:  # running from a source checkout without an install
        rf = getattr(sys.modules.get("rayleighflow"), "__version__", None) or "unknown"
    return {
        "rayleighflow": rf,
        "torch": _dist_version("torch") or "not installed",
        "numpy": np.__version__,
        "scipy": _dist_version("scipy") or "not installed",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
