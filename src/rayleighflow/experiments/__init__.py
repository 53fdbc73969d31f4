"""Built-in experiments (the paper's results), user TOML experiments, and the runner."""

from __future__ import annotations

from .registry import EXPERIMENTS, get_experiment, run_experiment

__all__ = ["EXPERIMENTS", "get_experiment", "run_experiment"]
