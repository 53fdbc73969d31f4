"""Torch's intra-op thread count for command-line runs: one thread for small problems.

On a small problem every operation is too short for a thread pool to pay for its
synchronization, and on a machine whose cores are busy with other work the pool's threads
spin-wait against that work: a 5000-step gradient descent of softmax regression went from
seconds to minutes (``benchmarks/threads.py``, ``benchmarks/results/threads-cpu.json``).

The criterion, from the problem a flow is about to run: **work = P × n** (parameters times
samples: one gradient evaluation of a network costs a few multiply-adds per parameter and
sample, and no single matmul in it is larger). Below :data:`SMALL_WORK` the run uses one
thread; at or above it torch's default is kept. For sampled data (a
:class:`~rayleighflow.Sampler`) n is the size of the sample the records evaluate.

Only the command line decides (``rayleighflow run``/``demo``, through :func:`cli_threads`;
the option is parsed in ``rayleighflow.cli``): library functions such as
:func:`rayleighflow.gradient_flow` and a plain
:func:`~rayleighflow.experiments.run_experiment` never change the thread settings. The
``--threads`` option: ``auto`` (the default) applies the criterion, unless ``OMP_NUM_THREADS``
is set in the environment, which is then kept; ``N`` ≥ 1 sets N threads; ``0`` keeps torch's
default (what torch chose at start: ``OMP_NUM_THREADS``, else the cores).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SMALL_WORK", "AUTO", "TORCH_DEFAULT", "problem_work", "choose_threads",
           "ThreadPolicy", "cli_threads", "active_policy", "apply_threads",
           "one_thread_outside_cli"]

#: P × n below which a flow runs on one thread (see the module's docstring and
#: benchmarks/results/threads-cpu.json: below it one gradient step is a few milliseconds of
#: one core's work, less than what the thread pool's synchronization costs on a busy machine)
SMALL_WORK = 10_000_000
#: ``--threads auto``: the criterion (the default)
AUTO = "auto"
#: ``--threads 0``: torch's default
TORCH_DEFAULT = 0
#: the sample size assumed for sampled data when the flow's records name none
DEFAULT_SAMPLE = 4096


def problem_work(problem: Any, eval_data: Any = None) -> tuple[int, int]:
    """(P, n) of a :class:`~rayleighflow.Problem`: its parameter count and its number of
    samples (for sampled data, the size of ``eval_data``, else :data:`DEFAULT_SAMPLE`)."""
    from ..data import Dataset

    P = int(problem.model.n_params)
    if isinstance(problem.data, Dataset):
        return P, int(problem.data.n)
    if isinstance(eval_data, Dataset):
        return P, int(eval_data.n)
    if isinstance(eval_data, int):
        return P, eval_data
    return P, DEFAULT_SAMPLE


def choose_threads(P: int, n: int, requested: int | str = AUTO, *,
                   environ: dict[str, str] | None = None,
                   default: int | None = None,
                   current: int | None = None) -> tuple[int, str]:
    """(thread count, the one line that says why) for a problem of P parameters and n samples.

    ``requested``: :data:`AUTO` (the criterion; when the environment sets
    ``OMP_NUM_THREADS``, torch's ``current`` count is kept), 0 (torch's default ``default``,
    by default the count torch had at import) or a count ≥ 1.
    """
    env = os.environ if environ is None else environ
    default = _TORCH_DEFAULT if default is None else default
    size = f"P={P}, n={n}, P×n={P * n:.3g}"
    hint = "--threads N to change"
    if requested == AUTO:
        omp = env.get("OMP_NUM_THREADS", "").strip()
        if omp:
            kept = torch.get_num_threads() if current is None else current
            return kept, (f"threads: {kept}, kept as set (OMP_NUM_THREADS={omp} in the "
                          f"environment; {hint})")
        if P * n < SMALL_WORK:
            return 1, f"threads: 1 (small problem: {size} < {SMALL_WORK:.0e}; {hint})"
        return default, (f"threads: {default}, torch's default (problem {size} ≥ "
                         f"{SMALL_WORK:.0e}; {hint})")
    if requested == TORCH_DEFAULT:
        return default, f"threads: {default}, torch's default (--threads 0; {size})"
    if isinstance(requested, int) and requested >= 1:
        return requested, f"threads: {requested} (--threads {requested}; {size})"
    raise ValueError(f"threads: {requested!r} is not auto, 0 or a count ≥ 1")


#: the count torch chose when this module was imported (before any run changed it)
_TORCH_DEFAULT = torch.get_num_threads()


@dataclass
class ThreadPolicy:
    """What ``--threads`` asked for; :meth:`apply` sets the count before each flow and keeps
    the line that says why (once, and again only when a later flow changes the count)."""

    requested: int | str = AUTO
    current: int | None = None
    #: each line as it is decided (the command line prints them with the run's summary)
    lines: list[str] = field(default_factory=list)

    def apply(self, problem: Any, eval_data: Any = None) -> int:
        P, n = problem_work(problem, eval_data)
        count, line = choose_threads(P, n, self.requested)
        if count != torch.get_num_threads():
            torch.set_num_threads(count)
        if count != self.current:
            if self.current is None:
                _one_interop_thread(count)
            self.current = count
            self.lines.append(line)
        return count


def _one_interop_thread(count: int) -> None:
    """One inter-op thread along with one intra-op thread, where torch still allows it (only
    before any inter-op work has started, once per process)."""
    if count != 1:
        return
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


_POLICY: contextvars.ContextVar[ThreadPolicy | None] = contextvars.ContextVar(
    "rayleighflow_threads", default=None)


def active_policy() -> ThreadPolicy | None:
    """The policy of the command-line run in progress, or None (a library call)."""
    return _POLICY.get()


def apply_threads(problem: Any, eval_data: Any = None) -> None:
    """Before a flow of an experiment: the active policy's count, or nothing outside one."""
    policy = _POLICY.get()
    if policy is not None:
        policy.apply(problem, eval_data)


@contextlib.contextmanager
def cli_threads(requested: int | str = AUTO) -> Iterator[ThreadPolicy]:
    """The command line's thread policy for the runs inside the block; the thread count is
    restored at its end."""
    policy = ThreadPolicy(requested)
    before = torch.get_num_threads()
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def one_thread_outside_cli() -> Iterator[None]:
    """One thread inside the block, restored at its end, for an experiment known to be tiny
    when it runs as a library call; under the command line its policy decides (per flow)."""
    if _POLICY.get() is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
