"""The kernel operator with the data sharded across torch.distributed ranks.

Rank r holds the samples [start_r, stop_r) (contiguous, as even as possible). For the
symmetric form M = Ω^{1/2} G Ω^{1/2},

    M v = Ω^{1/2} J (Σ_r J_rᵀ Ω_r^{1/2} v_r):

each rank pulls back its own slice (one VJP over its samples), the parameter-sized results are
all-reduced (one collective per product), each rank pushes forward over its samples (one JVP)
and the slices are all-gathered. No rank ever holds the kernel, nor the Jacobian of the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, final

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from .._types import Convention, Params, check_weights, effective_weights
from ..data import Dataset
from ..distributed import collective, rank_and_size
from ..problem import Model
from ._batch import as_batch
from .operator import NTKOperator

__all__ = ["ShardedNTKOperator"]


@final
class ShardedNTKOperator:
    """K on L²(D; R^k) with the data split across the ranks of a process group.

    Every rank passes the same full inputs ``x`` (a tensor, a mapping of named inputs or a
    Dataset, as for :class:`NTKOperator`; and weights); each keeps its slice. Same
    conventions and vector layout (sample-major, length n·k) as :class:`NTKOperator`;
    :meth:`matvec` takes and returns the full vector on every rank, so SciPy's eigsh/LOBPCG
    (:func:`extreme_eigenpairs`) run identically on all ranks. Without a process group
    (or with one rank) it is a plain NTKOperator.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import NTKOperator, ShardedNTKOperator
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> import tempfile
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg",
        ...                         rank=0, world_size=1)       # here one rank; torchrun: many
        >>> v = torch.randn(10, dtype=torch.float64)
        >>> Kv = ShardedNTKOperator(net, x).matvec(v)          # all-reduce of the ranks' parts
        >>> bool(torch.allclose(Kv, NTKOperator(net, x).matvec(v)))
        True
        >>> dist.destroy_process_group()
    """

    is_symmetric: ClassVar[bool] = True   # matvec applies M = Ω^{1/2} G Ω^{1/2}, as NTKOperator
    is_psd: ClassVar[bool] = True

    def __init__(
        self, model: Model | nn.Module, x: Tensor | Mapping[str, Tensor] | Dataset, *,
        params: Params | None = None,
        weights: Tensor | None = None, convention: Convention | str = "mean",
        param_names: Sequence[str] | None = None, batch_size: int | None = None,
        max_memory: int | str | None = None, allow_tf32: bool = False, group=None,
    ) -> None:
        if isinstance(x, Dataset):
            x, weights = x.x, (weights if weights is not None else x.weights)  # type: ignore[attr-defined]
        elif not isinstance(x, Tensor) and isinstance(x, Mapping):
            x = as_batch(x, "x")  # named inputs: each rank keeps its rows of every entry
        n = int(x.shape[0])
        self.group = group
        self.rank, self.world = rank_and_size(group)
        if self.world > n:
            raise ValueError(f"{self.world} ranks for {n} samples: use at most {n} processes")
        w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        check_weights(w, n)
        self.start, self.stop = n * self.rank // self.world, n * (self.rank + 1) // self.world
        local_w = w[self.start:self.stop] / w[self.start:self.stop].sum()
        self.local = NTKOperator(model, x[self.start:self.stop], params=params,
                                 weights=local_w, convention=convention,
                                 param_names=param_names, batch_size=batch_size,
                                 max_memory=max_memory, allow_tf32=allow_tf32)
        conv = Convention.parse(convention)
        omega = effective_weights(w, conv)[self.start:self.stop]
        self.local.omega = omega.to(self.local.x.device, self.local.dtype)  # global ω
        self.n, self.k, self.dtype = n, self.local.k, self.local.dtype
        counts = [n * (r + 1) // self.world - n * r // self.world for r in range(self.world)]
        self.counts = counts
        self.n_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n * self.k, self.n * self.k)

    def matvec(self, v: Tensor) -> Tensor:
        """M v (full vector in, full vector out, on every rank); one all-reduce of size P and
        one all-gather of size n·k per product."""
        import torch.distributed as dist
        loc = self.local
        shape = v.shape
        v = torch.as_tensor(v).to(loc.x.device, self.dtype).reshape(self.n, self.k)
        root = loc.omega.sqrt()[:, None]
        pulled = loc._vjp(root * v[self.start:self.stop])
        if self.world > 1:
            flat = torch.cat([g.reshape(-1) for g in pulled.values()])
            if dist.get_backend(self.group) != "nccl":
                flat = flat.cpu()
            collective("all_reduce of J*v", dist.all_reduce, flat, group=self.group)
            flat = flat.to(loc.x.device)
            out, pos = {}, 0
            for name, g in pulled.items():
                out[name] = flat[pos:pos + g.numel()].view_as(g)
                pos += g.numel()
            pulled = out
        part = root * loc.push(pulled)  # (n_local, k)
        self.n_products += 1
        if self.world == 1:
            return part.reshape(shape)
        comm = part if dist.get_backend(self.group) == "nccl" else part.cpu()
        width = max(self.counts)
        pad = torch.zeros((width, self.k), dtype=comm.dtype, device=comm.device)
        pad[:comm.shape[0]] = comm
        bufs = [torch.empty_like(pad) for _ in range(self.world)]
        collective("all_gather of K v", dist.all_gather, bufs, pad, group=self.group)
        full = torch.cat([b[:c] for b, c in zip(bufs, self.counts, strict=True)])
        return full.to(loc.x.device).reshape(shape)

    def as_linear_operator(self) -> LinearOperator:
        """A float64 SciPy LinearOperator (the same on every rank)."""
        dev = self.local.x.device

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), device=dev).to(self.dtype)
            return self.matvec(t).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)
