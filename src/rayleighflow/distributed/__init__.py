"""torch.distributed plumbing: process groups under torchrun, with timeouts that fail loudly.

rayleighflow never starts processes itself: ``torchrun --nproc-per-node N`` (or
``torch.multiprocessing``) does, and :func:`init_distributed` joins the group it describes
(gloo on CPU, NCCL on GPU with one GPU per rank, ``LOCAL_RANK`` choosing it).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "init_distributed", "is_distributed", "rank_and_size"]

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A peer process did not join, died, or a collective did not complete in time."""


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_distributed(backend: str | None = None, *, timeout_s: float | None = None,
                     init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (env:// by default); returns (rank, size).

    ``backend``: "gloo" (CPU) or "nccl" (GPU; sets the current device to ``LOCAL_RANK``);
    default NCCL when CUDA is available, else gloo. ``timeout_s`` (default 300 s, or the
    environment variable ``RAYLEIGHFLOW_DIST_TIMEOUT``) bounds the wait for peers to join and
    every later collective: a rank that dies or never joins raises :class:`DistributedError`
    on the others after at most that long instead of hanging. Already initialized: no-op.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if timeout_s is None:
        timeout_s = float(os.environ.get("RAYLEIGHFLOW_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise DistributedError(
            "no process group to join: start the program with torchrun --nproc-per-node N "
            "(or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE)")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    try:
        dist.init_process_group(backend, init_method=init_method,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, ValueError) as err:  # DistStoreError is a RuntimeError
        raise DistributedError(
            f"could not join the process group within {timeout_s:g} s ({str(err)[:200]}): "
            "check that every rank started and that MASTER_ADDR/MASTER_PORT agree") from err
    return dist.get_rank(), dist.get_world_size()


def collective(what: str, fn, *args, **kwargs):
    """Run one collective; a peer that died or stalled becomes a one-line DistributedError."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedError(
            f"rank {rank}: {what} failed ({str(err).splitlines()[0][:200]}): a peer process "
            "died or stopped responding within the process group's timeout "
            "(init_distributed(timeout_s=...))") from err
