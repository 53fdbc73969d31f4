"""Full-data estimates by streaming: exact L, ‖∇L‖², ‖∇ℓ‖²_D and R(K; ∇ℓ) over a DataLoader.

The gradient of the full-data loss is accumulated batch by batch into buffers of the parameters'
shapes (the data is never stored); it is taken with ``torch.autograd.grad``, so the ``.grad``
fields the training step filled are left untouched. With uniform weights over the N samples:

    mean:  L = Σℓ_i / N,  ∇L = Σ∇ℓ_i / N,  ‖∇ℓ‖²_D = Σ‖g_i‖² / N;     sum: without the 1/N.

Cost: one forward and one backward per sample, i.e. one full-data gradient (plus one
accumulation per parameter and batch). The model is evaluated in eval mode (see
:func:`eval_mode`) and its training flags restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn

from .._types import Convention
from ..losses import Loss
from ._batch import batch_sums, flatten_batch
from ._params import ParamLayout, eval_mode
from ._ranks import RankGroup

__all__ = ["FullDataEstimate", "full_data_estimate"]


@final
@dataclass(frozen=True)
class FullDataEstimate:
    """Exact full-data diagnostics at one parameter point (``convention`` names the weights)."""

    loss: float
    grad_sq: float
    fgrad_sq: float
    rayleigh: float
    group_rayleigh: dict[str, float]
    n_samples: int
    n_batches: int
    convention: Convention

    def as_row(self) -> dict[str, float]:
        row = {"loss": self.loss, "grad_sq": self.grad_sq, "fgrad_sq": self.fgrad_sq,
               "rayleigh": self.rayleigh, "n_samples": float(self.n_samples)}
        row.update({f"rayleigh[{g}]": r for g, r in self.group_rayleigh.items()})
        return row


def _default_split(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    raise TypeError("cannot split a batch into (inputs, targets): the loader must yield "
                    "(x, y) pairs or {'x', 'y'} dicts, or pass split=lambda batch: (x, y)")


def full_data_estimate(
    model: nn.Module, data: Iterable[Any], loss: Loss, *,
    convention: Convention | str = Convention.MEAN, layout: ParamLayout | None = None,
    split: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ranks: RankGroup | None = None,
) -> FullDataEstimate:
    """Stream ``data`` (a DataLoader or any iterable of batches) once and return the exact
    full-data quotient at the model's current parameters.

    Example::

        est = full_data_estimate(net, loader, get_loss("cross-entropy"))
        est.rayleigh, est.group_rayleigh

    With ``ranks`` (the monitor under DDP) every rank streams its own shard of the data (a
    DistributedSampler) and the sums are all-reduced: the estimate is that of the union of the
    shards, the same on every rank. A rank whose shard is empty still takes part.
    """
    convention = Convention.parse(convention)
    layout = ParamLayout.of(model) if layout is None else layout
    split = _default_split if split is None else split
    params = layout.params
    device = params[0].device
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    s_loss = torch.zeros((), dtype=torch.float64, device=device)
    s_fg = torch.zeros((), dtype=torch.float64, device=device)
    n, batches = 0, 0
    with eval_mode(model), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for batch in data:
            x, y = split(batch)
            x = x.to(device) if isinstance(x, Tensor) else x
            y = y.to(device)
            out = model(x) if forward is None else forward(model, x)
            f, yf = flatten_batch(loss, out, y)
            f = _attach(out, f)
            ell, gsq = batch_sums(loss, f, loss.check_targets(f, yf), check=False)
            grads = torch.autograd.grad(ell.sum(), params, allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a.add_(g.double())
            s_loss += ell.detach().double().sum()
            s_fg += gsq.detach().double().sum()
            n += int(ell.shape[0])
            batches += 1
    if ranks is not None:   # one all-reduce of [Σℓ, Σ‖g‖², N, batches, Σ∇ℓ_i (P values)]
        flat = torch.cat([torch.stack([s_loss, s_fg]),
                          torch.tensor([float(n), float(batches)], dtype=torch.float64,
                                       device=device), *(a.reshape(-1) for a in acc)])
        ranks.all_reduce(flat)
        s_loss, s_fg = flat[0], flat[1]
        n, batches = int(flat[2].item()), int(flat[3].item())
        acc = [piece.view_as(a) for piece, a in
               zip(flat[4:].split([a.numel() for a in acc]), acc, strict=True)]
    if n == 0:
        raise ValueError("the full-data loader yielded no sample: nothing to estimate")
    scale = 1.0 / n if convention is Convention.MEAN else 1.0
    param_sq = torch.stack([(a * a).sum() for a in acc]) * scale * scale
    totals = torch.cat([torch.stack([s_loss * scale, s_fg * scale]), param_sq]).cpu().tolist()
    loss_v, fg = totals[0], totals[1]
    group_sq = layout.group_sums(totals[2:])
    grad_sq = float(sum(group_sq.values()))
    if fg > 0:
        r, groups = grad_sq / fg, {g: v / fg for g, v in group_sq.items()}
    else:
        r, groups = float("nan"), dict.fromkeys(group_sq, float("nan"))
    return FullDataEstimate(loss_v, grad_sq, fg, r, groups, n, batches, convention)


def _attach(out: Tensor, flat_detached: Tensor) -> Tensor:
    """The flattened outputs, still attached to the graph (flatten_batch detaches)."""
    f = out if out.dim() > 1 else out.unsqueeze(-1)
    return f.reshape(flat_detached.shape)
