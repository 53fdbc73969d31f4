"""User experiments from a TOML file (see examples/ and experiments.config for the schema)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset
from ..flow import Columns
from ..ntk import KernelTooLargeError, contrast_report
from ..ntk._common import SpectrumEstimate, fmt_bytes, memory_budget
from ..rundir import prepare_out, recorded_summary
from ..seeding import generator as seeded_generator
from .builders import build_problem, flow_kwargs, problem_size
from .common import (
    certificate_arrays,
    certificates,
    flow_summary,
    kernel_figure,
    loss_figure,
    spectrum_diagnostic,
)
from .config import ExperimentConfig, LogRecordsConfig, config_to_toml, load_config
from .runner import Experiment, RunContext, check_extras, execute_locked

__all__ = ["run_user_experiment", "ntk_summary", "apply_overrides"]


def apply_overrides(cfg: ExperimentConfig, *, seed=None, device=None, dtype=None,
                    quick: bool = False) -> ExperimentConfig:
    """Command-line options win over the file; ``quick`` divides t_max by 10 (≤ 20 log-spaced
    records)."""
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if device is not None:
        changes["device"] = device
    if dtype is not None:
        changes["dtype"] = dtype
    if quick:
        records = cfg.flow.records
        if isinstance(records, LogRecordsConfig):
            records = LogRecordsConfig(min(records.n, 20))
        changes["flow"] = dataclasses.replace(cfg.flow, t_max=cfg.flow.t_max / 10,
                                              records=records)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _eval_data(problem, cfg: ExperimentConfig) -> Dataset | None:
    return problem.data if isinstance(problem.data, Dataset) else None


def _kernel_figure(groups: list[str], spectra: bool) -> dict[str, Any]:
    """R(K; ∇ℓ) and per-group quotients, with the λ series only when spectra are recorded
    (no panel series without data)."""
    fig = kernel_figure("kernel", "flow", groups=groups)
    if not spectra:
        fig["title"] = "Rayleigh quotients along the flow"
        for panel in fig["panels"]:
            panel["series"] = [s for s in panel["series"] if ":lambda_" not in str(s.get("y"))]
            panel["title"] = "R(K; ∇ℓ) and per-group quotients"
            panel["ylabel"] = "Rayleigh quotient"
    return fig


def _uncertified_summary(ctx: RunContext, problem, data, result, info) -> dict[str, Any]:
    """Summary keys of a flow too short to certify, read off what it recorded."""
    summary = recorded_summary(ctx.out)
    summary.pop("notes", None)
    summary.pop("recorded_flow", None)
    return {**summary, "convention": problem.convention.value, "P": problem.model.n_params,
            "nk": data.n * int(info["k"]), "certificates": [],
            "flow_status": result.status.value, "flow_message": result.message,
            "grad_evals": result.n_grad_evals}


def _run(cfg: ExperimentConfig, built: tuple[Any, dict[str, Any]]):
    def run(ctx: RunContext) -> dict[str, Any]:
        problem, info = built
        groups = list(problem.model.groups) if cfg.diagnostics.groups else []
        spectra = cfg.diagnostics.spectrum_every > 0
        n_certs = len(cfg.certify.desingularizers) + 1
        figures = [loss_figure("loss", "flow", n_certs)]
        if spectra or groups:
            figures.append(_kernel_figure(groups, spectra))
        ctx.save_figures(figures)
        diagnostics = [spectrum_diagnostic(cfg.diagnostics.spectrum_every)] if spectra else []
        kwargs = flow_kwargs(cfg)
        eval_data = _eval_data(problem, cfg)
        if eval_data is None:  # sampler data: fix the evaluation sample so certificates use it
            eval_data = problem.data.sample(cfg.flow.eval_size, kwargs["generator"])
            kwargs["eval_data"] = eval_data
        if not cfg.diagnostics.groups:
            kwargs["records"] = dataclasses.replace(kwargs["records"], groups=False)
        result = ctx.flow("flow", problem, label=cfg.name, meta={"experiment": info},
                          observers=[Columns(d) for d in diagnostics], **kwargs)
        notes: list[str] = []
        if len(result.trajectory) < 2:  # stopped at its first record: nothing to certify
            certs = []
            notes.append(f"no certificate: the flow stopped ({result.status.value}) after "
                         f"{len(result.trajectory)} record(s): {result.message}")
        else:
            certs = certificates(result.trajectory, problem, eval_data,
                                 cfg.certify.desingularizers,
                                 rayleigh_lower=cfg.certify.rayleigh_lower, mu=cfg.certify.mu,
                                 rtol=cfg.certify.rtol, atol=cfg.certify.atol)
        if not certs:
            summary = _uncertified_summary(ctx, problem, eval_data, result, info)
        else:
            ctx.save_arrays(**certificate_arrays("", certs))
            figures[0] = loss_figure("loss", "flow", certs)
            ctx.save_figures(figures)
            summary = flow_summary(problem, eval_data, result, certs)
        summary["model"] = info.get("model")
        summary["data"] = info.get("data")
        notes += list(info.get("notes") or [])
        if notes:
            summary["notes"] = list(summary.get("notes", [])) + notes
        return summary

    return run


def run_user_experiment(path: Path, out: Path, *, seed=None, device=None, dtype=None,
                        quick: bool = False, resume: bool = False, overwrite: bool = False,
                        progress: Any = None, next_free: bool = False,
                        on_folder: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Validate the file, build the problem, and only then create (and lock) the run folder:
    a configuration or model error leaves nothing behind. ``next_free``, ``on_folder``: see
    :func:`~rayleighflow.experiments.registry.run_experiment`."""
    cfg = apply_overrides(load_config(path), seed=seed, device=device, dtype=dtype, quick=quick)
    check_extras(cfg.name, ("data",) if cfg.data.kind == "sklearn" else ())
    built = build_problem(cfg)
    exp = Experiment(name=cfg.name, description=f"user experiment from {path}",
                     run=_run(cfg, built), defaults={}, quick={})
    out = prepare_out(out, resume=resume, overwrite=overwrite, lock=True, next_free=next_free)
    return execute_locked(
        exp, out, lambda folder: RunContext(folder, {}, seed=cfg.seed, device=cfg.device,
                                            dtype=getattr(torch, cfg.dtype), resume=resume,
                                            progress=progress),
        config_to_toml(cfg), resume=resume, on_folder=on_folder)


def ntk_summary(path: Path, *, max_samples: int | None = None, force: bool = False,
                max_memory: int | str | None = None, log: Any = None) -> str:
    """The paper's contrast at initialization for a TOML experiment's model and data.

    ``path`` is a user experiment file, as ``registry.user_experiment_file`` resolves it (a
    run folder to its config.toml). The kernel's memory is estimated before anything is
    built and refused above the budget (``max_memory``, else 80% of free memory) unless
    ``force``; ``log(line)`` receives the estimate and progress of a long request."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1 (got {max_samples})")
    cfg = load_config(path)
    n, k, p = problem_size(cfg)
    n = min(n if n is not None else (max_samples or 512), max_samples or n or 512)
    estimate = SpectrumEstimate(n, k, p)
    budget, said = memory_budget(max_memory, torch.device(cfg.device))
    if estimate.bytes > budget and not force:
        fit = estimate.samples_within(budget)
        fewer = f"--max-samples {fit} (fits), " if 0 < fit < n else ""
        raise KernelTooLargeError(
            f"ntk: {estimate.describe()}, above the budget of {fmt_bytes(budget)} ({said}): "
            f"use {fewer}--max-memory SIZE to set the budget, or --force to try anyway")
    long = estimate.bytes > 2**30 or estimate.flops > 1e11
    say = log if (log is not None and long) else (lambda _line: None)
    begin = time.perf_counter()
    say(f"ntk: {estimate.describe()} (budget {fmt_bytes(budget)}); building the problem")
    problem, info = build_problem(cfg)
    data = problem.data
    if not isinstance(data, Dataset):
        data = data.sample(max_samples or 512, seeded_generator(cfg.seed))
    if max_samples is not None and data.n > max_samples:
        data = data.subset(torch.arange(max_samples))
    say(f"ntk: forming the kernel and its spectrum ({time.perf_counter() - begin:.1f} s)")
    report = contrast_report(problem, data, max_memory=max_memory)
    say(f"ntk: done in {time.perf_counter() - begin:.1f} s")
    return f"{cfg.name}: {info.get('model')} on {info.get('data')}\n{report}"
