"""Generic TOML-reading machinery for the experiment configuration (schema-free).

Each problem is an :class:`Issue`; all of them are raised together as one :class:`ConfigError`;
:func:`key_lines` and :func:`find_line` map key paths to the TOML lines that set them;
:class:`_Table` reads one TOML table into the fields of a dataclass declared with
:func:`_spec`, checking types, choices, bounds and sizes; :func:`toml_value` writes TOML
literals. The schema itself (the dataclasses and their cross-field rules) lives in
:mod:`rayleighflow.experiments.config`, which re-exports the public names defined here.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

_REQUIRED = object()
_BAD = object()


# ----------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Issue:
    """One problem: the key path (``flow.t_mx``), its TOML line when found, the message."""

    path: str
    line: int | None
    message: str


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line of the message (``issues``)."""

    __module__ = "rayleighflow.experiments.config"  # its public home (re-exported)

    def __init__(self, issues: Sequence[Issue] | str, source: str | Path | None = None) -> None:
        if isinstance(issues, str):
            issues = [Issue("", None, issues)]
        self.issues = tuple(issues)
        self.source = str(source) if source is not None else None
        n = len(self.issues)
        head = f"{n} error{'s' * (n != 1)} in the experiment configuration:"
        lines = [f"{self.source}: {head}" if self.source else head]
        lines += [f"  {f'line {i.line}: ' if i.line else ''}{i.message}" for i in self.issues]
        super().__init__("\n".join(lines))

    def one_line(self) -> str:
        """The message on one line: the file and line, then the problem; several problems
        are joined with "; " (each with its line)."""
        if len(self.issues) == 1:
            issue = self.issues[0]
            where = ", ".join(filter(None, (self.source,
                                            f"line {issue.line}" if issue.line else "")))
            return f"{where}: {issue.message}" if where else issue.message
        n = len(self.issues)
        head = f"{self.source}: {n} errors" if self.source else f"{n} errors"
        parts = [f"{f'line {i.line}: ' if i.line else ''}{i.message}" for i in self.issues]
        return f"{head}: " + "; ".join(" ".join(p.split()) for p in parts)


_TOKEN = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_HEADER = re.compile(rf"^\s*\[\[?\s*({_TOKEN}(?:\s*\.\s*{_TOKEN})*)\s*\]\]?\s*(?:#.*)?$")
_KEYLINE = re.compile(rf"^\s*({_TOKEN}(?:\s*\.\s*{_TOKEN})*)\s*=")
_INLINE = re.compile(rf"[{{,]\s*({_TOKEN})\s*=")


def _dotted(s: str) -> str:
    return ".".join(t.strip("\"'") for t in re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', s))


def key_lines(text: str) -> dict[str, int]:
    """Best-effort map from key path (``flow.t_max``, tables too) to its first line in ``text``."""
    table, out = "", {}
    for no, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            table = _dotted(m.group(1))
            out.setdefault(table, no)
        elif m := _KEYLINE.match(line):
            path = ".".join(filter(None, (table, _dotted(m.group(1)))))
            out.setdefault(path, no)
            for k in _INLINE.finditer(line[m.end():]):  # inline tables: mu = {log = 0.5}
                out.setdefault(f"{path}.{_dotted(k.group(1))}", no)
    return out


def find_line(lines: Mapping[str, int], path: str) -> int | None:
    """Line of ``path`` or, failing that, of its closest enclosing table."""
    path = re.sub(r"\[\d+\]", "", path)
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


class _Issues:
    def __init__(self, text: str | None) -> None:
        self.items: list[Issue] = []
        self.bad: set[str] = set()
        self.lines = key_lines(text) if text else {}

    def add(self, path: str, message: str, at: str | None = None) -> None:
        self.items.append(Issue(path, find_line(self.lines, at or path), message))
        self.bad.add(path)

    def ok(self, *paths: str) -> bool:
        return not any(p in self.bad for p in paths)

    def clean(self, section: str) -> bool:
        return not any(p == section or p.startswith(section + ".") for p in self.bad)


# ----------------------------------------------------------------------------- typed reading

_DESCRIBE = {"string": "a string", "integer": "an integer", "number": "a number",
             "boolean": "a boolean (true or false)", "integers": "an array of integers",
             "strings": "an array of strings", "table": "a table",
             "numbers": "a table of numbers", "path": "a string (a file path)",
             "factory": 'a string "package.module:function" or "file.py:function"'}


def _spec(kind: str, default: Any = _REQUIRED, **check: Any) -> Any:
    """A dataclass field carrying its TOML type and checks, read by ``_Table.read``."""
    md = {"kind": kind, **check}
    if default is _REQUIRED:
        return field(metadata=md)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=md)
    return field(default=default, metadata=md)


def _type_name(v: Any) -> str:
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
                    (list, "array"), (dict, "table"), (type(None), "null (not a TOML value)")):
        if isinstance(v, t):
            return name
    return "date/time"


def _show(v: Any) -> str:
    try:
        s = toml_value(v)
    except TypeError:  # not a TOML value (None, an object) handed in through the Python API
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Table:
    """One TOML table being read; every problem goes to the shared ``_Issues``."""

    def __init__(self, issues: _Issues, path: str, raw: Mapping[str, Any], base: Path) -> None:
        self.issues, self.path, self.raw, self.base = issues, path, raw, base

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def check_keys(self, allowed: Sequence[str], elsewhere: Mapping[str, str] = {}) -> None:
        where = f"[{self.path}]" if self.path else "the top level"
        for k in self.raw:
            p = self.key(k)
            if k in elsewhere:
                self.issues.add(p, f"{p} {elsewhere[k]}")
            elif k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                did = f"did you mean `{hint[0]}`? " if hint else ""
                self.issues.add(p, f"unknown key `{p}`: {did}allowed keys in {where}: "
                                   f"{', '.join(allowed)}")

    def read(self, cls: type, skip: Sequence[str] = (), **defaults: Any) -> dict[str, Any]:
        """Values of the dataclass fields of ``cls`` that carry a ``_spec``."""
        out = {}
        for f in fields(cls):
            if "kind" not in f.metadata or f.name in skip:
                continue
            default = defaults.get(f.name, f.default)
            if default is MISSING:
                default = f.default_factory() if f.default_factory is not MISSING else _REQUIRED
            out[f.name] = self.get(f.name, default=default, **f.metadata)
        return out

    def get(self, name: str, kind: str, default: Any = _REQUIRED, **check: Any) -> Any:
        path = self.key(name)
        if name not in self.raw:
            if default is _REQUIRED:
                what = f"table [{path}]" if kind == "table" else f"key `{path}`"
                choices = check.get("choices")
                extra = f" (one of {', '.join(choices)})" if choices else ""
                self.issues.add(path, f"missing required {what}{extra}", at=self.path)
                return None
            return default
        raw = self.raw[name]
        value = self._convert(path, raw, kind)
        if value is _BAD:
            self.issues.add(path, f"{path} must be {_DESCRIBE[kind]}, got {_type_name(raw)} "
                                  f"{_show(raw)}")
        elif not self._check(path, value, raw, kind, **check):
            value = _BAD
        if value is _BAD:
            return None if default is _REQUIRED else default
        enum = check.get("enum")
        return enum(value) if enum else value

    def _convert(self, path: str, raw: Any, kind: str) -> Any:
        num = isinstance(raw, int | float) and not isinstance(raw, bool)
        if kind == "integer":
            return raw if isinstance(raw, int) and not isinstance(raw, bool) else _BAD
        if kind == "number":
            return float(raw) if num else _BAD
        if kind in ("boolean", "string", "table"):
            return raw if isinstance(raw, {"boolean": bool, "string": str, "table": dict}[kind]) \
                else _BAD
        if kind in ("integers", "strings"):
            ok = int if kind == "integers" else str
            good = isinstance(raw, list) and all(
                isinstance(v, ok) and not isinstance(v, bool) for v in raw)
            return tuple(raw) if good else _BAD
        if kind == "numbers":
            good = isinstance(raw, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in raw.values())
            return {k: float(v) for k, v in raw.items()} if good else _BAD
        if not isinstance(raw, str):
            return _BAD
        return self._resolve(path, raw) if kind == "path" else self._factory(path, raw)

    def _resolve(self, path: str, raw: str) -> Path | None:
        p = Path(raw).expanduser()
        p = (p if p.is_absolute() else self.base / p).resolve()
        if p.is_dir():
            self.issues.add(path, f"{path}: {p} is a directory, not a file: name the data "
                                  "file in it (relative paths are resolved against the TOML "
                                  f"file's folder {self.base})")
            return None
        if not p.is_file():
            self.issues.add(path, f"{path}: file not found: {p} (relative paths are resolved "
                                  f"against the TOML file's folder {self.base})")
            return None
        return p

    def _factory(self, path: str, raw: str) -> Any:
        module, _, attr = raw.rpartition(":")
        ident = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
        if not module or not re.fullmatch(ident, attr):
            return _BAD
        if module.endswith(".py") or "/" in module or "\\" in module:
            p = self._resolve(path, module)  # a file: checked now, imported by the builder
            return f"{p}:{attr}" if p is not None else None
        return raw if re.fullmatch(ident, module) else _BAD

    def _check(self, path: str, value: Any, raw: Any, kind: str, *, choices=None, gt=None,
               ge=None, le=None, size=None, min_size=None, **_: Any) -> bool:
        if value is None:  # a missing file, already reported
            return False
        if choices is not None and value not in choices:
            self.issues.add(path, f"{path} {value!r} is not one of {', '.join(choices)}")
            return False
        n = len(value) if isinstance(value, tuple) else None
        if n is not None and ((size is not None and n != size) or n < (min_size or 0)):
            want = f"exactly {size}" if size is not None else f"at least {min_size}"
            self.issues.add(path, f"{path} must have {want} entries (got {n})")
            return False
        if kind in ("integers", "numbers"):
            items = value.items() if kind == "numbers" else enumerate(value)
            named = [(f"{path}.{k}" if kind == "numbers" else f"{path}[{k}]", v, raw[k])
                     for k, v in items]
        elif kind in ("integer", "number"):
            named = [(path, value, raw)]
        else:
            return True
        ok = True
        for p, v, shown in named:
            if not math.isfinite(v):
                self.issues.add(p, f"{p} must be a finite number (got {_show(shown)})")
                ok = False
            elif (gt is not None and not v > gt) or (ge is not None and not v >= ge):
                bound = f"> {gt:g}" if gt is not None else f">= {ge:g}"
                self.issues.add(p, f"{p} must be {bound} (got {_show(shown)})")
                ok = False
            elif le is not None and not v <= le:
                self.issues.add(p, f"{p} must be <= {le} (got {_show(shown)})")
                ok = False
        return ok


# ----------------------------------------------------------------------------- writing


def is_toml(name: str | Path) -> bool:
    """Whether ``name`` names a TOML file (any case of the extension) rather than a built-in."""
    return str(name).lower().endswith(".toml")


def toml_value(v: Any) -> str:
    """A Python value as a TOML literal (tables inline): the one TOML writer of the package.

    Non-finite floats are TOML's ``nan``, ``inf`` and ``-inf``; integral floats keep their
    decimal point (``2.0``), so they load back as floats.
    """
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("-inf" if v < 0 else "inf") if math.isinf(v)
                else repr(v))
    if isinstance(v, str | Path):
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        body = ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items())
        return "{ " + body + " }" if body else "{}"
    if hasattr(v, "isoformat"):  # TOML dates and times
        return v.isoformat()
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)
