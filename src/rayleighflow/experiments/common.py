"""Pieces every experiment shares: the spectrum diagnostic, certificates, figures, summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._io import finite_or_none
from ..certificate import Certificate, CertificateStatus
from ..certify import certify, rank_desingularizers
from ..composition import compose
from ..data import Dataset
from ..desingularizers import get_desingularizer
from ..flow import FlowResult
from ..hessian import strict_minimum
from ..losses import FunctionalKL
from ..ntk import ntk_spectrum
from ..ntk.spectrum import NUMERICAL_ZERO, STRUCTURAL_ZERO, VALUE
from ..problem import Problem
from ..trajectory import Trajectory

__all__ = ["spectrum_diagnostic", "certificates", "certificate_arrays", "loss_figure",
           "kernel_figure", "flow_summary", "finite_or_none", "functional_kl",
           "lambda_min_label", "limit_reading", "limit_note"]


def functional_kl(problem: Problem, data: Dataset) -> FunctionalKL:
    """The loss's functional KL fact for these weights, with k read off the model's outputs."""
    k = int(problem.model(problem.params, data.x[:1]).shape[-1])
    return problem.loss.functional_kl(data.weights, problem.convention, n_classes=k)


def spectrum_diagnostic(every: int = 1, max_samples: int | None = None):
    """Per-record NTK spectrum columns (λ_min, λ_max, smallest nonzero λ, rank) every N records.

    Eigenvalues are of the operator K on the evaluation data in the problem's convention,
    computed in float64; rank counts λ > max(nk, P)·eps·λ_max. ``spectrum_samples`` records how
    many points the spectrum saw (a subset never certifies the full kernel);
    ``lambda_min_structural`` / ``lambda_min_zero`` (1 or 0) carry λ_min's label.
    """
    if every < 1:
        raise ValueError(f"spectrum every N records needs N >= 1 (got {every})")

    def diag(problem: Problem, params, data: Dataset, index: int) -> dict[str, float]:
        if index % every:
            return {}
        if max_samples is not None and data.n > max_samples:
            data = data.subset(torch.arange(max_samples))
        spec = ntk_spectrum(problem.model, data, params=params, convention=problem.convention)
        # λ_min below the rank threshold is numerically zero: plot it at the threshold.
        return {"lambda_min": spec.lambda_min, "lambda_max": spec.lambda_max,
                "lambda_min_nonzero": spec.lambda_min_nonzero, "rank": float(spec.rank),
                "rank_threshold": spec.threshold, "spectrum_samples": float(data.n),
                "spectrum_float64": float(spec.computed_dtype == "float64"),
                "lambda_min_structural": float(spec.lambda_min_label == STRUCTURAL_ZERO),
                "lambda_min_zero": float(spec.lambda_min_label != VALUE),
                "lambda_min_plot": max(spec.lambda_min, spec.threshold)}

    return diag


def certificates(
    traj: Trajectory,
    problem: Problem,
    data: Dataset,
    desingularizers: Sequence[str],
    *,
    rayleigh_lower: float | None = None,
    mu: dict[str, float] | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> list[tuple[str, Certificate]]:
    """Observed-μ* certificates for each φ, plus the composition c·R_low for the loss's φ."""
    out = []
    # Stated μ are matched by canonical name, so aliases ("pl", "ce") find their entry.
    stated_mu = {get_desingularizer(k).name: v for k, v in (mu or {}).items()}
    for name in desingularizers:
        stated = stated_mu.get(get_desingularizer(name).name)
        out.append((f"{name} ({'stated' if stated else 'observed'} μ)",
                    certify(traj, name, stated, rtol=rtol, atol=atol)))
    fkl = functional_kl(problem, data)
    out.append((f"composed: c·R ({fkl.desingularizer})",
                compose(traj, fkl, rayleigh_lower, rtol=rtol, atol=atol)))
    return out


def certificate_arrays(prefix: str, certs: list[tuple[str, Certificate]]) -> dict[str, Any]:
    """Bound curves at the record times, for arrays.npz, keyed ``{prefix}bound{i}``."""
    arrays = {}
    for i, (_, cert) in enumerate(certs):
        if cert.status is not CertificateStatus.UNAVAILABLE:
            arrays[f"{prefix}bound{i}"] = cert.bound_at_records
    return arrays


def _cert_label(label: str, cert: Certificate) -> str:
    return f"{label}, μ = {cert.mu:.3g}: {cert.status.value} (scope {cert.scope.value})"


def loss_figure(name: str, traj_name: str, certs: Sequence[tuple[str, Certificate]] | int,
                prefix: str = "", title: str = "Loss and certified bounds") -> dict:
    """Loss against t with each certificate's bound (log-log). ``certs`` may be a count
    (declared before the run, labels generic) or the certificates themselves."""
    series: list[dict[str, Any]] = [
        {"kind": "line", "x": f"traj:{traj_name}:t", "y": f"traj:{traj_name}:loss",
         "label": "recorded loss L(θ_t)", "style": "-", "color": "k"}]
    items = list(certs) if not isinstance(certs, int) else [(f"bound {i}", None)
                                                            for i in range(certs)]
    for i, (label, cert) in enumerate(items):
        if cert is not None and cert.status is CertificateStatus.UNAVAILABLE:
            continue
        series.append({"kind": "line", "x": f"traj:{traj_name}:t", "y": f"arr:{prefix}bound{i}",
                       "label": label if cert is None else _cert_label(label, cert),
                       "style": "--", "color": f"C{i}", "role": "reference"})
    return {"name": name, "title": title, "panels": [{
        "title": "L(θ_t) ≤ φ⁻¹(φ(L₀) − μt)", "xlabel": "flow time t", "ylabel": "loss",
        "xscale": "symlog", "yscale": "log", "series": series}]}


def kernel_figure(name: str, traj_name: str, title: str = "Rayleigh quotient vs spectrum",
                  groups: Sequence[str] = ()) -> dict:
    """R(K; ∇ℓ) against λ_min and λ_max of K along the flow."""
    ref = f"traj:{traj_name}"
    series = [
        {"kind": "line", "x": f"{ref}:t", "y": f"{ref}:rayleigh", "label": "R(K; ∇ℓ)",
         "style": "-", "color": "C0"},
        {"kind": "scatter", "x": f"{ref}:t", "y": f"{ref}:lambda_max", "label": "λ_max(K)",
         "color": "C2"},
        {"kind": "scatter", "x": f"{ref}:t", "y": f"{ref}:lambda_min_nonzero",
         "label": "smallest nonzero λ(K)", "color": "C4"},
        {"kind": "scatter", "x": f"{ref}:t", "y": f"{ref}:lambda_min_plot",
         "label": "λ_min(K) (zero drawn at the rank threshold)", "color": "C3"},
    ]
    series += [{"kind": "line", "x": f"{ref}:t", "y": f"{ref}:rayleigh[{g}]",
                "label": f"R(K_{g}; ∇ℓ)", "style": ":"} for g in groups]
    return {"name": name, "title": title, "panels": [{
        "title": "one Rayleigh quotient vs all eigenvalues", "xlabel": "flow time t",
        "ylabel": "eigenvalue / quotient", "xscale": "symlog", "yscale": "log",
        "series": series}]}


def _reduce(traj: Trajectory, name: str, fn) -> float | None:
    """fn over the finite values of a column; None when it was never recorded."""
    col = traj.get(name)
    if col is None or not np.isfinite(col).any():
        return None
    return finite_or_none(fn(col[np.isfinite(col)]))


def lambda_min_label(traj: Trajectory) -> str | None:
    """The label of the smallest recorded λ_min: structural zero, numerical zero, or value."""
    if traj.get("lambda_min") is None:
        return None
    structural, zero = traj.get("lambda_min_structural"), traj.get("lambda_min_zero")
    if structural is not None and np.nansum(structural) > 0:
        return STRUCTURAL_ZERO
    if zero is not None and np.nansum(zero) > 0:
        return NUMERICAL_ZERO
    return VALUE if zero is not None else None


def cert_dicts(certs: Sequence[tuple[str, Certificate]], loss0: float) -> list[dict[str, Any]]:
    """to_dict of each certificate, labelled, with the certified and forecast time to 1e-3·L₀."""
    out = []
    for label, cert in certs:
        d = cert.to_dict(target=float(loss0) * 1e-3)
        d["label"] = label
        out.append(d)
    return out


def flow_summary(problem: Problem, data: Dataset, result: FlowResult,
                 certs: list[tuple[str, Certificate]]) -> dict[str, Any]:
    """The summary.json keys of one flow (docs/RUN_FOLDER.md)."""
    traj = result.trajectory
    loss = traj["loss"]
    rank = _reduce(traj, "rank", np.max)
    k = problem.model(problem.params, data.x[:1]).shape[-1]
    cert_dicts_ = cert_dicts(certs, float(loss[0]))
    violations = [c["max_bound_violation"] for c in cert_dicts_
                  if c["max_bound_violation"] is not None]
    return {
        "convention": problem.convention.value, "P": problem.model.n_params, "nk": data.n * k,
        "loss_initial": finite_or_none(loss[0]), "loss_final": finite_or_none(loss[-1]),
        "t_final": finite_or_none(result.t_final),
        "rank": None if rank is None else int(rank),
        "rank_threshold": _reduce(traj, "rank_threshold", np.max),
        "lambda_min": _reduce(traj, "lambda_min", np.min),
        "lambda_min_label": lambda_min_label(traj),
        "spectrum_samples": _reduce(traj, "spectrum_samples", np.min),
        "lambda_max": _reduce(traj, "lambda_max", np.max),
        "rayleigh_min": _reduce(traj, "rayleigh", np.min),
        "certificates": cert_dicts_,
        "max_bound_violation": max(violations) if violations else None,
        "desingularizer_ranking": rank_desingularizers(traj),
        "flow_status": result.status.value, "flow_message": result.message,
        "grad_evals": result.n_grad_evals,
    }


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def limit_reading(problem: Problem, data: Dataset, result: FlowResult, grad_rtol: float,
                  floor: float) -> dict[str, Any]:
    """Where the flow stopped: its status, time, ‖∇L‖²/L and L/L₀ there, which limit rule
    stopped it, and, where the gradient rule did, the Hessian's strict-minimum evidence."""
    loss, grad_sq = result.trajectory["loss"], result.trajectory["grad_sq"]
    out: dict[str, Any] = {"status": result.status.value, "t": result.t_final,
                           "message": result.message,
                           "grad_sq_over_loss": float(grad_sq[-1] / loss[-1]),
                           "loss_over_initial": float(loss[-1] / loss[0]),
                           "rule": grad_rtol, "floor": floor, "by": None,
                           "evidence": None}
    t = result.trajectory.t
    decade = np.flatnonzero((t >= t[-1] / 10) & (t > 0))
    if decade.size >= 2 and loss[decade[0]] > 0 and loss[-1] > 0 and t[-1] > t[decade[0]]:
        out["tail_slope"] = float(np.log(loss[-1] / loss[decade[0]])
                                  / np.log(t[-1] / t[decade[0]]))
        out["tail_from"] = float(t[decade[0]])
    if result.status.value == "limit":
        out["by"] = "floor" if loss[-1] <= floor else "gradient"
        if out["by"] == "gradient":
            out["evidence"] = strict_minimum(problem, result.params, data).to_dict()
    return out


def limit_note(what: str, r: dict[str, Any]) -> str:
    """Where the flow ``what`` stopped, from ``r["limit"]`` (:func:`limit_reading`)."""
    lim = r["limit"]
    head = f"{what}, by {r['integrator']}: "
    if lim["by"] == "floor":
        return head + (f"the zero-loss limit was reached at t = {lim['t']:.3g}: L = "
                       f"{_g(r['loss_final'])} ≤ {lim['floor']:.3g} (L/L₀ = "
                       f"{_g(lim['loss_over_initial'])}).")
    if lim["by"] == "gradient":
        ev = lim["evidence"]
        return head + (f"the limit was reached at t = {lim['t']:.3g} (‖∇L‖² ≤ {lim['rule']:g}·L"
                       f"), at L = {_g(r['loss_final'])}; the Hessian there: {ev['summary']}.")
    tail = ""
    if lim.get("tail_slope") is not None:
        tail = (f"; from t = {lim['tail_from']:.3g} to {lim['t']:.3g} L fell like "
                f"t^{lim['tail_slope']:.2f}")
    return head + (f"stopped at t = {lim['t']:.3g} ({lim['status']}) with ‖∇L‖²/L = "
                   f"{_g(lim['grad_sq_over_loss'])} and L/L₀ = "
                   f"{_g(lim['loss_over_initial'])}: not the limit rule ‖∇L‖² ≤ "
                   f"{lim['rule']:g}·L or L ≤ {lim['floor']:.3g}, so the loss there is where the "
                   f"flow stood, not its limit{tail}.")
