"""Print the README's monitor-cost paragraph from ``benchmarks/results/monitor-cpu.json``
(tests/test_readme.py checks the README's paragraph against that file)::

    python benchmarks/readme_monitor_paragraph.py
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pct(c: dict, arm: str, of: str = "") -> str:
    lo, hi = c[f"marginal{of}_range_fraction"][arm]
    return (f"{100 * c[f'marginal{of}_median_fraction'][arm]:.1f}% ({100 * lo:.1f}% to "
            f"{100 * hi:.1f}%)")


def paragraph() -> str:
    arms = json.loads((ROOT / "benchmarks/results/monitor-cpu.json").read_text())[
        "marginal_arms"]
    mlp, tr = arms["mlp-digits"], arms["transformer-tokens"]
    verdict = "meets" if mlp["marginal_median_fraction"]["monitor"] <= 0.05 else "misses"
    text = (
        "The monitor's cost (`marginal_arms` in `benchmarks/results/monitor-cpu.json`: whole "
        "training steps in interleaved blocks of four arms, same model and optimizer, "
        f"{mlp['runs']} independent runs with fresh seeds; the median over runs of each run's "
        "median step against the plain arm's, then the range over runs): on the 64-512-512-10 "
        f"MLP ({1e3 * mlp['plain_step_median_s']:.2g} ms a step) a monitored step takes "
        f"{_pct(mlp, 'monitor')} longer than a plain one, and so {verdict} the 5% bar; "
        "counting the read-back every "
        f"{mlp['sync_every']} steps, which the median skips, the mean step takes "
        f"{_pct(mlp, 'monitor', '_mean')} longer; the "
        "cheapest possible per-step read of the gradients (`torch._foreach_norm` of every "
        f"`.grad`, which the monitor's step is built on) costs {_pct(mlp, 'gradient_read')}; "
        f"`Monitor(..., every={mlp['every']})` measures one step in {mlp['every']}, says so in "
        f"its log, and costs {_pct(mlp, 'monitor_every')}. On a two-layer transformer whose "
        f"logits exceed the storage bound ({1e3 * tr['plain_step_median_s']:.3g} ms a step; "
        "cross-entropy sums and the gradient check then run at each step, the check on strided "
        f"rows) over {tr['runs']} runs: the monitor {_pct(tr, 'monitor')} (mean "
        f"{_pct(tr, 'monitor', '_mean')}), the gradient read "
        f"{_pct(tr, 'gradient_read')}, every {tr['every']}th step {_pct(tr, 'monitor_every')}. "
        "These are differences of medians on a shared machine: below zero means no cost "
        "measurable here.")
    return textwrap.fill(text, 96, break_on_hyphens=False, break_long_words=False)


if __name__ == "__main__":
    print(paragraph())
