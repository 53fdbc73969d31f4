"""The optional extras (issue 21): ``pip install rayleighflow`` is the core and the monitor;
``[report]`` (matplotlib, jinja2), ``[prove]`` (python-flint, mpmath) and ``[data]``
(scikit-learn) bring the rest, and a feature used without its extra says which to install.

The "not installed" runs are subprocesses that hide the optional packages before importing
rayleighflow: every finder on ``sys.meta_path`` is wrapped so that it does not find them, which
is what an environment without them looks like (``import x`` raises ModuleNotFoundError,
``importlib.util.find_spec(x)`` is None, as torch's own probes expect). torch itself requires
jinja2, and sympy (torch's) requires mpmath: those two are hidden only from imports made by
rayleighflow and by the test script, so that torch still works; the three others are hidden
from everyone. The child also checks that no rayleighflow module holds a hidden package's
module or object (an import served from ``sys.modules`` bypasses the finders).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from rayleighflow._optional import DISTRIBUTIONS, EXTRAS, MissingExtra, guard, require

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("matplotlib", "jinja2", "flint", "mpmath", "sklearn")

HIDE = textwrap.dedent('''
    import sys, types

    HIDDEN = {hidden!r}
    TORCH_DEPS = ("jinja2", "mpmath")   # torch requires them: hidden from rayleighflow only

    def _importer():
        """The module whose import statement is being run (past this file and importlib)."""
        f = sys._getframe(3)   # past _importer, _hidden and _Hide.find_spec
        while f is not None:
            name = f.f_code.co_filename
            if not (name.startswith("<frozen importlib") or "/importlib/" in name):
                return f.f_globals.get("__name__") or ""
            f = f.f_back
        return ""

    def _hidden(name):
        top = name.partition(".")[0]
        if top not in HIDDEN:
            return False
        return top not in TORCH_DEPS or _importer().partition(".")[0] in ("rayleighflow",
                                                                          "__main__")

    class _Hide:
        """A finder that does not find the hidden packages (None: not installed)."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            find = getattr(self.inner, "find_spec", None)
            if _hidden(name) or find is None:
                return None
            return find(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    for _name in HIDDEN:   # the hiding works: none of them can be imported from here
        try:
            __import__(_name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{{_name}} is still importable")

    def leaked():
        """(module, name) of rayleighflow globals that come from a hidden package."""
        out = []
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("rayleighflow") or mod is None:
                continue
            for key, value in list(vars(mod).items()):
                origin = (value.__name__ if isinstance(value, types.ModuleType)
                          else getattr(value, "__module__", None))
                if isinstance(origin, str) and origin.partition(".")[0] in HIDDEN:
                    out.append((mod_name, key))
        return out
''').format(hidden=HIDDEN)


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(HIDE + textwrap.dedent(body), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_core_and_monitor_without_the_extras(tmp_path):
    _run('''
        import json, math
        from pathlib import Path

        import torch
        import torch.nn.functional as F

        import rayleighflow as rf

        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        run = Path("run")
        mon = rf.Monitor(net, "cross-entropy", log=run, optimizer=opt, echo=None, sync_every=2)
        for _ in range(6):
            opt.zero_grad()
            out = net(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            mon.step(out, y, loss)
            opt.step()
        summary = mon.close()
        assert (run / "summary.json").is_file() and (run / "figures.json").is_file()
        assert (run / "trajectories" / "main.jsonl").is_file()
        assert json.loads((run / "summary.json").read_text())["status"] == summary["status"]
        quotients = [r["rayleigh"] for r in mon.rows]
        assert len(quotients) == 6 and all(math.isfinite(q) and q > 0 for q in quotients)
        assert not (run / "report.html").exists()       # rendered later, with [report]

        # the numerical core: the NTK, a flow and its certificate
        net2 = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 2)).double()
        xs, ys = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        k = rf.ntk.empirical_ntk(net2, xs)
        assert k.shape == (6, 6, 2, 2) and torch.isfinite(k).all()
        problem = rf.Problem(rf.Model(net2), rf.Dataset.from_arrays(xs, ys), "square")
        res = rf.gradient_flow(problem, t_max=20.0, records=rf.LogSpaced(12))
        cert = rf.certify(res.trajectory, "log")
        assert math.isfinite(cert.mu) and cert.mu > 0
        # the run-folder names of rayleighflow.report need no extra
        from rayleighflow.report import read_summary
        assert read_summary(run)["status"] == summary["status"]

        assert not leaked(), leaked()
        assert not [m for m in sys.modules if m.partition(".")[0] in
                    ("matplotlib", "sklearn", "flint")]
    ''', tmp_path)


def test_features_without_their_extra_name_it(tmp_path):
    out = _run('''
        import contextlib, importlib, io

        import rayleighflow as rf
        from rayleighflow._optional import MissingExtra

        def message(fn):
            try:
                fn()
            except MissingExtra as e:
                assert isinstance(e, ImportError)
                return str(e)
            raise AssertionError("no MissingExtra")

        def report():
            from rayleighflow.report import render_report
            render_report("nowhere")

        def render_at_close():
            from rayleighflow.monitor import RunFolder
            RunFolder("run", render=True)

        print(message(lambda: rf.prove))
        print(message(report))
        print(message(render_at_close))
        print(message(lambda: rf.load_sklearn("iris")))
        logistic = importlib.import_module("rayleighflow.theorems.logistic")
        print(message(lambda: logistic.sklearn_separable("iris")))

        from rayleighflow.cli import main
        Path = __import__("pathlib").Path
        Path("config.toml").write_text(
            '[model]\\nkind = "mlp"\\n[data]\\nkind = "sklearn"\\nname = "iris"\\n'
            '[loss]\\nname = "cross-entropy"\\n')
        for argv in (["report", "run"], ["prove", "config.toml"], ["run", "--quick",
                     "--out", "demo"], ["ntk", "config.toml"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            print("cli", argv[0], code, repr(err.getvalue()))
        assert not Path("demo").exists()      # refused before the folder is made
        assert not leaked(), leaked()
    ''', tmp_path)
    lines = out.stdout.splitlines()
    prove = "needs python-flint and mpmath: pip install 'rayleighflow[prove]'"
    report = "needs matplotlib and jinja2: pip install 'rayleighflow[report]'"
    data = "needs scikit-learn: pip install 'rayleighflow[data]'"
    assert lines[0] == f"rf.prove (proof-grade certificates) {prove}"
    assert lines[1] == f"rayleighflow report (figures and report.html) {report}"
    assert lines[2].startswith("RunFolder(render=True)") and lines[2].endswith(report)
    assert lines[3] == f"the dataset 'iris' (load_sklearn) {data}"
    assert lines[4].endswith(data)
    # the CLI: one line on stderr, exit 2 (bad input), never a traceback
    assert lines[5] == f"cli report 2 {'error: rayleighflow report ' + report + chr(10)!r}"
    assert lines[6] == f"cli prove 2 {'error: rayleighflow prove ' + prove + chr(10)!r}"
    assert lines[7] == ("cli run 2 " + repr("error: rayleighflow run demo (its figures and "
                                            f"report.html) {report}\n"))
    assert lines[8] == "cli ntk 2 " + repr(f"error: the dataset 'iris' (load_sklearn) {data}\n")


def _name(requirement: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert m, requirement
    return m.group(0).lower().replace("_", "-")


def test_pyproject_core_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert {"torch", "numpy", "scipy", "torchdiffeq", "rich"} <= core
    optional = {DISTRIBUTIONS.get(m, m) for mods in EXTRAS.values() for m in mods}
    assert optional == {"matplotlib", "jinja2", "python-flint", "mpmath", "scikit-learn"}
    assert not core & optional, core & optional
    for extra, modules in EXTRAS.items():   # the error messages and pyproject agree
        assert extras[extra] == {DISTRIBUTIONS.get(m, m) for m in modules}, extra
    assert extras["all"] == optional
    for kept in ("test", "lightning", "tensorboard", "huggingface", "docs"):
        assert extras[kept], kept


def test_ci_installs_every_extra():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = next(ln for ln in ci.splitlines() if "pip install" in ln and "-e" in ln)
    named = set(re.search(r'\.\[([^\]]*)\]', install).group(1).split(","))
    assert {"report", "prove", "data"} <= named or "all" in named, install


def test_missing_extra_helpers():
    e = MissingExtra("data", "the thing")
    assert isinstance(e, ImportError) and e.extra == "data"
    assert str(e) == "the thing needs scikit-learn: pip install 'rayleighflow[data]'"
    with pytest.raises(MissingExtra, match=r"rayleighflow\[report\]"), guard("report", "x"):
        raise ModuleNotFoundError("No module named 'matplotlib.figure'",
                                  name="matplotlib.figure")
    # another missing module (a broken install) is not blamed on the extra
    with pytest.raises(ModuleNotFoundError) as info, guard("report", "x"):
        raise ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")
    assert not isinstance(info.value, MissingExtra)
    with pytest.raises(ValueError, match="not a package of the extra"):
        require("numpy", "data", "x")
    assert require("mpmath", "prove", "x").__name__ == "mpmath"
