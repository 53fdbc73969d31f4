"""User experiments from a TOML file (see examples/ and experiments.config for the schema)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset
from ..ntk import contrast_report
from .builders import build_problem, flow_kwargs
from .common import (
    certificate_arrays,
    certificates,
    flow_summary,
    kernel_figure,
    loss_figure,
    spectrum_diagnostic,
)
from .config import ExperimentConfig, config_to_toml, load_config
from .runner import Experiment, RunContext, execute

__all__ = ["run_user_experiment", "ntk_summary", "apply_overrides"]


def apply_overrides(cfg: ExperimentConfig, *, seed=None, device=None, dtype=None,
                    quick: bool = False) -> ExperimentConfig:
    """Command-line options win over the file; ``quick`` divides t_max by 10 (≤ 20 records)."""
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if device is not None:
        changes["device"] = device
    if dtype is not None:
        changes["dtype"] = dtype
    if quick:
        changes["flow"] = dataclasses.replace(
            cfg.flow, t_max=cfg.flow.t_max / 10, n_records=min(cfg.flow.n_records, 20))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _eval_data(problem, cfg: ExperimentConfig) -> Dataset | None:
    return problem.data if isinstance(problem.data, Dataset) else None


def _run(cfg: ExperimentConfig):
    def run(ctx: RunContext) -> dict[str, Any]:
        problem, info = build_problem(cfg)
        groups = list(problem.model.groups) if cfg.diagnostics.groups else []
        spectra = cfg.diagnostics.spectrum_every > 0
        n_certs = len(cfg.certify.desingularizers) + 1
        figures = [loss_figure("loss", "flow", n_certs)]
        if spectra or groups:
            figures.append(kernel_figure("kernel", "flow", groups=groups))
        ctx.save_figures(figures)
        diagnostics = [spectrum_diagnostic(cfg.diagnostics.spectrum_every)] if spectra else []
        kwargs = flow_kwargs(cfg)
        eval_data = _eval_data(problem, cfg)
        if eval_data is None:  # sampler data: fix the evaluation sample so certificates use it
            eval_data = problem.data.sample(cfg.flow.eval_size, kwargs["generator"])
            kwargs["eval_data"] = eval_data
            kwargs.pop("eval_size", None)
        result = ctx.flow("flow", problem, label=cfg.name, meta={"experiment": info},
                          diagnostics=diagnostics, group_quotients=cfg.diagnostics.groups,
                          **kwargs)
        certs = certificates(result.trajectory, problem, eval_data, cfg.certify.desingularizers,
                             rayleigh_lower=cfg.certify.rayleigh_lower, mu=cfg.certify.mu,
                             rtol=cfg.certify.rtol, atol=cfg.certify.atol)
        ctx.save_arrays(**certificate_arrays("", certs))
        figures[0] = loss_figure("loss", "flow", certs)
        ctx.save_figures(figures)
        summary = flow_summary(problem, eval_data, result, certs)
        summary["model"] = info.get("model")
        summary["data"] = info.get("data")
        return summary

    return run


def run_user_experiment(path: Path, out: Path, *, seed=None, device=None, dtype=None,
                        quick: bool = False, resume: bool = False,
                        progress: Any = None) -> dict[str, Any]:
    cfg = apply_overrides(load_config(path), seed=seed, device=device, dtype=dtype, quick=quick)
    exp = Experiment(name=cfg.name, description=f"user experiment from {path}", run=_run(cfg),
                     defaults={}, quick={})
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out, {}, seed=cfg.seed, device=cfg.device,
                     dtype=getattr(torch, cfg.dtype), resume=resume, progress=progress)
    return execute(exp, ctx, config_to_toml(cfg))


def ntk_summary(path: Path, *, max_samples: int | None = None) -> str:
    """The paper's contrast at initialization for a TOML experiment's model and data."""
    cfg = load_config(path)
    problem, info = build_problem(cfg)
    data = problem.data
    if not isinstance(data, Dataset):
        data = data.sample(max_samples or 512, torch.Generator().manual_seed(cfg.seed))
    if max_samples is not None and data.n > max_samples:
        data = data.subset(torch.arange(max_samples))
    report = contrast_report(problem, data)
    return f"{cfg.name}: {info.get('model')} on {info.get('data')}\n{report}"
