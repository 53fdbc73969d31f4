"""Where an empirical_ntk call's time goes: its matrix products alone, and the rest.

For each case of ``benchmarks/ntk.py`` named, on one thread: one call is profiled with its
shapes recorded; every matrix product it ran (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``) is
then timed alone on fresh operands of the same shapes and dtype (min of ``--repeats``), and
their sum is the *product floor*: the call's time if everything but its products took none.
Written beside it: the call's own minimum time, the products' FLOPs and rate, the minor page
faults per call (first touches of freshly mapped memory), and, where
``ntk_vs_neural_tangents-cpu.json`` has the case, the speed-up over neural-tangents' best that
the floor would give (its ``speedup_ceiling``)::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/ntk_floor.py --cases mlp784,mlp784_f64
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from _env import environment

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def product_shapes(fn) -> list[tuple[str, list[list[int]]]]:
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    return [(e.name, [list(s) for s in e.input_shapes if s]) for e in prof.events()
            if e.name in PRODUCTS]


def operands(name: str, shapes: list[list[int]], dtype: torch.dtype) -> tuple:
    arity = 3 if name in {"aten::addmm", "aten::baddbmm"} else 2  # (input,) a, b
    return tuple(torch.randn(*s, dtype=dtype) for s in shapes[:arity])


def flops(name: str, shapes: list[list[int]]) -> int:
    a, b = (shapes[1], shapes[2]) if name in {"aten::addmm", "aten::baddbmm"} else shapes[:2]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def time_alone(name: str, shapes: list[list[int]], dtype: torch.dtype, repeats: int) -> float:
    ops = operands(name, shapes, dtype)
    fn = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm,
          "aten::baddbmm": torch.baddbmm}[name]
    fn(*ops)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*ops)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp784,mlp784_f64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ntk_floor-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "src"))
    import ntk as bench

    from rayleighflow.ntk import empirical_ntk

    nt_path = ROOT / "benchmarks" / "results" / "ntk_vs_neural_tangents-cpu.json"
    nt = json.loads(nt_path.read_text())["cases"] if nt_path.exists() else {}
    report: dict = {"environment": environment("cpu"), "statistic":
                    f"min of {args.repeats} calls (the whole call, and each product alone)",
                    "cases": {}}
    for case in args.cases.split(","):
        net, x = bench.setup(case, "cpu", False)

        def call(net=net, x=x) -> None:
            empirical_ntk(net, x, convention="sum")

        call()  # plan probe, warm-up
        calls, faults = [], []
        for _ in range(args.repeats):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            call()
            calls.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        shapes = product_shapes(call)
        alone = [time_alone(n, s, x.dtype, args.repeats) for n, s in shapes]
        total_flops = sum(flops(n, s) for n, s in shapes)
        floor = sum(alone)
        rec = {"description": bench.CASES[case]["desc"], "dtype": str(x.dtype)[6:],
               "call_min_s": min(calls), "products": len(shapes),
               "product_floor_s": floor, "product_flops": total_flops,
               "product_gflops_per_s": total_flops / floor / 1e9,
               "rest_s": min(calls) - floor,
               "minor_page_faults_per_call_median": sorted(faults)[len(faults) // 2]}
        if case in nt:
            best = min(nt[case]["neural_tangents_min_s"].values())
            rec["neural_tangents_best_s"] = best
            rec["speedup_ceiling"] = best / floor
            rec["speedup_at_call_min"] = best / min(calls)
        report["cases"][case] = rec
        print(f"[{case}] call {min(calls) * 1e3:.2f} ms, products alone {floor * 1e3:.2f} ms "
              f"({rec['product_gflops_per_s']:.0f} GFLOP/s), faults/call "
              f"{rec['minor_page_faults_per_call_median']}"
              + (f", ceiling {rec['speedup_ceiling']:.2f}x" if case in nt else ""), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
