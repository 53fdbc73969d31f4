"""Command-line interface: a thin layer over rayleighflow.experiments and rayleighflow.report."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

DEFAULT_OUT = "runs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayleighflow",
        description="Certify and diagnose gradient-flow convergence through Rayleigh quotients "
                    "of the neural tangent kernel and Kurdyka-Lojasiewicz inequalities.",
    )
    parser.add_argument("--version", action="version", version=f"rayleighflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a built-in experiment or a TOML experiment file",
                         description="Run a built-in experiment (see `rayleighflow list`) or a "
                                     "user experiment from a TOML file, into a run folder with "
                                     "config.toml, summary.json, trajectories, figures and "
                                     "report.html.")
    run.add_argument("experiment", nargs="?", default="demo",
                     help="experiment name or path to a .toml file (default: demo)")
    _add_run_options(run)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last record")

    demo = sub.add_parser("demo", help="the default demo (same as `rayleighflow run demo`)")
    _add_run_options(demo)

    report = sub.add_parser("report", help="re-render a run folder's figures and report.html "
                                           "from its saved files")
    report.add_argument("run_dir", type=Path)

    sub.add_parser("list", help="list the built-in experiments")

    ntk = sub.add_parser("ntk", help="NTK spectrum summary at initialization for an "
                                     "experiment's model and data")
    ntk.add_argument("experiment", help="a .toml experiment file")
    ntk.add_argument("--max-samples", type=int, default=None,
                     help="use at most this many samples (the kernel is (n k)^2)")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help=f"run folder (default: {DEFAULT_OUT}/<experiment>)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (default 0, or the TOML file's)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default cpu, or the TOML file's)")
    p.add_argument("--dtype", default=None, choices=["float64", "float32"],
                   help="floating-point type (default float64, or the TOML file's)")
    p.add_argument("--quick", action="store_true", help="a short variant (seconds), as in CI")


def _progress():
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("t={task.completed:.4g}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _cmd_run(args) -> int:
    from .experiments import run_experiment

    resume = args.resume is not None if hasattr(args, "resume") else False
    if resume:
        run_dir = Path(args.resume)
        config = run_dir / "config.toml"
        if not config.exists():
            print(f"error: {run_dir} has no config.toml: not a run folder", file=sys.stderr)
            return 2
        target, out = str(config), run_dir
    else:
        target = args.experiment if hasattr(args, "experiment") else "demo"
        stem = Path(target).stem if target.endswith(".toml") else target
        out = args.out if args.out is not None else Path(DEFAULT_OUT) / stem
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    with _progress() as progress:
        summary = run_experiment(target, out, seed=args.seed, device=args.device,
                                 dtype=args.dtype, quick=args.quick, resume=resume,
                                 progress=progress)
    _print_summary(summary, out)
    return 0 if summary["status"] == "complete" else 130


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{summary['experiment']}: {summary['status']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("P", "nk", "rank", "lambda_min", "lambda_max", "rayleigh_min", "loss_initial",
                "loss_final", "t_final", "run_time_s"):
        value = summary.get(key)
        table.add_row(key, "—" if value is None else f"{value:.4g}"
                      if isinstance(value, float) else str(value))
    console.print(table)
    certs = Table(title="certificates")
    for col in ("certificate", "μ", "status", "bound at end"):
        certs.add_column(col)
    for c in summary.get("certificates", []):
        mu, bound = c.get("mu"), c.get("bound_final")
        certs.add_row(c.get("label", c["desingularizer"]), "—" if mu is None else f"{mu:.4g}",
                      c["status"], "—" if bound is None else f"{bound:.4g}")
    if summary.get("certificates"):
        console.print(certs)
    console.print(f"run folder: {out}   report: {out / 'report.html'}")


def _cmd_report(args) -> int:
    from .report import report_from_dir

    path = report_from_dir(args.run_dir)
    print(f"report: {path}")
    return 0


def _cmd_list(_args) -> int:
    from .experiments import EXPERIMENTS

    width = max(len(n) for n in EXPERIMENTS)
    for name, exp in EXPERIMENTS.items():
        print(f"{name:<{width}}  {exp.description}")
    return 0


def _cmd_ntk(args) -> int:
    from .experiments.user import ntk_summary

    print(ntk_summary(Path(args.experiment), max_samples=args.max_samples))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": _cmd_run, "demo": _cmd_run, "report": _cmd_report, "list": _cmd_list,
                "ntk": _cmd_ntk, None: _cmd_run}
    if args.command is None:
        args = _parser().parse_args(["run", *(argv or [])])
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
