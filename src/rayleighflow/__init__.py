"""rayleighflow: certify and diagnose gradient-flow convergence through Rayleigh quotients of
the neural tangent kernel and Kurdyka–Łojasiewicz inequalities (Robin, Scaman, Lelarge, 2022).

The numerical core: :class:`Problem` (model + data + loss), :func:`measure` (R(K; ∇ℓ) at one
backward pass), :func:`gradient_flow` (a recorded :class:`Trajectory`), :func:`certify` and
:func:`compose` (KL certificates), the desingularizer family, and the NTK engine in
:mod:`rayleighflow.ntk`.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

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
from .losses import BinaryLogistic, FunctionalKL, Loss, SoftmaxCrossEntropy, SquareLoss, get_loss
from .monitor import Monitor
from .problem import Model, NondeterministicModelError, Problem
from .rayleigh import Measurement, measure, witness_bound
from .tables import certificates_frame
from .trajectory import Trajectory

if TYPE_CHECKING:
    from .prove import prove

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
    """``rayleighflow`` itself, with :func:`prove` loaded on first use: the proofs need
    python-flint, which ``import rayleighflow`` does not load.

    ``rf.prove`` is the function, not the subpackage ``rayleighflow.prove`` of the same name
    (reached as ``sys.modules["rayleighflow.prove"]`` or by importing from it): the import
    system's binding of the subpackage on its parent is ignored.
    """

    @property
    def prove(self):  # noqa: D401 - the function rayleighflow.prove.prove
        from .prove import prove as fn
        return fn

    @prove.setter
    def prove(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("rayleighflow.prove is the proof function; it cannot be set")

    def __dir__(self):
        return sorted({*super().__dir__(), "prove"})


sys.modules[__name__].__class__ = _Package
