"""Build the :class:`~rayleighflow.problem.Problem` an :class:`ExperimentConfig` describes.

The model's input shape and output width come from the data and the loss (number of classes
for cross-entropy, 1 for logistic, the target width for square); given widths are checked.
Randomness comes from named streams of ``cfg.seed`` (``"model"``, ``"data"``, ``"teacher"``,
``"flow"``), so the model's initialization does not replay the data's draws, and global RNG
state is left as it was.

Example:
    >>> from rayleighflow.experiments.config import parse_config
    >>> cfg = parse_config({"model": {"kind": "mlp", "widths": [8]},
    ...                     "data": {"kind": "sklearn", "name": "wine"},
    ...                     "loss": {"name": "cross-entropy"}})
    >>> problem, info = build_problem(cfg)
    >>> info["n"], info["k"], info["P"], info["model"]
    (178, 3, 139, 'MLP 13 → 8 → 3 (tanh)')
    >>> result = gradient_flow(problem, **flow_kwargs(cfg))       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..activations import activation_spec
from ..data import (
    Dataset,
    Gaussian,
    Sampler,
    TeacherStudent,
    UniformBox,
    load_file,
    load_sklearn,
    smooth_target,
)
from ..problem import Model, NondeterministicModelError, Problem
from ..seeding import generator as seeded_generator
from ..seeding import numpy_rng, seed_torch
from .config import (
    CNNConfig,
    ConfigError,
    ExperimentConfig,
    FileData,
    GaussianData,
    ImportConfig,
    Issue,
    MLPConfig,
    SklearnData,
    TeacherStudentData,
    UniformData,
    find_line,
    key_lines,
)

__all__ = ["build_problem", "make_generator", "flow_kwargs"]

def make_generator(cfg: ExperimentConfig, stream: str = "flow") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for ``stream``; pass ``make_generator(cfg)`` to the flow."""
    return seeded_generator(cfg.seed, stream)


def flow_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`rayleighflow.flow.gradient_flow`, generator included."""
    kwargs = {**cfg.flow.kwargs(), "generator": make_generator(cfg, "flow")}
    if getattr(cfg.data, "population", False):   # sampler data: the evaluation sample's size
        kwargs["eval_data"] = cfg.flow.eval_size
    return kwargs


def _fail(cfg: ExperimentConfig, path: str, message: str) -> ConfigError:
    """A ConfigError at ``path``, with its line when the config came from a file."""
    line = None
    if cfg.source is not None and cfg.source.is_file():
        line = find_line(key_lines(cfg.source.read_text(encoding="utf-8-sig")), path)
    return ConfigError([Issue(path, line, message)], cfg.source)


def build_problem(cfg: ExperimentConfig) -> tuple[Problem, dict[str, Any]]:
    """The Problem (model, data, loss, convention) and an info dict.

    ``info`` holds ``P`` (parameter count), ``n`` (samples; None for a sampler), ``k`` (output
    width), ``input_shape``, ``groups`` and description strings ``model``/``data``/``loss``,
    plus ``name``, ``seed``, ``dtype``, ``device``, ``convention``; all JSON-serializable.
    Raises :class:`ConfigError` for what only the built objects reveal (file contents, an
    imported factory, CUDA availability).
    """
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    device = _device(cfg)
    raw, data_desc, n_classes = _raw_data(cfg, dtype)
    # A sampler is probed with a few draws to learn shapes and to validate the model early.
    probe = raw if isinstance(raw, Dataset) else raw.sample(8, make_generator(cfg, "probe"))
    k = _output_width(cfg, probe, n_classes)
    shape = tuple(cfg.model.input_shape) if isinstance(cfg.model, CNNConfig) \
        and cfg.model.input_shape else tuple(probe.x.shape[1:]) or (1,)
    if isinstance(cfg.model, CNNConfig) and len(shape) != 3:
        raise _fail(cfg, "model.input_shape", "model.input_shape [channels, height, width] is "
                    f"required for kind = 'cnn': the data's inputs have shape {list(shape)}")
    if math.prod(shape) != math.prod(probe.x.shape[1:]):
        raise _fail(cfg, "model.input_shape", f"model.input_shape {list(shape)} does not match "
                    f"the data's {math.prod(probe.x.shape[1:])} input features")
    one_hot = k if cfg.loss.one_hot else None

    def transform(ds: Dataset) -> Dataset:
        x = ds.x.reshape(ds.n, *shape)
        y = nn.functional.one_hot(ds.y.long(), one_hot).to(dtype) if one_hot else ds.y
        return Dataset(x.to(device), y.to(device), ds.weights.to(device))

    data = transform(raw) if isinstance(raw, Dataset) else _Mapped(raw, transform)
    module, model_desc = _module(cfg, shape, k)
    notes = []
    given = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()
                    if p.is_floating_point() and p.dtype != dtype})
    if given:
        notes.append(f"the model's {', '.join(given)} parameters were cast to {cfg.dtype} "
                     "(the configuration's dtype)")
    try:
        model = Model(module.to(device=device, dtype=dtype))
    except NondeterministicModelError as exc:
        what = str(exc).split("; call model.eval()")[0]
        fix = ("return the module in eval mode from the factory (e.g. `return net.eval()`) or "
               "remove the layer" if isinstance(cfg.model, ImportConfig)
               else "remove the layer")
        raise _fail(cfg, "model", f"model: {what}; {fix}") from None
    except ValueError as exc:  # half precision, meta device, no trainable parameters
        raise _fail(cfg, "model", f"model: {exc}") from None
    notes += model.notes
    _check_width(cfg, model, transform(probe), k)
    try:
        problem = Problem(model, data, cfg.loss.name, cfg.convention)
        if isinstance(raw, Sampler):
            problem.validate(transform(probe))
    except ValueError as exc:  # labels out of range, non-finite outputs, random model, ...
        raise _fail(cfg, "data", f"the model and data do not fit together: {exc}") from exc
    info = {"name": cfg.name, "P": model.n_params, "n": data.n if isinstance(data, Dataset)
            else None, "k": k, "input_shape": list(shape), "groups": list(model.groups),
            "model": model_desc, "data": data_desc, "loss": cfg.loss.name,
            "convention": cfg.convention.value, "dtype": cfg.dtype, "device": str(device),
            "seed": cfg.seed, "notes": notes}
    return problem, info


def problem_size(cfg: ExperimentConfig) -> tuple[int | None, int, int]:
    """(samples, None for a sampler; output width k; parameter count P) without building the
    Problem, whose validation runs the model on all the data: what a cost estimate needs."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    raw, _, n_classes = _raw_data(cfg, dtype)
    probe = raw if isinstance(raw, Dataset) else raw.sample(8, make_generator(cfg, "probe"))
    k = _output_width(cfg, probe, n_classes)
    shape = tuple(cfg.model.input_shape) if isinstance(cfg.model, CNNConfig) \
        and cfg.model.input_shape else tuple(probe.x.shape[1:]) or (1,)
    module, _ = _module(cfg, shape, k)
    p = sum(t.numel() for t in module.parameters() if t.requires_grad)
    return (raw.n if isinstance(raw, Dataset) else None), k, p


def _device(cfg: ExperimentConfig) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _fail(cfg, "device", f"device = {cfg.device!r} but CUDA is not available "
                        "here (torch.cuda.is_available() is False); set device = \"cpu\"")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _fail(cfg, "device", f"device = {cfg.device!r} but only "
                        f"{torch.cuda.device_count()} CUDA device(s) exist")
    return device


# ----------------------------------------------------------------------------- data


class _Mapped(Sampler):
    """A sampler whose draws pass through ``fn`` (reshape, one-hot, move to the device)."""

    def __init__(self, inner: Sampler, fn: Callable[[Dataset], Dataset]) -> None:
        self.inner, self.fn = inner, fn

    def sample(self, n: int, generator: torch.Generator) -> Dataset:
        return self.fn(self.inner.sample(n, generator))

    @property
    def description(self) -> str:
        return self.inner.description


def _raw_data(cfg: ExperimentConfig, dtype: torch.dtype) -> tuple[Any, str, int | None]:
    """(Dataset or Sampler on the CPU, description, number of classes when labels)."""
    d = cfg.data
    if isinstance(d, SklearnData):
        ds = load_sklearn(d.name, n_samples=d.n_samples, classes=d.classes,
                          standardize=d.standardize, dtype=dtype, seed=cfg.seed)
        if d.n_samples is not None and ds.n < d.n_samples:
            raise _fail(cfg, "data.n_samples", f"data.n_samples = {d.n_samples} but {d.name} "
                        f"has only {ds.n} samples of classes {list(d.classes or [])}")
        k = len(d.classes) if d.classes else int(ds.y.max()) + 1
        desc = f"sklearn {d.name}: {ds.n} samples, {ds.x.shape[1]} features, {k} classes"
        return ds, desc, k
    if isinstance(d, FileData):
        return _file_data(cfg, d, dtype)
    if isinstance(d, UniformData | GaussianData):
        sampler: Sampler = (UniformBox(d.dim, d.radius, smooth_target, dtype=dtype)
                            if isinstance(d, UniformData)
                            else Gaussian(d.dim, smooth_target, std=d.std, dtype=dtype))
        k = None
    else:
        sampler, k = _teacher(cfg, d, dtype), (d.outputs if d.classify else None)
    if d.population:
        return sampler, f"{sampler.description} (sampler)", k
    ds = sampler.sample(d.n_samples, make_generator(cfg, "data"))
    return ds, f"{sampler.description}: fixed sample of {ds.n}", k


def _teacher(cfg: ExperimentConfig, d: TeacherStudentData, dtype: torch.dtype) -> Sampler:
    g = make_generator(cfg, "teacher")
    w1 = torch.randn(d.dim, d.teacher_width, generator=g, dtype=dtype) / math.sqrt(d.dim)
    w2 = torch.randn(d.teacher_width, d.outputs, generator=g, dtype=dtype)
    w2 /= math.sqrt(d.teacher_width)

    def teacher(x: Tensor) -> Tensor:
        return torch.tanh(x @ w1.to(x)) @ w2.to(x)

    return TeacherStudent(teacher, d.dim, classify=d.classify, dtype=dtype)


def _file_data(cfg: ExperimentConfig, d: FileData, dtype: torch.dtype):
    try:
        ds = load_file(str(d.path), target=d.target, dtype=dtype)
    except ValueError as exc:
        key = "data.target" if "is not a column" in str(exc) else "data.path"
        raise _fail(cfg, key, f"{key}: {exc}") from None
    if cfg.loss.name == "square" and not cfg.loss.one_hot and not ds.y.is_floating_point():
        # whole-number targets of a regression are values, not class labels
        ds = Dataset(ds.x, ds.y.to(dtype), ds.weights)
    k = int(ds.y.max()) + 1 if not ds.y.is_floating_point() else None
    if d.n_samples is not None:
        if d.n_samples > ds.n:
            raise _fail(cfg, "data.n_samples", f"data.n_samples = {d.n_samples} but {d.path} "
                        f"has only {ds.n} samples")
        rng = numpy_rng(cfg.seed, "data")
        ds = ds.subset(torch.as_tensor(np.sort(rng.choice(ds.n, d.n_samples, replace=False))))
    labels = f", {k} classes" if k else ""
    return ds, f"{d.kind} {d.path.name}: {ds.n} samples{labels}", k


def _output_width(cfg: ExperimentConfig, probe: Dataset, n_classes: int | None) -> int:
    loss, y = cfg.loss, probe.y
    if loss.name != "square" or loss.one_hot:
        if n_classes is None and _negative_whole(y):
            raise _fail(cfg, "loss.name", f"loss {loss.name!r} needs class labels 0..k-1, but "
                        f"the data's labels include {float(y.min()):g}: negative labels are "
                        "not class indices; renumber them 0..k-1 (e.g. np.unique(y, "
                        "return_inverse=True)), or use loss 'square' for real targets")
        if n_classes is None:
            raise _fail(cfg, "loss.name", f"loss {loss.name!r}{' with one_hot' * loss.one_hot} "
                        "needs integer class labels 0..k-1, but the data's targets are "
                        "real-valued; use loss 'square'")
        if loss.name == "logistic" and n_classes != 2:
            raise _fail(cfg, "loss.name", "loss 'logistic' needs labels 0/1 but the data has "
                        f"{n_classes} classes; use loss 'cross-entropy'")
        k = 1 if loss.name == "logistic" else n_classes
    else:
        k = 1 if y.dim() == 1 else int(math.prod(y.shape[1:]))
    given = getattr(cfg.model, "output_dim", None)
    if given is not None and given != k:
        raise _fail(cfg, "model.output_dim", f"model.output_dim = {given} but loss "
                    f"{loss.name!r} on this data needs {k}; remove it to infer it")
    return k


def _negative_whole(y: torch.Tensor) -> bool:
    """Whole-number targets with a negative one: labels such as −1/1, not real values."""
    return bool(y.numel()) and bool((y == y.round()).all()) and float(y.min()) < 0


# ----------------------------------------------------------------------------- models


def _module(cfg: ExperimentConfig, shape: tuple[int, ...], k: int) -> tuple[nn.Module, str]:
    m = cfg.model
    if isinstance(m, MLPConfig) and m.input_dim is not None and m.input_dim != math.prod(shape):
        raise _fail(cfg, "model.input_dim", f"model.input_dim = {m.input_dim} but the data has "
                    f"{math.prod(shape)} input features; remove it to infer it")
    factory = _load_factory(cfg) if isinstance(m, ImportConfig) else None
    # nn.Module initializers draw from the global RNG: fork it so the caller's state survives.
    with torch.random.fork_rng(devices=[]):
        seed_torch(cfg.seed, "model")
        if isinstance(m, MLPConfig):
            module, desc = _mlp(m, shape, k)
        elif isinstance(m, CNNConfig):
            module, desc = _cnn(cfg, m, shape, k)
        else:
            module, desc = _call_factory(cfg, m, factory)
    _refuse_complex(cfg, module)
    with torch.no_grad():  # integer (frozen) parameters and buffers are left as they are
        for p in module.parameters():
            if p.is_floating_point() and m.init_scale != 1:
                p.mul_(m.init_scale)
    return module, desc + (f", init ×{m.init_scale:g}" if m.init_scale != 1 else "")


def _refuse_complex(cfg: ExperimentConfig, module: nn.Module) -> None:
    """Before the cast to the configured dtype, which would drop imaginary parts silently."""
    tensors = [("parameter", *nt) for nt in module.named_parameters()] + \
        [("buffer", *nt) for nt in module.named_buffers()]
    for kind, name, t in tensors:
        if t.is_complex():
            raise _fail(cfg, "model", f"model: {kind} {name!r} is "
                        f"{str(t.dtype).removeprefix('torch.')}: the losses, kernels and "
                        "certificates here are real; split it into real and imaginary parts "
                        "(torch.view_as_real)")


def _mlp(m: MLPConfig, shape: tuple[int, ...], k: int) -> tuple[nn.Module, str]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if len(shape) > 1:
        layers["flatten"] = nn.Flatten()
    d = math.prod(shape)
    for i, w in enumerate(m.widths, 1):
        layers[f"fc{i}"] = nn.Linear(d, w, bias=m.bias)
        layers[f"act{i}"] = activation_spec(m.activation).module()
        d = w
    layers["out"] = nn.Linear(d, k, bias=m.bias)
    sizes = " → ".join(str(s) for s in (math.prod(shape), *m.widths, k))
    return nn.Sequential(layers), f"MLP {sizes} ({m.activation}{'' if m.bias else ', no bias'})"


def _cnn(cfg: ExperimentConfig, m: CNNConfig, shape: tuple[int, ...], k: int):
    c, h, w = shape
    pad = m.kernel_size // 2  # 'same' size for odd kernels
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, ch in enumerate(m.channels, 1):
        layers[f"conv{i}"] = nn.Conv2d(c, ch, m.kernel_size, padding=pad, bias=m.bias)
        layers[f"act{i}"] = activation_spec(m.activation).module()
        h, w = h + 2 * pad - m.kernel_size + 1, w + 2 * pad - m.kernel_size + 1
        if m.pool > 1:
            layers[f"pool{i}"] = (nn.MaxPool2d if m.pooling == "max" else nn.AvgPool2d)(m.pool)
            h, w = h // m.pool, w // m.pool
        if h < 1 or w < 1:
            raise _fail(cfg, "model.channels", f"model.input_shape {list(shape)} is too small "
                        f"for {len(m.channels)} stages of pool {m.pool}: stage {i} leaves no "
                        "pixels; use fewer stages (model.channels) or a smaller model.pool")
        c = ch
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(c * h * w, k, bias=m.bias)
    chans = ", ".join(str(x) for x in m.channels)
    desc = (f"CNN {list(shape)} → conv [{chans}] (kernel {m.kernel_size}, {m.pooling} pool "
            f"{m.pool}, {m.activation}) → {c}×{h}×{w} → {k}")
    return nn.Sequential(layers), desc


def _load_factory(cfg: ExperimentConfig) -> Callable[..., Any]:
    spec = cfg.model.factory
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        name = f"_rayleighflow_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise _fail(cfg, "model.factory", f"model.factory: cannot load {path} as Python")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod  # dataclasses and pickling inside the file look it up
        try:
            loader_spec.loader.exec_module(mod)
        except Exception as exc:
            del sys.modules[name]
            raise _fail(cfg, "model.factory", f"model.factory: running {path} failed with "
                        f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            mod = importlib.import_module(module_name)
        except ImportError as exc:
            raise _fail(cfg, "model.factory", f"model.factory: cannot import module "
                        f"{module_name!r} ({exc}); install it or put its folder on PYTHONPATH, "
                        f"or give a file path relative to the TOML file, e.g. "
                        f"\"my_model.py:{attr}\"") from exc
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            names = sorted(n for n, v in vars(mod).items() if callable(v) and n[0] != "_")
            raise _fail(cfg, "model.factory", f"model.factory: {module_name} has no {attr!r}; "
                        f"its public callables are: {', '.join(names) or '(none)'}")
    if not callable(obj):
        raise _fail(cfg, "model.factory", f"model.factory: {spec} is a "
                    f"{type(obj).__name__}, not a function returning an nn.Module")
    # Checked before any call: a factory is code the configuration runs, so only what is
    # plainly meant to build a model (an nn.Module class, a def-defined function) is called.
    is_module_class = inspect.isclass(obj) and issubclass(obj, nn.Module)
    if not (is_module_class or inspect.isfunction(obj)):
        what = "a class that is not an nn.Module" if inspect.isclass(obj) else \
            f"a {type(obj).__name__}"
        raise _fail(cfg, "model.factory", f"model.factory: {spec} is {what}, not an nn.Module "
                    "class or a Python function (def) returning one; it was not called: name "
                    "your own model-building function, e.g. \"my_model.py:build\"")
    return obj


def _call_factory(cfg: ExperimentConfig, m: ImportConfig, factory: Callable[..., Any]):
    try:
        module = factory(**m.kwargs)
    except TypeError as exc:
        try:
            sig = f"; its signature is {m.factory.rpartition(':')[2]}{inspect.signature(factory)}"
        except (TypeError, ValueError):
            sig = ""
        raise _fail(cfg, "model.kwargs", f"model.factory called with [model.kwargs] "
                    f"{m.kwargs}: {exc}{sig}") from exc
    except Exception as exc:  # the user's factory raised: say so in context, one line
        raise _fail(cfg, "model.factory", f"model.factory: calling {m.factory}() failed with "
                    f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise _fail(cfg, "model.factory", f"model.factory {m.factory} returned a "
                    f"{type(module).__name__}, not a torch.nn.Module")
    args = ", ".join(f"{k}={v!r}" for k, v in m.kwargs.items())
    where = Path(m.factory.rpartition(":")[0]).name
    return module, f"{type(module).__name__} from {where}:{m.factory.rpartition(':')[2]}({args})"


def _check_width(cfg: ExperimentConfig, model: Model, probe: Dataset, k: int) -> None:
    with torch.no_grad():
        try:
            out = model(model.params, probe.x[:2])
        except Exception as exc:  # a user's module on our inputs: report its failure in context
            raise _fail(cfg, "model", f"model: calling it on inputs of shape "
                        f"{list(probe.x[:2].shape)} failed with {type(exc).__name__}: {exc}") \
                from exc
    if out.shape[1] != k:
        hint = " (set it through [model.kwargs])" if isinstance(cfg.model, ImportConfig) else ""
        raise _fail(cfg, "model", f"model: it returns {out.shape[1]} outputs per sample but "
                    f"loss {cfg.loss.name!r} on this data needs {k}{hint}")
