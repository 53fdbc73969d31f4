"""R3 as an experiment: finite-width two-layer networks on infinite-support data.

x ~ Uniform[−R, R]^d with a continuous non-polynomial target. For each width m and seed, the
flow runs on a fixed large sample (the population loss's stand-in) while an independent
held-out sample measures the test loss. P = m(d + 2) is finite while D is a continuum, so
λ_min(K) = 0 (rank K ≤ P < n·k on the sample); R(K; ∇ℓ) stays bounded below until the loss
plateaus at η(m), and η(m) decreases with m. The fraction of seeds with η < ε estimates 1 − δ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..certify import compose
from ..data import Dataset, UniformBox, smooth_target
from ..problem import Model, Problem
from ..theorems.two_layer import TwoLayer
from ..trajectory import Trajectory
from .common import finite_or_none, kernel_figure, spectrum_diagnostic
from .runner import Experiment, RunContext


def _test_loss(test: Dataset):
    def diag(problem: Problem, params, data, index: int) -> dict[str, float]:
        return {"test_loss": float(problem.loss_value(params, test))}

    return diag


def _prefix(traj: Trajectory, threshold: float) -> Trajectory:
    """The records before the loss first falls below ``threshold`` (the pre-plateau region)."""
    loss = traj["loss"]
    below = np.flatnonzero(loss < threshold)
    stop = int(below[0]) if below.size else len(loss)
    out = Trajectory(traj.meta)
    for row in traj.rows[:max(stop, 2)]:
        out.append(row)
    return out


def _run_name(m: int, seed: int) -> str:
    return f"m{m}_s{seed}"


def _figures(widths: list[int], seeds: int, show: str, eps: float) -> list[dict]:
    curves = [{"kind": "line", "x": f"traj:{_run_name(m, 0)}:t",
               "y": f"traj:{_run_name(m, 0)}:test_loss", "label": f"m = {m}"} for m in widths]
    return [
        {"name": "eta_vs_width", "title": "Limit loss η(m) against width", "panels": [
            {"title": f"test loss at the end, {seeds} seeds", "xlabel": "width m",
             "ylabel": "η(m)", "xscale": "log", "yscale": "log", "series": [
                 {"kind": "scatter", "x": "arr:all_m", "y": "arr:all_eta",
                  "label": "each seed", "color": "0.6"},
                 {"kind": "errorbar", "x": "arr:widths", "y": "arr:eta_mean",
                  "yerr": "arr:eta_std", "label": "mean ± std", "color": "C0", "style": "-"},
                 {"kind": "hline", "value": eps, "label": f"ε = {eps:g}", "color": "C3"}]},
            {"title": "estimate of 1 − δ: fraction of seeds with η < ε", "xlabel": "width m",
             "ylabel": "fraction", "xscale": "log", "yscale": "linear", "series": [
                 {"kind": "line", "x": "arr:widths", "y": "arr:success", "color": "C2",
                  "style": "-", "marker": "o"}]}]},
        {"name": "test_loss_curves", "title": "Test loss along the flow (seed 0)", "panels": [
            {"title": "held-out loss", "xlabel": "flow time t", "ylabel": "test loss",
             "xscale": "symlog", "yscale": "log", "series": curves}]},
        kernel_figure("kernel", show, f"Width {show.split('_')[0][1:]}: λ_min(K) = 0, "
                      "R(K; ∇ℓ) > 0"),
    ]


def run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    widths, seeds = [int(m) for m in p["widths"]], int(p["seeds"])
    sampler = UniformBox(p["dim"], p["radius"], smooth_target, dtype=ctx.dtype)
    train = sampler.sample(p["n_train"], ctx.generator(11)).to(ctx.device)
    test = sampler.sample(p["n_test"], ctx.generator(12)).to(ctx.device)
    show = _run_name(widths[len(widths) // 2], 0)
    ctx.save_figures(_figures(widths, seeds, show, p["eps"]))
    per_width: dict[int, dict[str, Any]] = {}
    for m in widths:
        rows = []
        for s in range(seeds):
            net = TwoLayer(p["dim"], m, activation=p["activation"],
                           generator=ctx.generator(1000 + s), dtype=ctx.dtype).to(ctx.device)
            problem = Problem(Model(net), train, "square")
            every = max(1, p["n_records"] // p["spectra_per_run"])
            res = ctx.flow(_run_name(m, s), problem, label=f"m={m} seed={s}",
                           t_max=p["t_max"], n_records=p["n_records"], rtol=p["rtol"],
                           atol=p["atol"], diagnostics=[
                               _test_loss(test),
                               spectrum_diagnostic(every, max_samples=p["n_spectrum"])])
            traj = res.trajectory
            eta = float(traj["test_loss"][-1])
            pre = _prefix(traj, p["plateau_factor"] * float(traj["loss"][-1]))
            fkl = problem.loss.functional_kl(train.weights, problem.convention)
            cert = compose(pre, fkl, rtol=p["slack_rtol"], atol=p["slack_atol"])
            lam, thr = traj["lambda_min"], traj["rank_threshold"]
            have = np.isfinite(lam)
            rows.append({"seed": s, "eta": eta, "train_final": float(traj["loss"][-1]),
                         "flow_status": res.status.value,
                         "rayleigh_min_before_plateau": float(np.nanmin(pre["rayleigh"])),
                         "lambda_min_max": float(np.nanmax(lam)),
                         # record by record: λ_min at or below that record's threshold
                         "lambda_min_zero": bool(np.all(~(lam[have] > thr[have]))),
                         "rank_max": float(np.nanmax(traj["rank"])),
                         "threshold": float(np.nanmax(traj["rank_threshold"])),
                         "cert_status": cert.status.value, "cert_mu": cert.mu,
                         "cert_violation": cert.max_bound_violation,
                         "P": problem.model.n_params})
        etas = np.array([r["eta"] for r in rows])
        # Only a flow that ran to t_max (or its loss target) has a limit loss to speak of.
        reached = np.array([r["flow_status"] in ("t_max", "loss_target") for r in rows])
        n_spec = min(p["n_spectrum"], train.n)
        per_width[m] = {
            "P": rows[0]["P"], "n_spectrum_k": n_spec, "eta_mean": float(etas.mean()),
            "eta_std": float(etas.std()), "etas": etas.tolist(),
            "success_fraction": float(np.mean((etas < p["eps"]) & reached)),
            "flows_completed": int(reached.sum()),
            "lambda_min_zero": all(r["lambda_min_zero"] for r in rows),
            "under_parameterized": rows[0]["P"] < n_spec,
            "rayleigh_min_before_plateau": min(r["rayleigh_min_before_plateau"] for r in rows),
            "certificates_hold": all(r["cert_status"] == "holds" for r in rows),
            "max_bound_violation": max(r["cert_violation"] for r in rows),
            "runs": rows}
        ctx.save_arrays(**_arrays(per_width))
    return _summary(per_width, widths, p, train)


def _arrays(per_width: dict[int, dict]) -> dict[str, Any]:
    ws = sorted(per_width)
    return {"widths": ws, "eta_mean": [per_width[m]["eta_mean"] for m in ws],
            "eta_std": [per_width[m]["eta_std"] for m in ws],
            "success": [per_width[m]["success_fraction"] for m in ws],
            "all_m": [m for m in ws for _ in per_width[m]["etas"]],
            "all_eta": [e for m in ws for e in per_width[m]["etas"]]}


def _summary(per_width, widths, p, train) -> dict[str, Any]:
    eta = np.array([per_width[m]["eta_mean"] for m in widths])
    slope = float(np.polyfit(np.log(widths), np.log(eta), 1)[0]) if len(widths) > 1 else None
    under = [m for m in widths if per_width[m]["under_parameterized"]]
    certs = [{"label": f"m = {m}: composed c·R until the plateau", "desingularizer": "log",
              "mu": min(r["cert_mu"] for r in per_width[m]["runs"]),
              "status": "holds" if per_width[m]["certificates_hold"] else "violated",
              "bound_final": None, "max_bound_violation": per_width[m]["max_bound_violation"],
              "mu_source": "composed (min over seeds)"} for m in widths]
    largest = per_width[widths[-1]]
    return {
        "convention": "mean", "P": largest["P"], "nk": train.n, "loss_initial": None,
        "loss_final": largest["eta_mean"], "t_final": p["t_max"],
        "rank": int(max(r["rank_max"] for r in largest["runs"])),
        "lambda_min": max(r["lambda_min_max"] for r in largest["runs"]),
        "lambda_max": None,
        "rayleigh_min": min(per_width[m]["rayleigh_min_before_plateau"] for m in widths),
        "certificates": certs,
        "max_bound_violation": max(per_width[m]["max_bound_violation"] for m in widths),
        "widths": widths, "eta": eta.tolist(),
        "success_fraction": [per_width[m]["success_fraction"] for m in widths],
        "eps": p["eps"], "eta_loglog_slope": finite_or_none(slope),
        "lambda_min_zero_where_underparameterized": (
            all(per_width[m]["lambda_min_zero"] for m in under) if under else None),
        "per_width": {str(m): {k: v for k, v in per_width[m].items() if k != "runs"}
                      for m in widths},
        "notes": [f"x ~ Uniform[−{p['radius']}, {p['radius']}]^{p['dim']}, target "
                  "sin(x·a) + ½cos(2x·b); flow on a fixed sample of "
                  f"{p['n_train']}, η(m) = loss on an independent sample of {p['n_test']}.",
                  f"Spectra on {min(p['n_spectrum'], train.n)} samples; widths with P < that "
                  f"(under-parameterized: {under}) have λ_min(K) = 0 by rank.",
                  "Rayleigh bounds and certificates are taken before the plateau (loss above "
                  f"{p['plateau_factor']}× its final value). Top-level P, rank, λ_min describe "
                  "the largest width."],
    }


EXPERIMENT = Experiment(
    name="two-layer",
    description="Finite-width two-layer tanh networks on x ~ Uniform[−R, R]^d (infinite "
                "support): λ_min(K) = 0 by rank, R(K; ∇ℓ) > 0 before the plateau, the limit "
                "loss η(m) falls with the width m.",
    run=run,
    defaults={"dim": 2, "radius": 2.0, "activation": "tanh",
              "widths": [2, 4, 8, 16, 32, 64, 128, 256], "seeds": 4, "n_train": 1024,
              "n_test": 4096, "n_spectrum": 512, "t_max": 500.0, "n_records": 30,
              "spectra_per_run": 3, "rtol": 1e-6, "atol": 1e-8, "eps": 0.01,
              "plateau_factor": 2.0, "slack_rtol": 1e-6, "slack_atol": 0.0},
    quick={"widths": [2, 8, 32], "seeds": 2, "n_train": 128, "n_test": 512,
           "n_spectrum": 64, "t_max": 50.0, "n_records": 12},
)
