"""``rayleighflow prove FILE.toml``: prove a user experiment's flow from its initialization."""

from __future__ import annotations

import json
from pathlib import Path

from ._proof import Proof
from .core import prove_details

__all__ = ["prove_file", "format_proof"]


def prove_file(path: str | Path, *, radius: float | None = None, target: float | None = None,
               json_out: str | Path | None = None) -> Proof:
    """Build the TOML experiment's problem (model at its seeded initialization, data, loss) and
    prove. ``path``: a user experiment file or a run folder of one."""
    from ..data import Dataset
    from ..experiments.builders import build_problem
    from ..experiments.config import load_config
    from ..experiments.registry import user_experiment_file

    path = user_experiment_file(path, "prove", "`rayleighflow run proof` proves the "
                                               "definite-NTK networks")
    cfg = load_config(path)
    problem, _info = build_problem(cfg)
    if not isinstance(problem.data, Dataset):
        raise ValueError("prove needs a finite dataset ([data] kind sklearn, csv, npz or a "
                         "fixed n_samples draw); a sampler's infinite support has no finite "
                         "Jacobian")
    proof = prove_details(problem, radius=radius, target=target)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(proof.to_dict(), indent=1, default=str),
                                  encoding="utf-8")
    return proof


def format_proof(proof: Proof) -> str:
    """The statement, then every constant with how it was bounded (built from the numbers)."""
    cert = proof.certificate
    lines = [proof.statement, f"status: {cert.status.value} (scope {cert.scope.value})"]
    if cert.reason is not None:
        lines.append(f"reason: {cert.reason.cause}; remedy: {cert.reason.remedy}")
    lines += [f"  {'✓' if a.holds else '✗'} {a.name}: {a.detail}" for a in cert.assumptions]
    lines += [f"  note: {n}" for n in cert.notes[1:]]
    return "\n".join(lines)
