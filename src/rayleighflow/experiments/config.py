"""Typed, validated configuration of a user experiment, read from TOML.

A file names a model, data, a loss, the flow's settings, the diagnostics to record and the
certificates to check (see ``examples/my_experiment.toml``). Every key is checked: a typo is an
error naming the key path, its line, the allowed keys and the closest match, never a silently
used default. All problems are collected and raised together as one :class:`ConfigError`, one
problem per line. Relative paths (data files, ``model.factory`` files) are resolved against the
TOML file's folder and stored absolute, so :func:`config_to_toml` output loads from anywhere.

Example:
    >>> cfg = parse_config({"model": {"kind": "mlp", "widths": [16]},
    ...                     "data": {"kind": "sklearn", "name": "iris"},
    ...                     "loss": {"name": "cross-entropy"}})
    >>> cfg.model.widths, cfg.flow.integrator.kind, cfg.flow.t_max
    ((16,), 'dopri5', 100.0)
    >>> parse_config({"model": {"kind": "mlp"}, "data": {"kind": "sklearn", "name": "iris"},
    ...               "loss": {"name": "cross-entropy"}, "flow": {"t_mx": 1.0}})
    Traceback (most recent call last):
    ...
    rayleighflow.experiments.config.ConfigError: 1 error in the experiment configuration:
      unknown key `flow.t_mx`: did you mean `t_max`? allowed keys in [flow]: t_max, ...
    >>> parse_config(tomllib.loads(config_to_toml(cfg))) == cfg   # round trip
    True
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..desingularizers import get_desingularizer
from ._toml import _REQUIRED, ConfigError, Issue, _Issues, _Table, toml_value
from ._toml import find_line as find_line  # re-exported: used by builders
from ._toml import key_lines as key_lines  # re-exported: used by builders
from .schema import (
    _DATA,
    _FLAT_KEYS,
    _FLOW_TABLES,
    _INTEGRATORS,
    _MODELS,
    _NOT_FOR_KIND,
    _RECORDS,
    _SECTIONS,
    ACTIVATIONS,
    SKLEARN_SHAPES,
    CertifyConfig,
    CNNConfig,
    DiagnosticsConfig,
    Dopri5Config,
    EveryRecordsConfig,
    ExperimentConfig,
    FileData,
    FlowConfig,
    GaussianData,
    GradientDescentConfig,
    ImplicitConfig,
    ImportConfig,
    LogRecordsConfig,
    LossConfig,
    MLPConfig,
    SklearnData,
    StochasticGDConfig,
    StopConfig,
    TeacherStudentData,
    UniformData,
)

__all__ = [
    "ConfigError", "Issue", "ExperimentConfig", "MLPConfig", "CNNConfig", "ImportConfig",
    "SklearnData", "UniformData", "GaussianData", "TeacherStudentData", "FileData",
    "LossConfig", "FlowConfig", "GradientDescentConfig", "StochasticGDConfig", "Dopri5Config",
    "LogRecordsConfig", "EveryRecordsConfig", "StopConfig", "DiagnosticsConfig",
    "CertifyConfig", "ACTIVATIONS",
    "SKLEARN_SHAPES", "load_config", "parse_config", "config_to_toml",
]

# ----------------------------------------------------------------------------- parsing


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment file; raises :class:`ConfigError` listing every
    problem with its line.

    Example:
        >>> cfg = load_config("examples/my_experiment.toml")      # doctest: +SKIP
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")   # a byte-order mark is not TOML: drop it
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration file: {exc}", p) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        issue = Issue("", int(m.group(1)) if m else None, f"not valid TOML: {exc}")
        raise ConfigError([issue], p) from None
    return parse_config(raw, p, text=text)


def parse_config(raw: Mapping[str, Any], source: str | Path | None = None, *,
                 text: str | None = None) -> ExperimentConfig:
    """Validate a decoded TOML document. ``source`` (the file) anchors relative paths and the
    default ``name``; ``text`` (default: read from ``source``) gives error line numbers."""
    src = Path(source).resolve() if source is not None else None
    if text is None and src is not None and src.is_file():
        text = src.read_text(encoding="utf-8-sig")
    issues = _Issues(text)
    base = src.parent if src is not None else Path.cwd()
    top = _Table(issues, "", raw, base)
    own = [f.name for f in fields(ExperimentConfig) if "kind" in f.metadata]
    top.check_keys([*own, *_SECTIONS])
    values = top.read(ExperimentConfig, name=src.stem if src is not None else "experiment")
    tables = {s: top.get(s, "table", _REQUIRED if s in ("model", "data", "loss") else {})
              for s in _SECTIONS}
    parts: dict[str, Any] = {}
    for s in _SECTIONS:
        t = _Table(issues, s, tables[s], base) if tables[s] is not None else None
        if t is None:
            parts[s] = None
        elif s in ("model", "data"):
            parts[s] = _read_kind(t, _MODELS if s == "model" else _DATA)
        elif s == "flow":
            parts[s] = _read_flow(t, issues, base)
        else:
            cls = {"loss": LossConfig, "diagnostics": DiagnosticsConfig,
                   "certify": CertifyConfig}[s]
            t.check_keys([f.name for f in fields(cls)])
            parts[s] = cls(**t.read(cls))
    if issues.ok("device") and not re.fullmatch(r"cpu|cuda(:\d+)?", values["device"]):
        issues.add("device", f"device {values['device']!r} is not one of cpu, cuda, cuda:N")
    if issues.ok("name") and (not values["name"].strip() or re.search(r"[/\\]", values["name"])):
        issues.add("name", f"name {values['name']!r} must be non-empty, without / or \\ (it "
                           "names the output folder)")
    _cross_checks(issues, tables, parts)
    if issues.items:
        ordered = sorted(issues.items, key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(ordered, src)
    return ExperimentConfig(**values, **parts, source=src)


def _read_flow(t: _Table, issues: _Issues, base: Path) -> Any:
    """[flow] with its integrator, records and stop tables; a flat key of the first form gets
    one error naming the table it belongs in."""
    t.check_keys(["t_max", "eval_size", *_FLOW_TABLES],
                 {k: f"is not a [flow] key: it belongs in {where}"
                  for k, where in _FLAT_KEYS.items()})
    values: dict[str, Any] = t.read(FlowConfig)
    for name, kinds, default in (("integrator", _INTEGRATORS, Dopri5Config),
                                 ("records", _RECORDS, LogRecordsConfig)):
        raw = t.get(name, "table", {})
        values[name] = (default() if raw == {} else None if raw is None
                        else _read_kind(_Table(issues, f"flow.{name}", raw, base), kinds))
    stop = _Table(issues, "flow.stop", t.get("stop", "table", {}) or {}, base)
    stop.check_keys([f.name for f in fields(StopConfig)])
    values["stop"] = StopConfig(**stop.read(StopConfig))
    return FlowConfig(**values)


def _read_kind(t: _Table, classes: Mapping[str, type]) -> Any:
    keys = {k: [f.name for f in fields(c) if "kind" in f.metadata and f.name != "kind"
                and f.name not in _NOT_FOR_KIND.get(k, ())] for k, c in classes.items()}
    every = dict.fromkeys(name for names in keys.values() for name in names)
    kind = t.get("kind", "string", choices=tuple(classes))
    if kind is None:
        t.check_keys(["kind", *every])
        return None
    cls, mine = classes[kind], keys[kind]
    elsewhere = {k: f"does not apply to kind = {kind!r} (it is a key of kind "
                    f"{', '.join(o for o in keys if k in keys[o])})"
                 for k in every if k not in mine}
    t.check_keys(["kind", *mine], elsewhere)
    values = t.read(cls, skip=("kind", *_NOT_FOR_KIND.get(kind, ())))
    return cls(kind=kind, **values) if cls is FileData else cls(**values)


def _inapplicable(section: str, parts: Mapping[str, Any]) -> dict[str, str]:
    """Keys of ``section`` that this configuration makes meaningless, with the reason."""
    data, flow, loss = parts.get("data"), parts.get("flow"), parts.get("loss")
    out: dict[str, str] = {}
    if section == "flow" and isinstance(flow, FlowConfig):
        if data is not None and not data.population:
            out["eval_size"] = ("applies only to sampler data (data.population = true); a "
                                "finite dataset is evaluated whole")
    if section == "data" and data is not None and data.population:
        out["n_samples"] = ("applies only to a fixed sample (population = false); a sampler's "
                            "evaluation size is flow.eval_size")
    if section == "loss" and loss is not None and loss.name != "square":
        out["one_hot"] = "applies only to name = 'square'"
    return out


def _labels(data: Any) -> tuple[str, int | None]:
    """('real', None) | ('labels', number of classes) | ('unknown', None) without loading."""
    if isinstance(data, SklearnData):
        return "labels", len(data.classes) if data.classes else SKLEARN_SHAPES[data.name][0]
    if isinstance(data, TeacherStudentData) and data.classify:
        return "labels", data.outputs
    return ("unknown", None) if isinstance(data, FileData) else ("real", None)


def _features(data: Any) -> int | None:
    if isinstance(data, SklearnData):
        return SKLEARN_SHAPES[data.name][1]
    return None if isinstance(data, FileData) else data.dim


def _cross_checks(iss: _Issues, tables: Mapping[str, Any], parts: Mapping[str, Any]) -> None:
    # A section with an error of its own takes no part in cross-field rules: no cascades.
    keep = {"flow": iss.ok("flow.integrator.kind", "flow.records.kind"),
            "certify": iss.ok("certify.desingularizers")}
    parts = {s: v if keep.get(s, iss.clean(s)) else None for s, v in parts.items()}
    model, data, loss, flow, cert = (parts[s] for s in ("model", "data", "loss", "flow",
                                                        "certify"))
    for section in ("flow", "data", "loss"):
        for key, why in _inapplicable(section, parts).items():
            if key in (tables[section] or {}):
                iss.add(f"{section}.{key}", f"{section}.{key} {why}")
    if isinstance(flow, FlowConfig):
        _check_flow(iss, flow, data)
    if data is not None and not data.population and not isinstance(data, SklearnData | FileData) \
            and data.n_samples is None and iss.ok("data.n_samples"):
        iss.add("data.n_samples", "data.n_samples is required for a fixed sample "
                                  "(population = false); or set population = true", at="data")
    if isinstance(data, FileData) and data.path.suffix != f".{data.kind}":
        iss.add("data.path", f"data.path must end in .{data.kind} for kind = {data.kind!r} "
                             f"(got {data.path.name}): the file is read by its extension")
    if isinstance(data, TeacherStudentData) and data.classify and data.outputs < 2:
        iss.add("data.outputs", "data.outputs must be >= 2 with classify = true (it is the "
                                f"number of classes; got {data.outputs})")
    if isinstance(data, SklearnData) and iss.ok("data.name"):
        k, _, n = SKLEARN_SHAPES[data.name]
        if data.classes and (max(data.classes) >= k or len(set(data.classes)) < len(data.classes)):
            iss.add("data.classes", f"data.classes {list(data.classes)} must be distinct class "
                                    f"ids in 0..{k - 1} ({data.name} has {k} classes)")
        if data.n_samples is not None and data.n_samples > n:
            iss.add("data.n_samples", f"data.n_samples = {data.n_samples} exceeds the {n} "
                                      f"samples of {data.name}")
    if loss is not None and data is not None and iss.ok("loss.name", "data.kind"):
        _check_loss_data(iss, loss, data)
    if model is not None and data is not None:
        _check_model_data(iss, model, data, loss)
    if cert is not None:
        mu = (tables["certify"] or {}).get("mu")
        _check_certify(iss, cert, list(mu) if isinstance(mu, dict) else [])


def _check_flow(iss: _Issues, flow: FlowConfig, data: Any) -> None:
    if isinstance(flow.integrator, StochasticGDConfig) and data is not None \
            and not data.population:
        iss.add("flow.integrator.kind", "flow.integrator.kind = 'stochastic-gd' draws fresh "
                "samples each step: it needs sampler data (data.population = true); for a "
                "fixed dataset use 'gradient-descent'")
    if isinstance(flow.records, EveryRecordsConfig) and isinstance(
            flow.integrator, Dopri5Config | ImplicitConfig):
        iss.add("flow.records.kind", "flow.records.kind = 'every' counts steps of a fixed-step "
                f"integrator; with kind = {flow.integrator.kind!r} use records kind = 'log'")


def _check_loss_data(iss: _Issues, loss: LossConfig, data: Any) -> None:
    what, k = _labels(data)
    needs_labels = loss.name != "square" or loss.one_hot
    if needs_labels and what == "real":
        key = "loss.name" if loss.name != "square" else "loss.one_hot"
        iss.add(key, f"{key}: loss {loss.name!r}{' with one_hot' * loss.one_hot} needs class "
                     f"labels, but data.kind = {data.kind!r} has real-valued targets; use loss "
                     "'square' (or teacher-student data with classify = true)")
    elif loss.name == "logistic" and k is not None and k != 2:
        fix = ("choose two with data.classes = [0, 1]" if isinstance(data, SklearnData)
               else "set data.outputs = 2")
        iss.add("loss.name", f"loss.name = 'logistic' needs exactly 2 classes but the data "
                             f"has {k}; {fix}, or use loss 'cross-entropy'")


def _check_model_data(iss: _Issues, model: Any, data: Any, loss: LossConfig | None) -> None:
    d = _features(data)
    if isinstance(model, MLPConfig) and model.input_dim is not None and d is not None \
            and model.input_dim != d:
        iss.add("model.input_dim", f"model.input_dim = {model.input_dim} but the data has {d} "
                                   "features; remove model.input_dim to infer it")
    if isinstance(model, CNNConfig) and d is not None and iss.ok("model.input_shape"):
        side = math.isqrt(d)
        eg = f", e.g. [1, {side}, {side}]" if side * side == d else ""
        if model.input_shape is None:
            iss.add("model.input_shape", "model.input_shape is required for kind = 'cnn' with "
                    f"flat inputs: give [channels, height, width] with product {d}{eg}",
                    at="model.kind")
        elif math.prod(model.input_shape) != d:
            iss.add("model.input_shape", f"model.input_shape {list(model.input_shape)} has "
                    f"{math.prod(model.input_shape)} entries but the data has {d} features{eg}")
    out = getattr(model, "output_dim", None)
    if out is None or loss is None:
        return
    what, k = _labels(data)
    want = (1 if loss.name == "logistic" else k if loss.name == "cross-entropy" or loss.one_hot
            else (data.outputs if isinstance(data, TeacherStudentData) else 1)
            if what == "real" else None)
    if want is not None and out != want:
        iss.add("model.output_dim", f"model.output_dim = {out} but loss {loss.name!r} on this "
                                    f"data needs {want}; remove model.output_dim to infer it")


def _check_certify(iss: _Issues, cert: CertifyConfig, mu_names: list[str]) -> None:
    canonical: dict[str, str] = {}
    for i, name in enumerate(cert.desingularizers):
        try:
            c = get_desingularizer(name).name
        except (ValueError, TypeError) as exc:
            iss.add(f"certify.desingularizers[{i}]", f"certify.desingularizers[{i}]: {exc}")
            continue
        if c in canonical:
            iss.add(f"certify.desingularizers[{i}]", f"certify.desingularizers[{i}] {name!r} "
                    f"repeats {canonical[c]!r}")
        canonical.setdefault(c, name)
    for key in mu_names:
        try:
            c = get_desingularizer(key).name
        except (ValueError, TypeError):
            c = None
        if c not in canonical:
            hint = difflib.get_close_matches(key, list(canonical.values()), n=1, cutoff=0.6)
            did = f"did you mean `{hint[0]}`? " if hint else ""
            iss.add(f"certify.mu.{key}", f"certify.mu.{key}: {did}a stated μ must name one of "
                    f"certify.desingularizers ({', '.join(cert.desingularizers)})")


# ----------------------------------------------------------------------------- writing


def config_to_toml(cfg: ExperimentConfig) -> str:
    """The fully resolved configuration as TOML: every default written out, unset optional keys
    as comments, keys this configuration makes meaningless left out. It loads back to ``cfg``.

    Example:
        >>> print(config_to_toml(cfg))                 # doctest: +SKIP
    """
    lines = ["# rayleighflow experiment configuration, resolved: every default is written out."]
    lines += [f"{f.name} = {toml_value(getattr(cfg, f.name))}" for f in fields(cfg)
              if "kind" in f.metadata]
    parts = {s: getattr(cfg, s) for s in _SECTIONS}
    for s in _SECTIONS:
        obj = parts[s]
        skip = set(_inapplicable(s, parts)) | set(_NOT_FOR_KIND.get(getattr(obj, "kind", ""), ()))
        lines += _table_lines(s, obj, skip)
        if s == "flow":
            for name in _FLOW_TABLES:
                lines += _table_lines(f"flow.{name}", getattr(obj, name), set())
    return "\n".join(lines) + "\n"


def _table_lines(path: str, obj: Any, skip: set[str]) -> list[str]:
    lines = ["", f"[{path}]"]
    if hasattr(obj, "kind"):
        lines.append(f"kind = {toml_value(obj.kind)}")
    for f in fields(obj):
        if f.name == "kind" or f.name in skip or "kind" not in f.metadata:
            continue
        v = getattr(obj, f.name)
        lines.append(f"# {f.name}: unset ({f.metadata.get('unset', 'none')})" if v is None
                     else f"{f.name} = {toml_value(v)}")
    return lines
