"""The registry of built-in experiments and the one entry point that runs any experiment."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..rundir import is_run_folder, prepare_out
from ..rundir import out_path as _out_path
from . import definite_ntk, demo, logistic, proof, toy2d, two_layer
from ._toml import ConfigError, Issue, is_toml, toml_value
from .runner import Experiment, RunContext, check_extras, config_sha256, execute_locked

__all__ = ["EXPERIMENTS", "get_experiment", "run_experiment", "builtin_config_text",
           "resume_run", "resume_conflicts", "prepare_out", "default_run_dir", "check_seed",
           "NothingToResume", "MAX_SEED", "is_toml", "is_run_folder", "user_experiment_file"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (demo.EXPERIMENT, toy2d.EXPERIMENT, definite_ntk.EXPERIMENT,
                        logistic.EXPERIMENT, two_layer.EXPERIMENT, proof.EXPERIMENT)
}

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}: built-in experiments are {', '.join(EXPERIMENTS)} "
            "(or give the path of a .toml experiment file)"
        )
    return EXPERIMENTS[name]


def builtin_config_text(name: str, settings: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    lines = ["# rayleighflow run configuration (re-run with: rayleighflow run <this file>)",
             f"experiment = {toml_value(name)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    lines.append("\n[params]")
    lines += [f"{k} = {toml_value(v)}" for k, v in params.items() if v is not None]
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


MAX_SEED = 2**32 - 1


class NothingToResume(Exception):
    """``--resume`` on a run that finished: there is nothing to continue."""


def check_seed(seed: Any) -> int:
    """``seed`` as an int in 0..2³²−1, or a one-line ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (got {seed!r})")
    return seed


def default_run_dir(target: str, root: str | Path = "runs") -> Path:
    """``runs/NAME``, or ``runs/NAME-2``, ``-3``… when it already holds files. NAME is the
    experiment's (for a saved ``config.toml``, the experiment it describes)."""
    stem = target
    if is_toml(target):
        stem = Path(target).stem
        try:
            doc = tomllib.loads(Path(target).read_text(encoding="utf-8-sig"))
            name = doc.get("experiment", doc.get("name"))
            if isinstance(name, str) and name.strip() and not re.search(r"[/\\]", name):
                stem = name.strip()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
    base = Path(root) / stem
    candidate, i = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


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
    overwrite: bool = False,
    progress: Any = None,
    next_free: bool = False,
    on_folder: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Run a built-in experiment by name, or a user TOML experiment by path, into ``out``.

    Everything is validated before the folder is touched (see :func:`prepare_out` for the
    folder rules); the folder is locked while the run lasts. A failure of the experiment itself
    leaves summary.json with status "failed" and raises
    :class:`~rayleighflow.experiments.runner.RunFailed`. ``next_free`` (a default folder):
    when ``out`` is taken, run in ``out-2``, ``out-3``, ... (the first one this run claims);
    ``on_folder`` is called with the folder the run is in once it is claimed.
    """
    out = _out_path(out)
    if seed is not None:
        check_seed(seed)
    if is_toml(name):
        return _run_file(Path(name), out, seed=seed, device=device, dtype=dtype, quick=quick,
                         resume=resume, overwrite=overwrite, progress=progress,
                         next_free=next_free, on_folder=on_folder)
    exp = get_experiment(name)
    seed = 0 if seed is None else seed
    device = device or "cpu"
    dtype = dtype or "float64"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use float64 or float32")
    _check_device(device)
    params = _resolve(exp, quick, overrides or {})
    settings = {"seed": seed, "device": device, "dtype": dtype, "quick": quick}
    check_extras(exp.name, exp.extras)
    out = prepare_out(out, resume=resume, overwrite=overwrite, lock=True, next_free=next_free)
    return execute_locked(
        exp, out, lambda folder: RunContext(folder, params, seed=seed, device=device,
                                            dtype=_DTYPES[dtype], resume=resume,
                                            progress=progress),
        builtin_config_text(exp.name, settings, params), resume=resume, on_folder=on_folder)


def _read_toml(path: Path) -> dict[str, Any]:
    """A TOML document, or a ConfigError that names the file (and the line)."""
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a .toml file: to continue a run use "
                         f"--resume {path}; to run it again use {path / 'config.toml'}")
    if not path.exists():
        raise FileNotFoundError(f"no experiment file {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
        return tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError([Issue("", int(m.group(1)) if m else None, f"not valid TOML: {exc}")],
                          path) from None


def _builtin_settings(path: Path, doc: Mapping[str, Any]) -> dict[str, Any]:
    extra = set(doc) - {"experiment", "seed", "device", "dtype", "quick", "params"}
    if extra:
        raise ConfigError(f"unknown key(s) {sorted(extra)} in a built-in run configuration "
                          "(allowed: experiment, seed, device, dtype, quick, [params])", path)
    types = {"experiment": str, "seed": int, "device": str, "dtype": str, "quick": bool,
             "params": dict}
    for key, kind in types.items():
        if key in doc and (not isinstance(doc[key], kind)
                           or (kind is int and isinstance(doc[key], bool))):
            raise ConfigError(f"{key} must be {'a table' if kind is dict else 'a ' + kind.__name__}"
                              f" (got {doc[key]!r})", path)
    return {"experiment": doc["experiment"], "seed": doc.get("seed", 0),
            "device": doc.get("device", "cpu"), "dtype": doc.get("dtype", "float64"),
            "quick": doc.get("quick", False), "params": doc.get("params", {})}


def _run_file(path: Path, out: Path, **kw: Any) -> dict[str, Any]:
    doc = _read_toml(path)
    if "experiment" in doc:  # a saved built-in run configuration
        saved = _builtin_settings(path, doc)
        return run_experiment(
            saved["experiment"], out,
            seed=kw["seed"] if kw["seed"] is not None else saved["seed"],
            device=kw["device"] or saved["device"], dtype=kw["dtype"] or saved["dtype"],
            quick=bool(saved["quick"] or kw["quick"]), overrides=saved["params"],
            resume=kw["resume"], overwrite=kw["overwrite"], progress=kw["progress"],
            next_free=kw["next_free"], on_folder=kw["on_folder"])
    from .user import run_user_experiment

    return run_user_experiment(path, out, **kw)


def resume_conflicts(run_dir: str | Path, *, experiment: str | None = None,
                     seed: int | None = None, device: str | None = None,
                     dtype: str | None = None, quick: bool = False) -> list[str]:
    """The options that would change the run saved in ``run_dir`` (empty: safe to resume)."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.toml"
    doc = _read_toml(saved_path)
    builtin = "experiment" in doc
    name = doc.get("experiment") if builtin else doc.get("name", "experiment")
    out = []
    for opt, value, default in (("seed", seed, 0), ("device", device, "cpu"),
                                ("dtype", dtype, "float64")):
        was = doc.get(opt, default)
        if value is not None and value != was:
            out.append(f"--{opt} {value} (the run has {opt} {was})")
    if quick and not (builtin and doc.get("quick") is True):
        out.append("--quick (the run is not a --quick run)" if builtin else
                   "--quick (the saved configuration already holds the run's flow settings)")
    if experiment is not None:
        if is_toml(experiment):
            if not _same_config(Path(experiment), saved_path, doc):
                out.append(f"{experiment} (not the configuration the run was started with)")
        elif not builtin or experiment != name:
            out.append(f"experiment {experiment!r} (the run is experiment {name!r})")
    return out


def _same_config(path: Path, saved_path: Path, saved: Mapping[str, Any]) -> bool:
    try:
        if path.resolve() == saved_path.resolve():
            return True
    except OSError:
        return False
    doc = _read_toml(path)
    if ("experiment" in saved) != ("experiment" in doc):
        return False
    if "experiment" in saved:
        return _builtin_settings(path, doc) == _builtin_settings(saved_path, saved)
    from .config import load_config

    return load_config(path) == load_config(saved_path)


def resume_run(run_dir: str | Path, *, experiment: str | None = None, seed: int | None = None,
               device: str | None = None, dtype: str | None = None, quick: bool = False,
               progress: Any = None) -> dict[str, Any]:
    """Continue the run saved in ``run_dir`` exactly as it was configured.

    Options are accepted only when they agree with the saved configuration; one that would
    change the run is a one-line ValueError. A finished run raises :class:`NothingToResume`.
    """
    run_dir = prepare_out(run_dir, resume=True)
    _check_config_unchanged(run_dir)
    conflicts = resume_conflicts(run_dir, experiment=experiment, seed=seed, device=device,
                                 dtype=dtype, quick=quick)
    if conflicts:
        raise ValueError(f"--resume {run_dir}: {'; '.join(conflicts)} would change the run; "
                         "drop it to continue the run as it was, or add --force-new to start "
                         "it over with the new settings")
    summary = run_dir / "summary.json"
    try:
        status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "complete":
        raise NothingToResume(f"nothing to resume: {run_dir} finished (status complete); "
                              f"`rayleighflow report {run_dir}` re-renders it, --force-new runs "
                              "it again")
    return run_experiment(str(run_dir / "config.toml"), run_dir, resume=True, progress=progress)


def _recorded_config_sha256(run_dir: Path) -> tuple[str, str] | None:
    """The config.toml hash the run recorded, and where: summary.json, else (after a kill) a
    checkpoint. None for a run that recorded none (made before hashes were kept)."""
    try:
        digest = json.loads((run_dir / "summary.json").read_text()).get("config_sha256")
        if isinstance(digest, str):
            return digest, "summary.json"
    except (OSError, ValueError, AttributeError):
        pass
    for ckpt in sorted((run_dir / "checkpoints").glob("*.pt")):
        try:
            digest = torch.load(ckpt, weights_only=True).get("config_sha256")
        except Exception:  # noqa: BLE001 - a torn checkpoint records nothing
            continue
        if isinstance(digest, str):
            return digest, f"checkpoints/{ckpt.name}"
    return None


def _check_config_unchanged(run_dir: Path) -> None:
    """Refuse to resume a run whose config.toml was edited after it started."""
    recorded = _recorded_config_sha256(run_dir)
    if recorded is None:
        return
    try:
        now = config_sha256((run_dir / "config.toml").read_bytes())
    except OSError as exc:
        raise ValueError(f"--resume {run_dir}: cannot read config.toml "
                         f"({exc.strerror or exc})") from None
    if now != recorded[0]:
        raise ValueError(f"--resume {run_dir}: {run_dir / 'config.toml'} was edited after the "
                         f"run started (its sha256 differs from the one in {recorded[1]}): "
                         "restore it to continue the run, or add --force-new to start the run "
                         "over with the edited configuration")


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N (N a device "
                         "index)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use cpu")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s): use cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")


def user_experiment_file(path: str | Path, command: str, builtin_hint: str) -> Path:
    """The user TOML experiment that ``command`` acts on: the file, or a run folder's
    config.toml. Anything else (a built-in experiment's name or configuration, a folder, a
    missing or non-TOML file) is refused with one line; ``builtin_hint`` says what to do for a
    built-in experiment instead ("{name}" in it becomes that experiment's name)."""
    path = Path(path)
    if path.is_dir() and (path / "config.toml").is_file():
        path = path / "config.toml"
    elif str(path) in EXPERIMENTS and not path.exists():
        raise ValueError(f"{command} takes a TOML experiment file; {str(path)!r} is a built-in "
                         f"experiment: {builtin_hint.format(name=path)}")
    elif path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a TOML experiment file or a run "
                         "folder")
    elif not is_toml(path):
        raise ValueError(f"{command} takes a .toml experiment file (got {str(path)!r})")
    if not path.exists():
        raise FileNotFoundError(f"no experiment file {str(path)!r}")
    try:
        import tomllib

        builtin = tomllib.loads(path.read_text(encoding="utf-8-sig")).get("experiment")
    except (OSError, UnicodeDecodeError, ValueError):
        builtin = None
    if builtin:
        raise ValueError(f"{str(path)!r} is the configuration of a built-in experiment: "
                         f"{command} takes a user experiment file (model, data, loss); "
                         f"{builtin_hint.format(name=builtin)}")
    return path
