"""The README (issue 18): short, its two set-up commands first and unchanged, its Python example
runs, its links resolve, and it quotes no measured number (those live in benchmarks/results/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" -e '
    '".[report,data]" && rayleighflow run',
    'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" -e '
    '".[test,report,prove,data,lightning,tensorboard]" && python -m pytest',
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.M | re.S)


def test_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 150
    first = _blocks("bash")[0].splitlines()
    assert first[:2] == SETUP
    assert README.index("```bash") < README.index("##")  # before any section


def test_readme_python_example_runs(capsys):
    blocks = _blocks("python")
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 10
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    assert "holds" in capsys.readouterr().out


def test_readme_links_and_figure_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert any(t.endswith(".png") for t in targets)
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing
    assert (ROOT / "docs/assets/demo-loss.png").stat().st_size < 300_000


def _paragraphs() -> list[str]:
    return [p for p in README.split("\n\n") if p.strip()]


def test_readme_quotes_no_benchmark_numbers():
    # speed-ups, overheads and timings belong to benchmarks/results/*.json (Performance page),
    # except the monitor's cost paragraph, whose figures are checked against that file below
    rest = "\n\n".join(p for p in _paragraphs() if "marginal_arms" not in p)
    assert not re.search(r"\d\s*×|\d+(\.\d+)?\s*(ms|µs)\b|\d+(\.\d+)?%", rest)


def test_readme_monitor_cost_is_the_benchmark_file_s():
    """The paragraph is the one benchmarks/readme_monitor_paragraph.py builds from
    benchmarks/results/monitor-cpu.json (every figure and the verdict on the 5% bar)."""
    import importlib.util
    import json

    (para,) = [p for p in _paragraphs() if "marginal_arms" in p]
    spec = importlib.util.spec_from_file_location(
        "readme_monitor_paragraph", ROOT / "benchmarks/readme_monitor_paragraph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert " ".join(para.split()) == " ".join(module.paragraph().split())
    arms = json.loads((ROOT / "benchmarks/results/monitor-cpu.json").read_text())[
        "marginal_arms"]
    mlp = arms["mlp-digits"]
    said = " ".join(para.split())
    assert f"{100 * mlp['marginal_median_fraction']['monitor']:.1f}% (" in said
    met = mlp["marginal_median_fraction"]["monitor"] <= 0.05
    assert ("meets the 5% bar" if met else "misses the 5% bar") in said
    assert not arms["transformer-tokens"]["outputs_stored"] and mlp["outputs_stored"]
