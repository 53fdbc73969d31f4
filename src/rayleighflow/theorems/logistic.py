"""R2: linear softmax regression converges, with a certified bound (THEORY.md §3, §4, §6 R2).

Model f_W(x) = Wᵀx with W ∈ R^{d×k} (no bias: append a constant feature for one). Data are
weighted points (x_i, y_i) with weights w_i > 0, Σ_i w_i = 1 (uniform 1/n by default), and the
loss is the L²(D) ("mean") convention L(W) = Σ_i w_i CE(Wᵀx_i, y_i).

If some W* with ‖W*‖_F = 1 has normalized margin (W*ᵀx_i)_{y_i} − max_{j≠y_i}(W*ᵀx_i)_j ≥ ε for
every i, the witness direction −W* gives, for EVERY W (a global KL inequality),

    ‖∇L(W)‖² ≥ κ²ε²(1 − e^{−L(W)})²,    κ = min_i w_i (isolation),  μ = κ²ε².

Integrating with the cross-entropy desingularizer φ(u) = log(e^u − 1) − 1/(e^u − 1),
C = φ(L₀), and ω = W0(exp(μt − C)) (principal Lambert branch, via wrightomega):

    derived:  L(W_t) ≤ log(1 + 1/ω)   (= φ⁻¹(φ(L₀) − μt), always positive; shipped)
    slides:   L(W_t) ≤ log(1/ω)       (printed form; negative once ω > 1, i.e. t > (C + 1)/μ)

The best ε is the multiclass hard-margin SVM: minimize ½‖W‖²_F subject to
(w_{y_i} − w_j)·x_i ≥ 1 for all i, j ≠ y_i; then ε = 1/‖W‖_F. For two classes this is √2 times
the binary (bias-free) SVM margin, because the Frobenius norm counts both columns.

Example::

    X, y = teacher_student(n=50, d=3, k=3, seed=0)
    cert = margin_certificate(X, y, 3, loss0=5.0)
    cert.bound([0.0, 1e3]), cert.first_slide_failure(np.geomspace(1, 1e9, 50))
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special

from rayleighflow._types import check_weights
from rayleighflow.desingularizers import CrossEntropy, ScaledCrossEntropy

__all__ = [
    "AdversarialProblem",
    "LabeledData",
    "LogisticCertificate",
    "SeparationStatus",
    "Separator",
    "adversarial",
    "isolation",
    "margin_certificate",
    "max_margin_separator",
    "normalized_margin",
    "sklearn_separable",
    "softmax_cross_entropy",
    "teacher_student",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


class SeparationStatus(enum.Enum):
    """Outcome of :func:`max_margin_separator`."""

    SEPARATED = "separated"
    """The returned W has a strictly positive measured margin."""
    NOT_SEPARABLE = "not_separable"
    """No positive margin found: add a bias feature or restrict to separable classes."""


@final
@dataclass(frozen=True, eq=False)
class Separator:
    """A unit-Frobenius-norm W (d×k) and its MEASURED normalized margin over the data."""

    W: FloatArray
    margin: float
    status: SeparationStatus
    iterations: int
    solver_message: str


def _check_data(X: ArrayLike, y: ArrayLike, n_classes: int) -> tuple[FloatArray, IntArray, int]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array (n, d); got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite entries")
    y_raw = np.asarray(y)
    if y_raw.ndim != 1:
        raise ValueError(f"y must be a 1-D array of integer labels; got shape {y_raw.shape}")
    if y_raw.shape[0] != X.shape[0]:
        raise ValueError(
            f"X and y have mismatched lengths: X has {X.shape[0]} rows, y has {y_raw.shape[0]}"
        )
    if not np.issubdtype(y_raw.dtype, np.integer):
        if not (np.issubdtype(y_raw.dtype, np.floating) and np.all(y_raw == np.round(y_raw))):
            raise ValueError(f"y must hold integer labels; got dtype {y_raw.dtype}")
    k = operator.index(n_classes)
    if k < 2:
        raise ValueError(f"n_classes must be at least 2; got {k}")
    y_int = y_raw.astype(np.int64)
    if y_int.min() < 0 or y_int.max() >= k:
        raise ValueError(
            f"labels must lie in [0, n_classes) = [0, {k}); "
            f"got range [{y_int.min()}, {y_int.max()}]"
        )
    return X, y_int, k


def _margins(X: FloatArray, y: IntArray, W: FloatArray) -> FloatArray:
    """Per-sample (Wᵀx_i)_{y_i} − max_{j≠y_i}(Wᵀx_i)_j for the W given (not normalized)."""
    scores = X @ W
    rows = np.arange(len(y))
    true = scores[rows, y]
    scores[rows, y] = -np.inf
    return true - scores.max(axis=1)


def normalized_margin(X: ArrayLike, y: ArrayLike, W: ArrayLike) -> float:
    """min_i (Ŵᵀx_i)_{y_i} − max_{j≠y_i}(Ŵᵀx_i)_j with Ŵ = W/‖W‖_F: any W's own valid ε."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D array (d, k); got shape {W.shape}")
    X, y_int, _ = _check_data(X, y, W.shape[1])
    if X.shape[1] != W.shape[0]:
        raise ValueError(f"X has {X.shape[1]} features but W has {W.shape[0]} rows")
    norm = np.linalg.norm(W)
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError("W must be finite and nonzero")
    return float(_margins(X, y_int, W / norm).min())


def _polish(Xs: FloatArray, y: IntArray, other: IntArray, alpha: FloatArray) -> FloatArray:
    """Active-set Newton step: make the support constraints tight exactly (G_S α_S = 1)."""
    i, c = np.nonzero(alpha > 1e-8 * alpha.max(initial=0.0))
    if i.size == 0:
        return alpha
    j = other[i, c]
    # Gram of the constraint matrices x_a(e_{y_a} − e_{j_a})ᵀ: (x_a·x_b)·(E_a·E_b).
    E = np.eye(alpha.shape[1] + 1)[y[i]] - np.eye(alpha.shape[1] + 1)[j]
    G = (Xs[i] @ Xs[i].T) * (E @ E.T)
    out = np.zeros_like(alpha)
    out[i, c] = np.linalg.lstsq(G, np.ones(i.size), rcond=None)[0]
    return out


def _best(
    X: FloatArray, y: IntArray, k: int, candidates: list[FloatArray]
) -> tuple[FloatArray, float]:
    """The candidate W (normalized) with the largest measured margin on the ORIGINAL X."""
    best: tuple[FloatArray, float] | None = None
    for W in candidates:
        norm = float(np.linalg.norm(W))
        if np.isfinite(norm) and norm > 0:
            margin = float(_margins(X, y, W / norm).min())
            if best is None or margin > best[1]:
                best = (W / norm, margin)
    if best is None:  # every candidate degenerate (α = 0): any unit W, measured honestly
        W = np.eye(X.shape[1], k) / math.sqrt(min(X.shape[1], k))
        return W, float(_margins(X, y, W).min())
    return best


def max_margin_separator(
    X: ArrayLike, y: ArrayLike, n_classes: int, *, max_iter: int = 50_000
) -> Separator:
    """Multiclass hard-margin SVM through its dual, a bound-constrained QP (L-BFGS-B).

    Dual: maximize Σα − ½‖Σ_{i,j≠y_i} α_ij x_i(e_{y_i} − e_j)ᵀ‖²_F over α ≥ 0, and
    W = Σ α_ij x_i(e_{y_i} − e_j)ᵀ. X is divided by its largest row norm first (the margin scales
    linearly with x, and the measured margin is taken on the original X). An upper bound
    α ≤ 1e12 keeps the dual bounded on non-separable data (it is then a soft-margin SVM); on
    separable data it is inactive unless the normalized margin is below ~1e-6. An active-set
    step then solves the support constraints exactly; the better of the two W is kept (margins
    agree with a primal SLSQP solve to ~1e-14 relative in the tests).

    The returned margin is always the one measured on the returned W, so it is a valid ε even if
    the solver stopped early. Status is SEPARATED when that margin exceeds 64·eps·max‖x_i‖
    (anything smaller is round-off), else NOT_SEPARABLE.
    """
    X, y_int, k = _check_data(X, y, n_classes)
    n = X.shape[0]
    scale = float(np.linalg.norm(X, axis=1).max())
    if scale == 0.0:
        return Separator(*_best(X, y_int, k, []), SeparationStatus.NOT_SEPARABLE, 0, "all x = 0")
    Xs = X / scale
    rows = np.arange(n)
    # other[i] lists the k - 1 wrong classes of sample i: the dual variables are α[i, :].
    other = np.array([[j for j in range(k) if j != c] for c in y_int], dtype=np.int64)

    def primal(alpha: FloatArray) -> FloatArray:
        A = np.zeros((n, k))
        A[rows[:, None], other] = -alpha
        A[rows, y_int] = alpha.sum(axis=1)
        return Xs.T @ A

    def objective(flat: FloatArray) -> tuple[float, FloatArray]:
        alpha = flat.reshape(n, k - 1)
        W = primal(alpha)
        S = Xs @ W
        grad = S[rows, y_int][:, None] - S[rows[:, None], other] - 1.0
        return 0.5 * float(np.sum(W * W)) - float(alpha.sum()), grad.ravel()

    res = optimize.minimize(
        objective,
        np.zeros(n * (k - 1)),
        jac=True,
        method="L-BFGS-B",
        bounds=optimize.Bounds(0.0, 1e12),
        options={
            "maxiter": max_iter,
            "maxfun": 2 * max_iter,
            "ftol": 1e-16,
            "gtol": 1e-12,
            "maxcor": 50,
        },
    )
    alpha = res.x.reshape(n, k - 1)
    W, margin = _best(X, y_int, k, [primal(alpha), primal(_polish(Xs, y_int, other, alpha))])
    separated = margin > 64 * np.finfo(np.float64).eps * scale
    status = SeparationStatus.SEPARATED if separated else SeparationStatus.NOT_SEPARABLE
    return Separator(W, margin, status, int(res.nit), str(res.message))


def isolation(weights: ArrayLike) -> float:
    """κ = min_i w_i for probability weights (see :func:`rayleighflow._types.check_weights`)."""
    check_weights(weights)
    return float(np.min(np.asarray(weights, dtype=np.float64)))


def _weights(weights: ArrayLike | None, n: int) -> FloatArray:
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    check_weights(w, n)
    return w


def softmax_cross_entropy(
    X: ArrayLike, y: ArrayLike, W: ArrayLike, weights: ArrayLike | None = None
) -> tuple[float, FloatArray]:
    """L(W) = Σ_i w_i CE(Wᵀx_i, y_i) and ∇L = Σ_i w_i x_i (p_i − e_{y_i})ᵀ, stable for logits 1e10.

    Logits are shifted by their max; CE_i = M_i + log1p(Σ_{j≠argmax} e^{s_ij − M_i}) with
    s_i = logits_i − logits_{i,y_i}, M_i = max_j s_ij, so a loss of 1e-300 keeps its digits.
    """
    W = np.asarray(W, dtype=np.float64)
    X, y_int, k = _check_data(X, y, W.shape[1] if W.ndim == 2 else 0)
    if W.shape[0] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features but W has {W.shape[0]} rows")
    n = X.shape[0]
    w = _weights(weights, n)
    rows = np.arange(n)
    logits = X @ W
    s = logits - logits[rows, y_int][:, None]
    top = s.argmax(axis=1)
    e = np.exp(s - s[rows, top][:, None])
    e[rows, top] = 0.0
    per_sample = s[rows, top] + np.log1p(e.sum(axis=1))
    e[rows, top] = 1.0
    p = e / e.sum(axis=1, keepdims=True)
    # p_y − 1 = −Σ_{j≠y} p_j is exact where 1 − p_y would cancel.
    p[rows, y_int] = 0.0
    p[rows, y_int] = -p.sum(axis=1)
    return float(w @ per_sample), X.T @ (w[:, None] * p)


@final
@dataclass(frozen=True)
class LogisticCertificate:
    """Global KL certificate for linear softmax regression: ‖∇L‖² ≥ μ(1 − e^{−L})², μ = κ²ε².

    ``margin`` ε is in the units of x, ``isolation`` κ = min_i w_i, ``C`` = φ(loss0).
    ``scale`` is the smallest effective weight κ' (κ in the mean convention, n·min w_i in the
    sum convention); the sharp isolation form (CERTIFICATES.md §5) reads
    ‖∇L‖² ≥ κ'²ε²(1 − e^{−L/κ'})², hence L_t ≤ κ'·φ⁻¹(φ(L₀/κ') − κ'ε²t) (:meth:`sharp_bound`).
    """

    margin: float
    isolation: float
    C: float
    mu: float
    loss0: float
    scale: float | None = None
    convention: str = "mean"

    @property
    def kappa(self) -> float:
        """κ' of the sharp form (the isolation in the mean convention)."""
        return self.isolation if self.scale is None else self.scale

    def desingularizer(self) -> CrossEntropy:
        """φ of the classical form: cross-entropy, with μ = :attr:`mu`."""
        return CrossEntropy()

    def sharp_desingularizer(self) -> ScaledCrossEntropy:
        """φ_κ'(u) = κ'φ(u/κ') of the sharp form, with the same μ = κ'²ε²."""
        return ScaledCrossEntropy(self.kappa)

    def sharp_bound(self, t: ArrayLike) -> FloatArray:
        """κ'·φ⁻¹(φ(L₀/κ') − κ'ε²t): never above :meth:`bound`, ~1/(ε²t) at small loss."""
        return self.sharp_desingularizer().bound(self.loss0, self.mu,
                                                 np.asarray(t, dtype=np.float64))

    def best_bound(self, t: ArrayLike) -> FloatArray:
        """The pointwise minimum of the two valid bounds."""
        return np.minimum(self.bound(t), self.sharp_bound(t))

    def __post_init__(self) -> None:
        fields = {"margin": self.margin, "mu": self.mu, "loss0": self.loss0}
        for name, value in fields.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0; got {value!r}")
        if not (0 < self.isolation <= 1):
            raise ValueError(f"isolation must lie in (0, 1]; got {self.isolation!r}")
        if not (0 < self.kappa <= 1):
            raise ValueError(f"scale must lie in (0, 1]; got {self.scale!r}")
        if not math.isfinite(self.C):
            raise ValueError(f"C = φ(loss0) must be finite; got {self.C!r}")

    def bound(self, t: ArrayLike) -> FloatArray:
        """Derived bound log(1 + 1/W0(exp(μt − C))) = φ⁻¹(φ(L₀) − μt); positive for all t."""
        return CrossEntropy().bound(self.loss0, self.mu, np.asarray(t, dtype=np.float64))

    def slide_bound(self, t: ArrayLike) -> FloatArray:
        """The slides' printed log(1/W0(exp(μt − C))); NEGATIVE for t > (C + 1)/μ.

        With ω = wrightomega(z), z = μt − C: log(1/ω) = ω − z (ω + log ω = z), finite when ω
        underflows; −log ω is used once ω > 1 to avoid cancelling two large numbers.
        """
        z = self.mu * np.asarray(t, dtype=np.float64) - self.C
        omega = special.wrightomega(z)
        big = omega > 1.0
        return np.where(big, -np.log(np.where(big, omega, 1.0)), omega - z)

    def local_decrease_lower(self, L: ArrayLike) -> FloatArray:
        """Lower bound on −dL/dt = ‖∇L‖² along the flow: μ(1 − e^{−L})²."""
        return self.mu * np.square(-np.expm1(-np.asarray(L, dtype=np.float64)))

    @property
    def slide_failure_time(self) -> float:
        """Exact t where the slide bound crosses 0: W0(e^z) = 1 ⟺ z = 1 ⟺ t = (C + 1)/μ."""
        return (self.C + 1.0) / self.mu

    def first_slide_failure(self, t: ArrayLike) -> float | None:
        """Smallest time in the grid ``t`` where the slide bound is < 0, or None."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        bad = t[self.slide_bound(t) < 0]
        return float(bad.min()) if bad.size else None


def margin_certificate(
    X: ArrayLike,
    y: ArrayLike,
    n_classes: int,
    loss0: float,
    weights: ArrayLike | None = None,
    separator: Separator | None = None,
    convention: str = "mean",
) -> LogisticCertificate:
    """Certificate for L(W_t) from the initial loss L₀ (computed by the caller at W_0).

    ε is the margin of ``separator`` re-measured on (X, y) (default: the max-margin one), so any
    separator is accepted; κ = min_i w_i. Mean convention (L = Σ w_i ℓ_i): μ = κ²ε². Sum
    convention (L = Σ ω_i ℓ_i, ω_i = n w_i): μ = κ_ω²ε² with κ_ω = n κ, which is ε² for
    uniform weights. Raises ValueError when the data are not separated.
    """
    if convention not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum' (got {convention!r})")
    X, y_int, k = _check_data(X, y, n_classes)
    kappa = isolation(_weights(weights, X.shape[0]))
    loss0 = float(loss0)
    if not (math.isfinite(loss0) and loss0 > 0):
        raise ValueError(f"loss0 must be finite and > 0; got {loss0!r}")
    sep = max_margin_separator(X, y_int, k) if separator is None else separator
    if sep.W.shape != (X.shape[1], k):
        raise ValueError(f"separator W has shape {sep.W.shape}, expected {(X.shape[1], k)}")
    eps = normalized_margin(X, y_int, sep.W)
    if sep.status is SeparationStatus.NOT_SEPARABLE or eps <= 0:
        raise ValueError(
            f"data are not linearly separable by a bias-free linear map (best normalized margin "
            f"{eps:.3g} <= 0), so the linear softmax certificate does not apply; add a constant "
            f"bias feature to X, or restrict to classes that are linearly separable"
        )
    C = float(CrossEntropy().phi(loss0))
    # The witness −W* gives ‖∇L‖ ≥ ε Σ ω_i h(ℓ_i) ≥ ε κ' h(L/κ') (concavity, CERTIFICATES §5).
    scale = kappa if convention == "mean" else min(1.0, kappa * X.shape[0])
    return LogisticCertificate(eps, kappa, C, scale**2 * eps**2, loss0, scale, convention)


# --- data generators for the R2 experiment -----------------------------------------------------


class LabeledData(NamedTuple):
    X: FloatArray
    y: IntArray
    description: str


@final
@dataclass(frozen=True, eq=False)
class AdversarialProblem:
    """Inputs of scale ``input_scale`` and an initialization W0 pointing against the teacher."""

    X: FloatArray
    y: IntArray
    W0: FloatArray
    teacher: FloatArray


def _teacher(
    n: int, d: int, k: int, seed: int | np.random.Generator, min_teacher_margin: float
) -> tuple[FloatArray, IntArray, FloatArray]:
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((d, k))
    T /= np.linalg.norm(T)
    Xs: list[FloatArray] = []
    kept = 0
    for _ in range(1000):
        Z = rng.standard_normal((max(2 * n, 64), d))
        top2 = np.sort(Z @ T, axis=1)[:, -2:]
        Z = Z[top2[:, 1] - top2[:, 0] >= min_teacher_margin]
        Xs.append(Z)
        kept += len(Z)
        if kept >= n:
            break
    else:
        raise ValueError(f"min_teacher_margin={min_teacher_margin} rejects almost every point")
    X = np.concatenate(Xs)[:n]
    return X, (X @ T).argmax(axis=1).astype(np.int64), T


def teacher_student(
    n: int = 100,
    d: int = 5,
    k: int = 4,
    seed: int | np.random.Generator = 0,
    *,
    min_teacher_margin: float = 0.05,
) -> tuple[FloatArray, IntArray]:
    """x ~ N(0, I_d), y = argmax_j (Tᵀx)_j for a random teacher T (‖T‖_F = 1).

    Separable by construction (T separates). Points whose teacher margin is below
    ``min_teacher_margin`` are rejected and redrawn, so ε ≥ min_teacher_margin.
    """
    X, y, _ = _teacher(n, d, k, seed, min_teacher_margin)
    return X, y


def adversarial(
    n: int = 100,
    d: int = 5,
    k: int = 4,
    seed: int | np.random.Generator = 0,
    input_scale: float = 1e6,
    init_norm: float = 1e5,
) -> AdversarialProblem:
    """Teacher–student data times ``input_scale`` and W0 = −init_norm · T (T the unit teacher).

    Every sample then has CE ≥ init_norm · input_scale · 0.05 (its teacher margin), so
    L(W0) ≥ 5e9 at the defaults; typical values are ~1e11.
    """
    X, y, T = _teacher(n, d, k, seed, 0.05)
    return AdversarialProblem(X * input_scale, y, -init_norm * T, T)


def sklearn_separable(name: str = "iris") -> LabeledData:
    """A linearly separable dataset shipped with scikit-learn, standardized, plus a bias column.

    ``"iris"``: setosa vs versicolor (100 × 5, 2 classes). ``"wine"``: all three cultivars
    (178 × 14, 3 classes). ``"digits01"``: digits 0 vs 1 (360 × 65; constant pixels give zero
    columns). Separability of each is checked by the tests with :func:`max_margin_separator`.
    """
    from .._optional import require

    datasets = require("sklearn.datasets", "data", f"the dataset {name!r} (sklearn_separable)")

    if name == "iris":
        data = datasets.load_iris()
        mask = data.target < 2
        what = "iris, setosa (0) vs versicolor (1), 4 standardized features + bias"
    elif name == "wine":
        data = datasets.load_wine()
        mask = np.ones(len(data.target), dtype=bool)
        what = "wine, 3 cultivars, 13 standardized features + bias"
    elif name == "digits01":
        data = datasets.load_digits()
        mask = data.target < 2
        what = "digits, 0 vs 1, 64 standardized pixels + bias"
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'iris', 'wine' or 'digits01'")
    X = np.asarray(data.data, dtype=np.float64)[mask]
    y = np.asarray(data.target, dtype=np.int64)[mask]
    std = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    X = np.hstack([X, np.ones((len(X), 1))])
    _, y = np.unique(y, return_inverse=True)
    return LabeledData(X, y.astype(np.int64), what)
