"""Strong and weak scaling of the distributed NTK engine (torch.distributed; gloo or NCCL).

One kernel (strong scaling: fixed n) or a kernel whose tile work per process is fixed (weak
scaling: n = n0·√p, the work grows as n²) is assembled by ``DistributedExecutor`` on p
processes (spawned here by torch.multiprocessing, rendezvous through a file on this machine;
one GPU per rank with --device cuda), and K·v of ``ShardedNTKOperator`` is timed on the same
data. Every rank checks nothing; rank 0 compares its kernel with the 1-process kernel of the
same run (max relative difference, float32 unless --float64). Writes JSON with the
environment. Examples::

    OMP_NUM_THREADS=1 python benchmarks/ntk_distributed.py --procs 1,2 --quick   # CPU, gloo
    python benchmarks/ntk_distributed.py --device cuda --procs 1,2,4,8            # NCCL

Under torchrun instead of the built-in spawner, use the library directly (README, "Scaling
out"). Time on one machine's CPU cores measures the engine's overheads, not a speed-up: the
ranks share the cores (see ``cpu_count`` and ``threads_per_rank`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rayleighflow.distributed import init_distributed  # noqa: E402
from rayleighflow.ntk import (  # noqa: E402
    DistributedExecutor,
    ShardedNTKOperator,
    empirical_ntk,
    plan_ntk,
)

WIDTHS = {"mlp784": [784, 512, 512, 10], "mlp3072": [3072, 2048, 2048, 2048, 8]}


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def setup(args, n: int, device: torch.device):
    torch.manual_seed(0)
    dtype = torch.float64 if args.float64 else torch.float32
    net = mlp(WIDTHS[args.model]).to(device=device, dtype=dtype).eval()
    x = torch.randn(n, WIDTHS[args.model][0], generator=torch.Generator().manual_seed(1),
                    dtype=dtype).to(device)
    return net, x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_main(rank: int, world: int, init: str, args, n: int, out: str) -> None:
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if backend == "nccl":
        os.environ["LOCAL_RANK"] = str(rank)
    init_distributed(backend, init_method=init, rank=rank, world_size=world, timeout_s=600)
    import torch.distributed as dist
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    net, x = setup(args, n, device)
    bs = args.block_size  # the same tiles for every process count
    ex = DistributedExecutor("rank0")
    times, kvp = [], []
    k = None
    for _ in range(args.repeats + 1):  # first call: warm-up (plan probe, allocator)
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        k = empirical_ntk(net, x, convention="sum", block_size=bs, executor=ex)
        sync(device)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    op = ShardedNTKOperator(net, x, convention="sum")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2)).to(x)
    for _ in range(args.repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        op.matvec(v)
        sync(device)
        kvp.append(time.perf_counter() - t0)
    if rank == 0:
        net1, x1 = setup(args, n, device)
        ref = empirical_ntk(net1, x1, convention="sum", block_size=bs)
        diff = float((k.double() - ref.double()).abs().max() / ref.double().abs().max())
        plan = plan_ntk(net, x, block_size=bs)
        rec = {"processes": world, "n": n, "nk": n * int(k.shape[2]), "block_size": bs,
               "tiles": plan.n_tiles, "method": plan.method.value,
               "kernel_s": min(times[1:]), "kernel_median_s": statistics.median(times[1:]),
               "kernel_times_s": times, "rank0_phases_last_call": ex.timing,
               "kvp_s": min(kvp[1:]), "kvp_times_s": kvp,
               "max_rel_diff_vs_1_process": diff}
        Path(out).write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


def run(args, world: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(rank_main, args=(world, init, args, n, out), nprocs=world,
                           join=True, start_method="spawn")
        rec = json.loads(Path(out).read_text())
    print(f"[{args.model}] p = {world}, n = {n}: kernel {rec['kernel_s']:.4g} s, "
          f"K v {rec['kvp_s']:.4g} s, diff {rec['max_rel_diff_vs_1_process']:.2g}", flush=True)
    return rec


def environment(args) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads_per_rank": args.threads, "device": args.device,
           "backend": "nccl" if args.device == "cuda" else "gloo",
           "dtype": "float64" if args.float64 else "float32", "loadavg_start": os.getloadavg(),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_"))}}
    if args.device == "cuda":
        env.update(device_name=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                   cuda=torch.version.cuda)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="mlp784", choices=list(WIDTHS))
    ap.add_argument("--n", type=int, default=None, help="samples (strong scaling; default "
                    "512, 128 with --quick, 4096 on cuda)")
    ap.add_argument("--block-size", type=int, default=None, help="samples per tile "
                    "(default n/8 of the strong-scaling n, kept for every run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    if args.device == "cuda" and max(procs) > torch.cuda.device_count():
        raise SystemExit(f"--procs {max(procs)} needs {max(procs)} GPUs (one per rank); "
                         f"this machine has {torch.cuda.device_count()}")
    n0 = args.n or (4096 if args.device == "cuda" else (128 if args.quick else 512))
    args.block_size = args.block_size or max(1, n0 // 8)  # 36 tiles at n0, more when weak
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"ntk_distributed-{args.device}.json")
    report = {"environment": environment(args), "model": args.model,
              "strong": [], "weak": []}
    for p in procs:
        report["strong"].append(run(args, p, n0))
    for p in procs:
        report["weak"].append(run(args, p, int(round(n0 * p ** 0.5))))
    base = report["strong"][0]["kernel_s"]
    for rec in report["strong"]:
        rec["speedup_vs_first"] = base / rec["kernel_s"]
    report["environment"]["loadavg_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
