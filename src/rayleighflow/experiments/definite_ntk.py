"""R1 as an experiment: the definite-NTK (PL) certificate needs P ≥ nk; the Rayleigh one does not.

The same data, two widths of the same two-layer network: over-parameterized (P ≫ nk), where
λ_min(K_θt) > 0 along the flow and the PL bound L₀e^{−cλt} holds; under-parameterized (P < nk),
where rank K ≤ P forces λ_min = 0, the PL certificate is unavailable, and the composed
certificate c·min R(K; ∇ℓ) still holds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..composition import spectral
from ..data import Dataset
from ..flow import Columns, Dopri5, Implicit, LimitReached, LogSpaced
from ..problem import Model, Problem
from ..theorems.two_layer import TwoLayer
from .common import (
    certificate_arrays,
    certificates,
    flow_summary,
    functional_kl,
    kernel_figure,
    limit_note,
    limit_reading,
    loss_figure,
    spectrum_diagnostic,
)
from .runner import Experiment, RunContext

REGIMES = ("over", "under")


def _data(p: dict, ctx: RunContext) -> Dataset:
    g = ctx.generator(1)
    x = (2 * torch.rand(p["n"], p["dim"], generator=g, dtype=ctx.dtype) - 1) * p["radius"]
    teacher = TwoLayer(p["dim"], p["teacher_width"], generator=ctx.generator(2), dtype=ctx.dtype)
    with torch.no_grad():
        y = teacher(x)
    return Dataset.from_arrays(x, y, dtype=ctx.dtype).to(ctx.device)


def _certs(traj, problem, data):
    pl = ("PL via λ_min(K) (definite NTK)", spectral(traj, functional_kl(problem, data)))
    return [pl, *certificates(traj, problem, data, [])]


def _figures(certs_by_regime) -> list[dict]:
    figs = []
    for regime in REGIMES:
        certs = certs_by_regime.get(regime, 2)
        figs.append(loss_figure(f"loss_{regime}", regime, certs, prefix=f"{regime}_",
                                title=f"{regime}-parameterized: loss and certified bounds"))
        figs.append(kernel_figure(f"kernel_{regime}", regime,
                                  f"{regime}-parameterized: λ_min(K) vs R(K; ∇ℓ)"))
    return figs


def run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    data = _data(p, ctx)
    ctx.save_figures(_figures({}))
    regimes: dict[str, Any] = {}
    certs_by_regime = {}
    for regime in REGIMES:
        width = p[f"width_{regime}"]
        net = TwoLayer(p["dim"], width, generator=ctx.generator(3), dtype=ctx.dtype)
        problem = Problem(Model(net.to(ctx.device)), data, "square")
        floor = p["limit_loss_floor"] * float(problem.loss_value(problem.params, data))
        if regime == "over":  # a zero-loss limit: the floor decides where it is reached
            how: dict[str, Any] = {"t_max": p["t_max"], "integrator": Dopri5(p["rtol"], p["atol"]),
                                   "records": LogSpaced(p["n_records"]),
                                   "stops": [LimitReached(p["limit_grad_rtol"], floor)]}
        else:
            how = {"t_max": p["under_t_max"],
                   "stops": [LimitReached(p["limit_grad_rtol"], floor)],
                   "integrator": Implicit(rtol=p["under_rtol"], atol=p["under_atol"]),
                   "records": LogSpaced(p["n_records"], t_min=p["under_t_first"])}
        result = ctx.flow(regime, problem, label=f"{regime} (m={width})",
                          observers=[Columns(spectrum_diagnostic(1))], **how)
        certs = _certs(result.trajectory, problem, data)
        certs_by_regime[regime] = certs
        ctx.save_arrays(**certificate_arrays(f"{regime}_", certs))
        regimes[regime] = {"width": width, **flow_summary(problem, data, result, certs),
                           "integrator": how["integrator"].describe(),
                           "limit": limit_reading(problem, data, result,
                                                  p["limit_grad_rtol"], floor)}
    ctx.save_figures(_figures(certs_by_regime))
    over, under = regimes["over"], regimes["under"]
    all_certs = [dict(c, label=f"{r}: {c['label']}") for r in REGIMES
                 for c in regimes[r]["certificates"]]
    violations = [c["max_bound_violation"] for c in all_certs
                  if c["max_bound_violation"] is not None]
    summary = {k: under[k] for k in ("convention", "P", "nk", "loss_initial", "loss_final",
                                     "t_final", "rank", "rank_threshold", "lambda_min",
                                     "lambda_min_label", "lambda_max", "rayleigh_min")}
    summary.update(
        certificates=all_certs, regimes=regimes,
        max_bound_violation=max(violations) if violations else None,
        pl_available_over=over["certificates"][0]["status"] == "holds",
        pl_available_under=under["certificates"][0]["status"] == "holds",
        notes=[_note(regime, regimes[regime]) for regime in REGIMES]
        + [limit_note(f"{regime}-parameterized flow", regimes[regime]) for regime in REGIMES]
        + ["Top-level keys describe the under-parameterized run."])
    return summary


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _note(regime: str, r: dict[str, Any]) -> str:
    """What this run shows, read off its computed statuses (never assumed)."""
    pl, composed = r["certificates"][0], r["certificates"][-1]
    size = "≥" if r["P"] >= r["nk"] else "<"
    why = "" if pl["reason"] is None else f" ({pl['reason']['cause']})"
    return (f"{regime}-parameterized: m = {r['width']}, P = {r['P']} {size} nk = {r['nk']}; "
            f"min λ_min(K) = {_fmt(r['lambda_min'])} ({r['lambda_min_label']}, rank threshold "
            f"{_fmt(r['rank_threshold'])}); PL certificate: {pl['status']} (scope "
            f"{pl['scope']}){why}; min R(K; ∇ℓ) = {_fmt(r['rayleigh_min'])}, composed Rayleigh "
            f"certificate: {composed['status']} (scope {composed['scope']}).")


EXPERIMENT = Experiment(
    name="definite-ntk",
    description="Two-layer tanh networks on the same data, over- (P ≫ nk) then "
                "under-parameterized (P < nk): λ_min(K) > 0 and the PL bound in the first, "
                "λ_min = 0 and only the Rayleigh certificate in the second.",
    run=run,
    defaults={"n": 20, "dim": 5, "radius": 1.0, "teacher_width": 2, "width_over": 512,
              "width_under": 2, "t_max": 1000.0, "n_records": 40, "rtol": 1e-7, "atol": 1e-9,
              "under_t_max": 1e8, "under_t_first": 0.1, "under_rtol": 1e-8, "under_atol": 1e-12,
              "limit_grad_rtol": 1e-12, "limit_loss_floor": 1e-14},
    quick={"width_over": 128, "t_max": 200.0, "n_records": 20, "under_rtol": 1e-6,
           "under_atol": 1e-10},
)
