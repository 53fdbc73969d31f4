"""The registry of built-in experiments and the one entry point that runs any experiment."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import definite_ntk, demo, logistic, toy2d, two_layer
from .runner import Experiment, RunContext, execute

__all__ = ["EXPERIMENTS", "get_experiment", "run_experiment", "builtin_config_text"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (demo.EXPERIMENT, toy2d.EXPERIMENT, definite_ntk.EXPERIMENT,
                        logistic.EXPERIMENT, two_layer.EXPERIMENT)
}

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}: built-in experiments are {', '.join(EXPERIMENTS)} "
            "(or give the path of a .toml experiment file)"
        )
    return EXPERIMENTS[name]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if isinstance(v, int) or v != int(v) or abs(v) >= 1e16 else f"{v:.1f}"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def builtin_config_text(name: str, settings: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    lines = ["# rayleighflow run configuration (re-run with: rayleighflow run <this file>)",
             f"experiment = {_toml_value(name)}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    lines.append("\n[params]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in params.items() if v is not None]
    return "\n".join(lines) + "\n"


def _resolve(exp: Experiment, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(exp.defaults)
    if quick:
        params.update(exp.quick)
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for experiment {exp.name!r}; "
            f"allowed: {sorted(params)}"
        )
    params.update(overrides)
    return params


def run_experiment(
    name: str,
    out: str | Path,
    *,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quick: bool = False,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Run a built-in experiment by name, or a user TOML experiment by path, into ``out``."""
    out = Path(out)
    if name.endswith(".toml"):
        return _run_file(Path(name), out, seed=seed, device=device, dtype=dtype, quick=quick,
                         resume=resume, progress=progress)
    exp = get_experiment(name)
    seed = 0 if seed is None else seed
    device = device or "cpu"
    dtype = dtype or "float64"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use float64 or float32")
    _check_device(device)
    params = _resolve(exp, quick, overrides or {})
    settings = {"seed": seed, "device": device, "dtype": dtype, "quick": quick}
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out, params, seed=seed, device=device, dtype=_DTYPES[dtype], resume=resume,
                     progress=progress)
    return execute(exp, ctx, builtin_config_text(exp.name, settings, params))


def _run_file(path: Path, out: Path, **kw: Any) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no experiment file {path}")
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    if "experiment" in doc:  # a saved built-in run configuration
        extra = set(doc) - {"experiment", "seed", "device", "dtype", "quick", "params"}
        if extra:
            raise ValueError(f"{path}: unknown key(s) {sorted(extra)} in a built-in run config")
        return run_experiment(
            doc["experiment"], out,
            seed=kw["seed"] if kw["seed"] is not None else int(doc.get("seed", 0)),
            device=kw["device"] or str(doc.get("device", "cpu")),
            dtype=kw["dtype"] or str(doc.get("dtype", "float64")),
            quick=bool(doc.get("quick", False)), overrides=doc.get("params", {}),
            resume=kw["resume"], progress=kw["progress"])
    from .user import run_user_experiment

    return run_user_experiment(path, out, **kw)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
