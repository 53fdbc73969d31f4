"""figures.json: the declarative figure specs an experiment writes (docs/RUN_FOLDER.md).

This module only checks specs and reads the data their REFs name; ``figures.py`` draws them.
Beyond the contract it accepts a few optional keys, all listed in the ``*_KEYS`` tables below:
figure ``caption``; panel ``xlim``/``ylim`` (``[lo, hi]``, either may be null), ``events``
(``[[x, label], ...]``: vertical marker lines with their labels, e.g. a monitor's diagnoses at
their steps) and ``zero_row`` (on a log y-axis, values exactly 0 are drawn on a row marked "0"
at the bottom instead of being masked); series ``marker``, ``alpha`` and ``linewidth``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any, final

import numpy as np

from rayleighflow.trajectory import Trajectory

__all__ = ["KINDS", "SCALES", "validate_figures_spec", "RunData"]

KINDS = ("line", "scatter", "band", "hline", "errorbar")
SCALES = ("linear", "log", "symlog")
# What each kind needs, and what any series may carry besides.
REQUIRED_BY_KIND: dict[str, tuple[str, ...]] = {
    "line": ("x", "y"), "scatter": ("x", "y"), "errorbar": ("x", "y", "yerr"),
    "band": ("x", "y", "y2"), "hline": ("value",),
}
STYLE_KEYS = ("label", "style", "color", "marker", "alpha", "linewidth", "role")
FIGURE_KEYS = ("name", "title", "panels", "caption")
PANEL_KEYS = ("title", "xlabel", "ylabel", "xscale", "yscale", "equal_aspect", "xlim", "ylim",
              "events", "zero_row", "series")
REF_KEYS = ("x", "y", "y2", "yerr")

# A figure name becomes a file name: no path separators, no leading dot.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
TRAJ_RE = re.compile(r"^traj:([A-Za-z0-9][A-Za-z0-9_.\-]*):(.+)$")
ARR_RE = re.compile(r"^arr:(.+)$")


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def ref_problem(ref: Any) -> str | None:
    """Why ``ref`` is not a REF (``traj:NAME:COLUMN`` or ``arr:KEY``), or None."""
    if not isinstance(ref, str):
        return f"a REF must be a string, got {ref!r}"
    if TRAJ_RE.match(ref) or ARR_RE.match(ref):
        return None
    return f"{ref!r} is not a REF ('traj:NAME:COLUMN' or 'arr:KEY')"


def series_problems(s: Any) -> tuple[list[str], list[str]]:
    """(fatal, minor) problems of one series: fatal ones keep it from being drawn."""
    if not isinstance(s, Mapping):
        return [f"a series must be an object, got {type(s).__name__}"], []
    kind = s.get("kind")
    if kind not in KINDS:
        return [f"kind must be one of {list(KINDS)}, got {kind!r}"], []
    fatal, minor = [], []
    for key in REQUIRED_BY_KIND[kind]:
        if key not in s:
            fatal.append(f"kind {kind!r} needs {key!r}")
        elif key == "value":
            if not _is_num(s[key]):
                fatal.append(f"'value' must be a number, got {s[key]!r}")
        elif (p := ref_problem(s[key])) is not None:
            fatal.append(f"{key}: {p}")
    for key in s:
        if key == "kind" or key in REQUIRED_BY_KIND[kind] or key in STYLE_KEYS:
            continue
        if key in REF_KEYS or key == "value":
            minor.append(f"{key!r} is not used by kind {kind!r}")
        else:
            minor.append(f"unknown key {key!r}")
    for key in ("label", "style", "color", "marker"):
        if key in s and s[key] is not None and not isinstance(s[key], str):
            minor.append(f"{key!r} must be a string, got {s[key]!r}")
    for key in ("alpha", "linewidth"):
        if key in s and not _is_num(s[key]):
            minor.append(f"{key!r} must be a number, got {s[key]!r}")
    return fatal, minor


def panel_problems(p: Any) -> list[str]:
    """Problems of a panel's own keys (its series are checked by :func:`series_problems`)."""
    if not isinstance(p, Mapping):
        return [f"a panel must be an object, got {type(p).__name__}"]
    problems = [f"unknown key {k!r}" for k in p if k not in PANEL_KEYS]
    for key in ("title", "xlabel", "ylabel"):
        if key in p and not isinstance(p[key], str):
            problems.append(f"{key!r} must be a string, got {p[key]!r}")
    for key in ("xscale", "yscale"):
        if key in p and p[key] not in SCALES:
            problems.append(f"{key!r} must be one of {list(SCALES)}, got {p[key]!r}")
    for key in ("equal_aspect", "zero_row"):
        if key in p and not isinstance(p[key], bool):
            problems.append(f"{key!r} must be true or false, got {p[key]!r}")
    if "events" in p and events_of(p) is None:
        problems.append(f"'events' must be [[x, label], ...] (a number and a string each), "
                        f"got {p['events']!r}")
    for key in ("xlim", "ylim"):
        v = p.get(key)
        if key in p and not (isinstance(v, list | tuple) and len(v) == 2
                             and all(e is None or _is_num(e) for e in v)):
            problems.append(f"{key!r} must be [lo, hi] (numbers or null), got {v!r}")
    if not isinstance(p.get("series"), list):
        problems.append("'series' must be a list")
    return problems


def events_of(panel: Mapping[str, Any]) -> list[tuple[float, str]] | None:
    """The panel's ``events`` as (x, label) pairs ([] when absent), or None if malformed."""
    raw = panel.get("events", [])
    if not isinstance(raw, list | tuple):
        return None
    out = []
    for e in raw:
        if not (isinstance(e, list | tuple) and len(e) == 2 and _is_num(e[0])
                and isinstance(e[1], str)):
            return None
        out.append((float(e[0]), e[1]))
    return out


def figure_problems(f: Any) -> list[str]:
    """Problems that keep a figure from being drawn at all."""
    if not isinstance(f, Mapping):
        return [f"a figure must be an object, got {type(f).__name__}"]
    problems = [f"unknown key {k!r}" for k in f if k not in FIGURE_KEYS]
    name = f.get("name")
    if not (isinstance(name, str) and NAME_RE.match(name)):
        problems.append(f"'name' must be a file stem of letters, digits, '_', '-', '.', "
                        f"got {name!r}")
    for key in ("title", "caption"):
        if key in f and not isinstance(f[key], str):
            problems.append(f"{key!r} must be a string, got {f[key]!r}")
    panels = f.get("panels")
    if not (isinstance(panels, list) and panels):
        problems.append("'panels' must be a non-empty list")
    return problems


def validate_figures_spec(spec: Any) -> list[str]:
    """Every problem in a figures.json document (empty list: valid), each with its location."""
    if not isinstance(spec, list):
        return [f"figures.json must be a list of figures, got {type(spec).__name__}"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, f in enumerate(spec):
        where = f"figure {i}" + (f" ({f['name']!r})" if isinstance(f, Mapping)
                                 and isinstance(f.get("name"), str) else "")
        problems += [f"{where}: {p}" for p in figure_problems(f)]
        if not isinstance(f, Mapping):
            continue
        if isinstance(f.get("name"), str):
            if f["name"] in seen:
                problems.append(f"{where}: duplicate name (its files would overwrite)")
            seen.add(f["name"])
        panels = f.get("panels")
        for j, p in enumerate(panels if isinstance(panels, list) else []):
            problems += [f"{where} panel {j}: {q}" for q in panel_problems(p)]
            series = p.get("series") if isinstance(p, Mapping) else None
            for k, s in enumerate(series if isinstance(series, list) else []):
                fatal, minor = series_problems(s)
                problems += [f"{where} panel {j} series {k}: {q}" for q in fatal + minor]
    return problems


@final
class RunData:
    """Resolves REFs against one run folder, loading each file once.

    ``get(ref)`` returns ``(array, None)`` or ``(None, reason)``: missing data is an expected
    state (an interrupted run), not an error.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._trajs: dict[str, Trajectory | str] = {}
        self._arrays: dict[str, np.ndarray] | str | None = None

    def _traj(self, name: str) -> Trajectory | str:
        if name not in self._trajs:
            path = self.run_dir / "trajectories" / f"{name}.jsonl"
            try:
                self._trajs[name] = Trajectory.load(path)
            except FileNotFoundError:
                self._trajs[name] = f"trajectory {name!r} was not saved"
            except (OSError, ValueError) as e:
                self._trajs[name] = f"trajectory {name!r} could not be read ({e})"
        return self._trajs[name]

    def _npz(self) -> dict[str, np.ndarray] | str:
        if self._arrays is None:
            path = self.run_dir / "arrays.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    self._arrays = {k: z[k] for k in z.files}
            except FileNotFoundError:
                self._arrays = "arrays.npz was not saved"
            except (OSError, ValueError) as e:
                self._arrays = f"arrays.npz could not be read ({e})"
        return self._arrays

    def get(self, ref: str) -> tuple[np.ndarray | None, str | None]:
        if (m := TRAJ_RE.match(ref)) is not None:
            traj = self._traj(m.group(1))
            if isinstance(traj, str):
                return None, traj
            values = traj.get(m.group(2))
            if values is None:
                return None, (f"trajectory {m.group(1)!r} has no column {m.group(2)!r} "
                              "(not recorded in this run)")
        elif (m := ARR_RE.match(ref)) is not None:
            arrays = self._npz()
            if isinstance(arrays, str):
                return None, arrays
            if m.group(1) not in arrays:
                return None, f"arrays.npz has no array {m.group(1)!r} (not recorded in this run)"
            values = arrays[m.group(1)]
        else:
            return None, ref_problem(ref)
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            return None, f"{ref} is not numeric"
        if values.ndim != 1:
            values = values.squeeze()
        if values.ndim != 1:
            return None, f"{ref} has shape {values.shape}; a series needs a 1-D array"
        if values.size == 0:
            return None, f"{ref} is empty"
        return values, None
