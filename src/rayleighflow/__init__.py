"""rayleighflow: certify and diagnose gradient-flow convergence through Rayleigh quotients of
the neural tangent kernel and Kurdyka–Łojasiewicz inequalities (Robin, Scaman, Lelarge, 2022).

The numerical core: :class:`Problem` (model + data + loss), :func:`measure` (R(K; ∇ℓ) at one
backward pass), :func:`gradient_flow` (a recorded :class:`Trajectory`), :func:`certify` and
:func:`compose` (KL certificates), the desingularizer family, and the NTK engine in
:mod:`rayleighflow.ntk`.
"""

from __future__ import annotations

from ._types import Convention, Params
from .certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from .certify import certify, kl_ratios, rank_desingularizers
from .composition import compose, spectral
from .data import Dataset, Gaussian, Sampler, TeacherStudent, UniformBox, load_sklearn
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
    Integrator,
    LogSpaced,
    LossBelow,
    MaxEvals,
    Observer,
    OnRecord,
    Progress,
    Stall,
    Start,
    StochasticGD,
    Times,
    gradient_flow,
)
from .losses import BinaryLogistic, FunctionalKL, SoftmaxCrossEntropy, SquareLoss, get_loss
from .monitor import Monitor
from .problem import Model, NondeterministicModelError, Problem
from .prove import prove
from .rayleigh import Measurement, measure, witness_bound
from .trajectory import Trajectory

__version__ = "0.1.0"

__all__ = [
    "Assumption", "BinaryLogistic", "Certificate", "CertificateStatus", "Checkpoint",
    "Columns", "Convention",
    "CrossEntropy", "Custom", "Dataset", "Desingularizer", "Dopri5", "Every", "FlowResult",
    "FlowStatus", "FunctionalKL", "Gaussian", "GradientDescent", "Integrator", "Log",
    "LogSpaced", "LossBelow", "MaxEvals", "Measurement", "Model", "Monitor",
    "NondeterministicModelError", "Observer", "OnRecord", "Params", "Plateau", "Power",
    "Problem", "Progress", "Reason",
    "Reciprocal", "Sampler", "ScaledCrossEntropy", "Scope", "SoftmaxCrossEntropy", "SquareLoss",
    "Stall", "Start", "StochasticGD", "TeacherStudent", "Times", "Trajectory", "UniformBox",
    "__version__", "certify", "compose",
    "get_desingularizer", "get_loss", "gradient_flow", "kl_ratios", "load_sklearn", "measure",
    "prove", "rank_desingularizers", "spectral", "witness_bound",
]
