"""``rayleighflow prove FILE.toml``: prove a user experiment's flow from its initialization."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ._proof import Proof
from .core import prove_details

__all__ = ["prove_file", "format_proof"]


PROOF_WORK_BUDGET = 2e10   # multiply-adds of J₀ and its Gram: about minutes in ball arithmetic


def prove_file(path: str | Path, *, radius: float | None = None, target: float | None = None,
               json_out: str | Path | None = None, force: bool = False,
               max_memory: int | str | None = None, log: Any = None) -> Proof:
    """Build the TOML experiment's problem (model at its seeded initialization, data, loss) and
    prove. ``path``: a user experiment file or a run folder of one.

    The proof's size (J₀ is nk × P, its Gram min(nk, P)²) is estimated before anything is
    built and refused above the memory budget (``max_memory``, else 80% of free memory) or
    :data:`PROOF_WORK_BUDGET` multiply-adds unless ``force``; ``log(line)`` receives the
    estimate and the stages as they start."""
    from ..data import Dataset
    from ..experiments.builders import build_problem, problem_size
    from ..experiments.config import load_config
    from ..experiments.registry import user_experiment_file
    from ..ntk._common import fmt_bytes, memory_budget

    say = log if log is not None else (lambda _line: None)
    path = user_experiment_file(path, "prove", "`rayleighflow run proof` proves the "
                                               "definite-NTK networks")
    cfg = load_config(path)
    n, k, p = problem_size(cfg)
    if n is not None:
        nk, m = n * k, min(n * k, p)
        need, work = 8 * nk * p + 16 * m * m, float(nk) * p * m
        budget, said = memory_budget(max_memory, torch.device("cpu"))
        size = (f"prove: n = {n}, k = {k}, P = {p}: J₀ is {nk} × {p}, its Gram {m} × {m}; "
                f"about {fmt_bytes(need)} and {work:.2g} multiply-adds")
        if not force and (need > budget or work > PROOF_WORK_BUDGET):
            over = (f"above the memory budget of {fmt_bytes(budget)} ({said})"
                    if need > budget else
                    f"above the work budget of {PROOF_WORK_BUDGET:.0e} multiply-adds")
            raise ValueError(f"{size}, {over}: use fewer samples ([data] n_samples) or a "
                             "smaller model, or --force to prove anyway")
        say(size)
    begin = time.perf_counter()
    say("prove: building the problem")
    problem, _info = build_problem(cfg)
    if not isinstance(problem.data, Dataset):
        raise ValueError("prove needs a finite dataset ([data] kind sklearn, csv, npz or a "
                         "fixed n_samples draw); a sampler's infinite support has no finite "
                         "Jacobian")
    say(f"prove: bounding the constants and searching the radius "
        f"({time.perf_counter() - begin:.1f} s)")
    proof = prove_details(problem, radius=radius, target=target)
    say(f"prove: done in {time.perf_counter() - begin:.1f} s")
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
