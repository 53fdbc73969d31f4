"""Full-batch gradient descent: rayleighflow's ``gradient_flow(problem, GradientDescent(η),
records=Every(10))`` against a plain torch loop, side by side in one process.

The plain loop is ``F.cross_entropy(model(x), y)``, ``backward()``, ``p.sub_(η·p.grad)`` and
``p.grad = None`` for each parameter. rayleighflow does the same steps and also logs, at every
iterate, L, ‖∇L‖² and ‖∇ℓ‖²_D (the exact discrete certificate needs them) and writes a record
(R(K; ∇ℓ), per-layer quotients) every 10 steps. Runs alternate (plain, rayleighflow, plain, ...)
so that both see the same machine load; the JSON keeps every time, the ratio of each pair and
their median, with the environment. Both sides run float64 from the same initial weights, and
the final losses are compared (they must agree to 1e-10 relative).

    python benchmarks/gd_overhead.py                 # softmax 1e5 steps + MLP, 3 pairs each
    python benchmarks/gd_overhead.py --quick         # a smoke run (small step counts)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import environment
from torch import nn

import rayleighflow as rf

ROOT = Path(__file__).resolve().parents[1]


def softmax_case(steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (100,), generator=g)
    net = nn.Linear(5, 4).double()
    return {"case": "softmax-regression", "description": "n = 100, d = 5, k = 4, linear "
            "softmax regression, float64", "x": x, "y": y, "net": net, "step": 0.5,
            "steps": steps}


def mlp_case(steps: int) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 320), nn.Tanh(), nn.Linear(320, 256), nn.Tanh(),
                        nn.Linear(256, 10)).double()
    return {"case": "mlp-digits", "description": "MLP 64-320-256-10 (tanh) on all 1797 digits,"
            " full batch, float64", "x": x, "y": y, "net": net, "step": 0.1, "steps": steps}


def plain(case: dict) -> tuple[float, float]:
    net, x, y, eta = copy.deepcopy(case["net"]), case["x"], case["y"], case["step"]
    params = list(net.parameters())
    begin = time.perf_counter()
    for _ in range(case["steps"]):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(eta * p.grad)
                p.grad = None
    elapsed = time.perf_counter() - begin
    with torch.no_grad():
        return elapsed, float(F.cross_entropy(net(x), y))


def ours(case: dict) -> tuple[float, float, int]:
    problem = rf.Problem(rf.Model(case["net"]), rf.Dataset.from_arrays(case["x"], case["y"]),
                         "cross-entropy")
    t_max = case["steps"] * case["step"]
    begin = time.perf_counter()
    run = rf.gradient_flow(problem, rf.GradientDescent(case["step"]), t_max=t_max,
                           records=rf.Every(10))
    elapsed = time.perf_counter() - begin
    evals = run.trajectory.evaluations
    return elapsed, float(run.trajectory["loss"][-1]), len(evals["t"])


def measure(case: dict, pairs: int) -> dict:
    plain(dict(case, steps=min(case["steps"], 200)))  # warm-up both sides
    ours(dict(case, steps=min(case["steps"], 200)))
    p_times, o_times, ratios = [], [], []
    for _ in range(pairs):
        tp, loss_p = plain(case)
        to, loss_o, logged = ours(case)
        p_times.append(tp)
        o_times.append(to)
        ratios.append(to / tp)
    n_params = sum(p.numel() for p in case["net"].parameters())
    return {"case": case["case"], "description": case["description"], "n_params": n_params,
            "steps": case["steps"], "record_every": 10, "pairs": pairs,
            "plain_s": p_times, "rayleighflow_s": o_times, "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "ratio_of_minima": min(o_times) / min(p_times),
            "plain_us_per_step": 1e6 * min(p_times) / case["steps"],
            "rayleighflow_us_per_step": 1e6 * min(o_times) / case["steps"],
            "evaluations_logged": logged, "final_loss_plain": loss_p,
            "final_loss_rayleighflow": loss_o,
            "final_loss_rel_diff": abs(loss_o - loss_p) / abs(loss_p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gd_overhead-cpu.json")
    args = ap.parse_args()
    warnings.simplefilter("error", DeprecationWarning)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cases = ([softmax_case(2000), mlp_case(20)] if args.quick
             else [softmax_case(100_000), mlp_case(300)])
    env = environment("cpu")
    env["dtype"] = "float64"
    results = []
    for case in cases:
        r = measure(case, 1 if args.quick else args.pairs)
        print(f"{r['case']}: plain {r['plain_us_per_step']:.1f} µs/step, rayleighflow "
              f"{r['rayleighflow_us_per_step']:.1f} µs/step; ratios {r['ratios']} (median "
              f"{r['median_ratio']:.3f}); final losses agree to {r['final_loss_rel_diff']:.1e}")
        results.append(r)
    env["loadavg_end"] = os.getloadavg()
    if not args.quick:
        args.out.write_text(json.dumps({"environment": env, "cases": results}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
