"""The default demo: a small network on real data, λ_min(K) = 0 while R(K; ∇ℓ) > 0.

The flow is integrated by the stiff integrator (:class:`~rayleighflow.Implicit`) far into its
tail (t_max = 1e6 by default): on separable data the cross-entropy falls to 0 only as t → ∞,
so no finite time is its limit, and the note says where the flow stood and how it was falling.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import load_sklearn
from ..flow import Columns, Implicit, LimitReached, LogSpaced
from ..ntk.spectrum import STRUCTURAL_ZERO, VALUE
from ..problem import Model, Problem
from ..seeding import seed_torch
from .common import (
    certificate_arrays,
    certificates,
    flow_summary,
    kernel_figure,
    limit_note,
    limit_reading,
    loss_figure,
    spectrum_diagnostic,
)
from .runner import Experiment, RunContext

DESINGULARIZERS = ("log", "reciprocal", "cross-entropy")


def run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    data = load_sklearn(p["dataset"], dtype=ctx.dtype, n_samples=p.get("n_samples"),
                        seed=ctx.seed).to(ctx.device)
    k = int(data.y.max()) + 1
    seed_torch(ctx.seed)  # nn.Linear draws from torch's global generator
    net = nn.Sequential(nn.Linear(data.x.shape[1], p["width"]), nn.Tanh(),
                        nn.Linear(p["width"], k)).to(ctx.device, ctx.dtype)
    problem = Problem(Model(net), data, "cross-entropy")
    n_certs = len(DESINGULARIZERS) + 1
    ctx.save_figures([loss_figure("loss", "flow", n_certs),
                      kernel_figure("kernel", "flow", groups=list(problem.model.groups))])
    floor = p["limit_loss_floor"] * float(problem.loss_value(problem.params, data))
    # below float64 the tolerances rise to what the gradients resolve (summary["integrator"])
    rtol = max(p["rtol"], Implicit.rtol_floor(ctx.dtype))
    integrator = Implicit(rtol=rtol, atol=max(p["atol"], 1e-3 * rtol))
    result = ctx.flow("flow", problem, label="gradient flow", t_max=p["t_max"],
                      integrator=integrator, records=LogSpaced(p["n_records"]),
                      stops=[LimitReached(p["limit_grad_rtol"], floor)],
                      observers=[Columns(spectrum_diagnostic(p["spectrum_every"]))])
    certs = certificates(result.trajectory, problem, data, DESINGULARIZERS)
    ctx.save_arrays(**certificate_arrays("", certs))
    ctx.save_figures([loss_figure("loss", "flow", certs),
                      kernel_figure("kernel", "flow", groups=list(problem.model.groups))])
    summary = flow_summary(problem, data, result, certs)
    summary["integrator"] = integrator.describe()
    summary["limit"] = limit_reading(problem, data, result, p["limit_grad_rtol"], floor)
    summary["notes"] = [contrast_note(p["dataset"], data.n, k, summary),
                        limit_note("The flow", summary)]
    return summary


def contrast_note(dataset: str, n: int, k: int, s: dict[str, Any]) -> str:
    """The demo's sentence, every clause read off the summary (never assumed)."""
    P, nk = s["P"], s["nk"]
    label, lam, rank = s.get("lambda_min_label"), s.get("lambda_min"), s.get("rank")
    parts = [f"{dataset}: n = {n}, k = {k}, P = {P} {'<' if P < nk else '≥'} nk = {nk}"]
    if label is None:
        parts.append("no spectrum was recorded")
    elif label == STRUCTURAL_ZERO:
        parts.append("so rank K ≤ P < nk and λ_min(K) = 0 at every θ (structural)")
    else:
        parts.append(f"max rank {rank} of {nk}, min λ_min(K) = {lam:.3g} ({label})")
    composed = s["certificates"][-1]
    r_min = s.get("rayleigh_min")
    parts.append(f"min R(K; ∇ℓ) over the records = {r_min:.3g}" if r_min is not None
                 else "R(K; ∇ℓ) was not recorded")
    verdict = (f"the composed Rayleigh certificate {composed['status']} (scope "
               f"{composed['scope']}, μ = c·min R = "
               f"{'—' if composed['mu'] is None else format(composed['mu'], '.3g')})")
    if composed["status"] == "holds" and label != VALUE:
        verdict += ": it certifies the decrease although no definite-NTK argument applies"
    elif composed["status"] == "holds":
        verdict += "; here λ_min > 0 too, so the definite-NTK argument would also apply"
    parts.append(verdict)
    return "; ".join(parts) + "."


EXPERIMENT = Experiment(
    name="demo",
    description="Two-layer tanh network on the wine data (scikit-learn), trained by gradient "
                "flow: λ_min(K) = 0 (P < nk) while R(K; ∇ℓ) > 0 certifies the decrease.",
    run=run,
    defaults={"dataset": "wine", "width": 12, "t_max": 1e6, "n_records": 60,
              "rtol": 1e-8, "atol": 1e-12, "spectrum_every": 3, "limit_grad_rtol": 1e-12,
              "limit_loss_floor": 1e-14},
    quick={"t_max": 1e3, "n_records": 20, "spectrum_every": 5},
    extras=("data",),
)
