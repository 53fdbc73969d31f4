"""Data: finite weighted datasets D = Σ_i w_i δ_{x_i} and infinite-support samplers.

A finite dataset carries inputs ``x`` (n, ...), targets ``y`` and weights ``w`` (n,) with
w_i > 0 and Σ_i w_i = 1 (uniform by default). A sampler draws fresh i.i.d. datasets from a
distribution with possibly infinite support; randomness always comes from an explicit
``torch.Generator``.
"""

from __future__ import annotations

import abc
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import numpy as np
import torch
from torch import Tensor

from ._optional import require
from ._types import check_weights
from .seeding import numpy_rng

__all__ = [
    "Dataset",
    "Sampler",
    "UniformBox",
    "quadrature",
    "MAX_QUADRATURE_POINTS",
    "Gaussian",
    "TeacherStudent",
    "SKLEARN_DATASETS",
    "load_sklearn",
    "load_file",
    "smooth_target",
]


def _check_finite(name: str, t: Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s): clean or drop those samples before "
            "building the dataset"
        )


@final
@dataclass(frozen=True, eq=False)  # identity semantics: tensors have no boolean equality
class Dataset:
    """A finite weighted dataset D = Σ_i w_i δ_(x_i): inputs ``x`` (n, ...), targets ``y``
    ((n,) integer labels or (n, k) / (n,) real targets) and probability weights ``weights``
    (n,), w_i > 0, Σ_i w_i = 1 (uniform by default). The weights define the L²(D) inner
    product ⟨u, v⟩_D = Σ_i w_i u_i·v_i of the "mean" convention.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> data = rf.Dataset.from_arrays(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> data.n, data.x.dtype, data.y.dtype, data.is_uniform
        (4, torch.float64, torch.int64, True)
        >>> float(data.weights.sum())
        1.0
        >>> data.subset(torch.tensor([0, 1])).weights     # renormalized to sum 1
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    x: Tensor
    y: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.dim() > 0 else 0
        if n == 0:
            raise ValueError("the dataset is empty: give at least one sample")
        if self.y.dim() == 0 or self.y.shape[0] != n:
            got = "a scalar" if self.y.dim() == 0 else f"{self.y.shape[0]}"
            raise ValueError(
                f"x has {n} samples but y has {got}: inputs and targets must have "
                "the same first dimension"
            )
        if self.weights.shape != (n,):
            raise ValueError(
                f"weights must have shape ({n},), got {tuple(self.weights.shape)}"
            )
        if self.x.dim() > 1 and self.x[0].numel() == 0:
            raise ValueError(f"x has shape {tuple(self.x.shape)}: each sample has no input "
                             "feature; give the inputs as (n, features, ...)")
        _check_finite("x", self.x)
        _check_finite("y", self.y)
        check_weights(self.weights, n)

    @classmethod
    def from_arrays(
        cls,
        x: Tensor | np.ndarray,
        y: Tensor | np.ndarray,
        weights: Tensor | np.ndarray | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        index_inputs: bool = False,
    ) -> Dataset:
        """Build a dataset: inputs are cast to ``dtype`` (kept as integers with
        ``index_inputs=True``, e.g. for an embedding), integer labels stay int64, and weights
        are renormalized to sum to exactly 1."""
        xt = torch.as_tensor(x, device=device)
        xt = xt if index_inputs else xt.to(dtype)
        yt = torch.as_tensor(y, device=device)
        yt = yt.long() if _is_index(yt) else yt.to(dtype)
        n = xt.shape[0] if xt.dim() > 0 else 0
        if weights is None:
            wt = torch.full((n,), 1.0 / max(n, 1), dtype=dtype, device=device)
        else:
            wt = torch.as_tensor(weights, device=device).to(dtype)
            total = float(wt.sum()) if wt.numel() else 0.0
            if abs(total - 1.0) <= 1e-6:
                wt = wt / wt.sum()  # κ and c assume Σw = 1 exactly
        return cls(xt, yt, wt)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_uniform(self) -> bool:
        return bool(torch.allclose(self.weights, self.weights.mean().expand_as(self.weights)))

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Dataset:
        x = self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else None)
        y = self.y.to(device=device, dtype=dtype if self.y.is_floating_point() else None)
        return Dataset(x, y, self.weights.to(device=device, dtype=dtype))

    def subset(self, idx: Tensor) -> Dataset:
        w = self.weights[idx]
        return Dataset(self.x[idx], self.y[idx], w / w.sum())


def _is_index(t: Tensor) -> bool:
    return t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


Target = Callable[[Tensor], Tensor]


class Sampler(abc.ABC):
    """A distribution over (x, y) with possibly infinite support.

    ``sample(n, generator)`` returns a uniformly weighted :class:`Dataset` of n fresh draws;
    randomness comes only from that explicit ``torch.Generator``. Subclasses implement
    ``sample`` and ``description``.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> class Line(rf.Sampler):               # x ~ N(0, 1), y = 2x
        ...     def sample(self, n, generator):
        ...         x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        ...         return rf.Dataset.from_arrays(x, 2 * x)
        ...     description = "x ~ N(0, 1), y = 2x"
        >>> d = Line().sample(5, torch.Generator().manual_seed(0))
        >>> d.n, bool(torch.equal(d.y, 2 * d.x))
        (5, True)
    """

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Dataset: ...

    @property
    @abc.abstractmethod
    def description(self) -> str: ...


def _uniform_dataset(x: Tensor, y: Tensor) -> Dataset:
    n = x.shape[0]
    return Dataset(x, y, torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device))


@final
class UniformBox(Sampler):
    """x ~ Uniform[-R, R]^d, y = target(x): a distribution with infinite support.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> box = rf.UniformBox(2, 2.0, lambda x: x.sum(-1, keepdim=True))
        >>> d = box.sample(100, torch.Generator().manual_seed(0))
        >>> d.x.shape, bool(d.x.abs().max() <= 2.0), box.description
        (torch.Size([100, 2]), True, 'x ~ Uniform[-2.0, 2.0]^2')
    """

    def __init__(self, dim: int, radius: float, target: Target, *, dtype=torch.float64) -> None:
        if dim < 1 or not radius > 0:
            raise ValueError(f"need dim >= 1 and radius > 0 (got dim={dim}, radius={radius})")
        self.dim, self.radius, self.target, self.dtype = dim, float(radius), target, dtype

    def sample(self, n: int, generator: torch.Generator) -> Dataset:
        u = torch.rand(n, self.dim, generator=generator, dtype=self.dtype)
        x = (2.0 * u - 1.0) * self.radius
        return _uniform_dataset(x, self.target(x))

    @property
    def description(self) -> str:
        return f"x ~ Uniform[-{self.radius}, {self.radius}]^{self.dim}"


#: The most nodes :func:`quadrature` builds (points_per_dim^dim): beyond it, sample instead.
MAX_QUADRATURE_POINTS = 1 << 20


def quadrature(box: UniformBox, points_per_dim: int) -> Dataset:
    """The population of ``box`` as a finite weighted dataset: the tensor Gauss–Legendre rule
    with ``points_per_dim`` nodes per coordinate on [−R, R]^d, targets ``box.target`` at the
    nodes, weights the rule's (normalized, Σw = 1).

    Σ_i w_i f(x_i) equals E_{x~Uniform[−R,R]^d} f(x) exactly for polynomials of degree
    ≤ 2·points_per_dim − 1 in each coordinate, and converges geometrically for analytic f (a
    network with analytic activation composed with a square loss and an analytic target), so
    the loss on this dataset is the population loss up to the rule's error: compare with a
    finer rule to state it. Needs points_per_dim^d ≤ :data:`MAX_QUADRATURE_POINTS` (d ≤ 3 in
    practice); in higher dimension use a Monte Carlo sample of ``box``.

    Example:
        >>> import torch, rayleighflow as rf
        >>> box = rf.UniformBox(2, 1.0, lambda x: (x ** 4).sum(-1, keepdim=True))
        >>> rule = rf.quadrature(box, 3)
        >>> rule.n, round(float(rule.weights @ rule.y[:, 0]), 12)    # E[x₁⁴ + x₂⁴] = 2/5
        (9, 0.4)
    """
    if not isinstance(box, UniformBox):
        raise TypeError(f"quadrature integrates over a UniformBox (got {type(box).__name__}); "
                        "other distributions: sample them")
    if isinstance(points_per_dim, bool) or not isinstance(points_per_dim, int) \
            or points_per_dim < 1:
        raise ValueError(f"points_per_dim must be an integer ≥ 1 (got {points_per_dim!r})")
    total = points_per_dim ** box.dim
    if total > MAX_QUADRATURE_POINTS:
        raise ValueError(f"a tensor rule with {points_per_dim} points in each of {box.dim} "
                         f"dimensions has {total:.3g} nodes > {MAX_QUADRATURE_POINTS}: use "
                         "fewer points per dimension, or a Monte Carlo sample (box.sample)")
    nodes, weights = np.polynomial.legendre.leggauss(points_per_dim)
    grids = np.meshgrid(*([nodes] * box.dim), indexing="ij")
    wgrids = np.meshgrid(*([weights] * box.dim), indexing="ij")
    x = np.stack([g.ravel() for g in grids], axis=1) * box.radius
    w = np.prod(np.stack([g.ravel() for g in wgrids], axis=1), axis=1)
    xt = torch.as_tensor(x, dtype=box.dtype)
    return Dataset.from_arrays(xt, box.target(xt), w / w.sum(), dtype=box.dtype)


@final
class Gaussian(Sampler):
    """x ~ N(0, σ² I_d), y = target(x).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> gauss = rf.Gaussian(3, torch.sin, std=0.5)
        >>> d = gauss.sample(4, torch.Generator().manual_seed(0))
        >>> d.x.shape, bool(torch.equal(d.y, torch.sin(d.x))), gauss.description
        (torch.Size([4, 3]), True, 'x ~ N(0, 0.5^2 I_3)')
    """

    def __init__(self, dim: int, target: Target, *, std: float = 1.0, dtype=torch.float64) -> None:
        if dim < 1 or not std > 0:
            raise ValueError(f"need dim >= 1 and std > 0 (got dim={dim}, std={std})")
        self.dim, self.std, self.target, self.dtype = dim, float(std), target, dtype

    def sample(self, n: int, generator: torch.Generator) -> Dataset:
        x = self.std * torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return _uniform_dataset(x, self.target(x))

    @property
    def description(self) -> str:
        return f"x ~ N(0, {self.std}^2 I_{self.dim})"


@final
class TeacherStudent(Sampler):
    """Gaussian inputs labelled by a fixed teacher: x ~ N(0, I_d), y = teacher(x), or
    argmax_c teacher(x)_c with ``classify=True`` (labels 0..k−1).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> teacher = torch.nn.Linear(2, 3).double()
        >>> d = rf.TeacherStudent(teacher, 2, classify=True).sample(6, torch.Generator())
        >>> d.y.dtype, bool(torch.equal(d.y, teacher(d.x).argmax(-1)))
        (torch.int64, True)
    """

    def __init__(
        self, teacher: Callable[[Tensor], Tensor], dim: int, *, classify: bool = False,
        dtype=torch.float64,
    ) -> None:
        self.teacher, self.dim, self.classify, self.dtype = teacher, dim, classify, dtype

    def sample(self, n: int, generator: torch.Generator) -> Dataset:
        x = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        with torch.no_grad():
            out = self.teacher(x)
        y = out.argmax(dim=-1) if self.classify else out
        return _uniform_dataset(x, y)

    @property
    def description(self) -> str:
        kind = "classification" if self.classify else "regression"
        return f"teacher-student {kind}, x ~ N(0, I_{self.dim})"


def smooth_target(x: Tensor) -> Tensor:
    """A continuous, non-polynomial target on R^d: sin(x·a) + ½ cos(2 x·b), shape (n, 1)."""
    d = x.shape[-1]
    idx = torch.arange(1, d + 1, dtype=x.dtype, device=x.device)
    a = 1.0 / idx
    b = torch.cos(idx) / math.sqrt(d)
    return (torch.sin(x @ a) + 0.5 * torch.cos(2.0 * (x @ b))).unsqueeze(-1)


SKLEARN_DATASETS = ("iris", "wine", "breast_cancer", "digits")


def load_sklearn(
    name: str,
    *,
    n_samples: int | None = None,
    classes: tuple[int, ...] | None = None,
    standardize: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Dataset:
    """A real dataset bundled with scikit-learn (no download), labels relabelled 0..k-1.

    ``classes`` keeps only those original classes; ``n_samples`` keeps a seeded random subset;
    ``standardize`` centres each feature and divides by its standard deviation. The weights
    are uniform, w_i = 1/n. Names: ``"iris"``, ``"wine"``, ``"breast_cancer"``, ``"digits"``.

    Example:
        >>> import rayleighflow as rf
        >>> wine = rf.load_sklearn("wine")
        >>> wine.n, tuple(wine.x.shape), sorted(set(wine.y.tolist()))
        (178, (178, 13), [0, 1, 2])
        >>> iris2 = rf.load_sklearn("iris", classes=(1, 2), n_samples=20)
        >>> iris2.n, sorted(set(iris2.y.tolist()))             # relabelled 0..k−1
        (20, [0, 1])
    """
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(SKLEARN_DATASETS)}")
    skd = require("sklearn.datasets", "data", f"the dataset {name!r} (load_sklearn)")
    bunch = getattr(skd, f"load_{name}")()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
    _, y = np.unique(y, return_inverse=True)
    if n_samples is not None and n_samples < len(y):
        idx = np.sort(numpy_rng(seed).choice(len(y), n_samples, replace=False))
        x, y = x[idx], y[idx]
    if standardize:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return Dataset.from_arrays(x, y, dtype=dtype)


def load_file(path: str, *, target: str | None = None,
              dtype: torch.dtype = torch.float64) -> Dataset:
    """Load a CSV (y is the column named ``target``, default the last) or an NPZ with x, y."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a data file: name the .csv or "
                                ".npz file in it")
    if path.endswith(".npz"):
        try:
            with np.load(path) as z:
                missing = {"x", "y"} - set(z.files)
                if missing:
                    raise ValueError(f"{path}: NPZ must contain arrays 'x' and 'y' (missing "
                                     f"{missing})")
                x, y = z["x"], z["y"]
                w = z["weights"] if "weights" in z.files else None
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            if isinstance(err, FileNotFoundError | IsADirectoryError):
                raise
            raise ValueError(f"{path}: not a readable NPZ archive ({type(err).__name__}: "
                             f"{err}); the file is truncated or not made by np.savez: write it "
                             "again with np.savez(path, x=x, y=y)") from None
        return Dataset.from_arrays(x, y, w, dtype=dtype)
    if path.endswith(".csv"):
        with open(path) as fh:
            header = [h.strip() for h in fh.readline().split(",")]
        has_header = not all(_is_number(h) for h in header)
        arr = np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, ndmin=2)
        if target is not None and target not in header:
            where = f"its header is {', '.join(header)}" if has_header else "it has no header row"
            raise ValueError(f"{path}: target {target!r} is not a column ({where})")
        col = header.index(target) if target is not None else arr.shape[1] - 1
        y = arr[:, col]
        x = np.delete(arr, col, axis=1)
        if np.all(y == np.round(y)) and y.min() >= 0:
            y = y.astype(np.int64)
            labels = np.unique(y)
            if labels[-1] >= 2 * labels.size:   # {0, 1, 1000000} would make 1000001 classes
                shown = ", ".join(str(v) for v in labels[:6]) + (", ..." if labels.size > 6 else "")
                raise ValueError(
                    f"{path}: the integer labels {{{shown}}} ({labels.size} distinct) would "
                    f"make {labels[-1] + 1} classes: renumber them 0..{labels.size - 1} (e.g. "
                    "np.unique(y, return_inverse=True)), or give real targets as floats "
                    "(1.0) for a square loss")
        return Dataset.from_arrays(x, y, dtype=dtype)
    raise ValueError(f"{path}: unsupported data file; use .csv or .npz")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
