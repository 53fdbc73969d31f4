"""Problem = model f_θ + parameters θ + data D + functional loss ℓ, so that L(θ) = ℓ(f_θ).

Any ``nn.Module`` works unchanged: it is called through ``torch.func.functional_call`` with a
``dict[str, Tensor]`` of parameters. A plain function ``f(params, x)`` works too. Outputs are
always viewed as (n, k). Inputs are a tensor (n, ...), passed as ``module(x)``, or a mapping of
named tensors sharing dimension 0 (Hugging Face style), passed as ``module(**x)``; an output
object with a ``logits`` tensor (a Hugging Face ``ModelOutput``) is read as its logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, final

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._types import Convention, Params, effective_weights
from .data import Dataset, Sampler
from .losses import Loss, get_loss

__all__ = ["Model", "Problem", "NondeterministicModelError"]

_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm,)


class NondeterministicModelError(ValueError):
    """The model's output is not a deterministic function of (θ, x): nothing can be certified.

    A ``ValueError``: raised for dropout or batch-norm layers in training mode, and when two
    calls on the same θ and x differ.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Dropout(0.5))
        >>> try:
        ...     rf.Model(net)
        ... except rf.NondeterministicModelError as err:
        ...     print(str(err).split(",")[0])
        layer 1 (Dropout) is dropout in training mode
        >>> rf.Model(net.eval()).n_params              # eval mode: deterministic
        12
    """


@final
class Model:
    """f_θ(x) as a function of a parameter dict; outputs reshaped to (n, k).

    Args:
        fn: an ``nn.Module`` or a callable ``f(params, x) -> Tensor``.
        params: required for a callable; for a module, defaults to its parameters (detached).
        groups: parameter groups {group: [param names]} for per-group Rayleigh quotients
            (THEORY.md T2); default one group per module (``"0.weight"`` and ``"0.bias"`` form
            group ``"0"``) or one per parameter for a callable.
        allow_nondeterministic: accept dropout / batch-norm in training mode (not advised).

    Parameters of a module with ``requires_grad=False`` are frozen: held fixed (passed with the
    buffers), excluded from θ and P, and listed in ``frozen`` and ``notes``. Half-precision
    (float16/bfloat16) and meta-device parameters are refused with the fix.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
        ...                           torch.nn.Linear(5, 2)).double()
        >>> model = rf.Model(net)
        >>> model.n_params, list(model.groups)        # P = 3·5 + 5 + 5·2 + 2; one group per layer
        (32, ['0', '2'])
        >>> model(model.params, torch.zeros(4, 3, dtype=torch.float64)).shape   # (n, k)
        torch.Size([4, 2])
        >>> linear = rf.Model(lambda p, x: x @ p["w"], {"w": torch.ones(3, 1)})   # f(params, x)
        >>> linear.n_params
        3

    Inputs: a tensor (n, ...), called as ``module(x)``, or a mapping of tensors that share
    the batch dimension 0 (``{"input_ids": ids, "attention_mask": mask}``), called as
    ``module(**x)`` (a plain function gets the mapping). The module may return a tensor or an
    object with a ``logits`` tensor (a Hugging Face ``ModelOutput``); for another field,
    wrap it in a module whose forward returns the tensor.
    """

    def __init__(
        self,
        fn: nn.Module | Callable[[Params, Tensor], Tensor],
        params: Mapping[str, Tensor] | None = None,
        *,
        groups: Mapping[str, list[str] | tuple[str, ...]] | None = None,
        allow_nondeterministic: bool = False,
    ) -> None:
        if not (isinstance(fn, nn.Module) or callable(fn)):
            raise TypeError(f"Model needs an nn.Module or a function f(params, x) (got "
                            f"{type(fn).__name__})")
        if isinstance(fn, torch.jit.ScriptModule):
            raise TypeError(f"Model got a TorchScript module ({type(fn).__name__}): rayleighflow "
                            "calls the model through torch.func.functional_call, which "
                            "TorchScript does not support; pass the original nn.Module")
        self.module = fn if isinstance(fn, nn.Module) else None
        self._fn = fn
        self.frozen: tuple[str, ...] = ()
        self.notes: list[str] = []
        if self.module is not None:
            if not allow_nondeterministic:
                _refuse_random_layers(self.module)
            named = dict(self.module.named_parameters())
            if params is None:
                params = {k: v.detach().clone() for k, v in named.items() if v.requires_grad}
                self.frozen = tuple(k for k, v in named.items() if not v.requires_grad)
                if self.frozen and not params:
                    raise ValueError("every parameter of the model has requires_grad=False: "
                                     "there is nothing to train; unfreeze some")
            if self.frozen:
                count = sum(named[k].numel() for k in self.frozen)
                shown = ", ".join(self.frozen[:4]) + (", ..." if len(self.frozen) > 4 else "")
                self.notes.append(f"{len(self.frozen)} frozen parameter tensor(s) ({shown}; "
                                  f"{count} values, requires_grad=False) are held fixed and "
                                  "excluded from θ and P")
            self.buffers = self._fixed()
        else:
            if params is None:
                raise ValueError("a plain function f(params, x) needs its initial params dict")
            self.buffers = {}
        self.params: Params = {k: torch.as_tensor(v).detach() for k, v in params.items()}
        if not self.params:
            raise ValueError("the model has no parameters: there is nothing to train or certify")
        _check_params(self.params)
        self.allow_nondeterministic = allow_nondeterministic
        self.groups = _make_groups(self.params, groups, by_module=self.module is not None)

    def _fixed(self) -> dict[str, Tensor]:
        """Buffers and frozen parameters: what functional_call takes besides θ."""
        assert self.module is not None
        named = dict(self.module.named_parameters())
        return {**{k: named[k].detach() for k in self.frozen},
                **{k: v.detach() for k, v in self.module.named_buffers()}}

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype of θ (None if the parameters mix dtypes)."""
        kinds = {p.dtype for p in self.params.values() if p.is_floating_point()}
        return kinds.pop() if len(kinds) == 1 else None

    def __call__(self, params: Params, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        if self.module is not None:
            if isinstance(x, Tensor) or not isinstance(x, Mapping):
                out = functional_call(self.module, (params, self.buffers), (x,))
            else:  # named inputs: module(**x)
                out = functional_call(self.module, (params, self.buffers), (),
                                      x if type(x) is dict else dict(x))
        else:
            out = self._fn(params, x)  # type: ignore[arg-type]
        if not isinstance(out, Tensor):
            out = output_tensor(out)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out.reshape(out.shape[0], -1)

    def to(self, device=None, dtype=None) -> Model:
        """Move parameters (and a wrapped module) to a device/dtype; returns self."""
        if self.module is not None:
            self.module.to(device=device, dtype=dtype)
            self.buffers = self._fixed()
        self.params = {k: v.to(device=device, dtype=dtype) for k, v in self.params.items()}
        return self


def output_tensor(out: Any) -> Tensor:
    """The tensor of a model's output: itself, or the ``logits`` of an output object (a Hugging
    Face ``ModelOutput``); anything else is refused with the fix."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"the model returned a {type(out).__name__}, not a Tensor: its forward "
                    "must return the outputs (n, k), or an object with a `logits` tensor (a "
                    "Hugging Face ModelOutput); for another field, wrap the module in one "
                    "whose forward returns that tensor, e.g. "
                    "`forward(self, **inputs): return self.net(**inputs).last_hidden_state[:, 0]`")


def _check_params(params: Params) -> None:
    for name, p in params.items():
        if p.is_meta:
            raise ValueError(f"parameter {name!r} is on the meta device (it has no values): "
                             "materialize the model first, e.g. module.to_empty(device='cpu') "
                             "and initialize it")
        if p.is_complex():
            raise TypeError(f"parameter {name!r} is {str(p.dtype).removeprefix('torch.')}: the "
                            "losses, kernels and certificates here are real; split a complex "
                            "parameter into real and imaginary parts (torch.view_as_real)")
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} is {str(p.dtype).removeprefix('torch.')}: a "
                            "gradient flow moves real parameters; freeze it "
                            "(requires_grad=False) or make it float32/float64")
        if p.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"parameter {name!r} is {str(p.dtype).removeprefix('torch.')}: a "
                             "gradient flow and its certificates need float32 or float64 (half "
                             "precision rounds the loss decrease away); call module.float() or "
                             "module.double() first")


def _refuse_random_layers(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        random_layer = isinstance(sub, _RANDOM_LAYERS) and sub.p > 0
        batch_stats = isinstance(sub, _NORM_LAYERS)
        if sub.training and (random_layer or batch_stats):
            kind = "dropout" if random_layer else "batch-norm (batch statistics)"
            raise NondeterministicModelError(
                f"layer {name or '<root>'} ({type(sub).__name__}) is {kind} in training mode, so "
                "f_θ(x) is not a deterministic function of θ and x and no certificate applies; "
                "call model.eval() first, or pass allow_nondeterministic=True to accept it anyway"
            )


def _make_groups(params: Params, groups, *, by_module: bool) -> dict[str, tuple[str, ...]]:
    if groups is None:
        out: dict[str, list[str]] = {}
        for name in params:
            key = name.rsplit(".", 1)[0] if by_module and "." in name else name
            out.setdefault(key, []).append(name)
        return {k: tuple(v) for k, v in out.items()}
    seen: set[str] = set()
    result = {}
    for g, names in groups.items():
        for n in names:
            if n not in params:
                raise ValueError(
                    f"group {g!r} names unknown parameter {n!r}; known: {list(params)}")
            if n in seen:
                raise ValueError(f"parameter {n!r} is in two groups: groups must be disjoint")
            seen.add(n)
        result[g] = tuple(names)
    missing = set(params) - seen
    if missing:
        raise ValueError(f"parameters {sorted(missing)} belong to no group: groups must cover all")
    return result


@final
@dataclass
class Problem:
    """L(θ) = ℓ(f_θ) = Σ_i ω_i ℓ_i(f_θ(x_i)), ω the convention's effective weights.

    ``data`` is a finite :class:`Dataset` or a :class:`Sampler` (infinite support); for a sampler
    the flow draws data itself (see :func:`rayleighflow.gradient_flow`). ``convention`` is
    "mean" (L²(D), ω_i = w_i, the default) or "sum" (Euclidean, ω_i = n·w_i).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> problem = rf.Problem(rf.Model(net), data, "square")
        >>> f = net(data.x)
        >>> manual = 0.5 * ((f - data.y) ** 2).sum(-1).mean()     # Σ w_i ½‖f_i − y_i‖², w = 1/n
        >>> bool(torch.isclose(problem.loss_value(problem.params, data), manual))
        True
        >>> problem.convention.value, problem.loss.name
        ('mean', 'square')
    """

    model: Model
    data: Dataset | Sampler
    loss: Loss
    convention: Convention = Convention.MEAN
    # Validated datasets and their checked targets: the flow's hot path then skips the label
    # checks (host syncs on a GPU) at every gradient evaluation.
    _checked: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary,
                                                repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, nn.Module) or not isinstance(self.model, Model):
            self.model = Model(self.model)
        if not isinstance(self.data, Dataset | Sampler):
            raise TypeError(f"Problem data must be a rayleighflow Dataset or Sampler (got "
                            f"{type(self.data).__name__}): build one with "
                            "Dataset.from_arrays(x, y)")
        self.loss = get_loss(self.loss)
        self.convention = Convention.parse(self.convention)
        if isinstance(self.data, Dataset):
            self.data = self._align(self.data)
            self.validate(self.data)

    def _align(self, data: Dataset) -> Dataset:
        """``data`` in the model's floating dtype: float inputs, real targets and weights are
        cast (float64 data with a float32 model, and back); integer inputs are cast as
        ``Dataset.from_arrays`` does, unless the model takes them as they are (an embedding)."""
        dtype = self.model.dtype
        if dtype is None:
            return data
        x, y, w = data.x, data.y, data.weights
        if not x.is_floating_point() and x.dtype is not torch.bool:
            try:
                with torch.no_grad():
                    self.model(self.model.params, x[:1])
            except (RuntimeError, TypeError, IndexError):
                x = x.to(dtype)
        elif x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        if y.is_floating_point() and y.dtype != dtype:
            y = y.to(dtype)
        if w.dtype != dtype:
            w = w.to(dtype)
            w = w / w.sum()
        if x is data.x and y is data.y and w is data.weights:
            return data
        return Dataset(x, y, w)

    @property
    def params(self) -> Params:
        return self.model.params

    def validate(self, data: Dataset) -> None:
        """Check shapes, labels, finiteness and determinism once per dataset object."""
        if data in self._checked:
            return
        dtype = self.model.dtype
        if dtype is not None and data.x.is_floating_point() and data.x.dtype != dtype:
            name = str(dtype).removeprefix("torch.")
            raise ValueError(f"the data is {str(data.x.dtype).removeprefix('torch.')} but the "
                             f"model's parameters are {name}: build the data with "
                             f"dtype=torch.{name} (Dataset.from_arrays, load_sklearn) or cast "
                             "the model (module.double() / module.float())")
        with torch.no_grad():
            f = self.model(self.model.params, data.x)
            f2 = self.model(self.model.params, data.x)
        if f.shape[0] != data.n:
            raise ValueError(
                f"the model returned {f.shape[0]} outputs for {data.n} inputs: it must map a "
                "batch (n, ...) to (n, k)"
            )
        if not torch.isfinite(f).all():
            raise ValueError(
                "the model's output at the initial parameters contains NaN/Inf: check the "
                "initialization scale and the inputs"
            )
        if not self.model.allow_nondeterministic and not torch.equal(f, f2):
            raise NondeterministicModelError(
                "two calls of the model on the same θ and x returned different outputs: the model "
                "is random (dropout? sampling?) and no certificate applies; make it "
                "deterministic or pass allow_nondeterministic=True to Model"
            )
        targets = self.loss.check_targets(f, data.y)
        self._check_differentiable(data)
        self._checked[data] = targets

    def _check_differentiable(self, data: Dataset) -> None:
        """The output must carry gradients to θ: a forward that detaches (``.detach()``,
        ``torch.no_grad()``, a NumPy round trip) passes every value check and fails in the
        flow. One sample's forward and backward."""
        params = {k: v.detach().requires_grad_(True) for k, v in self.model.params.items()}
        with torch.enable_grad():
            out = self.model(params, data.x[:1])
            grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True) \
                if out.requires_grad else ()
        if not any(g is not None for g in grads):
            raise ValueError("the model's output does not depend on its parameters through "
                             "autograd (no gradient reaches θ: does forward call .detach(), "
                             "run under torch.no_grad() or go through NumPy?): remove that, so "
                             "that the output carries gradients")

    def targets(self, data: Dataset, f: Tensor) -> Tensor:
        """Targets in the loss's form; checked once per validated dataset, else every call."""
        cached = self._checked.get(data)
        return cached if cached is not None else self.loss.check_targets(f, data.y)

    def omega(self, data: Dataset) -> Tensor:
        return effective_weights(data.weights, self.convention)

    def evaluate_float64(self, params: Params, data: Dataset,
                         omega: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """f_θ(x) (n, k) and L(θ) recomputed in float64 on the CPU, whatever the model's dtype:
        the reference that float32 losses are compared with. Hooks and ``forward`` run as in
        any call (``functional_call``); the loss is differentiable in the returned f.
        ``omega``: the effective weights to use (default: the data's, renormalized in float64,
        so that uniform weights held in float32 are 1/n again)."""
        p64 = {k: v.detach().to("cpu", torch.float64) for k, v in params.items()}
        x = data.x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        if self.model.module is not None:
            b64 = {k: v.detach().to("cpu", torch.float64) if v.is_floating_point() else v.cpu()
                   for k, v in self.model.buffers.items()}
            with torch.no_grad():
                out = output_tensor(functional_call(self.model.module, (p64, b64), (x,)))
        else:
            with torch.no_grad():
                out = self.model._fn(p64, x)
        f = out.reshape(out.shape[0], -1).double().requires_grad_(True)
        y = self.targets(data, f).detach().cpu()
        y = y.double() if y.is_floating_point() else y
        if omega is None:
            w = data.weights.detach().to("cpu", torch.float64)
            omega = effective_weights(w / w.sum(), self.convention)
        return f, self.loss.value(f, y, omega.detach().to("cpu", torch.float64))

    def loss_value(self, params: Params, data: Dataset) -> Tensor:
        """L(θ) on a finite dataset (differentiable in params)."""
        f = self.model(params, data.x)
        return self.loss.value(f, self.targets(data, f), self.omega(data))
