"""rayleighflow: certify and diagnose gradient-flow convergence through Rayleigh quotients of
the neural tangent kernel and Kurdyka–Łojasiewicz inequalities (Robin, Scaman, Lelarge, 2022).

The numerical core: :class:`Problem` (model + data + loss), :func:`measure` (R(K; ∇ℓ) at one
backward pass), :func:`gradient_flow` (a recorded :class:`Trajectory`), :func:`certify` and
:func:`compose` (KL certificates), the desingularizer family, and the NTK engine in
:mod:`rayleighflow.ntk`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Convention, Params
    from .certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
    from .certify import certify, kl_ratios, rank_desingularizers
    from .composition import compose, spectral
    from .data import (
        Dataset,
        Gaussian,
        Sampler,
        TeacherStudent,
        UniformBox,
        load_sklearn,
        quadrature,
    )
    from .desingularizers import (
        CrossEntropy,
        Custom,
        Desingularizer,
        Log,
        Plateau,
        Power,
        Reciprocal,
        ScaledCrossEntropy,
        get_desingularizer,
    )
    from .flow import (
        Checkpoint,
        Columns,
        Dopri5,
        Every,
        FlowResult,
        FlowStatus,
        GradientDescent,
        Implicit,
        Integrator,
        LimitReached,
        LogSpaced,
        LossBelow,
        MaxEvals,
        Observer,
        OnRecord,
        Progress,
        Sinks,
        Stall,
        Start,
        StochasticGD,
        Times,
        gradient_flow,
    )
    from .losses import (
        BinaryLogistic,
        FunctionalKL,
        Loss,
        SoftmaxCrossEntropy,
        SquareLoss,
        get_loss,
    )
    from .monitor import Monitor
    from .problem import Model, NondeterministicModelError, Problem
    from .prove import prove
    from .rayleigh import Measurement, measure, witness_bound
    from .tables import certificates_frame
    from .trajectory import Trajectory

#: Where each public name lives. ``import rayleighflow`` imports none of them (so that
#: ``rayleighflow --version`` does not load torch); each is imported on first use.
_EXPORTS: dict[str, str] = {
    "Assumption": "certificate",
    "BinaryLogistic": "losses",
    "Certificate": "certificate",
    "CertificateStatus": "certificate",
    "Checkpoint": "flow",
    "Columns": "flow",
    "Convention": "_types",
    "CrossEntropy": "desingularizers",
    "Custom": "desingularizers",
    "Dataset": "data",
    "Desingularizer": "desingularizers",
    "Dopri5": "flow",
    "Every": "flow",
    "FlowResult": "flow",
    "FlowStatus": "flow",
    "FunctionalKL": "losses",
    "Gaussian": "data",
    "GradientDescent": "flow",
    "Implicit": "flow",
    "Integrator": "flow",
    "LimitReached": "flow",
    "Log": "desingularizers",
    "LogSpaced": "flow",
    "Loss": "losses",
    "LossBelow": "flow",
    "MaxEvals": "flow",
    "Measurement": "rayleigh",
    "Model": "problem",
    "Monitor": "monitor",
    "NondeterministicModelError": "problem",
    "Observer": "flow",
    "OnRecord": "flow",
    "Params": "_types",
    "Plateau": "desingularizers",
    "Power": "desingularizers",
    "Problem": "problem",
    "Progress": "flow",
    "Reason": "certificate",
    "Reciprocal": "desingularizers",
    "Sampler": "data",
    "ScaledCrossEntropy": "desingularizers",
    "Scope": "certificate",
    "Sinks": "flow",
    "SoftmaxCrossEntropy": "losses",
    "SquareLoss": "losses",
    "Stall": "flow",
    "Start": "flow",
    "StochasticGD": "flow",
    "TeacherStudent": "data",
    "Times": "flow",
    "Trajectory": "trajectory",
    "UniformBox": "data",
    "certificates_frame": "tables",
    "certify": "certify",
    "compose": "composition",
    "get_desingularizer": "desingularizers",
    "get_loss": "losses",
    "gradient_flow": "flow",
    "kl_ratios": "certify",
    "load_sklearn": "data",
    "measure": "rayleigh",
    "quadrature": "data",
    "rank_desingularizers": "certify",
    "spectral": "composition",
    "witness_bound": "rayleigh",
}


__version__ = "0.1.0"

__all__ = [
    "Assumption", "BinaryLogistic", "Certificate", "CertificateStatus", "Checkpoint",
    "Columns", "Convention",
    "CrossEntropy", "Custom", "Dataset", "Desingularizer", "Dopri5", "Every", "FlowResult",
    "FlowStatus", "FunctionalKL", "Gaussian", "GradientDescent", "Implicit", "Integrator", "Log",
    "LimitReached", "LogSpaced", "Loss", "LossBelow", "MaxEvals", "Measurement", "Model",
    "Monitor",
    "NondeterministicModelError", "Observer", "OnRecord", "Params", "Plateau", "Power",
    "Problem", "Progress", "Reason",
    "Reciprocal", "Sampler", "ScaledCrossEntropy", "Scope", "Sinks", "SoftmaxCrossEntropy",
    "SquareLoss",
    "Stall", "Start", "StochasticGD", "TeacherStudent", "Times", "Trajectory", "UniformBox",
    "__version__", "certificates_frame", "certify", "compose",
    "get_desingularizer", "get_loss", "gradient_flow", "kl_ratios", "load_sklearn", "measure",
    "prove", "quadrature", "rank_desingularizers", "spectral", "witness_bound",
]


class _Package(types.ModuleType):
    """``rayleighflow`` itself, each public name imported on first use (``_EXPORTS``), and
    :func:`prove` too: the proofs need python-flint, which ``import rayleighflow`` does not
    load.

    ``rf.prove`` and ``rf.certify`` are the functions, not the submodules of the same names
    (reached as ``sys.modules["rayleighflow.certify"]`` or by importing from them): the import
    system's binding of a submodule on its parent is ignored where a public name is bound.
    """

    @property
    def prove(self):  # noqa: D401 - the function rayleighflow.prove.prove
        from .prove import prove as fn
        return fn

    @prove.setter
    def prove(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("rayleighflow.prove is the proof function; it cannot be set")

    def __getattr__(self, name: str) -> Any:
        where = _EXPORTS.get(name)
        if where is None:
            try:   # a submodule not imported yet: rf.data, rf.hessian, ...
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
        types.ModuleType.__setattr__(self, name, value)   # the next access skips this
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return   # the submodule certify must not replace the function certify
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), "prove", *_EXPORTS})


sys.modules[__name__].__class__ = _Package
