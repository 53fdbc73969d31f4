"""Problem = model f_θ + parameters θ + data D + functional loss ℓ, so that L(θ) = ℓ(f_θ).

Any ``nn.Module`` works unchanged: it is called through ``torch.func.functional_call`` with a
``dict[str, Tensor]`` of parameters. A plain function ``f(params, x)`` works too. Outputs are
always viewed as (n, k).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import final

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
    """The model's output is not a deterministic function of (θ, x): nothing can be certified."""


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
    """

    def __init__(
        self,
        fn: nn.Module | Callable[[Params, Tensor], Tensor],
        params: Mapping[str, Tensor] | None = None,
        *,
        groups: Mapping[str, list[str] | tuple[str, ...]] | None = None,
        allow_nondeterministic: bool = False,
    ) -> None:
        self.module = fn if isinstance(fn, nn.Module) else None
        self._fn = fn
        if self.module is not None:
            if not allow_nondeterministic:
                _refuse_random_layers(self.module)
            if params is None:
                params = {k: v.detach().clone() for k, v in self.module.named_parameters()}
            self.buffers = {k: v.detach() for k, v in self.module.named_buffers()}
        else:
            if params is None:
                raise ValueError("a plain function f(params, x) needs its initial params dict")
            self.buffers = {}
        self.params: Params = {k: torch.as_tensor(v).detach() for k, v in params.items()}
        if not self.params:
            raise ValueError("the model has no parameters: there is nothing to train or certify")
        self.allow_nondeterministic = allow_nondeterministic
        self.groups = _make_groups(self.params, groups, by_module=self.module is not None)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        if self.module is not None:
            out = functional_call(self.module, (params, self.buffers), (x,))
        else:
            out = self._fn(params, x)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out.reshape(out.shape[0], -1)

    def to(self, device=None, dtype=None) -> Model:
        """Move parameters (and a wrapped module) to a device/dtype; returns self."""
        if self.module is not None:
            self.module.to(device=device, dtype=dtype)
            self.buffers = {k: v.detach() for k, v in self.module.named_buffers()}
        self.params = {k: v.to(device=device, dtype=dtype) for k, v in self.params.items()}
        return self


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
    the flow draws data itself (see :func:`rayleighflow.gradient_flow`).
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
        self.loss = get_loss(self.loss)
        self.convention = Convention.parse(self.convention)
        if isinstance(self.data, Dataset):
            self.validate(self.data)

    @property
    def params(self) -> Params:
        return self.model.params

    def validate(self, data: Dataset) -> None:
        """Check shapes, labels, finiteness and determinism once per dataset object."""
        if data in self._checked:
            return
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
        self._checked[data] = self.loss.check_targets(f, data.y)

    def targets(self, data: Dataset, f: Tensor) -> Tensor:
        """Targets in the loss's form; checked once per validated dataset, else every call."""
        cached = self._checked.get(data)
        return cached if cached is not None else self.loss.check_targets(f, data.y)

    def omega(self, data: Dataset) -> Tensor:
        return effective_weights(data.weights, self.convention)

    def loss_value(self, params: Params, data: Dataset) -> Tensor:
        """L(θ) on a finite dataset (differentiable in params)."""
        f = self.model(params, data.x)
        return self.loss.value(f, self.targets(data, f), self.omega(data))
