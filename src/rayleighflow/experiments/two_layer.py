"""R3 as an experiment: finite-width two-layer networks on infinite-support data.

x ~ Uniform[−R, R]^d with a continuous non-polynomial target. The theorem is about the
*population* flow and its limit loss η(m). Here the population flow is approximated by the
flow on one fixed training sample with n ≫ P (``n_train ≥ population_ratio · P`` for the
largest width, checked and reported), integrated by gradient descent (the Euler scheme of the
flow, t = kη, which also gives the exact discrete certificate, scope PATH); the population loss
is measured on an independent held-out sample.

For each width m and seed:

* a **plateau detector** reads the run: the relative change of the training loss, and of the
  held-out loss, over the last doubling of t, [t_end/2, t_end], must be below ``plateau_tol``.
  A plateaued run's level is η (held-out loss at t_end, the population loss) and η_train
  (training loss at t_end). A run that has not plateaued gets no η: it is reported as such.
* the **plateau desingularizer** φ(u) = log(u − η_train) certifies convergence to the plateau
  (observed μ*), and the composed Rayleigh certificate (φ = log, μ = c·min R) is checked on the
  records before the plateau (training loss above ``(1 + plateau_margin)·η_train``).
* 1 − δ(m), the probability over initializations that η < ε, is estimated by the fraction of
  seeds with a plateau below ε, with a Clopper–Pearson 95% interval; seeds that did not
  plateau are undecided and widen the interval (counted as failures for its lower end and as
  successes for its upper end).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._time import within
from ..certificate import Certificate
from ..certify import certify
from ..composition import compose
from ..data import Dataset, UniformBox, smooth_target
from ..desingularizers import Plateau
from ..flow import Columns, GradientDescent, Times
from ..ntk.spectrum import STRUCTURAL_ZERO, VALUE
from ..problem import Model, Problem
from ..theorems.two_layer import TwoLayer
from ..trajectory import Trajectory
from .common import (
    cert_dicts,
    finite_or_none,
    functional_kl,
    kernel_figure,
    lambda_min_label,
    spectrum_diagnostic,
)
from .plateau import detect_plateau, success_interval
from .runner import Experiment, RunContext

__all__ = ["EXPERIMENT"]


# ------------------------------------------------------------------ plateau detector


def _test_loss(test: Dataset):
    def diag(problem: Problem, params, data, index: int) -> dict[str, float]:
        return {"test_loss": float(problem.loss_value(params, test))}

    return diag


def _target(frequency: float):
    if frequency == 1.0:
        return smooth_target

    def target(x):
        return smooth_target(frequency * x)

    return target


def _prefix(traj: Trajectory, threshold: float) -> Trajectory | None:
    """The records (and the gradient evaluations between them) before the training loss first
    falls to ``threshold``; None when fewer than 2 records lie above it."""
    loss = traj["loss"]
    below = np.flatnonzero(~(loss > threshold))
    stop = int(below[0]) if below.size else len(loss)
    if stop < 2:
        return None
    out = Trajectory(traj.meta)
    ev = traj.evaluations
    prev = -math.inf
    for row in traj.rows[:stop]:
        if ev is not None:
            # evaluations logged before this record: flow times in [previous record, this one)
            for j in np.flatnonzero((ev["t"] >= prev) & (ev["t"] < row["t"])):
                out.add_evaluation(float(ev["t"][j]), float(ev["loss"][j]),
                                   float(ev["grad_sq"][j]), float(ev["fgrad_sq"][j]))
        out.append(row)
        prev = row["t"]
    return out


def _record_times(t_max: float, step: float, n: int) -> np.ndarray:
    """Log-spaced record times on the step grid, with t_max/2 and t_max among them (the
    plateau detector compares those two)."""
    grid = np.geomspace(step, t_max, max(n - 2, 2))
    times = np.concatenate([grid, [t_max / 2, t_max]])
    times = np.unique(np.maximum(np.round(times / step), 1.0) * step)
    return times[within(times, t_max)]


def _run_name(m: int, seed: int) -> str:
    return f"m{m}_s{seed}"


def _cert_rank(cert: Certificate) -> tuple[int, float]:
    """Worst first: not holding, then the smallest μ."""
    mu = cert.mu if math.isfinite(cert.mu) else -math.inf
    return (0 if not cert.holds else 1, mu)


# ------------------------------------------------------------------ figures


def _figures(widths: list[int], eps: float, show: str) -> list[dict]:
    curves = [{"kind": "line", "x": f"traj:{_run_name(m, 0)}:t",
               "y": f"traj:{_run_name(m, 0)}:test_loss", "label": f"m = {m}",
               "color": f"C{i % 10}"} for i, m in enumerate(widths)]
    train = [{"kind": "line", "x": f"traj:{_run_name(m, 0)}:t",
              "y": f"traj:{_run_name(m, 0)}:loss", "style": ":", "color": f"C{i % 10}"}
             for i, m in enumerate(widths)]
    return [
        {"name": "eta_vs_width", "title": "Plateau level η(m) and the estimate of 1 − δ",
         "panels": [
             {"title": "η(m): held-out loss at the plateau (plateaued seeds)",
              "xlabel": "width m", "ylabel": "η(m)", "xscale": "log", "yscale": "log",
              "series": [
                  {"kind": "scatter", "x": "arr:all_m", "y": "arr:all_eta",
                   "label": "each plateaued seed", "color": "0.6"},
                  {"kind": "errorbar", "x": "arr:widths", "y": "arr:eta_mid",
                   "yerr": "arr:eta_halfwidth", "label": "min–max over plateaued seeds",
                   "color": "C0", "marker": "none"},
                  {"kind": "line", "x": "arr:widths", "y": "arr:eta", "marker": "o",
                   "label": "median η(m)", "color": "C0", "style": "-"},
                  {"kind": "hline", "value": eps, "label": f"ε = {eps:g}", "color": "C3"}]},
             {"title": "1 − δ: fraction of seeds with η < ε", "xlabel": "width m",
              "ylabel": "fraction", "xscale": "log", "yscale": "linear", "ylim": [-0.05, 1.05],
              "series": [
                  {"kind": "errorbar", "x": "arr:widths", "y": "arr:success_mid",
                   "yerr": "arr:success_halfwidth",
                   "label": "Clopper–Pearson 95% (undecided seeds widen it)", "color": "C2",
                   "marker": "none"},
                  {"kind": "scatter", "x": "arr:widths", "y": "arr:success",
                   "label": "plateaued below ε / seeds", "color": "k"}]}]},
        {"name": "test_loss_curves", "title": "Loss along the flow (seed 0)", "panels": [
            {"title": "held-out loss (solid) and training loss (dotted)",
             "xlabel": "flow time t", "ylabel": "loss", "xscale": "log", "yscale": "log",
             "series": curves + train}]},
        kernel_figure("kernel", show, f"Width {show.split('_')[0][1:]} (seed 0): spectrum of "
                      "K and R(K; ∇ℓ)"),
    ]


def _arrays(per_width: dict[int, dict]) -> dict[str, Any]:
    ws = sorted(per_width)
    nan = math.nan

    def get(m, key):
        v = per_width[m][key]
        return nan if v is None else v

    lo = [get(m, "eta_min") for m in ws]
    hi = [get(m, "eta_max") for m in ws]
    ci = [per_width[m]["success_ci95"] for m in ws]
    return {"widths": ws, "eta": [get(m, "eta_median") for m in ws],
            "eta_mid": [(a + b) / 2 for a, b in zip(lo, hi, strict=True)],
            "eta_halfwidth": [(b - a) / 2 for a, b in zip(lo, hi, strict=True)],
            "success": [per_width[m]["success_fraction"] for m in ws],
            "success_mid": [(a + b) / 2 for a, b in ci],
            "success_halfwidth": [(b - a) / 2 for a, b in ci],
            "all_m": [m for m in ws for e in per_width[m]["etas"] if e is not None],
            "all_eta": [e for m in ws for e in per_width[m]["etas"] if e is not None]}


# ------------------------------------------------------------------ the run


def run(ctx: RunContext) -> dict[str, Any]:
    # These networks are tiny (n·m ≲ 1e5): intra-op threads only add synchronization, which
    # costs 10× and more on a busy machine. One thread for the run, restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    widths, seeds = [int(m) for m in p["widths"]], int(p["seeds"])
    if seeds < 1 or not widths:
        raise ValueError("two-layer needs at least one width and one seed")
    sampler = UniformBox(p["dim"], p["radius"], _target(float(p["frequency"])), dtype=ctx.dtype)
    train = sampler.sample(p["n_train"], ctx.generator(11)).to(ctx.device)
    test = sampler.sample(p["n_test"], ctx.generator(12)).to(ctx.device)
    show = _run_name(widths[len(widths) // 2], 0)
    ctx.save_figures(_figures(widths, p["eps"], show))
    times = _record_times(float(p["t_max"]), float(p["step"]), int(p["n_records"]))
    per_width: dict[int, dict[str, Any]] = {}
    shown: dict[str, list[tuple[str, Certificate]]] = {}
    for m in widths:
        rows, certs_m = [], []
        for s in range(seeds):
            net = TwoLayer(p["dim"], m, activation=p["activation"],
                           generator=ctx.generator(1000 + s), dtype=ctx.dtype).to(ctx.device)
            problem = Problem(Model(net), train, "square")
            diags = [_test_loss(test)]
            if s == 0:  # spectra for seed 0: on the whole training sample (never a subset)
                diags.append(spectrum_diagnostic(max(1, len(times) // 2)))
            res = ctx.flow(_run_name(m, s), problem, label=f"m={m} seed={s}",
                           t_max=float(p["t_max"]),
                           integrator=GradientDescent(float(p["step"])), records=Times(times),
                           observers=[Columns(d) for d in diags])
            row, certs = _read_run(res, problem, train, p)
            row["seed"] = s
            rows.append(row)
            certs_m += [(s, c) for c in certs]
            if s == 0:
                traj = res.trajectory
                row["lambda_min"] = finite_or_none(np.nanmin(traj["lambda_min"]))
                row["lambda_min_label"] = lambda_min_label(traj)
                row["rank_max"] = finite_or_none(np.nanmax(traj["rank"]))
                row["lambda_max"] = finite_or_none(np.nanmax(traj["lambda_max"]))
                row["rank_threshold"] = finite_or_none(np.nanmax(traj["rank_threshold"]))
        per_width[m], shown[str(m)] = _width_summary(m, rows, certs_m, p, train.n)
        ctx.save_arrays(**_arrays(per_width))
    return _summary(per_width, shown, widths, p, train.n)


def _read_run(res, problem: Problem, train: Dataset, p: dict) -> tuple[dict, list]:
    """One run: plateau readings, η, the gap, and its certificates (labelled)."""
    traj = res.trajectory
    t, loss, test = traj.t, traj["loss"], traj["test_loss"]
    completed = res.status.value == "t_max"
    r_train = detect_plateau(t, loss, p["plateau_tol"])
    r_test = detect_plateau(t, test, p["plateau_tol"])
    plateaued = completed and r_train.plateaued and r_test.plateaued
    eta = float(test[-1]) if plateaued else None
    eta_train = float(loss[-1]) if plateaued else None
    row: dict[str, Any] = {
        "flow_status": res.status.value, "plateaued": plateaued,
        "train_plateau": r_train.to_dict(), "test_plateau": r_test.to_dict(),
        "eta": eta, "eta_train": eta_train,
        "train_final": float(loss[-1]), "test_final": float(test[-1]),
        "gap": None if eta is None else eta - eta_train,
        "rayleigh_min": finite_or_none(np.nanmin(traj["rayleigh"])),
        "P": problem.model.n_params, "loss_initial": float(loss[0])}
    certs: list[tuple[str, Certificate]] = []
    fkl = functional_kl(problem, train)
    if plateaued and eta_train > 0:
        certs.append(("plateau", certify(traj, Plateau(eta_train), rtol=p["slack_rtol"],
                                         atol=p["slack_atol"])))
        threshold = (1.0 + p["plateau_margin"]) * eta_train
        pre = _prefix(traj, threshold)
        row["pre_plateau_threshold"] = threshold
        if pre is not None:
            row["rayleigh_min_before_plateau"] = finite_or_none(np.nanmin(pre["rayleigh"]))
            certs.append(("composed before the plateau",
                          compose(pre, fkl, rtol=p["slack_rtol"], atol=p["slack_atol"])))
    else:  # no plateau: the composed certificate over the whole run, nothing about a limit
        certs.append(("composed, whole run (no plateau)",
                      compose(traj, fkl, rtol=p["slack_rtol"], atol=p["slack_atol"])))
    for kind, cert in certs:
        row[f"{kind} status"] = cert.status.value
    return row, certs


def _width_summary(m: int, rows: list[dict], certs: list[tuple[int, tuple[str, Certificate]]],
                   p: dict, n_train: int) -> tuple[dict, list]:
    seeds = len(rows)
    etas = [r["eta"] for r in rows]
    got = np.array([e for e in etas if e is not None], dtype=np.float64)
    plateaued = int(got.size)
    k = int(np.sum(got < p["eps"]))
    undecided = seeds - plateaued
    # not a limit: where the undecided runs stood at t_max (the held-out loss may still move)
    below_now = sum(1 for r in rows if r["eta"] is None and r["test_final"] < p["eps"])
    ci = success_interval(k, undecided, seeds)
    gaps = [r["gap"] for r in rows if r["gap"] is not None]
    # the worst certificate of each kind over the seeds, for summary["certificates"]
    worst: dict[str, tuple[int, Certificate]] = {}
    for s, (kind, cert) in certs:
        if kind not in worst or _cert_rank(cert) < _cert_rank(worst[kind][1]):
            worst[kind] = (s, cert)
    status_counts: dict[str, dict[str, int]] = {}
    for _, (kind, cert) in certs:
        key = f"{cert.status.value} (scope {cert.scope.value})"
        status_counts.setdefault(kind, {})
        status_counts[kind][key] = status_counts[kind].get(key, 0) + 1
    violations = [c.max_bound_violation for _, (_, c) in certs
                  if math.isfinite(c.max_bound_violation)]
    first = rows[0]
    pre = [r["rayleigh_min_before_plateau"] for r in rows
           if r.get("rayleigh_min_before_plateau") is not None]
    summary = {
        "P": first["P"], "P_vs_nk": "P < nk" if first["P"] < n_train else "P ≥ nk",
        "seeds": seeds, "plateaued": plateaued, "undecided": undecided,
        "undecided_below_eps_at_t_max": below_now,
        "successes": k, "success_fraction": k / seeds,
        "success_fraction_if_undecided_succeed": (k + undecided) / seeds,
        "success_ci95": list(ci),
        "etas": etas, "eta_median": float(np.median(got)) if plateaued else None,
        "eta_min": float(got.min()) if plateaued else None,
        "eta_max": float(got.max()) if plateaued else None,
        "test_train_gap_median": float(np.median(gaps)) if gaps else None,
        "test_train_gap_max": float(np.max(np.abs(gaps))) if gaps else None,
        "rayleigh_min_before_plateau": min(pre) if pre else None,
        "rayleigh_min": min(r["rayleigh_min"] for r in rows if r["rayleigh_min"] is not None),
        "lambda_min": first.get("lambda_min"), "lambda_min_label": first.get("lambda_min_label"),
        "rank": first.get("rank_max"), "rank_threshold": first.get("rank_threshold"),
        "lambda_max": first.get("lambda_max"),
        "certificate_counts": status_counts,
        "max_bound_violation": max(violations) if violations else None,
        "runs": rows}
    labelled = [(f"m = {m}: {kind}, worst of {seeds} seeds (seed {s})", cert)
                for kind, (s, cert) in worst.items()]
    return summary, labelled


def _summary(per_width: dict[int, dict], shown: dict[str, list], widths: list[int], p: dict,
             n_train: int) -> dict[str, Any]:
    largest = per_width[widths[-1]]
    p_max = max(per_width[m]["P"] for m in widths)
    ratio = n_train / p_max
    population = ratio >= p["population_ratio"]
    certs = []
    for m in widths:
        certs += cert_dicts(shown[str(m)], per_width[m]["runs"][0]["loss_initial"])
    violations = [per_width[m]["max_bound_violation"] for m in widths
                  if per_width[m]["max_bound_violation"] is not None]
    have = [m for m in widths if per_width[m]["eta_median"] is not None]
    slope = None
    if len(have) >= 2:
        slope = finite_or_none(np.polyfit(np.log(have),
                                          np.log([per_width[m]["eta_median"] for m in have]),
                                          1)[0])
    run0 = largest["runs"][0]
    summary: dict[str, Any] = {
        "convention": "mean", "P": largest["P"], "nk": n_train,
        "loss_initial": run0["loss_initial"], "loss_final": run0["train_final"],
        "t_final": float(p["t_max"]),
        "rank": None if largest["rank"] is None else int(largest["rank"]),
        "rank_threshold": largest["rank_threshold"],
        "lambda_min": largest["lambda_min"], "lambda_min_label": largest["lambda_min_label"],
        "lambda_max": largest["lambda_max"],
        "rayleigh_min": min(per_width[m]["rayleigh_min"] for m in widths),
        "certificates": certs,
        "max_bound_violation": max(violations) if violations else None,
        "population": {
            "approximation": "fixed training sample, n_train ≥ population_ratio · P_max",
            "n_train": n_train, "n_test": p["n_test"], "P_max": p_max,
            "n_train_over_P_max": ratio, "population_ratio": p["population_ratio"],
            "population_like": population,
            "integrator": f"gradient descent (Euler), step {p['step']:g}"},
        "plateau_rule": {"tol": p["plateau_tol"],
                         "window": "the last doubling of t, [t_end/2, t_end]",
                         "curves": "training and held-out loss", "margin": p["plateau_margin"]},
        "widths": widths,
        "eta": [per_width[m]["eta_median"] for m in widths],
        "plateaued": [per_width[m]["plateaued"] for m in widths],
        "seeds": int(p["seeds"]),
        "success_fraction": [per_width[m]["success_fraction"] for m in widths],
        "success_ci95": [per_width[m]["success_ci95"] for m in widths],
        "eps": p["eps"],
        "eta_loglog_slope_descriptive": slope,
        "eta_loglog_slope_widths": have if len(have) >= 2 else [],
        "per_width": {str(m): {k: v for k, v in per_width[m].items() if k != "runs"}
                      for m in widths},
        "runs": {str(m): per_width[m]["runs"] for m in widths},
    }
    summary["notes"] = notes(summary, p)
    return summary


# ------------------------------------------------------------------ notes from the numbers


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def notes(s: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """Every sentence read off the summary's numbers and statuses (never assumed)."""
    pop = s["population"]
    out = [
        f"x ~ Uniform[−{p['radius']:g}, {p['radius']:g}]^{p['dim']}, target "
        f"sin(ωx·a) + ½cos(2ωx·b) with ω = {p['frequency']:g}; the flow runs by "
        f"{pop['integrator']} on a fixed training sample of n = {pop['n_train']}, and η(m) is "
        f"the loss on an independent held-out sample of {pop['n_test']}.",
        (f"n_train / P_max = {pop['n_train_over_P_max']:.3g} ≥ {pop['population_ratio']:g}: "
         "the fixed sample stands in for the population flow, and the held-out loss for the "
         "population loss."
         if pop["population_like"] else
         f"n_train / P_max = {pop['n_train_over_P_max']:.3g} < {pop['population_ratio']:g}: "
         "the sample is too small to stand in for the population flow; η(m) here is a "
         "finite-sample quantity, not the theorem's limit."),
        f"Plateau rule: relative change of the training and of the held-out loss over "
        f"[t_end/2, t_end] ≤ {p['plateau_tol']:g}; a run that fails it by t_max = "
        f"{s['t_final']:g} gets no η.",
    ]
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        lo, hi = w["success_ci95"]
        parts = [f"m = {m} (P = {w['P']}, {w['P_vs_nk']} = {s['nk']}): "
                 f"{w['plateaued']} of {w['seeds']} seeds plateaued"]
        if w["plateaued"]:
            parts.append(f"median η = {_g(w['eta_median'])} (range {_g(w['eta_min'])}–"
                         f"{_g(w['eta_max'])}), median test − train gap "
                         f"{_g(w['test_train_gap_median'])}")
        if w["undecided"]:
            parts.append(f"{w['undecided']} not plateaued by t_max (no η; "
                         f"{w['undecided_below_eps_at_t_max']} of them with a held-out loss "
                         f"below ε at t_max, which is not a limit)")
        parts.append(f"{w['successes']} of {w['seeds']} with η < ε = {s['eps']:g}, 1 − δ in "
                     f"[{lo:.2f}, {hi:.2f}] (Clopper–Pearson 95%)")
        parts.append(_spectrum_clause(w, s["nk"]))
        for kind, counts in w["certificate_counts"].items():
            parts.append(f"{kind}: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
        out.append("; ".join(parts) + ".")
    slope = s["eta_loglog_slope_descriptive"]
    if slope is None:
        out.append("Fewer than two widths have a plateau level: no log-log slope of η(m).")
    else:
        out.append(f"Log-log slope of the median η(m) over widths {s['eta_loglog_slope_widths']}"
                   f": {slope:.3g} (descriptive only: a fit, not a rate the theorem gives).")
    out.append("summary['certificates'] holds, per width, the worst seed's certificate of each "
               "kind; per_width[...]['certificate_counts'] counts every seed's. Top-level P, "
               "rank and λ_min describe the largest width, seed 0.")
    return out


def _spectrum_clause(w: dict[str, Any], nk: int) -> str:
    label = w["lambda_min_label"]
    if label is None:
        return "no spectrum was recorded"
    if label == STRUCTURAL_ZERO:
        return (f"λ_min(K) = 0 is structural (rank K ≤ P = {w['P']} < nk = {nk}): a statement "
                "from the rank, not a measurement")
    what = "a measured value" if label == VALUE else label
    return (f"min λ_min(K) = {_g(w['lambda_min'])} over seed 0's spectra ({what}; rank "
            f"{_g(w['rank'])} of {nk}, threshold {_g(w['rank_threshold'])})")


EXPERIMENT = Experiment(
    name="two-layer",
    description="Finite-width two-layer tanh networks on x ~ Uniform[−R, R]^d (infinite "
                "support), the population flow approximated on a fixed sample with n ≫ P: "
                "plateau detection, the plateau level η(m), the plateau certificate, and 1 − δ "
                "with a Clopper–Pearson interval.",
    run=run,
    defaults={"dim": 2, "radius": 2.0, "frequency": 1.0, "activation": "tanh",
              "widths": [2, 4, 8, 16], "seeds": 16, "n_train": 512, "n_test": 2048,
              "population_ratio": 8.0, "t_max": 1536.0, "step": 0.5, "n_records": 24,
              "eps": 0.01, "plateau_tol": 0.02, "plateau_margin": 1.0,
              "slack_rtol": 1e-6, "slack_atol": 0.0},
    # --quick: a larger step reaches t = 1024 in the ~20 s budget; GD stays monotone here (the
    # discrete certificate checks α_k > 0 at every step and says so if it does not)
    quick={"widths": [2, 8], "seeds": 4, "n_train": 256, "n_test": 512, "t_max": 1024.0,
           "step": 1.0, "n_records": 14},
)
