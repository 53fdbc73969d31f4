"""Functional losses ℓ(f) = Σ_i ω_i ℓ_i(f_i) with closed-form functional gradients.

Each loss gives the per-sample values ℓ_i, the per-sample functional gradient g_i = ∂ℓ_i/∂f_i
(not multiplied by the weight, THEORY.md §1) and its functional KL fact (THEORY.md §4): a
desingularizer φ and a constant c with φ'(ℓ(f)) ‖∇ℓ(f)‖² ≥ c for every f.

Weights ω are the convention's effective weights: ω_i = w_i for "mean" (L²(D)), n·w_i for
"sum" (Euclidean).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, final

import torch
from torch import Tensor

from ._types import Convention

__all__ = [
    "FunctionalKL",
    "Loss",
    "SquareLoss",
    "SoftmaxCrossEntropy",
    "BinaryLogistic",
    "LOSS_NAMES",
    "get_loss",
]


@final
@dataclass(frozen=True)
class FunctionalKL:
    """The functional KL fact φ'(ℓ(f)) ‖∇ℓ(f)‖² ≥ c for all f, in the named convention
    (‖·‖ the convention's norm on function space), with the ``reason`` it holds.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> w = torch.full((10,), 0.1, dtype=torch.float64)
        >>> fkl = rf.SoftmaxCrossEntropy().functional_kl(w, rf.Convention.MEAN, n_classes=3)
        >>> fkl.desingularizer, round(fkl.c, 12)    # c = κ·k/(k−1), κ = min w_i = 0.1
        ('cross-entropy', 0.15)
    """

    desingularizer: str
    c: float
    convention: Convention
    reason: str


class Loss(abc.ABC):
    """A functional loss. ``f`` is always (n, k); targets are validated by ``check_targets``.

    Each loss owns its facts, read by the flow, the monitor, the configuration and the
    certificates: ``name``; ``targets`` ("real": a vector per sample, "labels": integer
    classes); ``curvature`` (c ≥ the largest eigenvalue of ∇²_f ℓ_i at every f, the
    Gauss–Newton stability bound's constant); ``desingularizer`` (the φ of its functional KL
    fact); :meth:`output_width` (the model outputs it needs).

    Example:
        >>> import rayleighflow as rf
        >>> [(l.name, l.targets, l.curvature, l.desingularizer) for l in (rf.SquareLoss(),
        ...  rf.SoftmaxCrossEntropy(), rf.BinaryLogistic())]   # doctest: +NORMALIZE_WHITESPACE
        [('square', 'real', 1.0, 'log'), ('cross-entropy', 'labels', 0.5, 'cross-entropy'),
         ('logistic', 'labels', 0.25, 'cross-entropy')]
        >>> rf.SoftmaxCrossEntropy().output_width(n_classes=10), rf.BinaryLogistic().output_width(2)
        (10, 1)
        >>> import torch
        >>> class Quarter(rf.Loss):                 # ℓ_i = ¼‖f_i − y_i‖², g_i = ½(f_i − y_i)
        ...     name = "quarter"
        ...     def per_sample(self, f, y):
        ...         return 0.25 * ((f - y) ** 2).sum(-1)
        ...     def functional_grad(self, f, y):
        ...         return 0.5 * (f - y)
        ...     def functional_kl(self, weights, convention, n_classes=None):
        ...         return rf.FunctionalKL("log", 1.0, convention, "‖∇ℓ‖² = ℓ")
        ...     def check_targets(self, f, y):
        ...         return y.to(f.dtype).reshape(f.shape)
        >>> f, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
        >>> Quarter().value(f, Quarter().check_targets(f, y), torch.tensor([0.5, 0.5]))
        tensor(0.6250)
        >>> Quarter().desingularizer, Quarter().curvature      # the base's defaults
        ('log', None)
    """

    name: ClassVar[str]
    targets: ClassVar[str] = "real"
    curvature: ClassVar[float | None] = None   # unknown: no stability diagnosis
    desingularizer: ClassVar[str] = "log"

    def output_width(self, n_classes: int | None = None,
                     target_width: int | None = None) -> int | None:
        """The model's output width on data with ``n_classes`` labels or ``target_width``-wide
        real targets (None: not known from these)."""
        return n_classes if self.targets == "labels" else target_width

    @abc.abstractmethod
    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        """ℓ_i(f_i), shape (n,)."""

    @abc.abstractmethod
    def functional_grad(self, f: Tensor, y: Tensor) -> Tensor:
        """g_i = ∂ℓ_i/∂f_i, shape (n, k)."""

    @abc.abstractmethod
    def functional_kl(self, weights: Tensor, convention: Convention,
                      n_classes: int | None = None) -> FunctionalKL:
        """The functional KL fact for data weights w (probability weights, sum 1) and k
        outputs (``n_classes``; some constants sharpen with it)."""

    @abc.abstractmethod
    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Validate targets against outputs; return them in the form ``per_sample`` expects."""

    def value(self, f: Tensor, y: Tensor, omega: Tensor) -> Tensor:
        """ℓ(f) = Σ_i ω_i ℓ_i(f_i)."""
        return (omega * self.per_sample(f, y)).sum()

    def sample_sums(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(ℓ_i, ‖g_i‖²) per sample, the batch sums the monitor reduces (y already checked);
        a loss may fuse them (cross-entropy does)."""
        g = self.functional_grad(f, y)
        return self.per_sample(f, y), (g * g).sum(-1)


@final
class SquareLoss(Loss):
    """ℓ_i = ½‖f_i − y_i‖², g_i = f_i − y_i; ‖∇ℓ‖² = 2ℓ so φ = log, c = 2 (either convention).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> loss = rf.SquareLoss()
        >>> f, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
        >>> w = torch.tensor([0.5, 0.5])
        >>> loss.per_sample(f, y), loss.value(f, y, w)   # ½(f − y)², Σ w_i ℓ_i
        (tensor([0.5000, 2.0000]), tensor(1.2500))
        >>> g = loss.functional_grad(f, y)
        >>> float((w * (g ** 2).sum(-1)).sum()) == 2 * float(loss.value(f, y, w))  # ‖∇ℓ‖² = 2ℓ
        True
    """

    name = "square"
    targets = "real"
    curvature = 1.0            # ∇²_f ℓ_i = I
    desingularizer = "log"

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((f - y) ** 2).sum(dim=-1)

    def functional_grad(self, f: Tensor, y: Tensor) -> Tensor:
        return f - y

    def functional_kl(self, weights: Tensor, convention: Convention,
                      n_classes: int | None = None) -> FunctionalKL:
        return FunctionalKL("log", 2.0, convention, "‖∇ℓ‖² = Σ ω_i‖f_i − y_i‖² = 2ℓ")

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.to(f.dtype)
        if y.dim() == 1:
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ValueError(
                f"square loss: model output has shape {tuple(f.shape)} but targets have shape "
                f"{tuple(y.shape)}: make the model's output width match the target width"
            )
        return y


def _check_labels(f: Tensor, y: Tensor, n_classes: int, loss: str) -> Tensor:
    if y.dim() != 1 or y.shape[0] != f.shape[0]:
        raise ValueError(
            f"{loss}: expected integer labels of shape ({f.shape[0]},), got {tuple(y.shape)}"
        )
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(f"{loss}: labels must be integers, got non-integer values")
        y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        what = ("logistic takes labels 0/1 (one logit); for more classes use loss "
                "'cross-entropy' with one output per class" if loss == "logistic" else
                f"the model has {n_classes} outputs, so labels must lie in [0, {n_classes - 1}]")
        raise ValueError(
            f"{loss}: label out of range: labels span [{int(y.min())}, {int(y.max())}]; {what}")
    return y.long()


@final
class SoftmaxCrossEntropy(Loss):
    """ℓ_i = logsumexp(f_i) − f_{i,y_i}, g_i = softmax(f_i) − e_{y_i}.

    Stable for logits of size 1e10 (max-shifted log-softmax). Functional KL (CERTIFICATES.md
    §4): cross-entropy φ with c = κ·k/(k−1), κ = min_i w_i (mean convention, sharp);
    c = k/((k−1)n) for uniform weights in the sum convention (sharp); k κ_ω²/((k−1)n) with
    κ_ω = n·min w for non-uniform ones, valid but not sharp (the true infimum can be several
    times larger).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> loss = rf.SoftmaxCrossEntropy()
        >>> f, y = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([0])
        >>> g = loss.functional_grad(f, y)                 # softmax(f) − e_y
        >>> bool(torch.allclose(g, torch.softmax(f, -1) - torch.tensor([1.0, 0, 0])))
        True
        >>> bool(torch.allclose(loss.per_sample(f, y), torch.nn.functional.cross_entropy(f, y)))
        True
    """

    name = "cross-entropy"
    targets = "labels"
    curvature = 0.5            # diag(p) − ppᵀ has norm ≤ 1/2
    desingularizer = "cross-entropy"

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        # (M − f_y) + log1p(Σ_{j≠argmax} e^{f_j − M}): full relative precision when the true
        # class wins by far (tiny losses), where log_softmax rounds ℓ to 0 while ∇ℓ ≠ 0.
        top = f.argmax(dim=-1, keepdim=True)
        m = f.gather(-1, top)
        rest = torch.exp(f - m).scatter(-1, top, 0.0).sum(-1)
        return (m.squeeze(-1) - f.gather(-1, y.unsqueeze(-1)).squeeze(-1)) + torch.log1p(rest)

    def functional_grad(self, f: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        # g_y = p_y − 1 = −Σ_{j≠y} p_j, summed without cancellation.
        g_y = -p.scatter(-1, y.unsqueeze(-1), 0.0).sum(-1, keepdim=True)
        return p.scatter(-1, y.unsqueeze(-1), g_y)

    def sample_sums(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax cross-entropy sums with q = p off the true class and s = Σ_j q_j = 1 − p_y
        summed directly (no cancellation): ‖g_i‖² = ‖q_i‖² + s_i², and ℓ_i = −log1p(−s_i) while
        s_i < ½ (full relative precision for tiny losses), ℓ_i = logsumexp(f_i) − f_iy otherwise.

        Without autograd (the monitor's per-step path: detached outputs) the (n, k) work is one
        fused softmax p, its true class zeroed, then s = Σ_{j≠y} p_j and ‖q‖² = Σ_{j≠y} p_j²; and
        ℓ_i = −log p_y while p_y is a normal number, else (max f − f_y) + log z with 1/z = max_j p_j
        (never underflows). On a large vocabulary this costs about what the training step's own
        cross-entropy does."""
        idx = y.unsqueeze(-1)
        if f.requires_grad and torch.is_grad_enabled():
            logp = torch.log_softmax(f, dim=-1)
            q = logp.exp().scatter(-1, idx, 0.0)   # out of place: autograd needs logp
            s = q.sum(-1)
            gsq = torch.linalg.vector_norm(q, dim=-1).square() + s * s
            wrong = -logp.gather(-1, idx).squeeze(-1)
        else:
            p = torch.softmax(f, dim=-1)            # the only (n, k) allocation
            p_y = p.gather(-1, idx).squeeze(-1)
            p.scatter_(-1, idx, 0.0)
            s = p.sum(-1)
            gsq = torch.linalg.vector_norm(p, dim=-1).square() + s * s
            under = p_y < torch.finfo(p.dtype).tiny
            wrong = -p_y.log()
            # on a CPU the check costs nothing; elsewhere it would be a host synchronization
            if f.device.type != "cpu" or bool(under.any()):
                # where p_y underflowed p's max is off the true class, so the zeroing left it
                lse_gap = (f.amax(-1) - f.gather(-1, idx).squeeze(-1)) - p.amax(-1).log()
                wrong = torch.where(under, lse_gap, wrong)
        small = s < 0.5   # the other branch is fed 0, so autograd never sees log1p(-1) = -inf
        ell = torch.where(small, -torch.log1p(-torch.where(small, s, 0.0)), wrong)
        return ell, gsq

    def functional_kl(self, weights: Tensor, convention: Convention,
                      n_classes: int | None = None) -> FunctionalKL:
        """``n_classes`` = k; without it the k-free constant (k/(k−1) → 1) is returned."""
        return _ce_kl(weights, convention, n_classes)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.shape[-1] < 2:
            raise ValueError(
                "cross-entropy needs a model with >= 2 outputs (one logit per class); for one "
                "output use loss 'logistic'"
            )
        return _check_labels(f, y, f.shape[-1], "cross-entropy")


def _ce_kl(weights: Tensor, convention: Convention, n_classes: int | None) -> FunctionalKL:
    # CERTIFICATES.md §4. Per sample, the wrong-class probabilities sum to 1 − p_y = h(ℓ_i),
    # h(u) = 1 − e^{−u}, so ‖g_i‖² ≥ k/(k−1)·h(ℓ_i)² (one logit: |g_i| = h(ℓ_i), factor 1).
    # mean: Σ w_i‖g_i‖² ≥ κ·k/(k−1)·max_i h(ℓ_i)² ≥ κ·k/(k−1)·h(L), since max_i ℓ_i ≥ L.
    # sum (ω_i = n w_i, Σω = n): Cauchy–Schwarz Σω_i h_i² ≥ (Σω_i h_i)²/n, and the concave
    #   ℓ ↦ Σω_i h(ℓ_i) on {Σω_i ℓ_i = L} is smallest at a vertex: ≥ κ_ω h(L/κ_ω) ≥ κ_ω h(L).
    if n_classes is None:
        factor, k_txt = 1.0, "k/(k−1) → 1 (k not given)"
    elif n_classes == 1:  # the one-logit binary loss: |g_i| = h(ℓ_i) exactly
        factor, k_txt = 1.0, "one logit: |g_i| = 1 − e^{−ℓ_i}"
    else:
        factor, k_txt = n_classes / (n_classes - 1), f"k/(k−1) = {n_classes}/{n_classes - 1}"
    if convention is Convention.MEAN:
        kappa = float(weights.min())
        c, why = kappa * factor, f"κ = min w_i = {kappa:.6g}; c = κ·{k_txt}"
    else:
        n = weights.shape[0]
        kappa = float(weights.min()) * n
        c = factor * kappa**2 / n
        why = (f"ω_i = n w_i, κ_ω = min ω = {kappa:.6g}, n = {n}; c = {k_txt}·κ_ω²/n"
               + ("" if float(weights.max()) == float(weights.min()) else
                  " (valid for non-uniform weights, not sharp)"))
    return FunctionalKL("cross-entropy", c, convention, why)


@final
class BinaryLogistic(Loss):
    """One logit, labels y ∈ {0, 1}: ℓ_i = softplus(−s_i f_i), s_i = 2y_i − 1.

    g_i = −s_i σ(−s_i f_i), so |g_i| = 1 − p_i = 1 − e^{−ℓ_i}: the cross-entropy KL fact with
    no k/(k−1) factor, c = κ (mean, sharp) and κ_ω²/n (sum: sharp for uniform weights, valid
    but not sharp otherwise).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> loss = rf.BinaryLogistic()
        >>> f, y = torch.tensor([[0.3], [-1.2]], dtype=torch.float64), torch.tensor([1, 0])
        >>> ell, g = loss.per_sample(f, y), loss.functional_grad(f, y)
        >>> bool(torch.allclose(g.abs().squeeze(-1), 1 - torch.exp(-ell)))   # |g_i| = 1 − e^(−ℓ_i)
        True
        >>> loss.functional_kl(torch.tensor([0.25, 0.75]), rf.Convention.MEAN).c   # κ = min w_i
        0.25
    """

    name = "logistic"
    targets = "labels"
    curvature = 0.25           # σ(z)(1 − σ(z)) ≤ 1/4
    desingularizer = "cross-entropy"

    def output_width(self, n_classes: int | None = None,
                     target_width: int | None = None) -> int | None:
        return 1   # one logit

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        s = 2.0 * y.to(f.dtype) - 1.0
        return torch.nn.functional.softplus(-s * f[:, 0])

    def functional_grad(self, f: Tensor, y: Tensor) -> Tensor:
        s = 2.0 * y.to(f.dtype) - 1.0
        return (-s * torch.sigmoid(-s * f[:, 0])).unsqueeze(-1)

    def functional_kl(self, weights: Tensor, convention: Convention,
                      n_classes: int | None = None) -> FunctionalKL:
        return _ce_kl(weights, convention, 1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.shape[-1] != 1:
            raise ValueError(
                f"logistic loss needs a model with exactly 1 output, got {f.shape[-1]}; "
                "for several classes use loss 'cross-entropy'"
            )
        return _check_labels(f, y, 2, "logistic")


LOSS_NAMES = ("square", "cross-entropy", "logistic")


def get_loss(spec: str | Loss) -> Loss:
    """A loss by name: 'square' (alias 'mse'), 'cross-entropy' (alias 'ce'), 'logistic'; a
    :class:`Loss` instance is returned as it is.

    Example:
        >>> import rayleighflow as rf
        >>> type(rf.get_loss("ce")).__name__, rf.get_loss("square").name
        ('SoftmaxCrossEntropy', 'square')
    """
    if isinstance(spec, Loss):
        return spec
    table = {
        "square": SquareLoss,
        "mse": SquareLoss,
        "cross-entropy": SoftmaxCrossEntropy,
        "ce": SoftmaxCrossEntropy,
        "logistic": BinaryLogistic,
    }
    if spec not in table:
        raise ValueError(f"unknown loss {spec!r}: choose one of {', '.join(LOSS_NAMES)}")
    return table[spec]()  # type: ignore[abstract]
