"""Full (non-quick) experiments: a few minutes each, so marked slow (`pytest -m slow`)."""

import json

import pytest

from rayleighflow.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["demo", "toy2d", "definite-ntk", "logistic", "two-layer"])
def test_full_experiment_bounds_hold(tmp_path, name):
    out = tmp_path / name
    assert main(["run", name, "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete"
    assert s["max_bound_violation"] <= 0
    if name == "logistic":
        for d in s["datasets"].values():
            assert d["local_decrease_holds"] and d["all_finite"]
        assert s["datasets"]["adversarial"]["loss_initial"] >= 1e9
        ts = s["datasets"]["teacher_student"]  # the sharp bound ≥ 10× tighter at the end
        assert ts["flow_sharp_tightening_at_end"] >= 10
        assert ts["gd_warm"]["status"] == "holds"
        assert ts["gd_warm"]["sharp_tightening_at_end"] >= 10
        gd = [c for c in s["certificates"] if " GD " in c["label"]]
        assert gd and all(c["scope"] == "path" and c["discrete"] for c in gd)
    if name == "two-layer":  # issue 19's must-show
        assert s["seeds"] >= 32 and sum(s["undecided"]) == 0
        for w in s["per_width"].values():
            lo, hi = w["success_ci95"]
            assert 0 <= lo <= w["success_fraction"] <= hi <= 1
        pw = [s["per_width"][str(m)] for m in s["widths"]]
        above = [i for i, w in enumerate(pw) if w["failed"] > w["seeds"] / 2]
        below = [i for i, w in enumerate(pw) if w["below"] == w["seeds"]]
        assert above and below and min(below) > min(above)
        assert pw[-1]["success_ci95"][0] >= 0.8
