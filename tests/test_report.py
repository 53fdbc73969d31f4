"""The report layer: summary.json, figures from figures.json, and the self-contained report.html.

Every test builds a synthetic run folder with numpy only (no flow is run): the report reads
files and must never recompute anything.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rayleighflow.report import (
    REQUIRED_SUMMARY_KEYS,
    format_number,
    read_summary,
    render_figures,
    render_report,
    report_from_dir,
    validate_figures_spec,
    validate_summary,
    versions,
    write_summary,
)
from rayleighflow.rundir import json_safe
from rayleighflow.trajectory import Trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"
REPORT_PKG = Path(__file__).resolve().parents[1] / "src" / "rayleighflow" / "report"

CONFIG = """\
experiment = "logistic"
description = "Linear logistic regression on separable data"

[flow]
t_max = 20.0
method = "euler"
step = 0.1
"""


def _trajectory(run_dir: Path, *, n: int = 201, close: bool = True) -> np.ndarray:
    t = np.linspace(0.0, 20.0, n)
    traj = Trajectory({"experiment": "logistic", "convention": "mean", "n_params": 3, "nk": 40},
                      run_dir / "trajectories" / "main.jsonl")
    for i, ti in enumerate(t):
        loss = 0.69 * math.exp(-0.35 * ti) + 1e-4
        row = {"t": ti, "loss": loss, "grad_sq": 0.3 * loss**2,
               "rayleigh": 0.4 + 0.1 * math.cos(ti), "wall": 0.01 * i}
        if i % 10 == 0:  # a sparse column, as a spectrum diagnostic recorded every 10 rows
            row["lambda_min"] = 0.3 + 0.01 * i / n
        traj.append(row)
    traj.close("t_max", "reached t_max = 20")
    if not close:  # a killed writer: no end record, and half a row at the end
        path = run_dir / "trajectories" / "main.jsonl"
        lines = path.read_text().splitlines()[:-1]
        path.write_text("\n".join(lines) + '\n{"type": "row", "t": 20.1, "lo')
    return t


def _summary(**over) -> dict:
    d = {
        "experiment": "logistic", "status": "complete", "convention": "mean", "P": 3, "nk": 40,
        "loss_initial": 0.6901, "loss_final": np.float64(6.5e-6), "t_final": 20.0, "rank": 3,
        "rank_threshold": 1e-8, "lambda_min": 0.2871, "lambda_max": 4.125,
        "rayleigh_min": 0.3017, "run_time_s": 12.5, "versions": versions(),
        "created": "2024-05-01T12:00:00+00:00", "description": EVIL,
        "notes": ["a note from the experiment"],
        "certificates": [
            {"desingularizer": "log", "mu": 0.1234, "mu_source": "observed", "status": "holds",
             "bound_final": 2.5e-3, "max_bound_violation": -1e-3,
             "slack": {"rtol": 1e-6, "atol": 1e-12},
             "assumptions": [{"name": "KL inequality", "holds": True,
                              "detail": "min ratio 0.1234 at t = 3"},
                             {"name": "Rayleigh lower bound", "holds": False,
                              "detail": "R < 0.2 at t = 7"}]},
            {"desingularizer": "reciprocal", "mu": 0.5, "mu_source": "user",
             "status": "violated", "bound_final": float("nan"), "max_bound_violation": 0.25,
             "first_violation": [4.0, "ratio below μ"], "assumptions": []},
        ],
        "max_bound_violation": 0.25, "margin": 0.4321, "isolation": 1.75,
        "widths": [16, 64, 256],
    }
    d.update(over)
    return d


FIGURES = [
    {"name": "loss", "title": "Loss and certified bound", "caption": "The bound sits above.",
     "panels": [{"title": "Loss", "xlabel": "flow time t", "ylabel": "L", "yscale": "log",
                 "series": [
                     {"kind": "line", "x": "traj:main:t", "y": "traj:main:loss", "label": "loss"},
                     {"kind": "line", "x": "arr:t_bound", "y": "arr:bound_log",
                      "label": "certified bound (log, μ = 0.12)", "style": "--", "color": "C1"},
                     {"kind": "band", "x": "arr:t_bound", "y": "arr:bound_lo",
                      "y2": "arr:bound_log"},
                     {"kind": "hline", "value": 1e-3, "label": "target"},
                     {"kind": "line", "x": "traj:main:t", "y": "traj:main:not_recorded",
                      "label": "ghost"},
                 ]}]},
    {"name": "ntk", "title": "NTK", "panels": [
        {"title": "Rayleigh quotient", "xlabel": "t", "ylabel": "R",
         "series": [{"kind": "line", "x": "traj:main:t", "y": "traj:main:rayleigh",
                     "label": "R(K; ∇ℓ)"},
                    {"kind": "scatter", "x": "traj:main:t", "y": "traj:main:lambda_min",
                     "label": "λ_min"}]},
        {"title": "Spectrum", "xlabel": "index", "ylabel": "eigenvalue", "yscale": "log",
         "series": [{"kind": "scatter", "x": "arr:idx", "y": "arr:eigs"},
                    {"kind": "errorbar", "x": "arr:idx", "y": "arr:eigs", "yerr": "arr:err"},
                    {"kind": "line", "x": "arr:idx", "y": "arr:missing_key"}]}]},
]


def make_run(run_dir: Path, *, summary: dict | None = None, figures=FIGURES) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    t = _trajectory(run_dir)
    idx = np.arange(12.0)
    eigs = np.concatenate([np.geomspace(4.0, 0.3, 10), [0.0, -1e-9]])  # masked on log axis
    np.savez(run_dir / "arrays.npz", t_bound=t, bound_log=0.7 * np.exp(-0.1234 * t),
             bound_lo=0.35 * np.exp(-0.1234 * t), idx=idx, eigs=eigs, err=0.1 * np.abs(eigs))
    (run_dir / "figures.json").write_text(json.dumps(figures))
    (run_dir / "config.toml").write_text(CONFIG + f'note = "{EVIL}"\n')
    write_summary(run_dir, summary if summary is not None else _summary())
    return run_dir


class _Structure(HTMLParser):
    """Collects tags, checks nesting, and records every URL-bearing attribute."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> tuple[str, _Structure]:
    html = path.read_text(encoding="utf-8")
    p = _Structure()
    p.feed(html)
    p.close()
    return html, p


# -- summary.json --------------------------------------------------------------------------------

def test_summary_roundtrip_converts_numpy_and_nan(tmp_path):
    d = _summary(lambda_max=float("inf"), P=np.int64(3), rayleigh_min=np.float32(0.25))
    assert validate_summary(d) == []
    write_summary(tmp_path, d)
    raw = (tmp_path / "summary.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    back = read_summary(tmp_path)
    assert back["lambda_max"] is None
    assert back["certificates"][1]["bound_final"] is None
    assert back["P"] == 3 and back["rayleigh_min"] == pytest.approx(0.25)
    assert set(REQUIRED_SUMMARY_KEYS) <= set(back)
    assert not list(tmp_path.glob("*.tmp"))


def test_summary_validation_rejects_and_writes_nothing(tmp_path):
    bad = _summary()
    del bad["rank"], bad["created"]
    bad["P"] = "three"
    bad["status"] = "done"
    bad["certificates"] = [{"desingularizer": "log", "mu": 0.1}]
    problems = validate_summary(bad)
    text = "\n".join(problems)
    for needle in ("'rank'", "'created'", "'P'", "'status'", "'status'", "'bound_final'"):
        assert needle in text
    with pytest.raises(ValueError, match="missing key 'rank'"):
        write_summary(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []
    assert validate_summary([1, 2]) != []
    # An interrupted run may not know P and nk; a complete one must.
    assert validate_summary(_summary(status="interrupted", P=None, nk=None)) == []
    assert len(validate_summary(_summary(P=None, nk=None))) == 2
    assert any("bool" in p or "True" in p for p in validate_summary(_summary(nk=True)))


_leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
                   st.floats(width=32).map(np.float32), st.integers(0, 99).map(np.int64),
                   st.text(max_size=5))


@given(st.recursive(_leaves, lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.text(max_size=4), c, max_size=4), max_leaves=20))
def test_json_safe_always_gives_strict_json(value):
    text = json.dumps(json_safe(value), allow_nan=False)  # raises on NaN or ±Infinity
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_format_number():
    assert format_number(None) == "—" and format_number(float("nan")) == "—"
    assert format_number(0.123456) == "0.1235" and format_number(12345) == "12,345"
    assert format_number(float("-inf")) == "−∞" and format_number(True) == "yes"
    assert str(format_number(2.5e-7)) == "2.5×10<sup>−7</sup>"
    assert str(format_number(1e12)) == "10<sup>12</sup>"
    assert format_number("<b>") == "<b>"  # plain str: the template escapes it


def test_versions_are_strings_and_report_never_imports_torch():
    v = versions()
    assert {"rayleighflow", "torch", "numpy", "scipy", "python", "platform"} <= set(v)
    assert all(isinstance(x, str) and x for x in v.values())
    # The report reads files only: no torch and no numerical module but the trajectory format.
    allowed = {"rayleighflow.trajectory"}
    for path in REPORT_PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and
                     node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
                if name.startswith("rayleighflow"):
                    assert name in allowed, f"{path.name} imports {name}"


# -- figures -------------------------------------------------------------------------------------

def test_figures_render_png_svg_and_skip_missing(tmp_path):
    run = make_run(tmp_path / "run")
    before = dict(matplotlib.rcParams)
    figs = render_figures(run)
    assert dict(matplotlib.rcParams) == before  # no global matplotlib state leaks
    assert [f.name for f in figs] == ["loss", "ntk"]
    for f in figs:
        assert f.ok and f.png.read_bytes()[:8] == PNG_MAGIC and f.png.stat().st_size > 5000
        root = ET.parse(f.svg).getroot()
        assert root.tag.endswith("svg")
    loss, ntk = figs
    assert any("not_recorded" in n and "skipped" in n for n in loss.notes)
    assert any("missing_key" in n and "skipped" in n for n in ntk.notes)
    assert any("masked on the log axis" in n for n in ntk.notes)  # 0 and -1e-9
    assert ntk.panels == 2 and "Spectrum" in ntk.alt
    # Rendering twice gives the same SVG (stable ids, no date).
    first = ntk.svg.read_bytes()
    render_figures(run)
    assert ntk.svg.read_bytes() == first


def test_bad_specs_are_notes_not_crashes(tmp_path):
    figures = [
        {"name": "../escape", "title": "x", "panels": [{"series": []}]},
        {"name": "ok", "title": "Mixed", "panels": [{"title": "p", "xscale": "cubic", "series": [
            {"kind": "spline", "x": "traj:main:t", "y": "traj:main:loss"},
            {"kind": "line", "x": "nowhere", "y": "traj:main:loss"},
            {"kind": "line", "x": "traj:main:t", "y": "traj:main:loss", "colour": "red"},
            {"kind": "line", "x": "traj:other:t", "y": "traj:other:loss"},
            {"kind": "hline", "value": "high"}]}]},
        {"name": "empty", "title": "Nothing recorded", "panels": [{"title": "p", "series": [
            {"kind": "line", "x": "arr:nope", "y": "arr:nope"}]}]},
        {"name": "math", "title": "cost $5", "panels": [{"title": "a $b", "series": []}]},
    ]
    problems = validate_figures_spec(figures)
    text = "\n".join(problems)
    for needle in ("'name'", "cubic", "spline", "'nowhere' is not a REF", "colour", "'value'"):
        assert needle in text
    assert validate_figures_spec(FIGURES) == []
    assert validate_figures_spec({"name": "x"}) != []
    run = make_run(tmp_path / "run", figures=figures)
    figs = {f.name: f for f in render_figures(run)}
    assert not figs["../escape"].ok and not (run / "escape.png").exists()
    ok = figs["ok"]
    assert ok.ok and any("colour" in n for n in ok.notes)
    assert any("'other' was not saved" in n for n in ok.notes)
    assert figs["empty"].ok and any("skipped" in n for n in figs["empty"].notes)
    assert figs["math"].ok
    (run / "figures.json").write_text("{not json")
    (bad,) = render_figures(run)
    assert not bad.ok and "could not be read" in bad.notes[0]


# -- report.html ---------------------------------------------------------------------------------

def test_report_is_self_contained_escaped_and_complete(tmp_path):
    run = make_run(tmp_path / "run")
    path = report_from_dir(run)
    assert path == run / "report.html"
    html, p = _parse(path)
    assert p.errors == [] and p.stack == []
    assert len(p.imgs) == 2
    assert all(img["src"].startswith("data:image/png;base64,") and img.get("alt")
               for img in p.imgs)
    assert not [u for u in p.urls if u.startswith(("http:", "https:", "//"))]
    assert "http://" not in html.replace("http://www.w3.org", "")  # no CDN, font or script URL
    assert {"script", "link", "iframe"}.isdisjoint(p.tags)
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    text = " ".join(p.text)
    for number in ("0.6901", "0.2871", "4.125", "0.3017", "0.1234", "0.4321", "1.75",
                   "16, 64, 256", "12.5 s"):
        assert number in text, number
    # 6.5e-6 and the rank threshold 1e-8 as powers of ten
    assert "6.5×10<sup>−6</sup>" in html and "threshold 10<sup>−8</sup>" in html
    assert html.count('class="certificate"') == 2
    for word in ("holds", "violated", "reciprocal", "observed", "KL inequality",
                 "R &lt; 0.2 at t = 7", "first violation at t = 4"):
        assert word in html, word
    assert "✓" in text and "✗" in text
    assert "certificates are empirical: they hold at the recorded points" in text
    assert "Complete" in text and "a note from the experiment" in text
    assert "not_recorded" in text  # the skipped series' note is shown
    assert 'href="figures/loss.svg"' in html
    assert "t_max = 20.0" in text  # the configuration, escaped in a <pre>
    assert "—" in text  # the NaN bound of the violated certificate


def test_partial_report_from_trajectories_only(tmp_path):
    run = tmp_path / "killed"
    _trajectory(run, n=57, close=False)
    (run / "config.toml").write_text(CONFIG)
    path = render_report(run)
    html, p = _parse(path)
    assert p.errors == []
    text = " ".join(p.text)
    assert "Interrupted" in text and "shows what was recorded" in text
    assert "logistic" in text and "summary.json was not written" in text
    assert "No certificate was issued" in text
    assert "no end record" in text and "57" in text  # the half-written last row is dropped
    assert not (run / "summary.json").exists()


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_from_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither summary.json nor"):
        report_from_dir(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        report_from_dir(tmp_path / "file.txt")


def test_invalid_summary_still_renders_with_problems(tmp_path):
    run = make_run(tmp_path / "run")
    d = json.loads((run / "summary.json").read_text())
    del d["rank"]
    d["status"] = "failed"
    (run / "summary.json").write_text(json.dumps(d))
    html, p = _parse(render_report(run))
    text = " ".join(p.text)
    assert "Failed" in text and "missing key 'rank'" in text


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    report = report_from_dir(run)
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", report.resolve().as_uri()]
    subprocess.run(cmd, timeout=60, capture_output=True, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000


# -- issue 11: certified reduction, vacuous bounds, scope, endings, many flows ---------------------

def test_certificates_show_reduction_scope_and_vacuous(tmp_path):
    certs = [
        {"desingularizer": "log", "mu": 0.1, "status": "holds", "bound_final": 0.01,
         "loss_initial": 0.8841, "scope": "path", "horizon": 20.0, "reason": None},
        {"desingularizer": "cross-entropy", "mu": 1e-3, "status": "holds",
         "bound_final": 0.8838, "loss_initial": 0.8841, "scope": "records",
         "label": "composed: c·R (cross-entropy)"},
        {"desingularizer": "reciprocal", "mu": None, "status": "unavailable",
         "bound_final": None, "scope": "records",
         "reason": {"code": "no_kl", "cause": "the KL ratio is not bounded below",
                    "remedy": "record longer"}},
    ]
    run = make_run(tmp_path / "run", summary=_summary(certificates=certs,
                                                      max_bound_violation=-1.0))
    html = render_report(run).read_text()
    assert "0.8841 → 0.01" in html and "vacuous" in html
    assert html.count('class="pill vacuous"') == 1  # only the 0.8838 bound
    assert html.count('class="scope"') == 3 and ">path</span>" in html \
        and html.count(">records</span>") == 2
    assert "the KL ratio is not bounded below" in html and "record longer" in html
    assert "checked up to t = 20" in html
    assert "Certificates holding (not vacuous)" in html and "1 of 3" in html
    # old run folders without the new keys still render, scope "not stated"
    old = make_run(tmp_path / "old")
    assert ">not stated</span>" in render_report(old).read_text()


def test_failed_and_stopped_early_endings_in_the_report(tmp_path):
    run = make_run(tmp_path / "f", summary=_summary(
        status="failed", error="RuntimeError: boom", traceback="Traceback ...\nboom"))
    html = render_report(run).read_text()
    assert "Failed" in html and "RuntimeError: boom" in html and "Error traceback" in html
    run = make_run(tmp_path / "s", summary=_summary(stopped_early=[
        {"flow": "main", "status": "stalled", "message": "stalled near t = 0"}]))
    html = render_report(run).read_text()
    assert "Complete" in html and "stopped early" in html and "stalled near t = 0" in html
    assert "Interrupted" not in html
    run = make_run(tmp_path / "i", summary=_summary(status="interrupted"))
    assert "rayleighflow run --resume" in render_report(run).read_text()


def test_many_flows_ordered_numerically_collapsed_with_set_cards(tmp_path):
    run = make_run(tmp_path / "run", summary=_summary(loss_initial=None, loss_final=None,
                                                      rayleigh_min=None, lambda_min=-3.9e-17,
                                                      rank_threshold=1e-12))
    src = run / "trajectories" / "main.jsonl"
    for m in (2, 16, 128, 4, 8, 32, 64, 256, 512):
        shutil.copy(src, run / "trajectories" / f"m{m}.jsonl")
    src.unlink()
    html = render_report(run).read_text()
    names = [f"m{m}" for m in (2, 4, 8, 16, 32, 64, 128, 256, 512)]
    where = [html.index(f"<code>{n}</code>") for n in names]
    assert where == sorted(where)  # m16 before m128
    assert '<details class="collapse">' in html and "9 trajectories" in html
    assert "Loss, final ÷ initial (9 flows)" in html and "Flows finished" in html
    assert "9 of 9" in html
    assert "below the rank threshold" in html  # −3.9e−17 is shown as 0


def test_panels_without_data_are_left_out(tmp_path):
    figures = [{"name": "k", "title": "K", "panels": [
        {"title": "R", "xlabel": "t", "ylabel": "R", "series": [
            {"kind": "line", "x": "traj:main:t", "y": "traj:main:rayleigh", "label": "R"}]},
        {"title": "spectrum", "xlabel": "t", "ylabel": "λ", "yscale": "log", "series": [
            {"kind": "scatter", "x": "traj:main:t", "y": "traj:main:lambda_max"}]}]}]
    run = make_run(tmp_path / "run", figures=figures)
    (fig,) = render_figures(run)
    assert fig.ok and any("panel left out" in n for n in fig.notes)
    html = render_report(run).read_text()
    assert 'class="footnotes"' in html and 'class="fig-notes"' not in html


def test_summary_and_report_are_world_readable(tmp_path):
    run = make_run(tmp_path / "run")
    render_report(run)
    for name in ("summary.json", "report.html"):
        assert (run / name).stat().st_mode & 0o044 == 0o044
