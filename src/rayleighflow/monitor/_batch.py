"""Per-step batch quantities from outputs already computed: no second forward, no backward.

For a batch B of n samples with outputs f_i and the declared loss ℓ (THEORY.md §1), in the
convention's weights ω_i (ω_i = 1/n for "mean", 1 for "sum"):

    L_B = Σ ω_i ℓ_i(f_i),   ‖∇ℓ‖²_D = Σ ω_i ‖g_i‖²,  g_i = ∂ℓ_i/∂f_i,

and ‖∇L_B‖² = Σ_p ‖p.grad‖² is read from the gradients the training step left in ``.grad``.
Outputs are stored (detached) until the next flush and evaluated there in one vectorized pass,
so a step costs one multi-tensor norm of the gradients and no host synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .._types import Convention
from ..losses import Loss
from ._ranks import RankGroup

__all__ = ["flatten_batch", "PendingStep", "evaluate_steps", "grad_norms", "grad_check_sums"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def flatten_batch(loss: Loss, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs as (n, k) and targets in the matching shape, or a ValueError that says why.

    Label losses accept outputs (B, ..., k) with labels (B, ...) (tokens count as samples, as in
    ``F.cross_entropy(out.flatten(0, -2), y.flatten())``); the square loss takes outputs and
    targets of one shape, one sample per leading index.
    """
    if not isinstance(out, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"outputs and targets must be tensors, got {type(out).__name__} and "
                        f"{type(y).__name__}")
    out = out.detach()
    if y.requires_grad:
        y = y.detach()
    if y.device != out.device:
        y = y.to(out.device, non_blocking=True)
    if out.dim() == 2 and y.dim() == 1 and loss.targets == "labels" \
            and y.shape[0] == out.shape[0]:
        return out, y  # the common (n, k) outputs with (n,) labels: nothing to reshape
    if out.dim() == 0:
        raise ValueError("the outputs are a scalar: pass the model's batch outputs (n, k), not "
                         "the loss")
    if out.dim() == 1:
        out = out.unsqueeze(-1)
    if loss.targets == "real":
        if y.dim() == 1 and out.shape[1:] == (1,):
            y = y.unsqueeze(-1)
        if y.shape != out.shape:
            raise ValueError(
                f"square loss: outputs have shape {tuple(out.shape)} but targets have shape "
                f"{tuple(y.shape)}: they must match (one target per output)")
        return out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1)
    if out.dim() > 2:
        if tuple(y.shape) != tuple(out.shape[:-1]):
            raise ValueError(
                f"{loss.name}: outputs have shape {tuple(out.shape)}, so labels must have shape "
                f"{tuple(out.shape[:-1])} (one label per output vector), got {tuple(y.shape)}")
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    if y.dim() != 1 or y.shape[0] != out.shape[0]:
        raise ValueError(
            f"{loss.name}: outputs have shape {tuple(out.shape)}, so labels must have shape "
            f"({out.shape[0]},), got {tuple(y.shape)}")
    return out, y


@dataclass
class PendingStep:
    """One optimizer step not yet read back: gradient norms and the stored batch pieces."""

    index: int
    grad_norms: list[Tensor]                # ‖p.grad‖ per monitored parameter (0-d)
    outputs: list[Tensor] = field(default_factory=list)   # (n_b, k) per micro-batch
    targets: list[Tensor] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)    # losses the user passed (0-d)
    lrs: tuple[float, ...] = ()             # learning rate per monitored parameter
    missing_grads: tuple[str, ...] = ()     # parameters without .grad at this step
    computed: tuple[Tensor, Tensor, Tensor] | None = None  # (Σℓ_i, Σ‖g_i‖², n) if eager
    scale: Tensor | None = None             # backpropagated loss = scale · L_B (0-d)
    void: str | None = None                 # why .grad is not scale·∇L_B (the caller knows)
    gcheck: Tensor | None = None            # grad_check_sums of the step's checked outputs


#: Above this many output entries the gradient check reads strided rows (grad_check_sums).
CHECKED_ELEMENTS = 1 << 16


class OutputGrad(NamedTuple):
    """The gradient read on a step's outputs, kept until the read-back: ``_fast_step`` queues
    it and :func:`grad_check_sums_steps` turns the steps' gradients into sums in one batch
    (per step, the sums are a dozen small operations: a visible share of a small step)."""

    grad: Tensor


def grad_check_sums(loss: Loss, f: Tensor, y: Tensor, grad: Tensor) -> Tensor:
    """The sums that compare G = ∂(backpropagated loss)/∂f, read by a hook during the backward,
    with the declared loss's g_i = ∂ℓ_i/∂f_i, in float64 (a difference of near-equal sums):

        [⟨G, g⟩, ‖g‖², ‖G‖², floor, ⟨G, u⟩, ⟨g, u⟩, n]

    with u_i = e_{y_i} − 1/k for cross-entropy (label smoothing moves G by ε·u; NaN for other
    losses) and ``floor`` the size of the rounding of G itself (n for label losses, whose G has
    entries of size ≤ 1; Σ‖f_i‖² for the square loss, whose G is a difference f − y).

    Outputs of more than ``CHECKED_ELEMENTS`` entries (a language model's logits) are checked
    on evenly strided rows, in float64 only there, their sums scaled by rows/checked rows to
    stand for the whole batch's (whose n the mean convention's weight 1/n needs). What the
    check is for (label smoothing, a penalty, another reduction, a missing 1/N) changes every
    row alike, and each of its tests is homogeneous in the sums."""
    rows = f.shape[0]
    grad = grad.reshape(f.shape)
    stride = -(-f.numel() // CHECKED_ELEMENTS)
    if stride > 1:
        f, y, grad = f[::stride], y[::stride], grad[::stride]
    sums = grad_check_sums_steps(loss, f[None], y[None], grad[None])[0]
    if stride == 1:
        return sums
    return torch.cat([sums[:6] * (rows / f.shape[0]), sums.new_tensor([float(rows)])])


def grad_check_sums_steps(loss: Loss, f: Tensor, y: Tensor, grad: Tensor) -> Tensor:
    """:func:`grad_check_sums` of S steps at once: ``f`` and ``grad`` (S, n, k), ``y`` (S, n)
    labels or (S, n, k) targets; returns (S, 7)."""
    steps, k = f.shape[0], f.shape[-1]
    labels = loss.targets == "labels"
    f64 = f.double().reshape(-1, k)
    yy = y.long().reshape(-1) if labels else y.to(torch.float64).reshape(-1, k)
    g = loss.functional_grad(f64, yy).reshape(steps, -1, k)
    G = grad.double().reshape(g.shape)
    n = g.shape[1]
    dims = (1, 2)
    floor = torch.full((steps,), float(n), dtype=torch.float64, device=g.device) if labels \
        else (f64 * f64).reshape(steps, -1).sum(1)
    if loss.name == "cross-entropy" and k > 1:
        idx = yy.reshape(steps, -1, 1)
        Gu = G.gather(-1, idx).sum(dims) - G.mean(-1).sum(1)
        gu = g.gather(-1, idx).sum(dims) - g.mean(-1).sum(1)
    else:
        Gu = gu = torch.full((steps,), math.nan, dtype=torch.float64, device=g.device)
    count = torch.full((steps,), float(n), dtype=torch.float64, device=g.device)
    return torch.stack([(G * g).sum(dims), (g * g).sum(dims), (G * G).sum(dims), floor, Gu, gu,
                        count], dim=1)


def grad_norms(grads: list[Tensor | None]) -> list[Tensor]:
    """‖g‖ per tensor (0-d, on the device; 0 for None) in one multi-tensor norm
    (``torch._foreach_norm``: one kernel launch on a GPU); stacked and squared at read-back."""
    present = [g for g in grads if g is not None]
    norms = list(torch._foreach_norm(present))
    if len(present) < len(grads):
        zero = torch.zeros((), dtype=norms[0].dtype, device=norms[0].device)
        it = iter(norms)
        norms = [zero if g is None else next(it) for g in grads]
    return norms


def batch_sums(loss: Loss, f: Tensor, y: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """(ℓ_i, ‖g_i‖²) per sample, in float32 at least (half-precision outputs are upcast).

    ``check=False`` skips the label-range check (a host synchronization on a GPU)."""
    if f.dtype in _LOW_PRECISION:
        f = f.float()
    if check:
        y = loss.check_targets(f, y)
    elif loss.targets == "real":
        y = y.to(f.dtype)
    else:
        y = y.long()
    return loss.sample_sums(f, y)


def evaluate_steps(loss: Loss, steps: list[PendingStep], convention: Convention,
                   ranks: RankGroup | None = None) -> dict[str, list[float]]:
    """Read back a list of pending steps: per step L_B, ‖∇ℓ‖²_D, n, the passed loss and the
    per-parameter squared gradient norms. A fixed number of operations for any number of
    steps, and one host synchronization. With ``ranks`` (DDP, see ``_ranks``) the per-rank sums
    are combined by one all-gather into those of the union batch; ``unequal`` flags steps whose
    ranks had different batch sizes and ``spread`` is the largest difference of a squared
    gradient norm between ranks, relative to ‖.grad‖² (0 when DDP synchronized the gradients).
    ``raw_grad_sq`` is ‖.grad‖² as read, before a step's ``scale`` (or the sum convention's W²)
    corrects it into ‖∇L_B‖²: the norm a gradient clipping acted on.
    """
    n = len(steps)
    norms = torch.stack([g for s in steps for g in s.grad_norms]).double()
    param_sq = (norms * norms).reshape(n, -1).T                      # (m, n)
    device = param_sq.device
    sums = torch.zeros(3, n, dtype=torch.float64, device=device)   # Σℓ_i, Σ‖g_i‖², count
    lazy = [(i, s) for i, s in enumerate(steps) if s.computed is None]
    if lazy:
        outputs = [o for _, s in lazy for o in s.outputs]
        f = torch.cat(outputs)   # targets may be elsewhere: the monitor's fast path checks
        ell, gsq = batch_sums(loss, f, torch.cat(   # their device only when shapes change
            [t.to(f.device, non_blocking=True) for _, s in lazy for t in s.targets]))
        size = outputs[0].shape[0]
        if len(lazy) == n == len(outputs) and all(o.shape[0] == size for o in outputs):
            # the common case, one batch of one size per step: per-step sums by a reshape
            sums[:2] = torch.stack([ell, gsq]).double().reshape(2, n, size).sum(-1)
            sums[2] = size
        else:
            sizes = torch.tensor([o.shape[0] for o in outputs], device=device)
            owner = torch.tensor([i for i, s in lazy for _ in s.outputs], device=device)
            seg = torch.repeat_interleave(owner, sizes)
            sums.index_add_(1, seg, torch.stack([ell.double(), gsq.double(),
                                                 torch.ones_like(ell, dtype=torch.float64)]))
    for i, s in enumerate(steps):
        if s.computed is not None:
            sums[:, i] = torch.stack(s.computed).to(device)
    with_loss = [(i, s) for i, s in enumerate(steps) if s.losses]
    if len(with_loss) == n and all(len(s.losses) == 1 for s in steps):
        passed = torch.stack([s.losses[0].to(device) for s in steps]).double()
    else:   # NaN where no loss was passed, else the sum of the micro-batches' losses
        passed = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
        if with_loss:
            flat = torch.stack([v.to(device) for _, s in with_loss for v in s.losses]).double()
            owner = torch.tensor([i for i, s in with_loss for _ in s.losses], device=device)
            passed.index_fill_(0, torch.tensor([i for i, _ in with_loss], device=device), 0.0)
            passed.index_add_(0, owner, flat)
    raw_sq = param_sq.sum(0)   # ‖.grad‖² as it is, before any correction: the clip check's
    scaled = [(i, s.scale) for i, s in enumerate(steps) if s.scale is not None]
    if scaled:   # .grad = scale·∇L_B and the passed loss is scale·L_B
        c = torch.ones(n, dtype=torch.float64, device=device)
        c[[i for i, _ in scaled]] = torch.stack([v.to(device) for _, v in scaled]).double()
        param_sq = param_sq / (c * c)
        passed = passed / c
    if ranks is None:
        if convention is Convention.MEAN:
            sums[:2] /= sums[2]
        packed = torch.cat([sums, passed[None], param_sq, torch.zeros(2, n, dtype=sums.dtype,
                                                                      device=device),
                            raw_sq[None]])
    else:
        g = ranks.gather(torch.cat([sums, passed[None], param_sq]))   # (W, 4 + m, n)
        count, w = g[:, 2], ranks.world
        if convention is Convention.MEAN:   # DDP's weights: 1/(W n_r) on rank r's samples
            both = (g[:, :2] / count[:, None]).sum(0) / w
            passed = g[:, 3].sum(0) / w
            psq = g[0, 4:]
        else:                               # ∇(Σ_i ℓ_i) = W·.grad
            both = g[:, :2].sum(0)
            passed = g[:, 3].sum(0)
            psq = g[0, 4:] * float(w * w)
        total = g[0, 4:].sum(0)
        spread = (g[:, 4:] - g[0:1, 4:]).abs().amax(dim=(0, 1)) / total.clamp_min(1e-300)
        unequal = (count.amax(0) != count.amin(0)).to(sums.dtype)
        packed = torch.cat([both, count.sum(0)[None], passed[None], psq, unequal[None],
                            spread[None], raw_sq[None]])
    check = torch.full((7, n), math.nan, dtype=torch.float64, device=device)
    for i, s in enumerate(steps):
        if s.gcheck is not None:
            check[:, i] = s.gcheck.to(device)
    packed = torch.cat([packed, check])
    rows = packed.T.cpu().tolist()
    return {
        "loss": [r[0] for r in rows], "fgrad_sq": [r[1] for r in rows],
        "n": [r[2] for r in rows], "loss_passed": [r[3] for r in rows],
        "param_sq": [r[4:-10] for r in rows], "unequal": [r[-10] for r in rows],
        "spread": [r[-9] for r in rows], "raw_grad_sq": [r[-8] for r in rows],
        "gcheck": [r[-7:] for r in rows],
    }


def eager_sums(loss: Loss, f: Tensor, y: Tensor,
               check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(Σℓ_i, Σ‖g_i‖², n) on the device, for outputs too large to keep until the flush."""
    ell, gsq = batch_sums(loss, f, y, check)
    n = torch.tensor(float(ell.shape[0]), dtype=torch.float64, device=ell.device)
    return ell.double().sum(), gsq.double().sum(), n
