"""Reading the two-layer flows: each seed's decision (η < ε or η ≥ ε, and the rule that decided
it), each width's 1 − δ with its Clopper–Pearson interval, and the notes, every sentence built
from those numbers.

The decisions use what the exact gradient flow guarantees. Its training loss never increases,
so a loss checked below ε (by the decision margin that covers the integrator's error) at any
time decides η_train < ε. The opposite needs the limit itself: the flow stopped at a *strict*
minimum (∇²L positive definite, a negligible Newton step) whose quadratic-model lower bound
L − ‖∇L‖²/(2λ_min) is ≥ ε, or, where the Hessian does not show one, a plateau at t_max at or
above ε. A seed that meets none of these is undecided and says why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..certificate import Certificate
from ..ntk.spectrum import STRUCTURAL_ZERO, VALUE
from ..trajectory import Trajectory
from .plateau import success_interval

__all__ = ["BELOW", "FAILED", "UNDECIDED", "prefix", "width_summary", "notes"]

BELOW, FAILED, UNDECIDED = "below ε", "at or above ε", "undecided"


def prefix(traj: Trajectory, threshold: float) -> Trajectory | None:
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


def _cert_rank(cert: Certificate) -> tuple[int, float]:
    """Worst first: not holding, then the smallest μ."""
    mu = cert.mu if math.isfinite(cert.mu) else -math.inf
    return (0 if not cert.holds else 1, mu)


def _could_flip(row: dict[str, Any], eps: float) -> bool:
    """Could the decision flip on the population loss? With a quadrature rule: the rule's error
    (against the finer rule) reaches ε from the decided loss. With a Monte Carlo training
    sample: the held-out estimate ± 2 standard errors lies on the other side of ε."""
    if row["decision"] == UNDECIDED:
        return False
    if row["quadrature_error"] is not None:
        return abs(row["loss_final"] - eps) <= row["quadrature_error"]
    mc, se = row["mc_loss"], row["mc_se"]
    return mc + 2 * se >= eps if row["decision"] == BELOW else mc - 2 * se < eps


def width_summary(m: int, rows: list[dict], certs: list[tuple[int, tuple[str, Certificate]]],
                  p: dict, n_train: int) -> tuple[dict, list]:
    """One width: the decisions' counts, 1 − δ and its interval, η's spread, the checks."""
    seeds = len(rows)
    eps = p["eps"]
    below = [r for r in rows if r["decision"] == BELOW]
    failed = [r for r in rows if r["decision"] == FAILED]
    undecided = seeds - len(below) - len(failed)
    rules: dict[str, int] = {}
    for r in rows:
        rules[f"{r['decision']}: {r['rule']}"] = rules.get(f"{r['decision']}: {r['rule']}", 0) + 1
    etas = [r["eta"] for r in rows]
    decided = np.array([r["eta"] for r in rows if r["decision"] != UNDECIDED], dtype=np.float64)
    eta_failed = np.array([r["eta"] for r in failed], dtype=np.float64)
    worst: dict[str, tuple[int, Certificate]] = {}
    status_counts: dict[str, dict[str, int]] = {}
    for s, (kind, cert) in certs:
        if kind not in worst or _cert_rank(cert) < _cert_rank(worst[kind][1]):
            worst[kind] = (s, cert)
        key = f"{cert.status.value} (scope {cert.scope.value})"
        status_counts.setdefault(kind, {})
        status_counts[kind][key] = status_counts[kind].get(key, 0) + 1
    violations = [c.max_bound_violation for _, (_, c) in certs
                  if math.isfinite(c.max_bound_violation)]
    gaps = [r["mc_loss"] - r["loss_final"] for r in rows]
    quad = [r["quadrature_error"] for r in rows if r["quadrature_error"] is not None]
    first = rows[0]
    summary = {
        "P": first["P"], "P_vs_nk": "P < nk" if first["P"] < n_train else "P ≥ nk",
        "seeds": seeds, "below": len(below), "failed": len(failed), "undecided": undecided,
        "decided_by": rules, "successes": len(below), "success_fraction": len(below) / seeds,
        "success_ci95": list(success_interval(len(below), undecided, seeds)),
        "etas": etas, "eta_is_upper_bound": [r["decision"] == BELOW for r in rows],
        "eta_median": float(np.median(decided)) if decided.size else None,
        "eta_failed_median": float(np.median(eta_failed)) if eta_failed.size else None,
        "eta_failed_min": float(eta_failed.min()) if eta_failed.size else None,
        "eta_failed_max": float(eta_failed.max()) if eta_failed.size else None,
        "eta_below_max": max((r["eta"] for r in below), default=None),
        "t_decision_median": float(np.median([r["t_final"] for r in rows])),
        "grad_evals_median": float(np.median([r["grad_evals"] for r in rows])),
        "mc_gap_max_abs": float(np.max(np.abs(gaps))),
        "mc_se_median": float(np.median([r["mc_se"] for r in rows])),
        # the gap in standard errors: a quadrature rule that is the population gives |z| ≲ 3
        "mc_z_max_abs": float(np.max(np.abs(gaps) / np.array([r["mc_se"] for r in rows]))),
        "could_flip": sum(_could_flip(r, eps) for r in rows),
        "quadrature_error_max": max(quad) if quad else None,
        "rayleigh_min": min((r["rayleigh_min"] for r in rows if r["rayleigh_min"] is not None),
                            default=None),
        "lambda_min": first.get("lambda_min"), "lambda_min_label": first.get("lambda_min_label"),
        "rank": first.get("rank_max"), "rank_threshold": first.get("rank_threshold"),
        "lambda_max": first.get("lambda_max"),
        "certificate_counts": status_counts,
        "max_bound_violation": max(violations) if violations else None,
        "runs": rows}
    labelled = [(f"m = {m}: {kind}, worst of {seeds} seeds (seed {s})", cert)
                for kind, (s, cert) in worst.items()]
    return summary, labelled


# ------------------------------------------------------------------ notes from the numbers


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _widths(ms: list[int]) -> str:
    return ", ".join(str(m) for m in ms)


def notes(s: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """Every sentence read off the summary's numbers and statuses (never assumed)."""
    pop, rule = s["population"], s["decision_rule"]
    eps = s["eps"]
    out = [_data_note(s, p), (
        f"Each flow is integrated by {rule['integrator']} from θ₀ until: the training loss at a "
        f"record is ≤ ε·(1 − {rule['margin']:g}), which decides η < ε (the exact flow's loss "
        f"never increases; the margin covers the integrator's error); or ‖∇L‖² ≤ "
        f"{rule['limit_grad_rtol']:g}·L (the limit is reached), where the Hessian decides "
        f"η ≥ ε if θ is a strict minimum (λ_min(∇²L) > {rule['eig_rtol']:g}·λ_max, Newton "
        f"step ≤ {rule['newton_rtol']:g}·max(1, ‖θ‖)) with L − ‖∇L‖²/(2λ_min) ≥ ε; otherwise "
        f"the flow continues to t_max = {s['t_max']:g}, where a plateau (relative change ≤ "
        f"{rule['plateau_tol']:g} over the last doubling of t) at or above ε decides η ≥ ε.")]
    out.append(_integrator_note(s))
    out.append(_mc_note(s, pop))
    for m in s["widths"]:
        out.append(_width_note(m, s["per_width"][str(m)], s["nk"], eps))
    out += _headline_notes(s)
    out.append("summary['certificates'] holds, per width, the worst seed's certificate of each "
               "kind (scope PATH at most: the flow's gradient evaluations and the delayed check, "
               f"from runs by {rule['integrator']}); per_width[...]['certificate_counts'] counts "
               "every seed's. Top-level P, rank and λ_min describe the largest width, seed 0.")
    return out


def _data_note(s: dict[str, Any], p: dict[str, Any]) -> str:
    pop = s["population"]
    head = (f"x ~ Uniform[−{p['radius']:g}, {p['radius']:g}]^{p['dim']}, target "
            f"sin(ωx·a) + ½cos(2ωx·b) with ω = {p['frequency']:g}. ")
    if pop["measure"] == "quadrature":
        return head + (
            f"The flow trains on the population itself: the tensor Gauss–Legendre rule with "
            f"{pop['points_per_dim']} points per dimension ({pop['n_train']} weighted nodes), "
            f"whose loss is the population loss up to the rule's error; against the rule with "
            f"{pop['check_points_per_dim']} points per dimension, the largest difference at the "
            f"final θ of any seed is {_g(pop['quadrature_error_max'])}.")
    return head + (
        f"The flow trains on a fixed Monte Carlo sample of n = {pop['n_train']}: its loss "
        "stands in for the population loss only up to the held-out gap below.")


def _integrator_note(s: dict[str, Any]) -> str:
    chk = s["integrator_check"]
    worst = chk["max_rel_diff"]
    text = (f"Integrator check: seed 0 of every width re-integrated at rtol/100 to its decision "
            f"time; the largest relative difference in the training loss there is "
            f"{_g(worst)} (margin {chk['margin']:g})")
    if chk["withdrawn_widths"]:
        return text + (f"; it exceeds the margin at widths {_widths(chk['withdrawn_widths'])}, "
                       "where the below-ε decisions are withdrawn (undecided).")
    return text + ": within the margin at every width."


def _mc_note(s: dict[str, Any], pop: dict[str, Any]) -> str:
    pw = [s["per_width"][str(m)] for m in s["widths"]]
    flips = sum(w["could_flip"] for w in pw)
    gap = max(w["mc_gap_max_abs"] for w in pw)
    z = max(w["mc_z_max_abs"] for w in pw)
    se = float(np.median([w["mc_se_median"] for w in pw]))
    if pop["measure"] == "quadrature":
        text = (f"A fresh Monte Carlo sample of {pop['n_mc']} points checks the rule "
                f"independently: the largest |L_MC − L_rule| at a final θ is {_g(gap)}, "
                f"{z:.2f} standard errors (median standard error {_g(se)}), "
                + ("consistent with sampling noise" if z <= 4 else
                   "more than sampling noise explains: the rule may not be the population")
                + ". ")
        if flips:
            return text + (f"For {flips} seed(s) the rule's error reaches ε from the decided "
                           "loss, so the verdict could flip there (per_width[...]"
                           "['could_flip']).")
        return text + "For no seed does the rule's error reach ε from the decided loss."
    text = (f"A fresh Monte Carlo sample of {pop['n_mc']} points is the held-out estimate of the "
            f"population loss: the largest held-out − training gap at a final θ is {_g(gap)} "
            f"(median standard error {_g(se)}); ")
    if flips:
        return text + (f"for {flips} seed(s) the held-out estimate ± 2 standard errors lies on "
                       "the other side of ε from the decision, so the verdict could flip there "
                       "(per_width[...]['could_flip']).")
    return text + "for no seed does it (± 2 standard errors) lie on the other side of ε."


def _width_note(m: int, w: dict[str, Any], nk: int, eps: float) -> str:
    lo, hi = w["success_ci95"]
    parts = [f"m = {m} (P = {w['P']}, {w['P_vs_nk']} = {nk}): {w['below']} of {w['seeds']} "
             f"seeds decided η < ε = {eps:g}, {w['failed']} decided η ≥ ε, {w['undecided']} "
             "undecided"]
    parts.append("decided by " + ", ".join(f"{k} ({n})" for k, n in w["decided_by"].items()))
    if w["failed"]:
        parts.append(f"η at the limits at or above ε: median {_g(w['eta_failed_median'])} "
                     f"(range {_g(w['eta_failed_min'])}–{_g(w['eta_failed_max'])})")
    if w["below"]:
        parts.append(f"the losses that decided η < ε are ≤ {_g(w['eta_below_max'])} (upper "
                     "bounds on η)")
    parts.append(f"1 − δ in [{lo:.2f}, {hi:.2f}] (Clopper–Pearson 95%"
                 + (", undecided seeds widen it)" if w["undecided"] else ")"))
    parts.append(f"median decision time t = {_g(w['t_decision_median'])} after "
                 f"{_g(w['grad_evals_median'])} gradient evaluations")
    parts.append(_spectrum_clause(w, nk))
    for kind, counts in w["certificate_counts"].items():
        parts.append(f"{kind}: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
    return "; ".join(parts) + "."


def _headline_notes(s: dict[str, Any]) -> list[str]:
    widths, eps, level = s["widths"], s["eps"], s["level"]
    pw = {m: s["per_width"][str(m)] for m in widths}
    most_above = [m for m in widths if pw[m]["failed"] > pw[m]["seeds"] / 2]
    all_below = [m for m in widths if pw[m]["below"] == pw[m]["seeds"]]
    out = []
    if most_above and all_below and min(all_below) > min(most_above):
        out.append(f"η(m) crosses ε = {eps:g}: η ≥ ε for most seeds at width(s) "
                   f"{_widths(most_above)}; η < ε for every seed at width(s) "
                   f"{_widths(all_below)}.")
    else:
        out.append(f"No crossing of ε = {eps:g} is shown: widths with η ≥ ε for most seeds: "
                   f"{_widths(most_above) or 'none'}; widths with η < ε for every seed: "
                   f"{_widths(all_below) or 'none'}.")
    first = s["smallest_width_at_level"]
    if first is None:
        out.append(f"At no width does the 95% lower end of 1 − δ reach {level:g}.")
    else:
        lo = pw[first]["success_ci95"][0]
        out.append(f"The smallest width at which the 95% lower end of 1 − δ is ≥ {level:g}: "
                   f"m = {first} (lower end {lo:.3f}, {pw[first]['below']} of "
                   f"{pw[first]['seeds']} seeds).")
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
