"""R3 as an experiment: finite-width two-layer networks on infinite-support data reach
η(m) < ε with probability 1 − δ(m) → 1 as the width grows, without over-parameterization.

x ~ Uniform[−R, R]^d with a continuous non-polynomial target. The theorem is about the
*population* flow and its limit loss η(m). Here the flow trains on the population itself: the
tensor Gauss–Legendre rule of the box (:func:`~rayleighflow.quadrature`) is a finite weighted
dataset whose loss is the population loss up to the rule's error, stated against a finer rule;
a fresh Monte Carlo sample checks it independently (``measure = "sample"`` trains on a Monte
Carlo sample instead and reports the held-out gap). The flow is integrated by the stiff
integrator (:class:`~rayleighflow.Implicit`) until its limit decides the seed
(:mod:`.two_layer_read`): a checked loss below ε, a strict minimum at or above ε, or a plateau
at t_max. Per width: 1 − δ(m) with its Clopper–Pearson interval, η at the limits, the plateau
certificate (φ = log(u − η)) and the composed Rayleigh certificate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..certificate import Certificate
from ..certify import certify
from ..composition import compose
from ..data import Dataset, UniformBox, quadrature, smooth_target
from ..desingularizers import Plateau
from ..flow import Columns, FlowResult, Implicit, LimitReached, LogSpaced, LossBelow, Start, Times
from ..flow import gradient_flow as plain_flow
from ..hessian import strict_minimum
from ..problem import Model, Problem
from ..theorems.two_layer import TwoLayer
from .common import (
    cert_dicts,
    finite_or_none,
    functional_kl,
    kernel_figure,
    lambda_min_label,
    spectrum_diagnostic,
)
from .plateau import detect_plateau
from .runner import Experiment, RunContext
from .threads import one_thread_outside_cli
from .two_layer_read import BELOW, FAILED, UNDECIDED, notes, prefix, width_summary

__all__ = ["EXPERIMENT"]


def _target(frequency: float):
    if frequency == 1.0:
        return smooth_target

    def target(x):
        return smooth_target(frequency * x)

    return target


def _mc_loss(mc: Dataset):
    def diag(problem: Problem, params, data, index: int) -> dict[str, float]:
        return {"test_loss": float(problem.loss_value(params, mc))}

    return diag


def _mc_estimate(problem: Problem, params, mc: Dataset) -> tuple[float, float]:
    """The Monte Carlo population loss at θ and its standard error (uniform sample)."""
    with torch.no_grad():
        f = problem.model(params, mc.x)
        per = problem.loss.per_sample(f, problem.targets(mc, f)).double()
    return float(per.mean()), float(per.std() / math.sqrt(per.numel()))


def _run_name(m: int, seed: int) -> str:
    return f"m{m}_s{seed}"


def _jitter(m: int, s: int, seeds: int) -> float:
    """Seeds spread around their width on the log axis, so that points do not overlap."""
    return m * math.exp(0.12 * ((s + 0.5) / seeds - 0.5))


# ------------------------------------------------------------------ figures


def _figures(widths: list[int], eps: float, level: float, show: str) -> list[dict]:
    curves = [{"kind": "line", "x": f"traj:{_run_name(m, 0)}:t",
               "y": f"traj:{_run_name(m, 0)}:loss", "label": f"m = {m}",
               "color": f"C{i % 10}"} for i, m in enumerate(widths)]
    test = [{"kind": "line", "x": f"traj:{_run_name(m, 0)}:t",
             "y": f"traj:{_run_name(m, 0)}:test_loss", "style": ":", "color": f"C{i % 10}"}
            for i, m in enumerate(widths)]
    return [
        {"name": "eta_vs_width", "title": "η(m) at the flows' limits, and 1 − δ(m)",
         "panels": [
             {"title": "η(m): population loss where each seed was decided",
              "xlabel": "width m", "ylabel": "η(m)", "xscale": "log", "yscale": "log",
              "series": [
                  {"kind": "scatter", "x": "arr:failed_m", "y": "arr:failed_eta",
                   "label": "η ≥ ε: the limit (strict minimum or plateau)", "color": "C3",
                   "marker": "o"},
                  {"kind": "scatter", "x": "arr:below_m", "y": "arr:below_eta",
                   "label": "η < ε: the loss that decided it (η is lower)", "color": "C0",
                   "marker": "v"},
                  {"kind": "scatter", "x": "arr:undecided_m", "y": "arr:undecided_eta",
                   "label": "undecided: the loss where it stopped", "color": "0.5",
                   "marker": "x"},
                  {"kind": "line", "x": "arr:widths", "y": "arr:eta", "marker": "s",
                   "label": "median over decided seeds", "color": "k", "style": "-"},
                  {"kind": "hline", "value": eps, "label": f"ε = {eps:g}", "color": "C3"}]},
             {"title": "1 − δ(m): the fraction of seeds with η < ε", "xlabel": "width m",
              "ylabel": "fraction", "xscale": "log", "yscale": "linear", "ylim": [-0.05, 1.05],
              "series": [
                  {"kind": "errorbar", "x": "arr:widths", "y": "arr:success_mid",
                   "yerr": "arr:success_halfwidth", "label": "Clopper–Pearson 95%",
                   "color": "C2", "marker": "none"},
                  {"kind": "scatter", "x": "arr:widths", "y": "arr:success",
                   "label": "seeds decided η < ε / seeds", "color": "k"},
                  {"kind": "hline", "value": level, "label": f"level {level:g}",
                   "color": "0.5"}]}]},
        {"name": "loss_curves", "title": "Loss along the flow (seed 0)", "panels": [
            {"title": "training (quadrature) loss, solid; Monte Carlo check, dotted",
             "xlabel": "flow time t", "ylabel": "loss", "xscale": "log", "yscale": "log",
             "series": curves + test
             + [{"kind": "hline", "value": eps, "label": f"ε = {eps:g}", "color": "C3"}]}]},
        kernel_figure("kernel", show, f"Width {show.split('_')[0][1:]} (seed 0): spectrum of "
                      "K and R(K; ∇ℓ)"),
    ]


def _arrays(per_width: dict[int, dict]) -> dict[str, Any]:
    ws = sorted(per_width)
    out: dict[str, Any] = {"widths": ws}
    for key, decision in (("failed", FAILED), ("below", BELOW), ("undecided", UNDECIDED)):
        pts = [(_jitter(m, r["seed"], len(per_width[m]["runs"])), r["eta"]) for m in ws
               for r in per_width[m]["runs"] if r["decision"] == decision]
        out[f"{key}_m"] = [x for x, _ in pts]
        out[f"{key}_eta"] = [y for _, y in pts]
    ci = [per_width[m]["success_ci95"] for m in ws]
    out.update(eta=[math.nan if per_width[m]["eta_median"] is None else per_width[m]["eta_median"]
                    for m in ws],
               success=[per_width[m]["success_fraction"] for m in ws],
               success_mid=[(a + b) / 2 for a, b in ci],
               success_halfwidth=[(b - a) / 2 for a, b in ci])
    return out


# ------------------------------------------------------------------ the run


def run(ctx: RunContext) -> dict[str, Any]:
    # These networks are tiny (n·m ≲ 1e5): intra-op threads only add synchronization, which
    # costs 10× and more on a busy machine.
    with one_thread_outside_cli():
        return _run(ctx)


def _data(ctx: RunContext, p: dict) -> tuple[Dataset, Dataset | None, Dataset, dict[str, Any]]:
    """(training measure, the finer rule that checks it or None, the Monte Carlo sample, the
    population block of the summary)."""
    box = UniformBox(p["dim"], p["radius"], _target(float(p["frequency"])), dtype=ctx.dtype)
    mc = box.sample(p["n_mc"], ctx.generator(12)).to(ctx.device)
    pop: dict[str, Any] = {"measure": p["measure"], "n_mc": p["n_mc"]}
    if p["measure"] == "quadrature":
        train = quadrature(box, int(p["points_per_dim"])).to(ctx.device)
        check = quadrature(box, int(p["check_points_per_dim"])).to(ctx.device)
        pop.update(points_per_dim=p["points_per_dim"],
                   check_points_per_dim=p["check_points_per_dim"])
    elif p["measure"] == "sample":
        train, check = box.sample(p["n_train"], ctx.generator(11)).to(ctx.device), None
    else:
        raise ValueError(f"two-layer: measure must be 'quadrature' or 'sample' (got "
                         f"{p['measure']!r})")
    pop["n_train"] = train.n
    return train, check, mc, pop


def _integrator(p: dict, tighter: float = 1.0) -> Implicit:
    return Implicit(p["method"], rtol=p["rtol"] / tighter, atol=p["atol"] / tighter)


def _run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    widths, seeds = [int(m) for m in p["widths"]], int(p["seeds"])
    if seeds < 1 or not widths:
        raise ValueError("two-layer needs at least one width and one seed")
    if not 0 < p["margin"] < 1:
        raise ValueError(f"two-layer: margin must lie in (0, 1) (got {p['margin']})")
    train, check, mc, pop = _data(ctx, p)
    show = _run_name(widths[len(widths) // 2], 0)
    ctx.save_figures(_figures(widths, p["eps"], p["level"], show))
    per_width: dict[int, dict[str, Any]] = {}
    shown: dict[str, list[tuple[str, Certificate]]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for m in widths:
        rows, certs_m = [], []
        for s in range(seeds):
            row, certs, res = _seed(ctx, m, s, train, check, mc, p)
            rows.append(row)
            certs_m += [(s, c) for c in certs]
            if s == 0:
                checks[str(m)] = _integrator_check(ctx, m, train, res, p)
        if not checks[str(m)]["within_margin"]:
            for row in rows:  # the integrator's error could hide a loss above ε
                if row["decision"] == BELOW:
                    row["decision"], row["rule"] = UNDECIDED, "integrator check above margin"
        per_width[m], shown[str(m)] = width_summary(m, rows, certs_m, p, train.n)
        ctx.save_arrays(**_arrays(per_width))
    return _summary(per_width, shown, checks, widths, p, train.n, pop)


def _net(ctx: RunContext, m: int, s: int, p: dict) -> TwoLayer:
    return TwoLayer(p["dim"], m, activation=p["activation"], generator=ctx.generator(1000 + s),
                    dtype=ctx.dtype).to(ctx.device)


def _seed(ctx: RunContext, m: int, s: int, train: Dataset, check: Dataset | None,
          mc: Dataset, p: dict) -> tuple[dict, list[tuple[str, Certificate]], FlowResult]:
    """One flow to its decision: the row of the summary and its certificates."""
    problem = Problem(Model(_net(ctx, m, s, p)), train, "square")
    diags = [_mc_loss(mc)]
    records = LogSpaced(int(p["n_records"]), t_min=float(p["t_first"]))
    if s == 0:  # spectra for seed 0: on the whole training measure (never a subset)
        diags.append(spectrum_diagnostic(2))
    eps = float(p["eps"])
    res = ctx.flow(_run_name(m, s), problem, label=f"m={m} seed={s}", t_max=float(p["t_max"]),
                   integrator=_integrator(p), records=records,
                   stops=[LossBelow(eps * (1 - p["margin"])), LimitReached(p["limit_grad_rtol"])],
                   observers=[Columns(d) for d in diags])
    traj, final = res.trajectory, res
    row: dict[str, Any] = {"seed": s, "P": problem.model.n_params,
                           "loss_initial": float(traj["loss"][0]), "continued": False,
                           "evidence": None, "plateau": None}
    status = res.status.value
    if status == "loss_target":
        row["decision"], row["rule"] = BELOW, "checked loss"
    elif status in ("limit", "t_max"):
        ev = _evidence(problem, res, train, p)
        row["evidence"] = ev.to_dict()
        if not ev.is_strict_minimum and status == "limit":
            # stationary, but the Hessian does not show a strict minimum: on to t_max
            final = ctx.flow(_run_name(m, s) + "_to_t_max", problem, t_max=float(p["t_max"]),
                             integrator=_integrator(p), records=records,
                             start=Start(res.params, res.t_final, res.n_grad_evals),
                             stops=[LossBelow(eps * (1 - p["margin"]))],
                             observers=[Columns(_mc_loss(mc))])
            row["continued"] = True
            if final.status.value != "loss_target":
                ev = _evidence(problem, final, train, p)
                row["evidence"] = ev.to_dict()
        reading = detect_plateau(final.trajectory.t, final.trajectory["loss"], p["plateau_tol"])
        if final.status.value == "loss_target":
            row["decision"], row["rule"] = BELOW, "checked loss"
        elif ev.at_or_above(eps):
            row["decision"], row["rule"] = FAILED, "strict minimum"
        elif ev.is_strict_minimum:
            row["decision"], row["rule"] = UNDECIDED, "strict minimum whose bound is below ε"
        elif final.status.value == "t_max" and reading.plateaued and reading.level >= eps:
            row["decision"], row["rule"] = FAILED, "plateau at t_max"
            row["plateau"] = reading.to_dict()
        else:
            row["decision"] = UNDECIDED
            row["rule"] = f"no strict minimum, no plateau by t = {final.t_final:.3g}"
    else:
        row["decision"], row["rule"] = UNDECIDED, f"flow stopped: {res.message}"
    loss_final = float(final.trajectory["loss"][-1])
    mc_loss, mc_se = _mc_estimate(problem, final.params, mc)
    row.update(flow_status=final.status.value, flow_message=final.message,
               t_final=float(final.t_final), grad_evals=int(final.n_grad_evals),
               loss_final=loss_final, eta=loss_final, mc_loss=mc_loss, mc_se=mc_se,
               quadrature_error=None if check is None else
               abs(float(problem.loss_value(final.params, check)) - loss_final),
               rayleigh_min=finite_or_none(np.nanmin(traj["rayleigh"])))
    if s == 0:
        row["lambda_min"] = finite_or_none(np.nanmin(traj["lambda_min"]))
        row["lambda_min_label"] = lambda_min_label(traj)
        row["rank_max"] = finite_or_none(np.nanmax(traj["rank"]))
        row["lambda_max"] = finite_or_none(np.nanmax(traj["lambda_max"]))
        row["rank_threshold"] = finite_or_none(np.nanmax(traj["rank_threshold"]))
    certs = _certificates(problem, train, traj, row, p)
    for kind, cert in certs:
        row[f"{kind} status"] = cert.status.value
    return row, certs, res


def _certificates(problem: Problem, train: Dataset, traj, row: dict,
                  p: dict) -> list[tuple[str, Certificate]]:
    """At a limit at or above ε: the plateau certificate and the composed one before the
    plateau; otherwise the composed certificate over the whole run."""
    fkl = functional_kl(problem, train)
    rtol, atol = p["slack_rtol"], p["slack_atol"]
    eta = float(np.min(traj["loss"]))
    if row["decision"] == FAILED and row["rule"] == "strict minimum" and eta > 0:
        certs = [("plateau", certify(traj, Plateau(eta), rtol=rtol, atol=atol))]
        threshold = (1.0 + p["plateau_margin"]) * eta
        row["pre_plateau_threshold"] = threshold
        pre = prefix(traj, threshold)
        if pre is not None:
            certs.append(("composed before the plateau", compose(pre, fkl, rtol=rtol, atol=atol)))
        return certs
    return [("composed, whole run", compose(traj, fkl, rtol=rtol, atol=atol))]


def _evidence(problem: Problem, res: FlowResult, train: Dataset, p: dict):
    return strict_minimum(problem, res.params, train, eig_rtol=p["eig_rtol"],
                          newton_rtol=p["newton_rtol"])


def _integrator_check(ctx: RunContext, m: int, train: Dataset, res: FlowResult,
                      p: dict) -> dict[str, Any]:
    """Seed 0 re-integrated at rtol/100 and atol/100 to its decision time: the relative
    difference of the training loss there, against the decision margin."""
    problem = Problem(Model(_net(ctx, m, 0, p)), train, "square")
    t_end = float(res.t_final)
    tight = plain_flow(problem, _integrator(p, 100.0), t_max=t_end, records=Times([t_end]))
    loss, loss_tight = float(res.trajectory["loss"][-1]), float(tight.trajectory["loss"][-1])
    rel = abs(loss - loss_tight) / max(loss_tight, 1e-300)
    return {"t": t_end, "loss": loss, "loss_tight": loss_tight, "rel_diff": rel,
            "status_tight": tight.status.value, "margin": p["margin"],
            "within_margin": bool(tight.status.value == "t_max" and rel <= p["margin"])}


def _summary(per_width: dict[int, dict], shown: dict[str, list], checks: dict[str, dict],
             widths: list[int], p: dict, n_train: int, pop: dict) -> dict[str, Any]:
    largest = per_width[widths[-1]]
    certs = []
    for m in widths:
        certs += cert_dicts(shown[str(m)], per_width[m]["runs"][0]["loss_initial"])
    violations = [per_width[m]["max_bound_violation"] for m in widths
                  if per_width[m]["max_bound_violation"] is not None]
    quad = [per_width[m]["quadrature_error_max"] for m in widths
            if per_width[m]["quadrature_error_max"] is not None]
    pop["quadrature_error_max"] = max(quad) if quad else None
    at_level = [m for m in widths if per_width[m]["success_ci95"][0] >= p["level"]]
    run0 = largest["runs"][0]
    summary: dict[str, Any] = {
        "convention": "mean", "P": largest["P"], "nk": n_train,
        "loss_initial": run0["loss_initial"], "loss_final": run0["loss_final"],
        "t_final": run0["t_final"], "t_max": float(p["t_max"]),
        "rank": None if largest["rank"] is None else int(largest["rank"]),
        "rank_threshold": largest["rank_threshold"],
        "lambda_min": largest["lambda_min"], "lambda_min_label": largest["lambda_min_label"],
        "lambda_max": largest["lambda_max"],
        "rayleigh_min": min((per_width[m]["rayleigh_min"] for m in widths
                             if per_width[m]["rayleigh_min"] is not None), default=None),
        "certificates": certs,
        "max_bound_violation": max(violations) if violations else None,
        "population": pop,
        "decision_rule": {
            "integrator": _integrator(p).describe(), "margin": p["margin"],
            "limit_grad_rtol": p["limit_grad_rtol"], "eig_rtol": p["eig_rtol"],
            "newton_rtol": p["newton_rtol"], "plateau_tol": p["plateau_tol"]},
        "integrator_check": {
            "per_width": checks, "margin": p["margin"],
            "max_rel_diff": max(c["rel_diff"] for c in checks.values()),
            "withdrawn_widths": [int(m) for m, c in checks.items() if not c["within_margin"]]},
        "widths": widths, "seeds": int(p["seeds"]), "eps": p["eps"], "level": p["level"],
        "eta": [per_width[m]["eta_median"] for m in widths],
        "below": [per_width[m]["below"] for m in widths],
        "failed": [per_width[m]["failed"] for m in widths],
        "undecided": [per_width[m]["undecided"] for m in widths],
        "success_fraction": [per_width[m]["success_fraction"] for m in widths],
        "success_ci95": [per_width[m]["success_ci95"] for m in widths],
        "smallest_width_at_level": at_level[0] if at_level else None,
        "per_width": {str(m): {k: v for k, v in per_width[m].items() if k != "runs"}
                      for m in widths},
        "runs": {str(m): per_width[m]["runs"] for m in widths},
    }
    summary["notes"] = notes(summary, p)
    return summary


EXPERIMENT = Experiment(
    name="two-layer",
    description="Finite-width two-layer tanh networks on x ~ Uniform[−R, R]^d (infinite "
                "support), trained on the population itself (a Gauss–Legendre rule of the box) "
                "by a stiff integrator until each flow's limit decides η < ε or η ≥ ε: η(m), "
                "1 − δ(m) with a Clopper–Pearson interval, the plateau and composed "
                "certificates.",
    run=run,
    defaults={"dim": 2, "radius": 2.0, "frequency": 1.0, "activation": "tanh",
              "widths": [2, 3, 4, 8, 16, 32, 64], "seeds": 32, "measure": "quadrature",
              "points_per_dim": 16, "check_points_per_dim": 32, "n_train": 1024,
              "n_mc": 4096, "t_max": 1e8, "method": "LSODA", "rtol": 1e-8, "atol": 1e-12,
              "n_records": 40, "t_first": 0.1, "eps": 0.01, "margin": 1e-3,
              "limit_grad_rtol": 1e-12, "eig_rtol": 1e-9, "newton_rtol": 1e-4,
              "plateau_tol": 0.02, "plateau_margin": 1.0, "level": 0.8,
              "slack_rtol": 1e-6, "slack_atol": 0.0},
    # --quick: a coarser rule and looser tolerances (the integrator check still holds them to
    # the decision margin) keep six seeds of two widths within ~20 s
    quick={"widths": [2, 8], "seeds": 6, "points_per_dim": 12, "check_points_per_dim": 24,
           "n_mc": 2048, "rtol": 1e-6, "atol": 1e-10, "n_records": 30},
)
