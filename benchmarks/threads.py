"""The thread default on a loaded machine: a 5000-step gradient descent from the command line.

The same small experiment (an MLP on scikit-learn's digits, gradient descent, 5000 steps) runs
as ``rayleighflow run CONFIG --threads 0`` (torch's default: one thread per core) and as
``--threads auto`` (the default, which picks one thread for a problem this small), alternating,
while ``--load`` busy processes (default: twice the cores) spin on the machine, as other
people's jobs do on a shared one. Each run is a fresh process; the time is the run's own
``run_time_s`` (the flow and its records, not Python's start-up). Writes JSON with the
environment::

    python benchmarks/threads.py                  # load = 2 × cores, 3 runs per arm
    python benchmarks/threads.py --load 0         # an idle machine
    python benchmarks/threads.py --quick          # a smoke run (500 steps, 1 run per arm)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import environment

CONFIG = """\
name = "threads-bench"
seed = 0
dtype = "float32"

[model]
kind = "mlp"
widths = [64]
activation = "tanh"

[data]
kind = "sklearn"
name = "digits"
n_samples = 512
standardize = true

[loss]
name = "cross-entropy"

[flow]
t_max = {t_max}

[flow.integrator]
kind = "gradient-descent"
step = {step}

[flow.records]
kind = "every"
steps = {every}

[certify]
desingularizers = ["log"]
"""

ARMS = {"torch-default": "0", "auto": "auto"}


def _spin(stop: mp.Event) -> None:  # one busy core, as another user's job
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _run(config: Path, threads: str, out: Path) -> dict:
    cmd = [sys.executable, "-c", "from rayleighflow.cli import main; raise SystemExit(main())",
           "run", str(config), "--out", str(out), "--overwrite", "--threads", threads]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"run_time_s": summary["run_time_s"], "wall_s": wall,
            "threads": summary.get("threads", {}).get("count"),
            "threads_line": (summary.get("threads", {}).get("lines") or [""])[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3, help="runs per arm (alternating)")
    parser.add_argument("--load", type=int, default=None,
                        help="busy processes beside the runs (default 2 × cores)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "threads-cpu.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.runs = 500, 1
    load = 2 * (os.cpu_count() or 1) if args.load is None else args.load
    step = 0.5
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
    env = environment("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "threads.toml"
        config.write_text(CONFIG.format(t_max=step * args.steps, step=step,
                                        every=max(1, args.steps // 50)))
        for p in spinners:
            p.start()
        try:
            time.sleep(1.0 if load else 0.0)
            for _ in range(args.runs):
                for arm, threads in ARMS.items():
                    row = _run(config, threads, Path(tmp) / arm)
                    runs[arm].append(row)
                    print(f"{arm}: {row['run_time_s']:.2f} s ({row['threads']} threads)",
                          flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join(timeout=5)
    medians = {arm: statistics.median(r["run_time_s"] for r in rows)
               for arm, rows in runs.items()}
    result = {"benchmark": "threads", "environment": env, "steps": args.steps,
              "load_processes": load, "loadavg_end": os.getloadavg(),
              "runs": runs, "median_run_time_s": medians,
              "default_over_auto": medians["torch-default"] / medians["auto"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.steps} steps at {load} busy processes: torch's default "
          f"{medians['torch-default']:.2f} s, auto {medians['auto']:.2f} s "
          f"({result['default_over_auto']:.2f}×); wrote {args.out}")


if __name__ == "__main__":
    main()
