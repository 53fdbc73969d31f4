"""Per-step batch quantities from outputs already computed: no second forward, no backward.

For a batch B of n samples with outputs f_i and the declared loss ℓ (THEORY.md §1), in the
convention's weights ω_i (ω_i = 1/n for "mean", 1 for "sum"):

    L_B = Σ ω_i ℓ_i(f_i),   ‖∇ℓ‖²_D = Σ ω_i ‖g_i‖²,  g_i = ∂ℓ_i/∂f_i,

and ‖∇L_B‖² = Σ_p ‖p.grad‖² is read from the gradients the training step left in ``.grad``.
Outputs are stored (detached) until the next flush and evaluated there in one vectorized pass,
so a step costs one multi-tensor norm of the gradients and no host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._types import Convention
from ..losses import Loss, SoftmaxCrossEntropy, SquareLoss

__all__ = ["flatten_batch", "PendingStep", "evaluate_steps"]

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
    y = y.detach().to(out.device, non_blocking=True)
    if out.dim() == 0:
        raise ValueError("the outputs are a scalar: pass the model's batch outputs (n, k), not "
                         "the loss")
    if out.dim() == 1:
        out = out.unsqueeze(-1)
    if isinstance(loss, SquareLoss):
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
    grad_norms: list[Tensor]                # one 0-d tensor per monitored parameter
    outputs: list[Tensor] = field(default_factory=list)   # (n_b, k) per micro-batch
    targets: list[Tensor] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)    # losses the user passed (0-d)
    lrs: tuple[float, ...] = ()             # learning rate per monitored parameter
    missing_grads: tuple[str, ...] = ()     # parameters without .grad at this step
    computed: tuple[Tensor, Tensor, Tensor] | None = None  # (Σℓ_i, Σ‖g_i‖², n) if eager


def batch_sums(loss: Loss, f: Tensor, y: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """(ℓ_i, ‖g_i‖²) per sample, in float32 at least (half-precision outputs are upcast).

    ``check=False`` skips the label-range check (a host synchronization on a GPU)."""
    if f.dtype in _LOW_PRECISION:
        f = f.float()
    if check:
        y = loss.check_targets(f, y)
    elif isinstance(loss, SquareLoss):
        y = y.to(f.dtype)
    else:
        y = y.long()
    if isinstance(loss, SoftmaxCrossEntropy):
        return _cross_entropy_sums(f, y)
    g = loss.functional_grad(f, y)
    return loss.per_sample(f, y), (g * g).sum(-1)


def _cross_entropy_sums(f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy in one log-softmax pass: with q = p off the true class and
    s = Σ_j q_j = 1 − p_y (no cancellation), ‖g_i‖² = ‖q_i‖² + s_i² and ℓ_i = −log1p(−s_i)
    while s_i < ½ (full relative precision for tiny losses), −log p_y otherwise."""
    logp = torch.log_softmax(f, dim=-1)
    idx = y.unsqueeze(-1)
    q = logp.exp().scatter(-1, idx, 0.0)   # out of place: also used under autograd
    s = q.sum(-1)
    gsq = torch.linalg.vector_norm(q, dim=-1).square() + s * s
    small = s < 0.5   # the other branch is fed 0, so autograd never sees log1p(-1) = -inf
    ell = torch.where(small, -torch.log1p(-torch.where(small, s, 0.0)),
                      -logp.gather(-1, idx).squeeze(-1))
    return ell, gsq


def evaluate_steps(loss: Loss, steps: list[PendingStep],
                   convention: Convention) -> dict[str, list[float]]:
    """Read back a list of pending steps: per step L_B, ‖∇ℓ‖²_D, n, the passed loss and the
    per-parameter squared gradient norms. A fixed number of operations for any number of
    steps, and one host synchronization."""
    n = len(steps)
    norms = torch.stack([g for s in steps for g in s.grad_norms]).double()
    device = norms.device
    sums = torch.zeros(3, n, dtype=torch.float64, device=device)   # Σℓ_i, Σ‖g_i‖², count
    lazy = [(i, s) for i, s in enumerate(steps) if s.computed is None]
    if lazy:
        outputs = [o for _, s in lazy for o in s.outputs]
        sizes = torch.tensor([o.shape[0] for o in outputs], device=device)
        owner = torch.tensor([i for i, s in lazy for _ in s.outputs], device=device)
        seg = torch.repeat_interleave(owner, sizes)
        ell, gsq = batch_sums(loss, torch.cat(outputs),
                              torch.cat([t for _, s in lazy for t in s.targets]))
        sums.index_add_(1, seg, torch.stack([ell.double(), gsq.double(),
                                             torch.ones_like(ell, dtype=torch.float64)]))
    for i, s in enumerate(steps):
        if s.computed is not None:
            sums[:, i] = torch.stack(s.computed).to(device)
    if convention is Convention.MEAN:
        sums[:2] /= sums[2]
    passed = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    with_loss = [(i, s) for i, s in enumerate(steps) if s.losses]
    if with_loss:
        flat = torch.stack([v.to(device) for _, s in with_loss for v in s.losses]).double()
        owner = torch.tensor([i for i, s in with_loss for _ in s.losses], device=device)
        passed.index_fill_(0, torch.tensor([i for i, _ in with_loss], device=device), 0.0)
        passed.index_add_(0, owner, flat)
    packed = torch.cat([sums.T, passed[:, None], (norms * norms).reshape(n, -1)], dim=1)
    rows = packed.cpu().tolist()
    return {
        "loss": [r[0] for r in rows], "fgrad_sq": [r[1] for r in rows],
        "n": [r[2] for r in rows], "loss_passed": [r[3] for r in rows],
        "param_sq": [r[4:] for r in rows],
    }


def eager_sums(loss: Loss, f: Tensor, y: Tensor,
               check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(Σℓ_i, Σ‖g_i‖², n) on the device, for outputs too large to keep until the flush."""
    ell, gsq = batch_sums(loss, f, y, check)
    n = torch.tensor(float(ell.shape[0]), dtype=torch.float64, device=ell.device)
    return ell.double().sum(), gsq.double().sum(), n
