"""Issue 10 as an experiment: prove, then run the flow, then check that the run obeys the proof.

The definite-NTK experiment's data and networks (two-layer tanh, square loss, mean convention):
the wide one (P ≫ nk) and the narrow one (P < nk). For each width, ``rf.prove`` searches the
radius for the strongest statement its outward-rounded bounds allow (and, separately, asks for
convergence to zero loss); sampled falsification tries to beat its constants (and must beat a
deliberately wrong Lip_J/100); the flow runs; and every record, every solver gradient
evaluation and every model evaluation's distance from θ₀ are compared with the proof.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..flow import Dopri5, LogSpaced
from ..problem import Model, Problem
from ..theorems.two_layer import TwoLayer
from .common import cert_dicts, finite_or_none
from .definite_ntk import _data
from .runner import Experiment, RunContext

REGIMES = ("wide", "narrow")


def _figures(regimes: dict[str, Any]) -> list[dict]:
    figs = []
    for regime in REGIMES:
        series: list[dict[str, Any]] = [
            {"kind": "line", "x": f"traj:{regime}:t", "y": f"traj:{regime}:loss",
             "label": "recorded loss L(θ_t)", "style": "-", "color": "k"}]
        dist: list[dict[str, Any]] = [
            {"kind": "scatter", "x": f"arr:{regime}_pt_loss", "y": f"arr:{regime}_pt_dist",
             "label": "‖θ − θ₀‖ at every model evaluation", "color": "C0"}]
        r = regimes.get(regime)
        if r is not None and r["proof"]["status"] == "holds":
            p = r["proof"]
            series.append({"kind": "line", "x": f"traj:{regime}:t", "y": f"arr:{regime}_bound",
                           "label": f"proven bound (to L ≤ {p['target']:.3g} by t = "
                                    f"{p['time']:.3g})", "style": "--", "color": "C1",
                           "role": "reference"})
            dist += [
                {"kind": "line", "x": f"arr:{regime}_env_loss", "y": f"arr:{regime}_env",
                 "label": "proven bound on ‖θ − θ₀‖ (path-length envelope)", "style": "--",
                 "color": "C1", "role": "reference"},
                {"kind": "line", "x": f"arr:{regime}_env_loss", "y": f"arr:{regime}_radius",
                 "label": f"ball radius r = {p['radius']:.3g}", "style": ":", "color": "C3",
                 "role": "reference"}]
        figs.append({"name": f"proof_{regime}", "title": f"{regime}: the run against its proof",
                     "panels": [
                         {"title": "loss and the proven bound", "xlabel": "flow time t",
                          "ylabel": "loss", "xscale": "symlog", "yscale": "log",
                          "series": series},
                         {"title": "‖θ − θ₀‖ against L (proven: below the envelope "
                                   "while L > target)",
                          "xlabel": "loss L", "ylabel": "‖θ − θ₀‖", "xscale": "log",
                          "yscale": "linear", "series": dist}]})
    return figs


def _run_width(ctx: RunContext, regime: str, width: int, data) -> tuple[dict, list]:
    # rayleighflow.prove needs the [prove] extra: imported here, so that the registry (and
    # `rayleighflow list`) does not; run_experiment checks the extra before the run starts.
    from ..prove import prove_details
    from ..prove.falsify import falsify_proof
    from ..prove.runcheck import BallTracker, check_run, envelope, proven_bound

    p = ctx.params
    net = TwoLayer(p["dim"], width, generator=ctx.generator(3), dtype=ctx.dtype)
    problem = Problem(Model(net.to(ctx.device)), data, "square")
    proof = prove_details(problem)
    zero = prove_details(problem, target=0.0)
    out: dict[str, Any] = {"width": width, "P": problem.model.n_params, "nk": data.n,
                           "proof": _proof_summary(proof),
                           "zero_loss_proof": {"status": zero.certificate.status.value,
                                               "statement": zero.statement}}
    certs = [(f"proven, m = {width}", proof.certificate),
             (f"proven to zero loss, m = {width}", zero.certificate)]
    tracker = BallTracker(problem)
    flow_problem = Problem(tracker.model(), data, "square")
    result = ctx.flow(regime, flow_problem, label=f"{regime} (m={width})", t_max=p["t_max"],
                      integrator=Dopri5(p["rtol"], p["atol"]), records=LogSpaced(p["n_records"]))
    traj = result.trajectory
    arrays: dict[str, Any] = {f"{regime}_pt_loss": np.array(tracker.loss),
                              f"{regime}_pt_dist": np.array(tracker.dist)}
    if proof.certificate.holds:
        check = check_run(proof, traj, tracker, rtol=p["check_rtol"])
        out["run_check"] = check.to_dict()
        c = proof.constants
        fals = falsify_proof(problem, proof, samples=p["samples"], points=tracker.kept,
                             generator=ctx.generator(7))
        wrong = falsify_proof(problem, proof, samples=p["samples"], lip_j_factor=0.01,
                              generator=ctx.generator(8))
        out["falsification"] = {**fals.to_dict(), "run_points": len(tracker.kept),
                                "wrong_lip_j": c.lip_j / 100,
                                "wrong_constant_caught": wrong.falsified,
                                "wrong_constant_first": wrong.counterexamples[:1]}
        grid = np.geomspace(max(proof.target, c.loss0 * 1e-6), c.loss0, 200)
        arrays.update({f"{regime}_bound": proven_bound(proof, traj["t"]),
                       f"{regime}_env_loss": grid, f"{regime}_env": envelope(proof, grid),
                       f"{regime}_radius": np.full(grid.shape, proof.radius)})
    ctx.save_arrays(**arrays)
    out["loss_initial"] = finite_or_none(traj["loss"][0])
    out["loss_final"] = finite_or_none(traj["loss"][-1])
    out["t_final"] = finite_or_none(result.t_final)
    out["certificates"] = cert_dicts(certs, float(traj["loss"][0]))
    return out, certs


def _proof_summary(proof) -> dict[str, Any]:
    d = proof.to_dict()
    d.pop("search")
    d.pop("certificate")
    return d


def run(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    data = _data(p, ctx)
    ctx.save_figures(_figures({}))
    regimes: dict[str, Any] = {}
    for regime in REGIMES:
        regimes[regime], _ = _run_width(ctx, regime, p[f"width_{regime}"], data)
    ctx.save_figures(_figures(regimes))
    all_certs = [dict(c, label=f"{r}: {c['label']}") for r in REGIMES
                 for c in regimes[r]["certificates"]]
    wide = regimes["wide"]
    return {
        "convention": "mean", "P": wide["P"], "nk": wide["nk"],
        "loss_initial": wide["loss_initial"], "loss_final": wide["loss_final"],
        "t_final": wide["t_final"], "certificates": all_certs, "regimes": regimes,
        "proof_seconds_wide": wide["proof"]["seconds"],
        "notes": [_note(r, regimes[r]) for r in REGIMES]
        + ["Top-level keys describe the wide run."],
    }


def _note(regime: str, r: dict[str, Any]) -> str:
    """What this run shows, built from its computed numbers."""
    pr = r["proof"]
    head = f"{regime}: m = {r['width']}, P = {r['P']}, nk = {r['nk']}; {pr['statement']}"
    head += f" (proof time {pr['seconds']:.2f} s)"
    zero = r["zero_loss_proof"]
    head += f"; convergence to zero: {zero['status']}"
    if zero["status"] != "holds":
        head += f" ({zero['statement']})"
    rc = r.get("run_check")
    if rc is not None:
        after = (f" (+{rc['n_evaluations_after']} past the last record, not checked)"
                 if rc["n_evaluations_after"] else "")
        head += (f". At {rc['n_records']} records the run "
                 f"{'obeys' if rc['passed'] else 'DOES NOT obey'} the proof (bound; ball and "
                 f"path-length envelope at the {rc['record_points']} model evaluations at "
                 "records' θ above the target: "
                 f"max ‖θ_t − θ₀‖ = {rc['max_record_distance']:.3g} vs r = {rc['radius']:.3g})"
                 f"; at {rc['n_evaluations']} gradient evaluations{after} and "
                 f"{rc['n_points']} model evaluations (Runge–Kutta stages, not points of the "
                 f"flow): {rc['eval_above_bound']} above the bound, {rc['points_outside_ball']} "
                 f"outside the ball above the target (max relative excess over the bound "
                 f"{max(rc['max_record_excess'], rc['max_eval_excess']):.2g}, tolerance "
                 f"{rc['rtol']:.0e}; max ‖θ − θ₀‖ {rc['max_distance']:.3g})")
        f = r["falsification"]
        rmin = f["min_rayleigh_margin"]
        head += (f"; sampled falsification over {f['samples']} points in {f['phases_checked']} "
                 f"phase ball(s) and {f['run_points']} points of the run: max "
                 f"‖J_θ − J₀‖/‖θ − θ₀‖ = {f['max_lip_j_ratio']:.3g} vs Lip_J = {f['lip_j']:.3g}, "
                 f"max (‖f_θ − f₀‖_D/‖θ − θ₀‖)/Lip_F = {f['max_lip_f_margin']:.3g}, min R/ρ = "
                 + ("—" if rmin is None else f"{rmin:.3g}")
                 + f": {len(f['counterexamples'])} counterexample(s); with Lip_J/100 the "
                 f"sampler "
                 + ("finds a counterexample" if f["wrong_constant_caught"] else
                    "finds NONE (the check has no teeth here)"))
    return head + "."


EXPERIMENT = Experiment(
    name="proof",
    description="Proof-grade certificates (scope proven) for the definite-NTK experiment's "
                "two-layer networks: prove, run the flow, check the run obeys the proof.",
    run=run,
    defaults={"n": 20, "dim": 5, "radius": 1.0, "teacher_width": 2, "width_wide": 512,
              "width_narrow": 2, "t_max": 100.0, "n_records": 40, "rtol": 1e-7, "atol": 1e-9,
              "check_rtol": 1e-6, "samples": 24},
    quick={"t_max": 20.0, "n_records": 20, "samples": 8},
    extras=("prove",),
)
