"""Flow time per second of wall time, and gradient evaluations, of three integrators of the
gradient flow θ̇ = −∇L(θ) on the same problems, side by side in one process.

Integrators: ``Dopri5(rtol=1e-7)`` (adaptive Runge–Kutta, torchdiffeq), ``GradientDescent(η)``
(Euler) with η = safety / λ_max(∇²L(θ₀)) per width (safety 0.5 by default: λ_max grows along
some flows, and η·λ_max must stay below 2 at every step; the dense Hessian at
θ₀ is computed here and λ_max, λ_min and η are recorded), and ``Implicit("LSODA", rtol=1e-8,
atol=1e-12)`` (scipy's stiff solver with the exact Hessian as Jacobian; its Hessian calls are
counted and timed here, they are not in ``n_grad_evals``). Problems: the two-layer tanh networks
``TwoLayer(2, m)`` (float64, generator seed 1000) for m = 2, 8, 32, 64, square loss, on the
16 × 16 Gauss–Legendre rule of ``UniformBox(2, 2.0, smooth_target)`` (256 weighted points).
Horizons t_max = 1e4 and 1e8, records ``LogSpaced(30, t_min=1e-2)``, one torch thread, and
one BLAS thread for scipy's linear algebra (threadpoolctl; without it, set
OPENBLAS_NUM_THREADS=1).

Each (integrator, width, horizon) gets the same wall budget (20 s; 3 s with ``--quick``),
enforced two ways, whichever comes first: an ``OnRecord`` observer raises KeyboardInterrupt at
the first record after the budget (the driver ends the flow with status ``interrupted`` and
keeps its records), and ``MaxEvals(n)`` with n = budget / (the marginal seconds per gradient
evaluation of two short probe runs of the same integrator and width, stopped after k and 2k
evaluations) stops a run inside a record interval (status ``step_budget``): observers see only
records, and log-spaced record intervals grow until one can outlast the whole budget. After a
stop inside an interval the adaptive integrators' ``t_final`` is the last record time (the
wall time spent on the unfinished interval is lost); gradient descent's is its last step. So
each case also keeps the rate at its last record (t and wall of that record, the same moment),
and the summary gives the ratios both ways. The implicit integrator's cost per evaluation is
not stationary (LSODA switches to its stiff mode and calls the P × P Hessian, each call worth
hundreds of gradients at P = 256): its runs end mostly at the record-time check, which can
overrun the budget by one record interval.

Per case: t reached (``t_final``), wall seconds, gradient evaluations, flow time per second,
final L and ‖∇L‖² (last record), status, and λ_max of the Hessian at the final θ (η·λ_max < 2
is gradient descent's stability condition). The summary holds, per width and horizon, the
implicit integrator's flow time per second over Dopri5's and over gradient descent's, and which
integrators reached the horizon. Writes JSON with the environment::

    python benchmarks/flow_integrators.py              # 20 s per case, 24 cases (~9 min)
    python benchmarks/flow_integrators.py --quick      # 3 s per case, a smoke run (no file
                                                       # written unless --out is given)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _env import environment
from torch.func import hessian

import rayleighflow as rf
from rayleighflow.data import smooth_target
from rayleighflow.theorems.two_layer import TwoLayer

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (2, 8, 32, 64)
HORIZONS = (1e4, 1e8)
INTEGRATORS = ("dopri5", "gd", "implicit")
SEED = 1000


@dataclass
class _Calls:
    n: int = 0
    seconds: float = 0.0


_HESSIANS = _Calls()   # the Jacobian calls of the running CountedImplicit


class CountedImplicit(rf.Implicit):
    """``rf.Implicit`` whose Jacobian (dense Hessian) calls are counted and timed in
    ``_HESSIANS``: scipy's solver calls them besides the gradient evaluations it counts."""

    def init(self, run):
        state = super().init(run)
        work = state.work
        if isinstance(work, dict) and callable(work.get("jac")):
            jac = work["jac"]

            def counted(t, y):
                begin = time.perf_counter()
                try:
                    return jac(t, y)
                finally:
                    _HESSIANS.n += 1
                    _HESSIANS.seconds += time.perf_counter() - begin

            work["jac"] = counted
        else:   # the integrator's internals changed: no count
            _HESSIANS.n = _HESSIANS.seconds = -1
        return state


def dataset() -> rf.Dataset:
    return rf.quadrature(rf.UniformBox(2, 2.0, smooth_target), 16)


def problem(width: int, data: rf.Dataset) -> rf.Problem:
    net = TwoLayer(2, width, generator=torch.Generator().manual_seed(SEED))
    return rf.Problem(rf.Model(net), data, "square")


def hessian_eigs(prob: rf.Problem, params, data: rf.Dataset) -> tuple[float, float, float]:
    """(λ_min, λ_max, seconds) of the dense ∇²L at ``params``."""
    like = {k: v.detach() for k, v in params.items()}

    def loss_of(flat):
        out, i = {}, 0
        for k, p in like.items():
            out[k] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return prob.loss_value(out, data)

    begin = time.perf_counter()
    h = hessian(loss_of)(torch.cat([p.reshape(-1) for p in like.values()]))
    ev = torch.linalg.eigvalsh(h.detach())
    return float(ev[0]), float(ev[-1]), time.perf_counter() - begin


def integrator(name: str, step: float) -> rf.Integrator:
    if name == "dopri5":
        return rf.Dopri5(rtol=1e-7)
    if name == "gd":
        return rf.GradientDescent(step)
    if name == "implicit":
        return CountedImplicit("LSODA", rtol=1e-8, atol=1e-12)
    raise ValueError(name)


def records() -> rf.LogSpaced:
    return rf.LogSpaced(30, t_min=1e-2)


def probe(prob: rf.Problem, name: str, step: float, evals: int) -> dict:
    """Seconds per gradient evaluation, marginal: runs (horizon 1e8) stopped after ``evals``
    and after 2·``evals`` evaluations, so that the set-up of a run does not count."""
    walls, counts = [], []
    for n in (evals, 2 * evals):
        begin = time.perf_counter()
        run = rf.gradient_flow(prob, integrator(name, step), t_max=max(HORIZONS),
                               records=records(), stops=[rf.MaxEvals(n)])
        walls.append(time.perf_counter() - begin)
        counts.append(run.n_grad_evals)
    marginal = (walls[1] - walls[0]) / max(counts[1] - counts[0], 1)
    return {"evals": counts, "wall_s": walls, "t_reached": run.t_final,
            "s_per_eval": marginal if marginal > 0 else walls[1] / max(counts[1], 1)}


def run_case(width: int, prob: rf.Problem, data: rf.Dataset, name: str, step: float,
             horizon: float, budget: float, s_per_eval: float, min_evals: int) -> dict:
    max_evals = max(min_evals, math.ceil(budget / s_per_eval))
    fired = []

    def deadline(row, params):   # not at the horizon's own record: that run has finished
        if row["t"] < horizon and time.perf_counter() - begin > budget:
            fired.append(row["t"])
            raise KeyboardInterrupt

    _HESSIANS.n, _HESSIANS.seconds = 0, 0.0
    integ = integrator(name, step)
    begin = time.perf_counter()
    run = rf.gradient_flow(prob, integ, t_max=horizon, records=records(),
                           stops=[rf.MaxEvals(max_evals)], observers=[rf.OnRecord(deadline)])
    wall = time.perf_counter() - begin
    traj = run.trajectory
    last = traj.rows[-1]
    lam_min, lam_max, _ = hessian_eigs(prob, run.params, data)
    rec = {
        "integrator": name, "describe": integ.describe(), "width": width,
        "n_params": prob.model.n_params, "horizon": horizon, "budget_s": budget,
        "max_evals": max_evals,
        "status": run.status.value, "message": run.message,
        "reached_horizon": run.status is rf.FlowStatus.T_MAX,
        "budget_interrupt": bool(fired),
        "t_final": run.t_final, "wall_s": wall, "driver_wall_s": run.wall_time,
        "n_grad_evals": run.n_grad_evals,
        "flow_time_per_s": run.t_final / wall,
        "grad_evals_per_s": run.n_grad_evals / wall,
        "flow_time_per_grad_eval": run.t_final / max(run.n_grad_evals, 1),
        "records": len(traj),
        "t_last_record": last["t"], "wall_at_last_record_s": last["wall"],
        "grad_evals_at_last_record": last["grad_evals"],
        "flow_time_per_s_at_last_record": (last["t"] / last["wall"] if last["wall"] > 0
                                           else math.nan),
        "final_loss": float(traj["loss"][-1]), "final_grad_sq": float(traj["grad_sq"][-1]),
        "lambda_min_final": lam_min, "lambda_max_final": lam_max,
    }
    if name == "gd":
        rec["step"] = step
        rec["step_times_lambda_max_final"] = step * lam_max
    if name == "implicit":
        rec["hessian_evals"] = _HESSIANS.n if _HESSIANS.n >= 0 else None
        rec["hessian_s"] = _HESSIANS.seconds if _HESSIANS.n >= 0 else None
    return rec


def summarize(cases: list[dict]) -> list[dict]:
    out = []
    for width in dict.fromkeys(c["width"] for c in cases):
        for horizon in HORIZONS:
            by = {c["integrator"]: c for c in cases
                  if c["width"] == width and c["horizon"] == horizon}
            if len(by) < len(INTEGRATORS):
                continue

            def ratio(key, a, b, by=by):
                return by[a][key] / by[b][key] if by[b][key] > 0 else math.inf

            row = {"width": width, "n_params": by["gd"]["n_params"], "horizon": horizon,
                   "reached_horizon": [n for n in INTEGRATORS if by[n]["reached_horizon"]],
                   "status": {n: by[n]["status"] for n in INTEGRATORS},
                   "t_final": {n: by[n]["t_final"] for n in INTEGRATORS},
                   "wall_s": {n: by[n]["wall_s"] for n in INTEGRATORS},
                   "n_grad_evals": {n: by[n]["n_grad_evals"] for n in INTEGRATORS},
                   "flow_time_per_s": {n: by[n]["flow_time_per_s"] for n in INTEGRATORS},
                   "implicit_over_dopri5": ratio("flow_time_per_s", "implicit", "dopri5"),
                   "implicit_over_gd": ratio("flow_time_per_s", "implicit", "gd"),
                   "implicit_over_dopri5_at_last_record":
                       ratio("flow_time_per_s_at_last_record", "implicit", "dopri5"),
                   "implicit_over_gd_at_last_record":
                       ratio("flow_time_per_s_at_last_record", "implicit", "gd"),
                   "final_loss": {n: by[n]["final_loss"] for n in INTEGRATORS},
                   "implicit_hessian_evals": by["implicit"].get("hessian_evals")}
            if by["implicit"]["reached_horizon"] and by["dopri5"]["reached_horizon"]:
                li, ld = by["implicit"]["final_loss"], by["dopri5"]["final_loss"]
                row["loss_at_horizon_rel_diff_implicit_dopri5"] = abs(li - ld) / abs(ld)
            out.append(row)
    return out


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "HEAD"),
            "src_changes": status.splitlines() if status else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall seconds per case (default 20; 3 with --quick)")
    ap.add_argument("--gd-safety", type=float, default=0.5,
                    help="gradient descent's step is this over λ_max(∇²L(θ₀))")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    budget = args.budget or (3.0 if args.quick else 20.0)
    probe_evals = 100 if args.quick else 300
    widths = [int(w) for w in args.widths.split(",")]
    out = args.out or (None if args.quick
                       else ROOT / "benchmarks" / "results" / "flow_integrators-cpu.json")
    torch.set_num_threads(1)
    try:   # scipy's LAPACK (LSODA's LU) on one thread too
        from threadpoolctl import threadpool_info, threadpool_limits

        limiter = threadpool_limits(limits=1, user_api="blas")   # kept until the end
        pools = [{k: p.get(k) for k in ("internal_api", "num_threads", "prefix")}
                 for p in threadpool_info()]
    except ImportError:
        limiter, pools = None, None
    env = environment("cpu")
    env["dtype"] = "float64"
    env["threadpools"] = pools
    env["nice"] = os.nice(0)
    env["git"] = git_state()
    data = dataset()
    setup = {"problem": f"TwoLayer(2, m, tanh), float64, generator seed {SEED}, square loss",
             "data": f"quadrature(UniformBox(2, 2.0, smooth_target), 16): {data.n} points",
             "widths": widths, "horizons": list(HORIZONS), "records": "LogSpaced(30, t_min=1e-2)",
             "budget_s": budget, "probe_evals": probe_evals, "gd_safety": args.gd_safety,
             "gd_step": "gd_safety / λ_max(∇²L(θ₀))",
             "integrators": {n: integrator(n, 1.0).describe().replace(
                 "step η = 1", "step η per width") for n in INTEGRATORS},
             "stops": "MaxEvals(max(probe_evals, budget / probe s_per_eval)) + OnRecord "
                      "KeyboardInterrupt after budget_s; Dopri5 keeps its default Stall()",
             "torch_threads": torch.get_num_threads()}
    report = {"environment": env, "setup": setup, "widths": [], "cases": []}

    # warm-up: imports (torchdiffeq, scipy), torch.func's first Hessian, the lean GD path
    warm = problem(2, data)
    hessian_eigs(warm, warm.params, data)
    for name in INTEGRATORS:
        rf.gradient_flow(warm, integrator(name, 0.5), t_max=10.0, records=records(),
                         stops=[rf.MaxEvals(50)])

    for width in widths:
        prob = problem(width, data)
        lam_min, lam_max, h_s = hessian_eigs(prob, prob.params, data)
        step = args.gd_safety / lam_max
        probes = {n: probe(prob, n, step, probe_evals) for n in INTEGRATORS}
        winfo = {"width": width, "n_params": prob.model.n_params, "lambda_max_0": lam_max,
                 "lambda_min_0": lam_min, "hessian_s": h_s, "gd_step": step,
                 "loss_0": float(prob.loss_value(prob.params, data)), "probes": probes}
        report["widths"].append(winfo)
        print(f"m = {width} (P = {winfo['n_params']}): λ_max(θ₀) = {lam_max:.4g}, λ_min(θ₀) = "
              f"{lam_min:.4g}, η = {step:.4g}; probe ms/eval " + ", ".join(
                  f"{n} {1e3 * p['s_per_eval']:.3g}" for n, p in probes.items()), flush=True)
        for horizon in HORIZONS:
            for name in INTEGRATORS:
                rec = run_case(width, prob, data, name, step, horizon, budget,
                               probes[name]["s_per_eval"], probe_evals)
                report["cases"].append(rec)
                extra = (f", {rec['hessian_evals']} Hessians ({rec['hessian_s']:.2f} s)"
                         if name == "implicit" and rec["hessian_evals"] is not None else "")
                print(f"  t_max {horizon:.0e} {name:8s}: {rec['status']:11s} t = "
                      f"{rec['t_final']:.4g} in {rec['wall_s']:.2f} s ({rec['flow_time_per_s']:.4g}"
                      f" /s), {rec['n_grad_evals']} evals{extra}; L = {rec['final_loss']:.6g}, "
                      f"‖∇L‖² = {rec['final_grad_sq']:.3g}", flush=True)
                report["summary"] = summarize(report["cases"])
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(report, indent=1, default=str))
        for row in report["summary"]:
            if row["width"] == width:
                print(f"  t_max {row['horizon']:.0e}: implicit/dopri5 "
                      f"{row['implicit_over_dopri5']:.3g}, implicit/gd "
                      f"{row['implicit_over_gd']:.3g}; reached: {row['reached_horizon']}",
                      flush=True)
    env["loadavg_end"] = os.getloadavg()
    del limiter
    report["summary"] = summarize(report["cases"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
