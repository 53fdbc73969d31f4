"""Worker body for the 2-process DDP monitor test (spawned by torch.multiprocessing, gloo).

Every rank draws the same global batches and trains its slice through DistributedDataParallel;
at each step the monitor's row is compared, in float64, with two references computed in the
rank itself on the concatenated global batch: a single-process Monitor (distributed=False) on a
copy of the model trained on that batch, and ``rf.measure`` (THEORY.md §1) at the DDP model's
parameters, with the weights DDP's averaging gives (1/N, or 1/(W·n_r) for unequal batches).
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rayleighflow.data import Dataset
from rayleighflow.distributed import init_distributed
from rayleighflow.monitor import Monitor
from rayleighflow.problem import Model, Problem
from rayleighflow.rayleigh import measure

RTOL = 1e-10


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= RTOL * abs(b) + 1e-300, f"{what}: {a!r} vs {b!r}"


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _loss(name: str, out, y, reduction: str):
    if name == "square":
        per = 0.5 * ((out - y) ** 2).sum(-1)
        return per.mean() if reduction == "mean" else per.sum()
    return F.cross_entropy(out, y, reduction=reduction)


def _batch(step: int, n: int, loss: str):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 5, dtype=torch.float64, generator=g)
    y = (torch.randn(n, 3, dtype=torch.float64, generator=g) if loss == "square"
         else torch.randint(0, 3, (n,), generator=g))
    return x, y


def _measure(net, x, y, loss, convention, weights=None):
    params = {k: v.detach() for k, v in net.named_parameters()}
    data = Dataset.from_arrays(x, y, weights=weights)
    return measure(Problem(Model(net, params), data, loss, convention))


def _check(row, ref, what):
    for key in ("loss", "grad_sq", "fgrad_sq", "rayleigh"):
        _close(row[key], getattr(ref, key), f"{what} {key}")
    for g, r in ref.group_rayleigh.items():
        _close(row[f"rayleigh[{g}]"], r, f"{what} rayleigh[{g}]")


def _run(rank, world, loss, convention, sizes, out_dir, steps=4, full=False):
    """DDP training on slices of a global batch; returns the DDP monitor's rows."""
    net = _net()
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    kw = {}
    if full:   # the full data: 11 samples, sharded 6/5 over the ranks
        fx, fy = _batch(99, 11, loss)
        shard = slice(0, 6) if rank == 0 else slice(6, 11)
        kw = {"full_data": [(fx[shard][:4], fy[shard][:4]), (fx[shard][4:], fy[shard][4:])],
              "full_every": 2}
    mon = Monitor(ddp, loss, convention=convention, optimizer=opt, sync_every=3, echo=None,
                  log=os.path.join(out_dir, f"run{rank}"), **kw)
    assert mon.ranks is not None and mon.ranks.world == world
    single = copy.deepcopy(net)            # the single-process run on the global batch
    # "sum": DDP's .grad is ∇(Σ_i ℓ_i)/W, so the same trajectory needs η/W in one process
    sopt = torch.optim.SGD(single.parameters(), lr=0.1 / (world if convention == "sum" else 1),
                           momentum=0.9)
    smon = Monitor(single, loss, convention=convention, optimizer=sopt, sync_every=3,
                   echo=None, distributed=False)
    weights = None
    if convention == "mean":   # DDP: (1/W)·Σ_r (1/n_r)·Σ_{B_r} → 1/(W·n_r) per sample
        weights = torch.cat([torch.full((n,), 1.0 / (world * n), dtype=torch.float64)
                             for n in sizes])
    refs, full_refs = [], []
    for step in range(steps):
        x, y = _batch(step, total, loss)
        out = ddp(x[lo:hi])
        lv = _loss(loss, out, y[lo:hi], convention)
        opt.zero_grad()
        lv.backward()
        mon.step(out, y[lo:hi], lv)
        refs.append(_measure(net, x, y, loss, convention, weights))
        if full and step % 2 == 0:   # the full-data estimate is taken before this update
            full_refs.append(_measure(net, fx, fy, loss, convention))
        opt.step()
        sout = single(x)
        slv = _loss(loss, sout, y, convention)
        sopt.zero_grad()
        slv.backward()
        smon.step(sout, y, slv)
        sopt.step()
    mon.close()
    smon.close()
    assert list(mon.layout.groups) == list(smon.layout.groups) == ["0", "2"]
    rows = list(mon.rows)
    assert len(rows) == steps
    for i, (row, ref) in enumerate(zip(rows, refs, strict=True)):
        _check(row, ref, f"{loss}/{convention}/{sizes} step {i} vs measure")
        assert row["n"] == total
        if row.get("loss_passed") is not None:
            _close(row["loss_passed"], row["loss"], "loss passed")
    if len(set(sizes)) == 1 or convention == "sum":   # same loss: same trajectory
        for i, (row, srow) in enumerate(zip(rows, smon.rows, strict=True)):
            for key in ("loss", "grad_sq", "fgrad_sq", "rayleigh", "rayleigh[0]",
                        "rayleigh[2]", "kl[log]"):
                _close(row[key], srow[key], f"{loss}/{convention} step {i} {key} vs 1 process")
    if full:
        assert len(mon.full_rows) == len(full_refs) == 2
        for row, ref in zip(mon.full_rows, full_refs, strict=True):
            _check(row, ref, "full data (union of the shards)")
            assert row["n_samples"] == 11
    return mon


def monitor_ddp(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    init_distributed("gloo", init_method=init, rank=rank, world_size=world, timeout_s=30)
    mon = _run(rank, world, "cross-entropy", "mean", [4, 4], out_dir, full=True)
    kinds = [d.kind for d in mon.diagnoses]
    assert "distributed" in kinds and "unequal-rank-batches" not in kinds
    assert "unsynchronized-gradients" not in kinds and mon._mismatches == 0
    _run(rank, world, "square", "sum", [3, 3], out_dir + "/sum")
    mon = _run(rank, world, "cross-entropy", "mean", [5, 3], out_dir + "/unequal")
    assert [d.kind for d in mon.diagnoses].count("unequal-rank-batches") == 1
    # Not wrapped in DDP: each rank's .grad is its own batch's, and the monitor says so.
    net = _net()
    x, y = _batch(0, 8, "cross-entropy")
    part = slice(4 * rank, 4 * rank + 4)
    mon = Monitor(net, "cross-entropy", echo=None, distributed=True)
    out = net(x[part])
    lv = F.cross_entropy(out, y[part])
    lv.backward()
    mon.step(out, y[part], lv)
    row = mon.rows[-1]
    assert row["rayleigh"] != row["rayleigh"], row          # NaN: no quotient
    assert [d.kind for d in mon.diagnoses].count("unsynchronized-gradients") == 1
    if rank == 0:
        with open(os.path.join(out_dir, "ok.json"), "w") as fh:
            json.dump({"world": world, "worker_s": time.perf_counter() - t0}, fh)
    dist.barrier()
    dist.destroy_process_group()
