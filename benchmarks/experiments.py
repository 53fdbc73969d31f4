"""Run built-in experiments on a device and record wall time and their key results as JSON.

    python benchmarks/experiments.py --device cuda --quick

Each experiment runs through the same entry point as ``rayleighflow run``; the JSON holds the
environment, the wall time of each run and the summary numbers a reader checks first (status,
loss, λ_min, min R(K; ∇ℓ), every certificate's status, the largest bound violation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rayleighflow.experiments import EXPERIMENTS, run_experiment

KEYS = ("status", "P", "nk", "loss_initial", "loss_final", "lambda_min", "rank",
        "rayleigh_min", "max_bound_violation")


def _environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": device,
           "loadavg": os.getloadavg()}
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(0)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.experiments.split(","):
            start = time.perf_counter()
            summary = run_experiment(name, Path(tmp) / name, device=args.device,
                                     dtype=args.dtype, quick=args.quick)
            wall = time.perf_counter() - start
            row = {"experiment": name, "wall_s": wall, **{k: summary.get(k) for k in KEYS},
                   "certificates": [(c.get("label", c["desingularizer"]), c["status"])
                                    for c in summary["certificates"]]}
            results.append(row)
            print(json.dumps(row), flush=True)
    doc = {"environment": _environment(args.device), "dtype": args.dtype,
           "quick": args.quick, "results": results}
    out = Path(args.out or f"benchmarks/results/experiments-{args.device.split(':')[0]}"
               f"{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
