"""Benchmark of the empirical NTK engine against the torch.func tutorial's two recipes.

The tutorial ("Neural Tangent Kernels", torch.func) describes two ways to build the kernel:
(1) Jacobian contraction: per-sample Jacobians by vmap(jacrev) for x1 and x2, then an einsum
per parameter summed; (2) NTK-vector products: for each pair of single samples, a VJP of each
output basis vector followed by a JVP, vmapped over the basis and over both inputs. Both are
re-implemented below from that description; they are not part of the library.

Everything runs in one process on the same seeded weights; peak memory is measured per method
in a fresh subprocess (CPU: ru_maxrss growth; GPU: torch.cuda.max_memory_allocated growth).
Writes JSON with the environment. Examples::

    python benchmarks/ntk.py                          # CPU, all cases
    python benchmarks/ntk.py --device cuda            # GPU, all cases + FLOP rates
    python benchmarks/ntk.py --quick --cases mlp784   # a smoke run
    OMP_NUM_THREADS=1 python benchmarks/ntk.py --cases planning \
        --out benchmarks/results/ntk-planning-cpu.json  # cold probe vs one forward; plans
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _env import environment  # noqa: E402

from rayleighflow.ntk import NTKOperator, empirical_ntk, kernel_matrix, plan_ntk  # noqa: E402
from rayleighflow.ntk.plan import cached_probe, clear_plan_cache  # noqa: E402
from rayleighflow.ntk.probe import PROBE_COUNTS  # noqa: E402
from rayleighflow.ntk.spectrum import extreme_eigenpairs  # noqa: E402
from rayleighflow.problem import Model  # noqa: E402

# ----------------------------------------------------------------------------------------------
# models and cases


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class CifarCNN(nn.Module):
    """A small CIFAR-shaped CNN: 2 × (Conv2d 3×3 + ReLU + max-pool), Linear 2048-128-10."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.f1 = nn.Linear(32 * 8 * 8, 128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = F.max_pool2d(torch.relu(self.c2(h)), 2)
        return self.f2(torch.relu(self.f1(h.flatten(1))))


class FullResCNN(nn.Module):
    """Two 32-channel 3×3 convolutions at the full 32×32 resolution, one max-pool, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.f = nn.Linear(32 * 16 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.f(F.max_pool2d(h, 2).flatten(1))


class ResBlockCNN(nn.Module):
    """A stem convolution, a ResNet-style block h + c2(relu(c1(h))) at 16×16, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.f = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.stem(x)), 2)
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.f(F.max_pool2d(h, 2).flatten(1))


class DepthwiseCNN(nn.Module):
    """MobileNet-style at 32×32: a convolution, a depthwise 3×3 (groups = 32), a pointwise
    1×1, one 4×4 max-pool, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.f = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c(x))))))
        return self.f(F.max_pool2d(h, 4).flatten(1))


CASES: dict[str, dict] = {
    "mlp784": dict(desc="MLP 784-512-512-10, n = 128 (1280 × 1280 kernel)",
                   build=lambda: mlp([784, 512, 512, 10]), shape=(784,), n=128, quick_n=32,
                   widths=[784, 512, 512, 10]),
    "mlp3072": dict(desc="MLP 3072-2048-2048-2048-8, n = 16",
                    build=lambda: mlp([3072, 2048, 2048, 2048, 8]), shape=(3072,), n=16,
                    quick_n=4, widths=[3072, 2048, 2048, 2048, 8]),
    "cnn": dict(desc="CIFAR-shaped CNN (3×32×32; conv16-pool-conv32-pool-fc128-fc10), n = 64",
                build=CifarCNN, shape=(3, 32, 32), n=64, quick_n=8),
    "cnn_fullres": dict(desc="CNN at full resolution (3×32×32; conv32-conv32 at 32×32, one "
                        "pool, fc10), n = 64", build=FullResCNN, shape=(3, 32, 32), n=64,
                        quick_n=8),
    "resblock": dict(desc="ResNet-style block (conv16-pool, h + conv16(relu(conv16(h))) at "
                     "16×16, pool, fc10), n = 64", build=ResBlockCNN, shape=(3, 32, 32), n=64,
                     quick_n=8),
    "depthwise": dict(desc="MobileNet-style (conv32, depthwise 3×3, pointwise 1×1 at 32×32, "
                      "pool, fc10), n = 64", build=DepthwiseCNN, shape=(3, 32, 32), n=64,
                      quick_n=8),
    "mlp784_f64": dict(desc="MLP 784-512-512-10, n = 16, float64 (160 × 160 kernel)",
                       build=lambda: mlp([784, 512, 512, 10]), shape=(784,), n=16, quick_n=8,
                       widths=[784, 512, 512, 10], dtype=torch.float64),
    "big": dict(desc="20,000 × 20,000 kernel: MLP 784-2048-2048-10, n = 2,000, library only",
                build=lambda: mlp([784, 2048, 2048, 10]), shape=(784,), n=2000, quick_n=400,
                widths=[784, 2048, 2048, 10], library_only=True),
}
TUTORIAL = ("tutorial_jacobian", "tutorial_kvp")


def setup(case: str, device: str, quick: bool) -> tuple[nn.Module, Tensor]:
    spec = CASES[case]
    torch.manual_seed(0)
    dtype = spec.get("dtype", torch.float32)
    net = spec["build"]().to(device, dtype).eval()
    n = spec["quick_n"] if quick else spec["n"]
    x = torch.randn(n, *spec["shape"], generator=torch.Generator().manual_seed(1),
                    dtype=dtype).to(device)
    return net, x


def checksum(net: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in net.parameters()))


# ----------------------------------------------------------------------------------------------
# the tutorial's recipes, re-implemented from its description


def _single(net: nn.Module):
    def f(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)
    return f


def tutorial_jacobian(net: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in net.named_parameters()}
    f = _single(net)
    j1 = vmap(jacrev(f), (None, 0))(params, x1)
    j2 = vmap(jacrev(f), (None, 0))(params, x2)
    out = None
    for name in params:
        a, b = j1[name].flatten(2), j2[name].flatten(2)
        term = torch.einsum("Naf,Mbf->NMab", a, b)
        out = term if out is None else out + term
    return out


def tutorial_kvp(net: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in net.named_parameters()}
    f = _single(net)

    def pair(a: Tensor, b: Tensor) -> Tensor:
        out, pull = vjp(lambda p: f(p, b), params)

        def column(v: Tensor) -> Tensor:
            (cot,) = pull(v)
            return jvp(lambda p: f(p, a), (params,), (cot,))[1]

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return vmap(column)(basis)  # [c', c]

    blocks = vmap(vmap(pair, (None, 0)), (0, None))(x1, x2)
    return blocks.transpose(-1, -2)


def library_auto(net: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    return empirical_ntk(Model(net), x1, convention="sum")


METHODS: dict[str, Callable] = {"tutorial_jacobian": tutorial_jacobian,
                                "tutorial_kvp": tutorial_kvp, "library_auto": library_auto}


def memory_estimate(method: str, net: nn.Module, x: Tensor, k: int) -> float:
    p = sum(q.numel() for q in net.parameters())
    n, item = x.shape[0], x.element_size()
    if method == "tutorial_jacobian":
        return 2.5 * n * k * p * item  # J(x1), J(x2) and one parameter's contraction
    if method == "tutorial_kvp":
        return 1.0 * n * n * k * p * item  # the vmapped VJPs: n1·n2·k vectors of size P
    return 0.0


def available(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return 8e9


# ----------------------------------------------------------------------------------------------
# timing and memory


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int, slow: float = 5.0):
    """(median seconds, all times, last result); one run only when the first exceeds ``slow``."""
    times, cpu, out = [], [], None
    for _ in range(repeats + 1):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if times[0] > slow:
            break
    kept = times[1:] if len(times) > 1 else times
    CPU_TIMES.append(statistics.median(cpu[1:] if len(cpu) > 1 else cpu))
    return statistics.median(kept), times, out


CPU_TIMES: list[float] = []  # process CPU seconds of the last timed() calls (all threads)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    # ru_maxrss survives fork+exec (it starts at the parent's size): use VmHWM, reset here.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def worker(case: str, method: str, device: str, quick: bool) -> None:
    """Subprocess: build the case, run one method once, print time and peak memory growth."""
    net, x = setup(case, device, quick)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    out = METHODS[method](net, x, x)
    sync(device)
    elapsed = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status("VmHWM") - base
    print(json.dumps({"time_s": elapsed, "peak_bytes": int(peak), "checksum": checksum(net),
                      "result_bytes": out.numel() * out.element_size()}))


def measure_memory(case: str, method: str, device: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{case}:{method}", "--device", device]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"status": "failed", "stderr": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_memory(fn: Callable[[], Tensor]) -> dict:
    """Peak GPU memory growth of one run, in this process (torch.cuda.max_memory_allocated)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"peak_bytes": int(peak), "result_bytes": out.numel() * out.element_size()}


def rel_diff(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------
# cases


def structured_flops(widths: list[int], n: int, k: int, n_tiles_frac: float) -> float:
    """Floating-point operations of the structured path on an MLP (multiply-add = 2)."""
    pairs = [(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    fwd = 2 * n * sum(a * b for a, b in pairs)
    bwd = 2 * n * k * sum(a * b for a, b in pairs[1:])  # δ for k outputs, no weight gradients
    gram = sum(2 * (n * k) ** 2 * b + 2 * n * n * a + 2 * (n * k) ** 2 for a, b in pairs)
    return fwd + bwd + n_tiles_frac * gram


def run_case(case: str, args) -> dict:
    spec, device = CASES[case], args.device
    net, x = setup(case, device, args.quick)
    model = Model(net)
    k = int(net(x[:1]).shape[-1])
    p = sum(q.numel() for q in net.parameters())
    rec = {"case": case, "description": spec["desc"], "n": x.shape[0], "k": k, "P": p,
           "nk": x.shape[0] * k, "dtype": str(x.dtype), "checksum": checksum(net), "methods": {}}
    plan = plan_ntk(model, x)
    rec["auto_method"] = plan.method.value
    rec["plan"] = {"block_size": plan.block_size, "n_tiles": plan.n_tiles,
                   "working_bytes": plan.working_bytes, "result_bytes": plan.result_bytes}
    results: dict[str, Tensor] = {}
    names = ["library_auto"] if spec.get("library_only") else [*TUTORIAL, "library_auto"]
    for name in names:
        need, free = memory_estimate(name, net, x, k), available(device)
        if need > 0.8 * free:
            rec["methods"][name] = {"status": "skipped",
                                    "reason": f"would need {need / 1e9:.1f} GB, "
                                              f"{free / 1e9:.1f} GB available"}
            print(f"[{case}] {name}: skipped (would need {need / 1e9:.1f} GB)", flush=True)
            continue
        try:
            med, times, out = timed(lambda name=name: METHODS[name](net, x, x), device,
                                    args.repeats)
        except (RuntimeError, NotImplementedError) as err:  # e.g. out of memory
            rec["methods"][name] = {"status": "failed", "error": str(err)[:500]}
            print(f"[{case}] {name}: failed ({str(err)[:200]})", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = kernel_matrix(out) if out.dim() == 4 else out
        entry = {"status": "ok", "time_s": med, "times_s": times}
        if device == "cuda":
            entry["memory"] = cuda_memory(lambda name=name: METHODS[name](net, x, x))
        elif not args.no_memory:
            entry["memory"] = measure_memory(case, name, device, args.quick)
        entry["process_cpu_s"] = CPU_TIMES[-1]
        rec["methods"][name] = entry
        print(f"[{case}] {name}: {med:.4g} s", flush=True)
        del out
    tut = {m: rec["methods"][m]["time_s"] for m in TUTORIAL
           if rec["methods"].get(m, {}).get("status") == "ok"}
    if tut:
        best = min(tut, key=tut.get)
        rec["tutorial_best"] = best
        rec["speedup_vs_tutorial_best"] = tut[best] / rec["methods"]["library_auto"]["time_s"]
        rec["tutorial_best_time_s"] = tut[best]
        rec["max_rel_diff_vs_tutorial_best"] = rel_diff(results["library_auto"], results[best])
    # float64 ground truth on the same weights (structured path, cheap)
    if x.shape[0] * k <= 4096:
        net64 = spec["build"]().to(device).double().eval()
        net64.load_state_dict({kk: v.double() for kk, v in net.state_dict().items()})
        ref = kernel_matrix(empirical_ntk(Model(net64), x.double(), convention="sum"))
        rec["max_rel_diff_vs_float64"] = {m: rel_diff(r, ref) for m, r in results.items()}
    rec["kvp_vs_gradient"] = kvp_vs_gradient(model, net, x, device, args.repeats)
    if device == "cuda" and spec.get("library_only") and "library_auto" in results:
        med, _, host = timed(lambda: empirical_ntk(model, x, convention="sum",
                                                   out_device="cpu"), device, 2)
        rec["host_assembly"] = {"time_s": med, "device": str(host.device),
                                "max_rel_diff_vs_device":
                                rel_diff(kernel_matrix(host), results["library_auto"])}
        del host
    if "widths" in spec:  # the rate, as a fraction of the measured matmul rate (main())
        frac = (plan.n_tiles / ((-(-x.shape[0] // plan.block_size)) ** 2)) \
            if plan.n_tiles > 1 else 1.0
        flops = structured_flops(spec["widths"], x.shape[0], k, frac)
        rate = flops / rec["methods"]["library_auto"]["time_s"]
        rec["structured_flop_rate"] = {"flops": flops, "tflops_per_s": rate / 1e12}
    return rec


def kvp_vs_gradient(model: Model, net: nn.Module, x: Tensor, device: str, repeats: int) -> dict:
    op = NTKOperator(model, x, convention="sum", batch_size=x.shape[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2)).to(x)
    y = torch.randn(x.shape[0], op.k, generator=torch.Generator().manual_seed(3)).to(x)
    params = [q for q in net.parameters()]

    def grad():
        loss = 0.5 * ((net(x) - y) ** 2).sum() / x.shape[0]
        return torch.autograd.grad(loss, params)

    t_kvp = timed(lambda: op.matvec(v), device, max(repeats, 3))[0]
    t_grad = timed(grad, device, max(repeats, 3))[0]
    return {"kvp_s": t_kvp, "gradient_s": t_grad, "ratio": t_kvp / t_grad}


def run_lanczos(args) -> dict:
    n = 2000 if args.quick else 10_000
    torch.manual_seed(0)
    net = mlp([784, 512, 512, 10]).to(args.device).eval()
    x = torch.randn(n, 784, generator=torch.Generator().manual_seed(1)).to(args.device)
    op = NTKOperator(Model(net), x, convention="mean")
    t0 = time.perf_counter()
    vals, _ = extreme_eigenpairs(op, 1, which="largest", tol=1e-6)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    print(f"[lanczos] nk = {n * 10}: λ_max = {vals[-1]:.6g} in {elapsed:.3g} s", flush=True)
    return {"model": "MLP 784-512-512-10", "n": n, "nk": n * 10, "lambda_max": float(vals[-1]),
            "time_s": elapsed, "products": op.n_products, "tol": 1e-6, "convention": "mean"}


def run_planning(args, cases: tuple[str, ...] = ("mlp3072", "cnn")) -> dict:
    """Planning cost: the cold probe against one forward pass, and plans against calls.

    Per case, interleaved repeats on the same weights (load drifts hit every side alike):
    ``forward_s``, one no-grad forward of the model on the whole input batch;
    ``cold_probe_s``, the probe alone with the plan cache cleared (``cached_probe``);
    ``cold_plan_s`` / ``warm_plan_s``, ``plan_ntk`` with the cache cleared / holding the probe;
    ``cold_call_s`` / ``warm_call_s``, ``empirical_ntk`` likewise. ``probe_passes`` are the
    (forwards, backwards) the probe ran, on at most 3 samples; ``probe_counted`` the same
    counted by a forward pre-hook on the model and by torch.autograd.grad calls.
    """
    return {"statistic": "min over interleaved repeats",
            "cases": [_planning_case(case, args) for case in cases]}


def _planning_case(case: str, args) -> dict:
    net, x = setup(case, args.device, args.quick)
    model = Model(net, {k: v.detach() for k, v in net.named_parameters()})
    reps = max(args.repeats, 7)
    empirical_ntk(model, x, convention="sum")  # warm-up (allocator, first-call costs)
    t: dict[str, list[float]] = {k: [] for k in (
        "forward_s", "cold_probe_s", "cold_plan_s", "warm_plan_s", "cold_call_s",
        "warm_call_s")}

    def clock(fn, cold: bool) -> float:
        if cold:
            clear_plan_cache()
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        return time.perf_counter() - t0

    def forward() -> None:
        with torch.no_grad():
            net(x)

    for _ in range(reps):
        t["forward_s"].append(clock(forward, False))
        t["cold_probe_s"].append(clock(lambda: cached_probe(model, model.params, x), True))
        t["cold_plan_s"].append(clock(lambda: plan_ntk(model, x), True))
        t["warm_plan_s"].append(clock(lambda: plan_ntk(model, x), False))
        t["cold_call_s"].append(clock(lambda: empirical_ntk(model, x, convention="sum"),
                                      True))
        t["warm_call_s"].append(clock(lambda: empirical_ntk(model, x, convention="sum"),
                                      False))
    best = {key: min(v) for key, v in t.items()}
    counted = {"forwards": 0, "backwards": 0}
    hook = net.register_forward_pre_hook(
        lambda *_: counted.__setitem__("forwards", counted["forwards"] + 1))
    before = dict(PROBE_COUNTS)
    clear_plan_cache()
    plan = plan_ntk(model, x)
    hook.remove()
    counted["backwards"] = PROBE_COUNTS["backwards"] - before["backwards"]
    rec = {"case": case, "description": CASES[case]["desc"], "n": x.shape[0],
           "repeats": reps, **best, "times": t,
           "cold_probe_over_forward": best["cold_probe_s"] / best["forward_s"],
           "cold_plan_over_forward": best["cold_plan_s"] / best["forward_s"],
           "plan_fraction_cold": best["cold_plan_s"] / best["cold_call_s"],
           "plan_fraction_warm": best["warm_plan_s"] / best["warm_call_s"],
           "probe_passes": list(plan.probe_passes), "probe_counted": counted,
           "plan": str(plan)}
    print(f"[planning] {case}: forward {best['forward_s']:.4g} s, cold probe "
          f"{best['cold_probe_s']:.4g} s ({rec['cold_probe_over_forward']:.2f}x), plan "
          f"{100 * rec['plan_fraction_cold']:.1f}% of a cold call, "
          f"{100 * rec['plan_fraction_warm']:.2f}% of a warm one", flush=True)
    return rec


def matmul_rate(device: str) -> dict:
    size = 8192 if device == "cuda" else 2048
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    med = timed(lambda: a @ b, device, 10)[0]
    return {"size": size, "tflops_per_s": 2 * size**3 / med / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp784,mlp3072,cnn,big,lanczos")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (off by default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.worker:
        case, method = args.worker.split(":")
        worker(case, method, args.device, args.quick)
        return
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ntk-{args.device}.json")
    report = {"environment": environment(args.device), "cases": []}
    report["matmul_rate"] = matmul_rate(args.device)
    for case in args.cases.split(","):
        if case == "lanczos":
            report["lanczos"] = run_lanczos(args)
        elif case == "planning":
            report["planning"] = run_planning(args)
        else:
            report["cases"].append(run_case(case, args))
            if args.device == "cuda":
                torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    report["environment"]["loadavg_end"] = os.getloadavg()
    for rec in report["cases"]:
        if "structured_flop_rate" in rec:
            rec["structured_flop_rate"]["fraction_of_matmul"] = (
                rec["structured_flop_rate"]["tflops_per_s"] / report["matmul_rate"]["tflops_per_s"])
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
