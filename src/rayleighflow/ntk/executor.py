"""Kernel assembly as tile tasks, run by an executor (local, or across torch.distributed ranks).

A kernel request is cut into row chunks of ``plan.block_size`` samples; a *tile task* (i, j)
is the block between row chunk i and column chunk j (i ≤ j for a symmetric kernel, whose
lower triangle is the mirror). :class:`LocalExecutor` runs every task in this process
(the default). :class:`DistributedExecutor` gives rank r the tasks r, r + N, r + 2N, ... of
the upper triangle, then assembles the kernel row block by row block with one reduce per
block (each entry comes from exactly one rank: the sum is exact), either on rank 0
(``gather="rank0"``), on every rank (``"all"``), or keeping each row block on one rank
(``"rows"``: rank r holds a contiguous range of rows, returned as a :class:`KernelShard`).

The result may live in a memory-mapped ``.npy`` file (``out_file``): row blocks are written
to it as they are finished and nothing of the size of the kernel is held in memory.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import final

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import collective, init_distributed
from ._common import KernelKind, KernelRequest
from ._terms import Engine, tile_shape

__all__ = ["DistributedExecutor", "KernelShard", "LocalExecutor", "current_executor",
           "torchrun_session", "use_executor"]

_NP = {torch.float64: np.float64, torch.float32: np.float32}


@final
@dataclass(frozen=True)
class KernelShard:
    """Rows [start, stop) of a kernel kept on this rank: ``blocks`` (stop-start, n2, k, k)
    for "full" (a view of the (rows·k, n2·k) matrix), (rows, n2) for "trace", (rows, n2, k)
    for "diagonal".

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import DistributedExecutor, KernelShard, empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> import tempfile
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg",
        ...                         rank=0, world_size=1)       # here one rank; torchrun: many
        >>> shard = empirical_ntk(net, x, executor=DistributedExecutor("rows"))
        >>> isinstance(shard, KernelShard), shard.start, shard.stop, shard.blocks.shape
        (True, 0, 5, torch.Size([5, 5, 2, 2]))
        >>> dist.destroy_process_group()
    """

    start: int
    stop: int
    n: int
    blocks: Tensor


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device, out_file) -> Tensor:
    """Zeros, in memory or in a memory-mapped .npy file (host only)."""
    if out_file is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if dtype not in _NP:
        raise ValueError(f"out_file holds float32 or float64 kernels, not {dtype}")
    path = os.fspath(out_file)
    if not path.endswith(".npy"):
        raise ValueError(f"out_file must end in .npy (a NumPy array file), got {path!r}")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=_NP[dtype], shape=shape)
    return torch.from_numpy(mm)


def chunks(n: int, b: int) -> list[tuple[int, int]]:
    return [(s, min(s + b, n)) for s in range(0, n, b)]


def scale_tile(t: Tensor, req: KernelRequest, r1: tuple[int, int], r2: tuple[int, int]) -> None:
    s1 = None if req.s1 is None else req.s1[r1[0]:r1[1]]
    s2 = req.s1 if req.x2 is None else req.s2
    s2 = None if s2 is None else s2[r2[0]:r2[1]]
    b1, b2 = r1[1] - r1[0], r2[1] - r2[0]
    if req.kind is KernelKind.FULL:
        v = t.view(b1, req.k, b2, req.k)
        shapes: tuple[tuple[int, ...], tuple[int, ...]] = ((b1, 1, 1, 1), (1, 1, b2, 1))
    elif req.kind is KernelKind.TRACE:
        v, shapes = t, ((b1, 1), (1, b2))
    else:
        v, shapes = t, ((1, b1, 1), (1, 1, b2))
    for s, shp in ((s1, shapes[0]), (s2, shapes[1])):
        if s is not None:
            v.mul_(s.view(shp))


def write_tile(res: Tensor, acc: Tensor, kind: KernelKind, k: int, r1, r2, mirror: bool) -> None:
    """Add a finished tile (and its mirror) into the result, possibly on another device."""
    acc = acc.to(res.device, non_blocking=False)
    if kind is KernelKind.FULL:
        (a0, a1), (b0, b1) = (r1[0] * k, r1[1] * k), (r2[0] * k, r2[1] * k)
        res[a0:a1, b0:b1].add_(acc)
        if mirror:
            res[b0:b1, a0:a1].add_(acc.T)
    elif kind is KernelKind.TRACE:
        res[r1[0]:r1[1], r2[0]:r2[1]].add_(acc)
        if mirror:
            res[r2[0]:r2[1], r1[0]:r1[1]].add_(acc.T)
    else:
        res[:, r1[0]:r1[1], r2[0]:r2[1]].add_(acc)
        if mirror:
            res[:, r2[0]:r2[1], r1[0]:r1[1]].add_(acc.transpose(1, 2))


def transpose_tile(t: Tensor, kind: KernelKind) -> Tensor:
    return t.transpose(1, 2) if kind is KernelKind.DIAGONAL else t.T


class _Tiles:
    """Computes tile tasks of one request: features per chunk (cached when the plan says so)."""

    def __init__(self, req: KernelRequest, engine: Engine, plan, groups: list[str]) -> None:
        self.req, self.engine, self.plan, self.groups = req, engine, plan, groups
        self.sym = req.x2 is None
        self.x2 = req.x1 if self.sym else req.x2
        self.c1 = chunks(req.n1, plan.block_size)
        self.c2 = self.c1 if self.sym else chunks(req.n2, plan.block_size)
        self._cache: dict[tuple[int, int], list] = {}
        self._last: tuple[tuple[int, int, int], list] | None = None

    def tasks(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.c1))
                for j in range(i if self.sym else 0, len(self.c2))]

    def _features(self, side: int, idx: int, p: int) -> list:
        key = (side if not self.sym else 1, idx)
        if self.plan.cache_features:
            if key not in self._cache:
                s, e = (self.c1 if key[0] == 1 else self.c2)[idx]
                x = self.req.x1 if key[0] == 1 else self.x2
                self._cache[key] = self.engine.features(x[s:e], p)  # type: ignore[index]
            return self._cache[key]
        if self._last is not None and self._last[0] == (*key, p):
            return self._last[1]
        s, e = (self.c1 if key[0] == 1 else self.c2)[idx]
        f = self.engine.features((self.req.x1 if key[0] == 1 else self.x2)[s:e], p)  # type: ignore[index]
        if side == 1:  # row features serve a whole row of tiles
            self._last = ((*key, p), f)
        return f

    def new_pass(self) -> None:
        self._cache.clear()
        self._last = None

    def compute(self, i: int, j: int, p: int, into: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Tile (i, j) of pass p, scaled (√ω), per group; accumulated into ``into`` if given."""
        req = self.req
        (s1, e1), (s2, e2) = self.c1[i], self.c2[j]
        f1 = self._features(1, i, p)
        f2 = f1 if (self.sym and i == j) else self._features(2, j, p)
        shape = tile_shape(req.kind, e1 - s1, e2 - s2, req.k)
        acc = into if into is not None else {
            g: torch.zeros(shape, dtype=req.dtype, device=req.device) for g in self.groups}
        self.engine.contract(f1, f2, req.kind, acc)
        for g in self.groups:
            scale_tile(acc[g], req, (s1, e1), (s2, e2))
        return acc


@final
class LocalExecutor:
    """Every tile task in this process (the default executor).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import LocalExecutor, empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> K = empirical_ntk(net, x, executor=LocalExecutor())
        >>> bool(torch.equal(K, empirical_ntk(net, x)))
        True
    """

    def assemble(self, req: KernelRequest, engine: Engine, plan, groups: list[str],
                 out_file=None) -> dict[str, Tensor]:
        out_dev = torch.device(plan.out_device) if out_file is None else torch.device("cpu")
        storage = tile_shape(req.kind, req.n1, req.n2, req.k)
        if out_file is not None and len(groups) != 1:
            raise ValueError("out_file holds one kernel: use empirical_ntk, not group_ntk")
        res = {g: allocate(storage, req.dtype, out_dev, out_file) for g in groups}
        tiles = _Tiles(req, engine, plan, groups)
        direct = plan.n_tiles == 1 and out_dev == req.device and engine.n_passes == 1 \
            and out_file is None
        for p in range(engine.n_passes):
            tiles.new_pass()
            for i, j in tiles.tasks():
                if direct:
                    tiles.compute(i, j, p, into=res)
                    continue
                acc = tiles.compute(i, j, p)
                for g in groups:
                    write_tile(res[g], acc[g], req.kind, req.k, tiles.c1[i], tiles.c2[j],
                               mirror=tiles.sym and i != j)
        return res


@final
class DistributedExecutor:
    """Tile tasks sharded over the ranks of a torch.distributed process group.

    Args:
        gather: ``"rank0"`` (default: rank 0 returns the kernel, the others None), ``"all"``
            (every rank returns it) or ``"rows"`` (each rank returns a :class:`KernelShard`
            of contiguous rows; no rank holds the whole kernel).
        group: the process group (default: the world).

    Every rank must call with the same model, parameters, inputs and arguments. Memory per
    rank: its own tiles (about 1/N of the upper triangle) plus one row block in flight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import DistributedExecutor, empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> import tempfile
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg",
        ...                         rank=0, world_size=1)       # here one rank; torchrun: many
        >>> K = empirical_ntk(net, x, executor=DistributedExecutor("rank0"))
        >>> bool(torch.equal(K, empirical_ntk(net, x)))   # tiles reduced exactly, one per rank
        True
        >>> dist.destroy_process_group()
    """

    def __init__(self, gather: str = "rank0", group=None) -> None:
        if gather not in ("rank0", "all", "rows"):
            raise ValueError(f"gather must be 'rank0', 'all' or 'rows', got {gather!r}")
        self.gather, self.group = gather, group
        self.timing: dict[str, float] = {}  # seconds of the last call on this rank

    def assemble(self, req: KernelRequest, engine: Engine, plan, groups: list[str],
                 out_file=None) -> dict[str, Tensor | KernelShard | None]:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedExecutor needs an initialized process group: call "
                               "rayleighflow.distributed.init_distributed() under torchrun")
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        nccl = dist.get_backend(self.group) == "nccl"
        comm_dev = req.device if nccl else torch.device("cpu")
        tiles = _Tiles(req, engine, plan, groups)
        mine = tiles.tasks()[rank::world]
        t0 = time.perf_counter()
        done: dict[tuple[int, int], dict[str, Tensor]] = {}
        for p in range(engine.n_passes):
            tiles.new_pass()
            for i, j in mine:
                acc = tiles.compute(i, j, p)
                if (i, j) in done:
                    for g in groups:
                        done[(i, j)][g].add_(acc[g])
                else:
                    done[(i, j)] = acc
        if req.device.type == "cuda":
            torch.cuda.synchronize(req.device)
        t1 = time.perf_counter()
        kind, k, n1, n2 = req.kind, req.k, req.n1, req.n2
        nblocks = len(tiles.c1)
        owner = _owners(nblocks, world)
        out_dev = torch.device(plan.out_device) if out_file is None else torch.device("cpu")
        storage = tile_shape(kind, n1, n2, k)
        res: dict = {}
        if self.gather == "all" or (self.gather == "rank0" and rank == 0):
            res = {g: allocate(storage, req.dtype, out_dev, out_file) for g in groups}
        elif self.gather == "rows":
            mine_rows = [i for i in range(nblocks) if owner[i] == rank]
            start = tiles.c1[mine_rows[0]][0] if mine_rows else 0
            stop = tiles.c1[mine_rows[-1]][1] if mine_rows else 0
            shard = tile_shape(kind, stop - start, n2, k)
            res = {g: allocate(shard, req.dtype, out_dev, out_file) for g in groups}
        for i in range(nblocks):
            s, e = tiles.c1[i]
            shape = tile_shape(kind, e - s, n2, k)
            for g in groups:
                buf = torch.zeros(shape, dtype=req.dtype, device=comm_dev)
                for (a, b), acc in done.items():
                    if a == i:
                        write_tile(buf, acc[g], kind, k, (0, e - s), tiles.c2[b], mirror=False)
                    elif tiles.sym and b == i:
                        write_tile(buf, transpose_tile(acc[g], kind), kind, k, (0, e - s),
                                   tiles.c1[a], mirror=False)
                if self.gather == "all":
                    collective("all_reduce of a kernel row block", dist.all_reduce, buf,
                               group=self.group)
                    _put_rows(res[g], buf, kind, k, s, e)
                else:
                    dst = 0 if self.gather == "rank0" else owner[i]
                    collective("reduce of a kernel row block", dist.reduce, buf,
                               dst=_global(dst, self.group), group=self.group)
                    if rank == dst:
                        off = 0 if self.gather == "rank0" else start
                        _put_rows(res[g], buf, kind, k, s - off, e - off)
        self.timing = {"tiles_s": t1 - t0, "gather_s": time.perf_counter() - t1,
                       "my_tiles": len(mine)}
        if self.gather == "rank0" and rank != 0:
            return {g: None for g in groups}
        if self.gather == "rows":
            return {g: KernelShard(start, stop, n1, res[g]) for g in groups}
        return res


def _global(rank: int, group) -> int:
    if group is None:
        return rank
    return dist.get_global_rank(group, rank)


def _owners(nblocks: int, world: int) -> list[int]:
    """Contiguous row-block ranges, as even as possible: block i → rank."""
    return [min(world - 1, i * world // max(nblocks, 1)) for i in range(nblocks)]


def _put_rows(res: Tensor, buf: Tensor, kind: KernelKind, k: int, s: int, e: int) -> None:
    buf = buf.to(res.device)
    if kind is KernelKind.FULL:
        res[s * k:e * k].copy_(buf)
    elif kind is KernelKind.TRACE:
        res[s:e].copy_(buf)
    else:
        res[:, s:e].copy_(buf)


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("rayleighflow_ntk_executor",
                                                         default=None)


def current_executor() -> LocalExecutor | DistributedExecutor:
    """The executor kernels use when none is passed (LocalExecutor unless set)."""
    ex = _CURRENT.get()
    return LocalExecutor() if ex is None else ex


@contextmanager
def use_executor(executor: LocalExecutor | DistributedExecutor) -> Iterator[None]:
    """Within the block, kernels (also those that spectra and reports build) use
    ``executor`` when called without one. A DistributedExecutor here must gather "all"
    (callers inside expect the whole kernel)."""
    if not isinstance(executor, LocalExecutor | DistributedExecutor):
        raise TypeError(f"executor must be a LocalExecutor or a DistributedExecutor, got "
                        f"{type(executor).__name__}")
    if isinstance(executor, DistributedExecutor) and executor.gather != "all":
        raise ValueError("use_executor needs DistributedExecutor(gather='all'): code inside "
                         "the block expects the whole kernel on every rank")
    token = _CURRENT.set(executor)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextmanager
def torchrun_session() -> Iterator[bool]:
    """For commands that should run unchanged under torchrun: when the environment describes
    more than one process (``WORLD_SIZE`` > 1), join the group and let every kernel built
    inside the block shard its tiles over the ranks (``DistributedExecutor("all")``); the
    group is closed at the end. Yields True on the rank that should print (rank 0, or the
    only process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_initialized()
                                                       and dist.get_world_size() == 1):
        yield True
        return
    owned = not dist.is_initialized()
    rank, _ = init_distributed()
    try:
        with use_executor(DistributedExecutor("all")):
            yield rank == 0
        collective("the closing barrier", dist.barrier)
    finally:
        if owned:
            dist.destroy_process_group()
