"""The schema of a user experiment's configuration: one frozen dataclass per TOML table, each
field with its type, default and range (read and checked by :mod:`.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .._types import Convention
from ..activations import ACTIVATION_NAMES
from ..data import SKLEARN_DATASETS
from ..flow import (
    Dopri5,
    Every,
    GradientDescent,
    Implicit,
    LimitReached,
    LogSpaced,
    LossBelow,
    MaxEvals,
    StochasticGD,
)
from ..losses import LOSS_NAMES
from ._toml import _spec
from ._toml import find_line as find_line  # re-exported: used by builders
from ._toml import key_lines as key_lines  # re-exported: used by builders

ACTIVATIONS = ACTIVATION_NAMES  # the registry's names (rayleighflow.activations)
# (classes, features, samples) of the bundled scikit-learn sets: checked without loading them.
SKLEARN_SHAPES = {"iris": (3, 4, 150), "wine": (3, 13, 178), "breast_cancer": (2, 30, 569),
                  "digits": (10, 64, 1797)}


# ----------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class MLPConfig:
    """``kind = "mlp"``: (Linear → activation) per hidden width, then Linear to the output.

    Empty ``widths`` is a linear model. Unset ``input_dim``/``output_dim`` are inferred from the
    data and the loss; set, they are checked against them.
    """

    kind: ClassVar[str] = "mlp"
    widths: tuple[int, ...] = _spec("integers", (64, 64), ge=1)
    activation: str = _spec("string", "tanh", choices=ACTIVATIONS)
    bias: bool = _spec("boolean", True)
    input_dim: int | None = _spec("integer", None, ge=1, unset="inferred from the data")
    output_dim: int | None = _spec("integer", None, ge=1, unset="inferred from data and loss")
    init_scale: float = _spec("number", 1.0, gt=0)


@dataclass(frozen=True)
class CNNConfig:
    """``kind = "cnn"``: per channel count, Conv2d ('same' padding) → activation → pooling,
    then flatten → Linear. Flat inputs are reshaped to ``input_shape`` = [C, H, W].

    ``pooling = "avg"`` keeps f_θ smooth in θ: max-pooling's kinks make the adaptive integrator
    reject steps (about 25× more gradient evaluations on digits).
    """

    kind: ClassVar[str] = "cnn"
    channels: tuple[int, ...] = _spec("integers", (8, 16), ge=1, min_size=1)
    kernel_size: int = _spec("integer", 3, ge=1)
    pool: int = _spec("integer", 2, ge=1)
    pooling: str = _spec("string", "max", choices=("max", "avg"))
    activation: str = _spec("string", "tanh", choices=ACTIVATIONS)
    bias: bool = _spec("boolean", True)
    input_shape: tuple[int, ...] | None = _spec("integers", None, ge=1, size=3,
                                                unset="the data's own (n, C, H, W) shape")
    output_dim: int | None = _spec("integer", None, ge=1, unset="inferred from data and loss")
    init_scale: float = _spec("number", 1.0, gt=0)


@dataclass(frozen=True)
class ImportConfig:
    """``kind = "import"``: ``factory(**kwargs)`` must return an ``nn.Module``.

    ``factory`` is "package.module:function" or "path/to/file.py:function" (stored absolute).
    """

    kind: ClassVar[str] = "import"
    factory: str = _spec("factory")
    kwargs: dict[str, Any] = _spec("table", {})
    init_scale: float = _spec("number", 1.0, gt=0)


@dataclass(frozen=True)
class SklearnData:
    """A dataset bundled with scikit-learn, labels relabelled 0..k-1, features standardized."""

    kind: ClassVar[str] = "sklearn"
    population: ClassVar[bool] = False
    name: str = _spec("string", choices=SKLEARN_DATASETS)
    n_samples: int | None = _spec("integer", None, ge=1, unset="all samples")
    classes: tuple[int, ...] | None = _spec("integers", None, ge=0, min_size=2,
                                            unset="all classes")
    standardize: bool = _spec("boolean", True)


def _n_samples() -> Any:
    return _spec("integer", None, ge=1, unset="population = true: a sampler")


@dataclass(frozen=True)
class UniformData:
    """x ~ Uniform[-radius, radius]^dim, y = target(x); a sampler or a fixed sample."""

    kind: ClassVar[str] = "uniform"
    dim: int = _spec("integer", ge=1)
    radius: float = _spec("number", 1.0, gt=0)
    target: str = _spec("string", "smooth", choices=("smooth",))
    population: bool = _spec("boolean", False)
    n_samples: int | None = _n_samples()


@dataclass(frozen=True)
class GaussianData:
    """x ~ N(0, std² I_dim), y = target(x); a sampler or a fixed sample."""

    kind: ClassVar[str] = "gaussian"
    dim: int = _spec("integer", ge=1)
    std: float = _spec("number", 1.0, gt=0)
    target: str = _spec("string", "smooth", choices=("smooth",))
    population: bool = _spec("boolean", False)
    n_samples: int | None = _n_samples()


@dataclass(frozen=True)
class TeacherStudentData:
    """Gaussian x labelled by a seeded random tanh network dim → teacher_width → outputs.

    ``classify = true``: labels are the teacher's argmax, ``outputs`` the number of classes.
    """

    kind: ClassVar[str] = "teacher-student"
    dim: int = _spec("integer", ge=1)
    outputs: int = _spec("integer", 1, ge=1)
    classify: bool = _spec("boolean", False)
    teacher_width: int = _spec("integer", 32, ge=1)
    population: bool = _spec("boolean", False)
    n_samples: int | None = _n_samples()


@dataclass(frozen=True)
class FileData:
    """``kind = "csv"`` (y is the header column ``target``, else the last column) or ``"npz"``
    (arrays x, y and optional weights)."""

    population: ClassVar[bool] = False
    kind: str = _spec("string", choices=("csv", "npz"))
    path: Path = _spec("path")
    target: str | None = _spec("string", None, unset="the last column")
    n_samples: int | None = _spec("integer", None, ge=1, unset="all samples")


@dataclass(frozen=True)
class LossConfig:
    """``one_hot`` (square loss only): class labels become one-hot targets of width k."""

    name: str = _spec("string", choices=LOSS_NAMES)
    one_hot: bool = _spec("boolean", False)


@dataclass(frozen=True)
class GradientDescentConfig:
    """``kind = "gradient-descent"``: full-batch θ ← θ − η∇L(θ), recorded at t = kη."""

    kind: ClassVar[str] = "gradient-descent"
    step: float = _spec("number", gt=0)

    def build(self) -> GradientDescent:
        return GradientDescent(self.step)


@dataclass(frozen=True)
class StochasticGDConfig:
    """``kind = "stochastic-gd"``: the same step on ``batch_size`` fresh samples of the
    population per step (``data.population = true``)."""

    kind: ClassVar[str] = "stochastic-gd"
    step: float = _spec("number", gt=0)
    batch_size: int = _spec("integer", ge=1)

    def build(self) -> StochasticGD:
        return StochasticGD(self.step, self.batch_size)


@dataclass(frozen=True)
class Dopri5Config:
    """``kind = "dopri5"``: adaptive Dormand–Prince Runge–Kutta with ``rtol``/``atol``."""

    kind: ClassVar[str] = "dopri5"
    rtol: float = _spec("number", 1e-7, gt=0)
    atol: float = _spec("number", 1e-9, ge=0)

    def build(self) -> Dopri5:
        return Dopri5(self.rtol, self.atol)


@dataclass(frozen=True)
class ImplicitConfig:
    """``kind = "implicit"``: scipy's stiff solvers (``method`` LSODA, BDF or Radau) with the
    exact Hessian as Jacobian, for flows run to their limits (P ≤ 4096)."""

    kind: ClassVar[str] = "implicit"
    method: str = _spec("string", "LSODA", choices=("LSODA", "BDF", "Radau"))
    rtol: float = _spec("number", 1e-8, gt=0)
    atol: float = _spec("number", 1e-12, gt=0)

    def build(self) -> Implicit:
        return Implicit(self.method, self.rtol, self.atol)


@dataclass(frozen=True)
class LogRecordsConfig:
    """``kind = "log"``: records at t = 0 and ``n − 1`` log-spaced times up to t_max."""

    kind: ClassVar[str] = "log"
    n: int = _spec("integer", 60, ge=2)

    def build(self) -> LogSpaced:
        return LogSpaced(self.n)


@dataclass(frozen=True)
class EveryRecordsConfig:
    """``kind = "every"``: a record every ``steps`` steps of a fixed-step integrator."""

    kind: ClassVar[str] = "every"
    steps: int = _spec("integer", ge=1)

    def build(self) -> Every:
        return Every(self.steps)


@dataclass(frozen=True)
class StopConfig:
    """Stop rules besides t_max: ``loss_below`` (checked at records), ``limit_grad_rtol``
    (the limit reached: ‖∇L‖² ≤ limit_grad_rtol·L at a record), ``max_evals`` (gradient
    evaluations; adaptive runs default to 1e6)."""

    loss_below: float | None = _spec("number", None, gt=0, unset="run to t_max")
    limit_grad_rtol: float | None = _spec("number", None, gt=0, unset="run to t_max")
    max_evals: int | None = _spec("integer", None, ge=1, unset="no limit (adaptive: 1e6)")

    def build(self) -> list[LossBelow | LimitReached | MaxEvals]:
        stops: list[LossBelow | LimitReached | MaxEvals] = []
        if self.loss_below is not None:
            stops.append(LossBelow(self.loss_below))
        if self.limit_grad_rtol is not None:
            stops.append(LimitReached(self.limit_grad_rtol))
        if self.max_evals is not None:
            stops.append(MaxEvals(self.max_evals))
        return stops


IntegratorConfig = GradientDescentConfig | StochasticGDConfig | Dopri5Config | ImplicitConfig
RecordsConfig = LogRecordsConfig | EveryRecordsConfig
_INTEGRATORS: dict[str, type] = {"gradient-descent": GradientDescentConfig,
                                 "stochastic-gd": StochasticGDConfig, "dopri5": Dopri5Config,
                                 "implicit": ImplicitConfig}
_RECORDS: dict[str, type] = {"log": LogRecordsConfig, "every": EveryRecordsConfig}
_FLOW_TABLES = ("integrator", "records", "stop")


@dataclass(frozen=True)
class FlowConfig:
    """``[flow]``: ``t_max``, ``eval_size`` (sampler data), and the tables
    ``[flow.integrator]``, ``[flow.records]`` and ``[flow.stop]``; see :meth:`kwargs`."""

    t_max: float = _spec("number", 100.0, gt=0)
    eval_size: int = _spec("integer", 4096, ge=1)
    integrator: IntegratorConfig = field(default_factory=Dopri5Config)
    records: RecordsConfig = field(default_factory=LogRecordsConfig)
    stop: StopConfig = field(default_factory=StopConfig)

    def kwargs(self) -> dict[str, Any]:
        """``gradient_flow(problem, generator=..., **flow.kwargs())``."""
        return {"integrator": self.integrator.build(), "t_max": self.t_max,
                "records": self.records.build(), "stops": self.stop.build()}


# the flat [flow] keys of version 0.1's first form, each with the table it now belongs in
_FLAT_KEYS = {
    "method": "[flow.integrator] as kind = 'gradient-descent' | 'stochastic-gd' | 'dopri5'",
    "step": "[flow.integrator] (kind = 'gradient-descent' or 'stochastic-gd')",
    "batch_size": "[flow.integrator] (kind = 'stochastic-gd')",
    "rtol": "[flow.integrator] (kind = 'dopri5')",
    "atol": "[flow.integrator] (kind = 'dopri5')",
    "n_records": "[flow.records] as n (kind = 'log')",
    "loss_target": "[flow.stop] as loss_below",
    "max_steps": "[flow.stop] as max_evals",
}


@dataclass(frozen=True)
class DiagnosticsConfig:
    """``spectrum_every``: NTK spectrum every N records (0 = never); ``groups``: per-group R."""

    spectrum_every: int = _spec("integer", 0, ge=0)
    groups: bool = _spec("boolean", True)


@dataclass(frozen=True)
class CertifyConfig:
    """Desingularizers to certify with, an optional Rayleigh lower bound and stated μ's."""

    desingularizers: tuple[str, ...] = _spec("strings", ("log", "reciprocal", "cross-entropy"),
                                             min_size=1)
    rayleigh_lower: float | None = _spec("number", None, gt=0, unset="the observed minimum")
    mu: dict[str, float] = _spec("numbers", {}, gt=0)
    rtol: float = _spec("number", 1e-6, ge=0)
    atol: float = _spec("number", 0.0, ge=0)


ModelConfig = MLPConfig | CNNConfig | ImportConfig
DataConfig = SklearnData | UniformData | GaussianData | TeacherStudentData | FileData
_MODELS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "import": ImportConfig}
_DATA: dict[str, type] = {"sklearn": SklearnData, "uniform": UniformData,
                          "gaussian": GaussianData, "teacher-student": TeacherStudentData,
                          "csv": FileData, "npz": FileData}
_NOT_FOR_KIND = {"npz": ("target",)}
_SECTIONS = ("model", "data", "loss", "flow", "diagnostics", "certify")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``source`` is the TOML file it came from (not compared)."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    name: str = _spec("string", "experiment")
    seed: int = _spec("integer", 0, ge=0, le=2**32 - 1)  # registry.MAX_SEED, the CLI's range
    dtype: str = _spec("string", "float64", choices=("float64", "float32"))
    device: str = _spec("string", "cpu")
    convention: Convention = _spec("string", Convention.MEAN, choices=("mean", "sum"),
                                   enum=Convention)
    flow: FlowConfig = field(default_factory=FlowConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    source: Path | None = field(default=None, compare=False)
