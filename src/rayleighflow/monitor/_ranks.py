"""The monitor under DistributedDataParallel: which ranks form the batch, and how they combine.

DDP leaves in every rank's ``.grad`` the average over the W ranks of the rank gradients,

    .grad = (1/W) Σ_r ∇L_r,    L_r = Σ_{i∈B_r} ω_i^(r) ℓ_i  (ω^(r) = 1/n_r "mean", 1 "sum"),

so ``.grad`` is the gradient of L = (1/W) Σ_r L_r on the union batch B = ∪_r B_r, with sample
weights 1/(W n_r) ("mean"; 1/N on every sample when the n_r are equal, the global-batch mean)
or 1/W ("sum"). The monitor records, for the declared convention on the union batch:

    mean:  L_B = (1/W) Σ_r L_r,  ‖∇ℓ‖²_D = (1/W) Σ_r Σ_{i∈B_r} ‖g_i‖²/n_r,  ‖∇L_B‖² = ‖.grad‖²;
    sum:   L_B = Σ_r L_r,        ‖∇ℓ‖²_D = Σ_r Σ_{i∈B_r} ‖g_i‖²,          ‖∇L_B‖² = W²‖.grad‖²

(for "sum", ∇(Σ_i ℓ_i) = W·.grad). The per-rank sums travel in one all-gather per read-back;
``.grad`` itself needs no communication (DDP already averaged it), and the gathered gradient
norms check that it did: ranks whose norms differ (no DDP, ``no_sync``) void the quotient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn

__all__ = ["RankGroup", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its parameters, without the ``module.``
    prefix); other modules unchanged."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@final
@dataclass(frozen=True)
class RankGroup:
    """The process group whose ranks' batches form one step's batch."""

    group: Any          # a ProcessGroup, or None for the default group
    rank: int
    world: int

    @classmethod
    def resolve(cls, model: nn.Module, distributed: bool | None,
                process_group: Any) -> RankGroup | None:
        """None when the monitor runs alone (one process, or ``distributed=False``)."""
        if distributed is False:
            if process_group is not None:
                raise ValueError("process_group was given with distributed=False")
            return None
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        if not ready:
            if distributed or process_group is not None:
                raise ValueError("distributed=True (or a process_group) needs an initialized "
                                 "process group: call torch.distributed.init_process_group "
                                 "(or rayleighflow.distributed.init_distributed) first")
            return None
        if process_group is None:
            from torch.nn.parallel import DistributedDataParallel

            if isinstance(model, DistributedDataParallel):
                process_group = model.process_group
        world = dist.get_world_size(process_group)
        if world == 1 and not distributed:
            return None
        return cls(process_group, dist.get_rank(process_group), world)

    def gather(self, t: Tensor) -> Tensor:
        """All ranks' ``t`` stacked (W, *t.shape), the same on every rank."""
        import torch.distributed as dist

        from ..distributed import collective

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        collective("the monitor's all-gather of per-rank batch sums", dist.all_gather, parts, t,
                   group=self.group)
        return torch.stack(parts)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place (also returned)."""
        import torch.distributed as dist

        from ..distributed import collective

        collective("the monitor's all-reduce", dist.all_reduce, t, group=self.group)
        return t
