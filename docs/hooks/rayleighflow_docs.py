"""mkdocs hooks for the rayleighflow site (mkdocs.yml ``hooks:``).

* Tutorials: every ``docs/tutorials/*.py`` runs in a subprocess during the build (one thread,
  ``OMP_NUM_THREADS=1``), two at a time. Its page (``tutorials/<name>.md``, generated, never
  committed) holds the script's docstring, its source, what it printed and the PNG figures it
  wrote, with the captions it printed (``[figure] file.png: caption``). A tutorial that exits
  non-zero, or prints a figure it did not write, fails the build. Each figure's PNG metadata
  carries this build's id, which the page states, so a check can tell the figures came from
  this build.
* Snippets: ``<!-- rf:run snippets/NAME.py -->`` in a page is replaced by the snippet's source
  and the output of running it during this build.
* Performance: ``performance.md`` gets its tables from ``benchmarks/results/*.json`` (numbers
  and environment as recorded; nothing typed in).
* Changelog: ``changelog.md`` is ``git log`` of the repository.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.rayleighflow")
DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
TUTORIALS = DOCS / "tutorials"
TIMEOUT_S = 600
_FIGURE = re.compile(r"^\[figure\] (?P<file>[\w.-]+\.png): (?P<caption>.+)$")
_SNIPPET = re.compile(r"<!-- rf:run (?P<path>[\w/.-]+\.py) -->")

_state: dict = {}


def _run(script: Path, out: Path, build: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               RAYLEIGHFLOW_TUTORIAL_OUT=str(out), RAYLEIGHFLOW_DOCS_BUILD=build,
               PYTHONHASHSEED="0")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise PluginError(f"{script.relative_to(ROOT)} failed (exit {proc.returncode}) after "
                          f"{wall:.1f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"stdout": proc.stdout, "stderr": proc.stderr, "wall": wall}


def _docstring(source: str) -> tuple[str, str]:
    doc = ast.get_docstring(ast.parse(source)) or ""
    title, _, rest = doc.partition("\n")
    return title.strip().rstrip("."), rest.strip()


def _body(source: str) -> str:
    """The script without its module docstring (shown as the page's introduction)."""
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        return "\n".join(source.splitlines()[first.end_lineno:]).strip("\n")
    return source


def _tutorial_page(script: Path, result: dict, build: str, out: Path) -> tuple[str, list[Path]]:
    source = script.read_text()
    title, intro = _docstring(source)
    figures, printed = [], []
    for line in result["stdout"].splitlines():
        m = _FIGURE.match(line)
        if m:
            png = out / m["file"]
            if not png.is_file():
                raise PluginError(f"{script.name} printed figure {m['file']} but wrote no such "
                                  "file")
            figures.append((png, m["caption"]))
        printed.append(line)
    name = script.stem
    parts = [f"# {title}", "", intro, "",
             f"*This page was produced by running `docs/tutorials/{script.name}` during this "
             f"build of the site (build `{build}`, {result['wall']:.1f} s on one thread); "
             "every number and figure below is its output.* "
             f"[Download the script]({script.name}).", ""]
    for png, caption in figures:
        parts += [f"![{caption}]({name}/{png.name})", "", f"*{caption}*", ""]
    parts += ["## Output", "", "```text", *printed, "```", "",
              "## The script", "", "```python", _body(source), "```", ""]
    return "\n".join(parts), [p for p, _ in figures]


def on_config(config):
    _state["build"] = uuid.uuid4().hex[:12]
    return config


def on_files(files, config):
    build = _state.setdefault("build", uuid.uuid4().hex[:12])
    work = Path(tempfile.mkdtemp(prefix="rayleighflow-docs-"))
    _state["work"] = work
    scripts = sorted(TUTORIALS.glob("*.py"))
    snippets = sorted((DOCS / "snippets").glob("*.py"))
    jobs = [(s, work / "tutorials" / s.stem) for s in scripts]
    jobs += [(s, work / "snippets" / s.stem) for s in snippets]
    for _, out in jobs:
        out.mkdir(parents=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _run(job[0], job[1], build), jobs))
    log.info("rayleighflow: %d tutorials and %d snippets ran in %.1f s (build %s)",
             len(scripts), len(snippets), time.perf_counter() - start, build)
    by_script = dict(zip([s for s, _ in jobs], results, strict=True))
    _state["snippets"] = {f"snippets/{s.name}": by_script[s] for s in snippets}
    for script, out in jobs[: len(scripts)]:
        page, pngs = _tutorial_page(script, by_script[script], build, out)
        files.append(File.generated(config, f"tutorials/{script.stem}.md", content=page))
        for png in pngs:
            files.append(File.generated(config, f"tutorials/{script.stem}/{png.name}",
                                        abs_src_path=str(png)))
    files.append(File.generated(config, "performance.md", content=_performance_page()))
    files.append(File.generated(config, "changelog.md", content=_changelog_page()))
    return files


def on_page_markdown(markdown, page, config, files):
    def run(m: re.Match) -> str:
        key = m["path"]
        if key not in _state.get("snippets", {}):
            raise PluginError(f"{page.file.src_uri}: no snippet {key} under docs/")
        source = (DOCS / key).read_text().strip("\n")
        output = _state["snippets"][key]["stdout"].rstrip("\n")
        return (f"```python\n{source}\n```\n\nWhat it printed when this page was built:\n\n"
                f"```text\n{output}\n```")
    return _SNIPPET.sub(run, markdown)


def on_post_build(config):
    work = _state.pop("work", None)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


# -- performance ----------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return ", ".join(_fmt(v) for v in value)
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _scalar(value) -> bool:
    return (value is None or isinstance(value, str | int | float | bool)
            or (isinstance(value, list) and len(value) <= 4
                and all(isinstance(v, int | float) for v in value)))


def _table(rows: list[dict], first: str | None = None) -> list[str]:
    cols: list[str] = [] if first is None else [first]
    for r in rows:
        for k, v in r.items():
            if k not in cols and _scalar(v):
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return out


def _benchmark(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    stem = path.stem.rsplit("-", 1)[0]
    script = ROOT / "benchmarks" / f"{stem}.py"
    while not script.is_file() and "-" in stem:
        stem = stem.rsplit("-", 1)[0]
        script = ROOT / "benchmarks" / f"{stem}.py"
    lines = [f"## `{path.name}`", ""]
    if script.is_file():
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        lines += [f"Written by `benchmarks/{script.name}`; rerun it with "
                  f"`python benchmarks/{script.name}` (options: `--help`). From its "
                  "docstring:", "", "```text", doc.strip(), "```", ""]
    env = data.get("environment")
    if isinstance(env, dict):
        lines += ["**Environment** (as recorded):", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
        lines.append("")
    for key, value in data.items():
        if key == "environment":
            continue
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            lines += [f"**{key}**", "", *_table(value), ""]
        elif isinstance(value, dict) and value and all(isinstance(r, dict)
                                                       for r in value.values()):
            rows = [{"name": k, **r} for k, r in value.items()]
            lines += [f"**{key}**", "", *_table(rows, "name"), ""]
        elif isinstance(value, dict) and value:
            lines += [f"**{key}**", "", *_table([value]), ""]
        elif _scalar(value):
            lines += [f"**{key}**: {_fmt(value)}", ""]
    return lines


def _performance_page() -> str:
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    lines = ["# Performance", "",
             "Every table on this page is read from the JSON files in `benchmarks/results/` "
             "when the site is built: the numbers and the environment (hardware, thread "
             "count, load average) are as the benchmark scripts recorded them. Nested "
             "values (per-method timings, plans) are in the files themselves.", "",
             "To rerun one: `OMP_NUM_THREADS=1 python benchmarks/<script>.py` (each script "
             "writes its JSON beside these, with the environment), then rebuild the site.", ""]
    for path in results:
        lines += _benchmark(path)
    return "\n".join(lines)


# -- changelog ------------------------------------------------------------------------------------

def _changelog_page() -> str:
    try:
        out = subprocess.run(["git", "log", "--date=short", "--format=%ad%x09%h%x09%s"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise PluginError(f"changelog: git log failed ({err}); build the site from a git "
                          "clone") from None
    lines = ["# Changelog", "",
             "Every commit, newest first, as `git log` lists it when the site is built.", ""]
    day = None
    for row in out.splitlines():
        date, short, subject = row.split("\t", 2)
        if date != day:
            lines += ["", f"## {date}", ""]
            day = date
        subject = subject.replace("<", "&lt;").replace("*", r"\*").replace("_", r"\_")
        lines.append(f"- `{short}` {subject}")
    return "\n".join(lines) + "\n"
