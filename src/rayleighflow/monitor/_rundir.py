"""The monitor's run folder in the report's contract (docs/RUN_FOLDER.md): figures and summary.

trajectories/main.jsonl holds one row per optimizer step (``t`` = the step index, not flow
time), trajectories/full.jsonl the full-data estimates, trajectories/probe.jsonl the probe-set
spectra. Nothing here is a certificate: ``certificates`` is always empty and the notes say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["monitor_figures"]

_X = "optimizer step"


def _line(traj: str, col: str, label: str, **style: Any) -> dict[str, Any]:
    return {"kind": "line", "x": f"traj:{traj}:t", "y": f"traj:{traj}:{col}", "label": label,
            **style}


def _scatter(traj: str, col: str, label: str, **style: Any) -> dict[str, Any]:
    return {"kind": "scatter", "x": f"traj:{traj}:t", "y": f"traj:{traj}:{col}", "label": label,
            **style}


def monitor_figures(groups: Sequence[str], desingularizers: Sequence[str],
                    full: bool, probe: bool) -> list[dict[str, Any]]:
    """figures.json for a monitor run: loss, R(K; ∇ℓ) with per-layer quotients and the probe
    spectrum, KL ratios, and the two squared norms of the identity ‖∇L‖² = R·‖∇ℓ‖²_D."""
    loss = [_line("main", "loss", "batch loss L_B", color="k", alpha=0.6)]
    if full:
        loss.append(_line("full", "loss", "full-data loss L", style="-", marker="o",
                          color="C1"))
    kernel = [_line("main", "rayleigh", "R(K; ∇ℓ), batch", color="C0", alpha=0.7)]
    kernel += [_line("main", f"rayleigh[{g}]", f"R(K_{g}; ∇ℓ), batch", style=":")
               for g in groups]
    if full:
        kernel.append(_scatter("full", "rayleigh", "R(K; ∇ℓ), full data", color="C1"))
    if probe:
        kernel += [_scatter("probe", "lambda_max", "λ_max(K), probe set", color="C2"),
                   _scatter("probe", "lambda_min_plot",
                            "λ_min(K), probe set (zero drawn at the rank threshold)",
                            color="C3")]
    kl = [_line("main", f"kl[{d}]", f"φ'(L)‖∇L‖², φ = {d}", style="-") for d in desingularizers]
    norms = [_line("main", "grad_sq", "‖∇L_B‖² (from .grad)", color="C0"),
             _line("main", "fgrad_sq", "‖∇ℓ‖²_D (from the outputs)", color="C1")]
    if full:
        norms += [_scatter("full", "grad_sq", "‖∇L‖², full data", color="C0"),
                  _scatter("full", "fgrad_sq", "‖∇ℓ‖²_D, full data", color="C1")]
    panel = {"xlabel": _X, "xscale": "linear", "yscale": "log"}
    return [
        {"name": "loss", "title": "Loss along training (monitor)", "panels": [
            {**panel, "title": "batch and full-data loss", "ylabel": "loss", "series": loss}]},
        {"name": "kernel", "title": "Rayleigh quotient vs spectrum (monitor)", "panels": [
            {**panel, "title": "R(K; ∇ℓ) = ‖∇L‖² / ‖∇ℓ‖²_D, per layer",
             "ylabel": "eigenvalue / quotient", "series": kernel}]},
        {"name": "kl", "title": "KL ratios (diagnostics, not certificates)", "panels": [
            {**panel, "title": "φ'(L)‖∇L‖² on each batch", "ylabel": "KL ratio",
             "series": kl}]},
        {"name": "norms", "title": "Gradient norms", "panels": [
            {**panel, "title": "‖∇L‖² = R(K; ∇ℓ) · ‖∇ℓ‖²_D", "ylabel": "squared norm",
             "series": norms}]},
    ]
