"""Command-line interface: a thin layer over rayleighflow.experiments and rayleighflow.report.

Every failure ends in one line on stderr (``error: ...``; a configuration with several problems
lists one per line) and a non-zero exit code: 2 for bad input (options, files, configuration,
folders, an optional extra not installed: the line says which to install), 1 when the run
itself failed or a file could not be written (summary.json then has status "failed" where it
can still be written; the line names the file), 130 after an interrupt (Ctrl-C or SIGTERM; the
resume command is printed). Never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__

DEFAULT_OUT = "runs"
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_NO_PROOF = 3  # `rayleighflow prove`: the bounds give no proof (the reason is printed)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _seed(text: str) -> int:
    from .experiments.registry import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer seed (use 0 to {MAX_SEED})") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {text} is out of range (use 0 to {MAX_SEED})")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _threads(text: str) -> int | str:
    # parsed here, not in experiments.threads, which imports torch: --help stays fast
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a thread count (use N ≥ 1, 0 for torch's default, or auto)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, 0 for torch's default, or auto (got {value})")
    return value


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name; give a folder, e.g. runs/mine")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    run.add_argument("experiment", nargs="?", default=None,
                     help="experiment name or path to a .toml file (default: demo)")
    _add_run_options(run)
    run.add_argument("--resume", metavar="RUN_DIR", type=_folder,
                     help="continue an interrupted run from its last record, exactly as it was "
                          "configured (options that would change it are refused)")
    run.add_argument("--force-new", action="store_true",
                     help="with --resume: start RUN_DIR over (emptied), with the given options")

    demo = sub.add_parser("demo", help="the default demo (same as `rayleighflow run demo`)")
    _add_run_options(demo)

    report = sub.add_parser("report", help="re-render a run folder's figures and report.html "
                                           "from its saved files")
    report.add_argument("run_dir", type=_folder)

    sub.add_parser("list", help="list the built-in experiments")

    ntk = sub.add_parser("ntk", help="NTK spectrum summary at initialization for an "
                                     "experiment's model and data")
    ntk.add_argument("experiment", help="a .toml experiment file (or a run folder of one)")
    ntk.add_argument("--max-samples", type=_positive_int, default=None,
                     help="use at most this many samples (the kernel is (n k)^2)")
    ntk.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory budget, e.g. 4GB (default: 80%% of free memory); a larger "
                          "kernel is refused before anything is built")
    ntk.add_argument("--force", action="store_true",
                     help="run even when the estimate exceeds the budget")

    prove = sub.add_parser("prove", help="a proof (scope proven) that gradient flow from the "
                                         "experiment's initialization converges; exit 0 when "
                                         "proven, 3 when no proof is available")
    prove.add_argument("experiment", help="a .toml experiment file (or a run folder of one)")
    prove.add_argument("--radius", type=float, default=None,
                       help="the parameter ball's radius (default: searched)")
    prove.add_argument("--target", type=float, default=None,
                       help="the loss to reach (0: convergence to zero; default: the "
                            "strongest statement the bounds allow)")
    prove.add_argument("--json", default=None, help="also write the proof as JSON here")
    prove.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="memory budget, e.g. 4GB (default: 80%% of free memory)")
    prove.add_argument("--force", action="store_true",
                       help="prove even when the size estimate exceeds the budget")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=_folder, default=None,
                   help=f"run folder (default: {DEFAULT_OUT}/<experiment>, or "
                        f"{DEFAULT_OUT}/<experiment>-2, ... when that one holds files)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run folder's contents if it already holds a run")
    p.add_argument("--seed", type=_seed, default=None,
                   help="random seed, 0 to 2^32-1 (default 0, or the TOML file's)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default cpu, or the TOML file's)")
    p.add_argument("--dtype", default=None, choices=["float64", "float32"],
                   help="floating-point type (default float64, or the TOML file's)")
    p.add_argument("--quick", action="store_true", help="a short variant (seconds), as in CI")
    p.add_argument("--threads", type=_threads, default="auto", metavar="N",
                   help="torch threads: auto (default: 1 for small problems, P×n < 1e7, "
                        "unless OMP_NUM_THREADS is set), N ≥ 1, or 0 for torch's default")


class _LazyProgress:
    """A rich progress display that starts with its first bar, so an error raised while
    checking the inputs prints nothing but its one line."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("t={task.completed:.4g}"), TimeElapsedColumn(),
                                  TimeRemainingColumn(), transient=False)
        self._started = False

    def add_task(self, *args, **kwargs):
        if not self._started:
            self._progress.start()
            self._started = True
        return self._progress.add_task(*args, **kwargs)

    def update(self, *args, **kwargs) -> None:
        self._progress.update(*args, **kwargs)

    def __enter__(self) -> _LazyProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._progress.stop()


def _progress() -> _LazyProgress:
    return _LazyProgress()


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _cmd_run(args) -> int:
    from .experiments.registry import default_run_dir, resume_run, run_experiment

    resume = getattr(args, "resume", None)
    experiment = getattr(args, "experiment", None)
    options = {"seed": args.seed, "device": args.device, "dtype": args.dtype,
               "quick": args.quick}
    if resume is not None and args.out is not None and Path(args.out) != Path(resume):
        raise ValueError(f"--out {args.out} with --resume {resume}: a resumed run stays in its "
                         "own folder; drop --out")
    if resume is not None and args.overwrite and not args.force_new:
        raise ValueError("--overwrite with --resume: --resume continues the run; use "
                         "--force-new to start it over")
    if resume is not None and not args.force_new:
        out = Path(resume)
        run = lambda progress: resume_run(out, experiment=experiment,  # noqa: E731
                                          progress=progress, **options)
    else:
        next_free = False
        if resume is not None:  # --force-new: start over in the same folder
            out = Path(resume)
            target = experiment or str(out / "config.toml")
            overwrite = True
        else:
            target = experiment or "demo"
            next_free = args.out is None  # runs/NAME, or the next free runs/NAME-N
            out = Path(args.out) if args.out is not None else default_run_dir(target, DEFAULT_OUT)
            overwrite = args.overwrite
        if getattr(args, "force_new", False) and resume is None:
            raise ValueError("--force-new applies only with --resume RUN_DIR; to replace a "
                             "folder's run use --overwrite")

        def claimed(folder: Path) -> None:  # another run may have claimed `out` first
            nonlocal out
            out = folder

        run = lambda progress: run_experiment(  # noqa: E731
            target, out, overwrite=overwrite, progress=progress, next_free=next_free,
            on_folder=claimed, **options)
    from .experiments.threads import cli_threads

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    with cli_threads(args.threads), _progress() as progress:
        summary = run(progress)
    _print_summary(summary, out)
    if summary["status"] == "interrupted":
        from .experiments.runner import resume_command

        print(f"interrupted at t = {_fmt(summary.get('t_final'))}: what was recorded is in "
              f"{out}; continue with: {resume_command(out)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    for stop in summary.get("stopped_early") or []:
        print(f"warning: flow {stop['flow']!r} stopped early ({stop['status']}): "
              f"{stop['message']}", file=sys.stderr)
    return 0


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    recorded = summary["status"] != "complete"
    title = f"{summary['experiment']}: {summary['status']}"
    if recorded and summary.get("recorded_flow"):
        title += f" (values recorded by flow {summary['recorded_flow']!r})"
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("P", "nk", "rank", "lambda_min", "lambda_max", "rayleigh_min", "loss_initial",
                "loss_final", "t_final", "run_time_s"):
        table.add_row(key, _fmt(summary.get(key)))
    console.print(table)
    certs = Table(title="certificates")
    for col in ("certificate", "μ", "status", "scope", "L₀ → bound at end", "note"):
        certs.add_column(col)
    for c in summary.get("certificates", []):
        from .report.html import certified_reduction

        red = certified_reduction(c, summary)
        reduction = "—" if red["l0"] is None or red["bound"] is None else (
            f"{red['l0']:.4g} → {red['bound']:.4g} (×{red['ratio']:.3g})")
        certs.add_row(c.get("label", c["desingularizer"]), _fmt(c.get("mu")), c["status"],
                      str(c.get("scope") or "—"), reduction,
                      "vacuous" if red["vacuous"] else "")
    if summary.get("certificates"):
        console.print(certs)
    for line in (summary.get("threads") or {}).get("lines", []):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"run folder: {out}   report: {out / 'report.html'}")


def _cmd_report(args) -> int:
    from ._optional import require_extra

    require_extra("report", "rayleighflow report")
    from .report import report_from_dir, report_problems

    path = report_from_dir(Path(args.run_dir))
    problems = report_problems(Path(args.run_dir))
    print(f"report: {path}")
    if problems:  # the page shows what could be read; the damage is said here, and in the code
        for p in problems:
            print(f"error: {args.run_dir}: {p}", file=sys.stderr)
        print("the report shows only what could be read", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _cmd_list(_args) -> int:
    from .experiments import EXPERIMENTS

    width = max(len(n) for n in EXPERIMENTS)
    for name, exp in EXPERIMENTS.items():
        print(f"{name:<{width}}  {exp.description}")
    return 0


def _cmd_ntk(args) -> int:
    from .experiments.registry import user_experiment_file
    from .experiments.user import ntk_summary
    from .ntk.executor import torchrun_session

    with torchrun_session() as main:  # under torchrun: kernel tiles over the ranks
        path = user_experiment_file(Path(args.experiment), "ntk", "its report shows its "
                                    "spectrum: rayleighflow run {name}")
        text = ntk_summary(path, max_samples=args.max_samples, force=args.force,
                           max_memory=args.max_memory,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    if main:
        print(text)
    return 0


def _cmd_prove(args) -> int:
    from ._optional import require_extra

    require_extra("prove", "rayleighflow prove")
    from .prove.file import format_proof, prove_file

    proof = prove_file(args.experiment, radius=args.radius, target=args.target,
                       json_out=args.json, force=args.force, max_memory=args.max_memory,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_proof(proof))
    return 0 if proof.certificate.holds else EXIT_NO_PROOF


def _one_line(text: object) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `rayleighflow` says what it can do; `rayleighflow run` is the demo
        _parser().print_help()
        return 0
    # --help, --version and usage errors (one line) exit through SystemExit, as argparse does.
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["run", *argv])
    commands = {"run": _cmd_run, "demo": _cmd_run, "report": _cmd_report, "list": _cmd_list,
                "ntk": _cmd_ntk, "prove": _cmd_prove}
    from ._io import WriteError
    from ._optional import MissingExtra
    from .experiments._toml import ConfigError
    from .experiments.registry import NothingToResume
    from .experiments.runner import RunFailed

    try:
        return commands[args.command](args)
    except NothingToResume as done:
        print(done, file=sys.stderr)
        return 0
    except ConfigError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MissingExtra as err:  # an optional feature without its extra: the pip command
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        if err.summary_written:
            print(f"error: the run failed: {_one_line(err)}; what was recorded is in {err.out} "
                  "(summary.json status \"failed\", traceback in it)", file=sys.stderr)
        else:
            print(f"error: the run failed: {_one_line(err)}; summary.json could not be written "
                  f"either: free space, then `rayleighflow run --resume {err.out}` continues "
                  "from the last checkpoint", file=sys.stderr)
        return EXIT_FAILED
    except WriteError as err:  # a full disk before the run started: nothing was kept
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as stop:
        print(f"error: {_one_line(stop) if str(stop) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (please report this "
              "with the command you ran)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
