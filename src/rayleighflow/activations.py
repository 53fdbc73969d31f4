"""The one activation registry: name → torch function, ``nn.Module`` class, and proof coverage.

Models (:class:`~rayleighflow.theorems.two_layer.TwoLayer`, the TOML builders), the TOML schema
(``activation = "..."``) and the proofs (:mod:`rayleighflow.prove`) all read this table. The
proofs' ball-arithmetic constants (sup|σ′|, sup|σ″| with their arguments) live in
``rayleighflow.prove.activations``, which needs python-flint; this module never imports it.

Example:
    >>> spec = activation_spec("tanh")
    >>> spec.function is torch.tanh, spec.module is nn.Tanh, spec.proven
    (True, True)
    >>> [name for name, s in ACTIVATIONS.items() if not s.proven]
    ['relu']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn

__all__ = ["ActivationSpec", "ACTIVATIONS", "ACTIVATION_NAMES", "activation_spec",
           "module_activation"]


@final
@dataclass(frozen=True)
class ActivationSpec:
    """One activation σ.

    ``function``: torch's function (what :class:`TwoLayer` applies); ``module``: the
    ``nn.Module`` class (what builders instantiate and proofs recognise, by exact type);
    ``proven``: whether ``rf.prove`` bounds sup|σ′| and sup|σ″| for it (ReLU: σ′ jumps at 0);
    ``reference``: σ in mpmath, ``reference(mp, z)``, for the independent reference of the
    proofs (None where no proof needs it).
    """

    name: str
    function: Callable[[Tensor], Tensor]
    module: type[nn.Module]
    proven: bool
    reference: Callable[[Any, Any], Any] | None = None


ACTIVATIONS: dict[str, ActivationSpec] = {s.name: s for s in (
    ActivationSpec("tanh", torch.tanh, nn.Tanh, True, lambda mp, z: mp.tanh(z)),
    ActivationSpec("relu", torch.relu, nn.ReLU, False),
    ActivationSpec("gelu", nn.functional.gelu, nn.GELU, True, lambda mp, z: z * mp.ncdf(z)),
    ActivationSpec("sigmoid", torch.sigmoid, nn.Sigmoid, True,
                   lambda mp, z: 1 / (1 + mp.exp(-z))),
    ActivationSpec("softplus", nn.functional.softplus, nn.Softplus, True,
                   lambda mp, z: mp.log1p(mp.exp(z))),
)}
#: The names, in the registry's order (the TOML schema's choices).
ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATIONS)
_BY_MODULE: dict[type, ActivationSpec] = {s.module: s for s in ACTIVATIONS.values()}


def activation_spec(name: str) -> ActivationSpec:
    """The registry entry ``name``, or a one-line ValueError listing the names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}: use one of "
                         f"{', '.join(ACTIVATIONS)}") from None


def module_activation(kind: type) -> ActivationSpec | None:
    """The entry whose module class is exactly ``kind`` (subclasses do not count), or None."""
    return _BY_MODULE.get(kind)
