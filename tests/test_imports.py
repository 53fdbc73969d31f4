"""The package's import structure: no import cycles between its modules, and no heavy optional
dependency (python-flint, matplotlib, jinja2) loaded by a bare ``import rayleighflow``.

The import graph is read from the sources with :mod:`ast` (nothing is executed but the package
walk): an edge A → B for every ``import``/``from ... import`` of a rayleighflow module B in
module A, relative imports resolved. Module-top-level imports (those run when A is imported,
including ones under ``if``/``try`` at module level) must form an acyclic graph. Imports inside
functions are lazy; they may not close a cycle either, except the pairs listed in
``LAZY_ALLOWED`` below.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rayleighflow

ROOT = Path(rayleighflow.__file__).parent

# (importer, imported) edges, lazy or top-level, that are allowed to close a cycle. Keep empty
# except for cycles another change is about to remove.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()

HEAVY = ("flint", "matplotlib", "jinja2")


def _modules() -> dict[str, Path]:
    mods = {"rayleighflow": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], "rayleighflow."):
        path = ROOT.joinpath(*info.name.split(".")[1:])
        mods[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return mods


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _edges(mods: dict[str, Path]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(top-level edges, function-level edges) between rayleighflow modules."""
    top: set[tuple[str, str]] = set()
    lazy: set[tuple[str, str]] = set()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node: ast.AST, in_function: bool, mod: str = mod, is_pkg: bool = is_pkg) -> None:
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                )
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = _resolve(mod, is_pkg, child.level, child.module)
                    # `from . import x` may name a submodule x, or an attribute of the package
                    targets = [f"{base}.{a.name}" for a in child.names] + [base]
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    continue  # never executed
                for t in targets:
                    if not t.startswith("rayleighflow"):
                        continue
                    dst = known(t)
                    if dst and dst != mod:
                        (lazy if nested else top).add((mod, dst))
                visit(child, nested)

        visit(tree, False)
    # an import of a.b.c first imports a and a.b: those are not edges of the author's making,
    # and a package importing its own submodules is the normal layout, not a cycle
    return top, lazy - top


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _find_cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def _strip_ancestors(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    # A submodule importing from its own package's __init__ (``from . import x`` in a.b → a) and
    # the package importing its submodules are the ordinary package layout; Python resolves the
    # submodule first. Drop child → ancestor edges, keep everything else.
    return {(a, b) for a, b in edges if not a.startswith(b + ".")}


def test_walk_sees_the_package():
    mods = _modules()
    assert "rayleighflow.prove.core" in mods and "rayleighflow.ntk.executor" in mods
    assert all(p.is_file() for p in mods.values())


def test_no_cycle_among_top_level_imports():
    top, _ = _edges(_modules())
    edges = _strip_ancestors(top) - ALLOWED_CYCLE_EDGES
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_closed_by_a_lazy_import():
    top, lazy = _edges(_modules())
    edges = _strip_ancestors(top | lazy) - ALLOWED_CYCLE_EDGES
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle)


def test_allowlist_is_not_stale():
    top, lazy = _edges(_modules())
    assert ALLOWED_CYCLE_EDGES <= top | lazy, "remove the allowlisted edges that no longer exist"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert _find_cycle({("a", "b"), ("b", "c")}) is None


def test_import_rayleighflow_loads_no_heavy_dependency():
    code = (
        "import sys, rayleighflow\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_prove_is_still_reachable_lazily():
    code = (
        "import sys, rayleighflow as rf\n"
        "assert 'flint' not in sys.modules\n"
        "from rayleighflow import prove\n"
        "assert callable(prove) and prove is rf.prove\n"
        "assert 'prove' in rf.__all__ and 'prove' in dir(rf)\n"
        "assert 'flint' in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_version_and_help_load_neither_torch_nor_the_package_modules():
    """`rayleighflow --version`, `--help` and a bare `rayleighflow` import only the CLI: the
    package's names are loaded on first use (issue 21: the CLI took seconds to say its version)."""
    code = (
        "import sys, contextlib, io\n"
        "from rayleighflow.cli import main\n"
        "for argv in (['--version'], ['--help'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'\n"
        "             or m in ('rayleighflow.problem', 'rayleighflow.flow')))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_public_names_resolve_and_certify_stays_the_function():
    import importlib

    import rayleighflow as rf

    for name in rf.__all__:
        assert getattr(rf, name) is not None, name
    importlib.import_module("rayleighflow.certify")      # the submodule does not rebind it
    assert callable(rf.certify) and not isinstance(rf.certify, type(rf))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = rf.nope
