"""The report of a monitored run (issue 22) and the certificate table and time axis (issue 21).

The monitored run is a real one: rf.Monitor on a 16-layer model (15 residual layers and one
whose output is multiplied by 0, so its R is exactly 0 at every step) trained by SGD with a
step learning-rate schedule; a loss passed ×3 at step 12 makes a real diagnosis there.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib import colors as mcolors
from torch import nn

import rayleighflow as rf
from rayleighflow.report import render_report
from rayleighflow.report.figspec import RunData
from rayleighflow.report.figures import _auto_styles, _draw
from rayleighflow.report.monitored import adapt_monitor_figures, is_monitored
from rayleighflow.trajectory import Trajectory
from test_report import _summary, make_run

matplotlib.use("Agg")

STEPS, FULL_EVERY, MISMATCH = 30, 5, 12


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(15)])
        self.dead = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        h = x
        for layer in self.body:
            h = torch.tanh(layer(h)) + h
        return h[:, :1] + 0.0 * self.dead(x)  # a dead layer: no gradient reaches it


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = _Net().double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)
    run = tmp_path_factory.mktemp("mon") / "run"
    mon = rf.Monitor(net, "mse", log=run, optimizer=opt, full_data=[(x, y)],
                     full_every=FULL_EVERY, echo=None)
    for i in range(STEPS):
        xb, yb = x[i % 4 * 8:(i % 4 + 1) * 8], y[i % 4 * 8:(i % 4 + 1) * 8]
        out = net(xb)
        loss = 0.5 * ((out - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        mon.step(out, yb, loss * (3 if i == MISMATCH else 1))
        opt.step()
        sched.step()
    mon.close()
    render_report(run)
    return run


def _figure(run: Path, name: str):
    summary = json.loads((run / "summary.json").read_text())
    main = Trajectory.load(run / "trajectories" / "main.jsonl")
    spec = adapt_monitor_figures(json.loads((run / "figures.json").read_text()), summary,
                                 tuple(main.columns))
    fig_spec = next(f for f in spec if f["name"] == name)
    notes: list[str] = []
    return _draw(fig_spec, RunData(run), notes, parse_math=True), notes


def test_monitored_report_speaks_in_steps_not_flows(monitored):
    html = (monitored / "report.html").read_text()
    summary = json.loads((monitored / "summary.json").read_text())
    assert is_monitored(monitored, summary)
    for flow_word in ("Flow time", "Flows finished", "Certificates holding", "re-run with",
                      "No certificate was issued", "t from → to"):
        assert flow_word not in html, flow_word
    n_full = len(Trajectory.load(monitored / "trajectories" / "full.jsonl"))
    assert n_full == STEPS // FULL_EVERY
    assert (f"Steps recorded {STEPS}; full-data evaluations {n_full}; diagnoses 1."
            in html)
    assert "steps from → to" in html and "Last step" in html
    assert "NTK spectrum" in html and "not measured" in html and "NTK rank" not in html
    assert re.search(r"<h2>Diagnoses<span class=\"count\">2</span>", html)  # + update rule
    assert "loss-mismatch" in html and "Learning rate and gradient norm" in html
    assert (monitored / "figures" / "training.png").exists()


def test_interrupted_monitored_run_is_still_a_monitored_report(monitored, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(monitored, run)
    (run / "summary.json").unlink()  # killed before close: trajectories only
    html = render_report(run).read_text()
    assert "Interrupted" in html and "up to step 29" in html
    assert "diagnoses not saved (no summary.json)" in html
    assert "--resume" not in html and "Flow time" not in html and "Certificates" not in html
    assert "stopped before monitor.close()" in html


def test_diagnoses_marked_dead_layer_shown_and_layer_colours_distinct(monitored):
    main = Trajectory.load(monitored / "trajectories" / "main.jsonl")
    fig, notes = _figure(monitored, "kernel")
    ax = fig.axes[0]
    # the diagnosis: a vertical line at step 12 with its kind written by it
    vlines = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1
              and ln.get_linestyle() == "--"]
    assert [float(ln.get_xdata()[0]) for ln in vlines] == [MISMATCH]
    assert any(t.get_text().strip() == "loss-mismatch" for t in ax.texts)
    # the dead layer: every recorded step with R = 0 is a marker on the row labelled 0
    dead = np.asarray(main["rayleigh[dead]"], dtype=float)
    steps_zero = np.asarray(main.t, dtype=float)[dead == 0.0]
    assert steps_zero.size >= STEPS - 2  # R is missing only where no quotient was made
    row = [ln for ln in ax.get_lines() if ln.get_marker() == "v"]
    assert len(row) == 1 and np.array_equal(row[0].get_xdata(), steps_zero)
    assert any(t.get_text() == "0" for t in ax.texts)
    assert any("equal to 0 drawn on the row marked 0" in n for n in notes)
    # 16 per-layer curves, each its own colour, none a near copy of the panel's fixed colours
    layers = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith("R(K_")]
    assert len(layers) == 16
    colours = [mcolors.to_hex(ln.get_color()) for ln in layers]
    assert len(set(colours)) == 16
    fixed = [mcolors.to_rgb(ln.get_color()) for ln in ax.get_lines()
             if str(ln.get_label()).startswith("R(K; ∇ℓ)")]
    for c in colours:
        assert all(np.abs(np.subtract(mcolors.to_rgb(c), f)).sum() > 0.3 for f in fixed)


def test_learning_rate_and_gradient_norm_panels_follow_the_recording(monitored):
    main = Trajectory.load(monitored / "trajectories" / "main.jsonl")
    fig, _ = _figure(monitored, "training")
    lr_ax, grad_ax = fig.axes
    lr = next(ln for ln in lr_ax.get_lines() if ln.get_label() == "η")
    # StepLR(10, 0.5) from 0.05: the recorded η halves at steps 10 and 20
    assert np.allclose(lr.get_ydata(), [0.05 * 0.5 ** (s // 10) for s in range(STEPS)])
    grad = next(ln for ln in grad_ax.get_lines() if "∇L_B" in str(ln.get_label()))
    assert np.allclose(grad.get_ydata(), main["grad_sq"]) and grad_ax.get_yscale() == "log"


def test_more_than_twenty_curves_vary_the_line_style():
    series = [{"kind": "line", "x": "traj:a:t", "y": f"traj:a:c{i}"} for i in range(26)]
    styles = [next(it) for it in [_auto_styles(series)] for _ in range(26)]
    assert len(set(styles)) == 26
    assert len({c for c, _ in styles[:20]}) == 20 and all(s is None for _, s in styles[:20])
    assert all(s is not None for _, s in styles[20:])


# -- issue 21: the certificate table, the time axis, long descriptions ------------------------

LONG = "Sequential(" + ", ".join(f"Linear(in_features=64, out_features=64)#{i}"
                                 for i in range(12)) + ")"


def _long_run(tmp_path: Path) -> Path:
    certs = _summary()["certificates"] + [
        {"desingularizer": "cross-entropy", "mu": 1.234e-5, "mu_source": "composed",
         "status": "holds", "bound_final": 0.8838, "loss_initial": 0.8841, "scope": "records",
         "label": "composed: c·min R(K; ∇ℓ) over a very long horizon of recorded points " * 2,
         "notes": ["a long note " * 20]}]
    return make_run(tmp_path / "run", summary=_summary(certificates=certs, description=LONG,
                                                       model=LONG))


def test_certificate_table_is_short_rows_with_the_checks_in_details(tmp_path):
    html = render_report(_long_run(tmp_path)).read_text()
    table = html[html.index('<table class="cert-table">'):]
    table = table[:table.index("</table>")]
    head = re.findall(r"<th>(.*?)</th>", table[:table.index("</thead>")])
    assert head == ["Certificate", "μ", "Status", "Scope",
                    "L<sub>0</sub> → bound at the end"]
    rows = re.findall(r'<tr class="certificate">(.*?)</tr>', table, re.S)
    assert len(rows) == 3 and all(r.count("<td") == 5 for r in rows)
    assert all("Max bound violation" not in r and "<ul" not in r for r in rows)
    details = re.findall(r'<details class="checks">(.*?)</details>', table, re.S)
    assert len(details) == 3
    assert "Max bound violation" in details[0] and "KL inequality" in details[0]
    assert "first violation at t = 4" in details[1]
    # how the rows lay out is checked in a browser: test_report_table_has_no_overflow_...


def test_symlog_time_axis_starts_at_zero_without_negative_ticks(tmp_path):
    run = make_run(tmp_path / "run")
    t = np.asarray(Trajectory.load(run / "trajectories" / "main.jsonl").t, dtype=float)
    assert t.min() == 0.0
    spec = {"name": "loss", "panels": [{"xscale": "symlog", "yscale": "log", "series": [
        {"kind": "line", "x": "traj:main:t", "y": "traj:main:loss", "label": "L"}]}]}
    fig = _draw(spec, RunData(run), [], parse_math=True)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo == 0.0 and hi >= t.max()
    ticks = [v for v in ax.get_xticks() if lo <= v <= hi]
    assert ticks and min(ticks) == 0.0 and all(v >= 0 for v in ticks)
    fig.canvas.draw()
    labels = [lab.get_text() for lab in ax.get_xticklabels() if lab.get_text()]
    assert not any(lab.startswith(("−", "-")) for lab in labels), labels


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is not None:
        return "playwright", sync_playwright
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return "cli", shutil.which("chromium") or shutil.which("chromium-browser")
    return None, None


_OVERFLOW_JS = """(() => {
    const bad = [];
    for (const el of document.querySelectorAll(
            'table.cert-table td, table.cert-table th, .card, .description'))
        if (el.scrollWidth > el.clientWidth + 1) bad.push(el.className || el.tagName);
    const doc = document.documentElement;
    if (doc.scrollWidth > doc.clientWidth + 1) bad.push('page scrolls sideways');
    // a word of a certificate row split over two lines ("observe|d", "0.0011|51"); a break
    // after a hyphen is a line break, not a split
    for (const cell of document.querySelectorAll('table.cert-table tr.certificate > td')) {
        const walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
        for (let node = walk.nextNode(); node; node = walk.nextNode()) {
            const words = /[^\\s\\-\u2010\u2013\u2014]+[\\-\u2010\u2013\u2014]?/g;
            let m;
            while ((m = words.exec(node.data)) !== null) {
                const r = document.createRange();
                r.setStart(node, m.index); r.setEnd(node, m.index + m[0].length);
                const tops = new Set([...r.getClientRects()].map(b => Math.round(b.top)));
                if (tops.size > 1) bad.push('word split: ' + m[0]);
            }
        }
    }
    return bad; })()"""


def _overflow_with_cli(chromium: str, path: Path, tmp_path: Path, width: int) -> list[str]:
    """Chromium's command line: a copy of the page writes the overflow list into its DOM,
    which --dump-dom prints; --screenshot draws it."""
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace(
        "</body>", f"<script>document.body.insertAdjacentHTML('beforeend', '<pre id=\"ovf\">'"
                   f" + JSON.stringify({_OVERFLOW_JS}) + '</pre>');</script></body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900"]
    subprocess.run([*flags, f"--screenshot={tmp_path / 'report.png'}", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    found = re.findall(r'<pre id="ovf">(.*?)</pre>', dom, re.S)  # the last: the script's own
    assert len(found) > 1, "chromium ran no script on the page"  # source holds the first
    return json.loads(html_lib.unescape(found[-1]))


@pytest.mark.skipif(_browser()[0] is None,
                    reason="neither playwright nor a chromium binary is installed (pip install "
                           "playwright && playwright install chromium, or apt-get install "
                           "chromium)")
@pytest.mark.parametrize("width", [1280, 800, 500])   # a desktop, half a laptop, a phone
def test_report_table_has_no_overflow_in_headless_chromium(tmp_path, width):
    kind, backend = _browser()
    path = render_report(_long_run(tmp_path))
    if kind == "cli":
        overflow = _overflow_with_cli(backend, path, tmp_path, width)
    else:
        with backend() as p:
            try:
                browser = p.chromium.launch()
            except Exception as e:  # the package without its browser download
                pytest.skip(f"playwright's Chromium does not start ({str(e).splitlines()[0]})")
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(path.as_uri())
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            overflow = page.evaluate(_OVERFLOW_JS)
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert overflow == []


def test_events_share_a_line_per_step_and_close_labels_do_not_overprint(monitored):
    events = [[12, "plateau"], [12, "collapse"], [12.2, "rising"], [20, "plateau"]]
    spec = {"name": "loss", "panels": [{"xlabel": "optimizer step", "events": events,
                                        "series": [{"kind": "line", "x": "traj:main:t",
                                                    "y": "traj:main:loss"}]}]}
    ax = _draw(spec, RunData(monitored), [], parse_math=True).axes[0]
    xs = sorted(float(ln.get_xdata()[0]) for ln in ax.get_lines() if ln.get_linestyle() == "--")
    assert xs == [12.0, 12.2, 20.0]   # one line per distinct step
    labels = [t.get_text().strip() for t in ax.texts]
    assert labels == ["plateau, collapse", "plateau"]   # 12.2 is 0.7 % of the range away
