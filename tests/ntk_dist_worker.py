"""Worker bodies for the multi-process NTK tests (spawned by torch.multiprocessing)."""

from __future__ import annotations

import os
import time

import torch

from cases import CASES, inputs
from rayleighflow.distributed import DistributedError, init_distributed
from rayleighflow.ntk import (
    DistributedExecutor,
    NTKOperator,
    ShardedNTKOperator,
    empirical_ntk,
    extreme_eigenpairs,
    kernel_matrix,
)
from rayleighflow.problem import Model
from rayleighflow.reference import dense_gram

DIST_CASES = ("mlp_tanh", "cnn", "tokens_layernorm")  # MLP, CNN, a model with fallback layers


def _close(a, b, tol, what):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))
    assert err <= tol, f"{what}: relative difference {err:.3g} > {tol:g}"


def kernels(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=init, rank=rank, world_size=world, timeout_s=60)
    for name in DIST_CASES:
        case = CASES[name]
        model, x = case.build(), inputs(case, 7)
        for kind in ("full", "trace", "diagonal"):
            ref = empirical_ntk(model, x, kind=kind, block_size=2)
            k_all = empirical_ntk(model, x, kind=kind, block_size=2,
                                  executor=DistributedExecutor("all"))
            _close(k_all, ref, 1e-12, f"{name}/{kind} all vs 1 process")
            k0 = empirical_ntk(model, x, kind=kind, block_size=2,
                               executor=DistributedExecutor("rank0"))
            if rank == 0:
                _close(k0, ref, 1e-12, f"{name}/{kind} rank0")
            else:
                assert k0 is None
            shard = empirical_ntk(model, x, kind=kind, block_size=2,
                                  executor=DistributedExecutor("rows"))
            _close(shard.blocks, ref[shard.start:shard.stop], 1e-12, f"{name}/{kind} rows")
        # against the independent dense jacrev reference, in the "sum" convention
        ks = empirical_ntk(model, x, convention="sum", block_size=3,
                           executor=DistributedExecutor("all"))
        _close(kernel_matrix(ks), dense_gram(model, model.params, x), 1e-10, f"{name} dense")
        # cross kernel, out of core on rank 0
        x2 = inputs(case, 5, seed=3)
        path = os.path.join(out_dir, f"{name}.npy")
        kc = empirical_ntk(model, x, x2, block_size=2, out_file=path if rank == 0 else None,
                           executor=DistributedExecutor("rank0"))
        if rank == 0:
            _close(kc, empirical_ntk(model, x, x2), 1e-12, f"{name} cross out_file")
        # sharded operator: K v and Lanczos λ_max
        op1 = NTKOperator(model, x)
        ops = ShardedNTKOperator(model, x)
        v = torch.randn(op1.shape[0], generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
        _close(ops.matvec(v), op1.matvec(v), 1e-10, f"{name} sharded K v")
        lam1 = extreme_eigenpairs(op1, 2, tol=1e-12)[0]
        lams = extreme_eigenpairs(ops, 2, tol=1e-12)[0]
        _close(lams, lam1, 1e-10, f"{name} sharded Lanczos")
        # LOBPCG does not reach 1e-9 on these 21-dimensional kernels (it stops at maxiter):
        # both sides run the same 30 iterations from the same start and must agree
        lo1 = extreme_eigenpairs(op1, 1, which="smallest", method="lobpcg", tol=1e-9,
                                 maxiter=30)[0]
        los = extreme_eigenpairs(ops, 1, which="smallest", method="lobpcg", tol=1e-9,
                                 maxiter=30)[0]
        _close(los, lo1, 1e-6, f"{name} sharded LOBPCG λ_min")
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def dies_later(rank: int, world: int, init: str, out_dir: str, timeout_s: float = 5,
               name: str = "error") -> None:
    """Rank 1 joins then exits before the assembly: rank 0 gets a DistributedError."""
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=init, rank=rank, world_size=world, timeout_s=timeout_s)
    if rank == 1:
        os._exit(0)
    case = CASES["mlp_tanh"]
    model, x = case.build(), inputs(case, 7)
    t0 = time.perf_counter()
    try:
        empirical_ntk(model, x, block_size=2, executor=DistributedExecutor("all"))
    except DistributedError as err:
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as fh:
            fh.write(f"{time.perf_counter() - t0}\n{err}")
        return
    raise AssertionError("the assembly finished without its peer")


def never_joins(rank: int, world: int, init: str, out_dir: str) -> None:
    """A group of world + 1 ranks whose last rank never starts: every rank that did start
    must fail within the 3 s timeout; each writes its seconds and the error."""
    t0 = time.perf_counter()
    try:
        init_distributed("gloo", init_method=init, rank=rank, world_size=world + 1,
                         timeout_s=3)
    except DistributedError as err:
        with open(os.path.join(out_dir, f"never-{rank}.txt"), "w") as fh:
            fh.write(f"{time.perf_counter() - t0}\n{err}")
        return
    raise AssertionError("init_distributed returned without the missing rank")


def all_checks(rank: int, world: int, init: str, out_dir: str) -> None:
    """The whole 2-process selection in one spawn (process start-up dominates): every kernel
    and operator check, then a group whose third rank never joins, then one that rank 1
    leaves early. (Every rank makes the failed attempt: torch numbers process groups per
    process, and ranks must agree on the count to meet again.)"""
    kernels(rank, world, init, out_dir)
    never_joins(rank, world, f"file://{os.path.join(out_dir, 'never-rv')}", out_dir)
    dies_later(rank, world, f"file://{os.path.join(out_dir, 'later-rv')}", out_dir,
               timeout_s=10, name="died")


def smoke(rank: int, world: int, init: str, out_dir: str) -> None:
    """The quick 2-process check of the default suite: one kernel, one K v."""
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=init, rank=rank, world_size=world, timeout_s=60)
    case = CASES["mlp_tanh"]
    model, x = case.build(), inputs(case, 5)
    k = empirical_ntk(model, x, block_size=2, executor=DistributedExecutor("all"))
    _close(k, empirical_ntk(model, x, block_size=2), 1e-12, "smoke kernel")
    v = torch.randn(5 * 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _close(ShardedNTKOperator(model, x).matvec(v), NTKOperator(model, x).matvec(v), 1e-10,
           "smoke K v")
    import torch.distributed as dist
    dist.destroy_process_group()


def nccl_kernels(rank: int, world: int, init: str, out_dir: str) -> None:
    """One CUDA device per rank: kernels sharded over NCCL equal this rank's own kernel."""
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    init_distributed("nccl", init_method=init, rank=rank, world_size=world, timeout_s=60)
    for name in DIST_CASES:
        case = CASES[name]
        module = case.build().module
        assert module is not None
        model = Model(module.to(device))
        x = inputs(case, 7).to(device)
        ref = empirical_ntk(model, x, block_size=2)
        got = empirical_ntk(model, x, block_size=2, executor=DistributedExecutor("all"))
        _close(got, ref, 1e-12, f"{name} NCCL all vs 1 process")
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    open(os.path.join(out_dir, f"nccl-ok-{rank}"), "w").close()
