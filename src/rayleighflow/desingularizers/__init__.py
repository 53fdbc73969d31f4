r"""Kurdyka-Lojasiewicz desingularizers and the loss bounds they certify (THEORY.md section 3).

A desingularizer is an increasing function phi: (0, inf) -> R (phi' > 0). A loss L satisfies
the KL inequality with phi and constant mu > 0 where L > 0 if

    phi'(L) * |grad L|^2 >= mu.

Along the gradient flow d theta/dt = -grad L this integrates to

    L(t) <= phi^{-1}( phi(L(0)) - mu t ),

with equality for the scalar flow dL/dt = -mu / phi'(L). If phi is bounded below by
phi(0+) > -inf and phi(L(0)) - mu t falls below it, the bound is 0 (finite-time convergence).

Shipped: ``Log`` (PL), ``Reciprocal``, ``Power(alpha)``, ``CrossEntropy`` and ``Custom``.
Everything is numpy float64 and vectorized; scalars in give ``np.float64`` out.

>>> get_desingularizer("log").bound(2.0, 1.0, [0.0, 1.0])  # 2 e^{-t}
array([2.        , 0.73575888])
"""

from __future__ import annotations

import re

from ._base import Desingularizer
from .builtin import CrossEntropy, Log, Plateau, Power, Reciprocal, ScaledCrossEntropy
from .custom import Custom

__all__ = [
    "CrossEntropy",
    "Custom",
    "Desingularizer",
    "Log",
    "Plateau",
    "Power",
    "Reciprocal",
    "ScaledCrossEntropy",
    "get_desingularizer",
]

_ALIASES = {"pl": "log", "ce": "cross-entropy"}
_DEFAULT_CANDIDATES = ("log", "reciprocal", "power:0.5", "power:1.5", "power:3", "cross-entropy")


def get_desingularizer(spec) -> Desingularizer:
    """A Desingularizer (returned as is) or a name: 'log' | 'pl' | 'reciprocal' |
    'power:<alpha>' (also 'power(alpha=<alpha>)', the ``name`` form) | 'cross-entropy' | 'ce' |
    'cross-entropy:<scale>' | 'plateau:<eta>' (and their ``name`` forms).

    Example:
        >>> import rayleighflow as rf
        >>> rf.get_desingularizer("pl"), rf.get_desingularizer("power:0.5")
        (<Log log>, <Power power(alpha=0.5)>)
        >>> rf.get_desingularizer(rf.Plateau(0.05).name)      # a name rebuilds the object
        <Plateau plateau(eta=0.05)>
    """
    if isinstance(spec, Desingularizer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a Desingularizer or a name string, got {type(spec)}")
    allowed = ("log, pl, reciprocal, power:<alpha> (e.g. power:0.5), cross-entropy, ce, "
               "cross-entropy:<scale>, plateau:<eta>")
    s = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if s == "log":
        return Log()
    if s == "reciprocal":
        return Reciprocal()
    if s == "cross-entropy":
        return CrossEntropy()
    if s.startswith("power"):
        m = re.fullmatch(r"power:(.+)|power\(alpha=(.+)\)", s)
        try:
            alpha = float((m.group(1) or m.group(2)) if m else "")
        except ValueError:
            raise ValueError(f"cannot read alpha from {spec!r}; write e.g. 'power:0.5'") from None
        return Power(alpha)
    m = re.fullmatch(r"(cross-entropy|plateau)(?::(.+)|\((?:scale|eta)=(.+)\))", s)
    if m:
        try:
            value = float(m.group(2) or m.group(3))
        except ValueError:
            raise ValueError(f"cannot read the parameter of {spec!r}; write e.g. "
                             "'cross-entropy:0.01' or 'plateau:0.05'") from None
        return ScaledCrossEntropy(value) if m.group(1) == "cross-entropy" else Plateau(value)
    if s.startswith("custom"):
        raise ValueError(f"{spec!r} cannot be rebuilt from its name; pass the Custom instance")
    raise ValueError(f"unknown desingularizer {spec!r}; allowed names: {allowed}")
