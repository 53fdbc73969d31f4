"""`rayleighflow run proof`: prove, run, check the run against the proof (issue 10)."""

from __future__ import annotations

import json

import pytest

from rayleighflow.cli import main
from rayleighflow.rundir import validate_summary


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    assert main(["run", "proof", "--out", str(out), *extra]) == 0
    return out, json.loads((out / "summary.json").read_text())


def _check(out, s):
    assert validate_summary(s) == [] and s["status"] == "complete"
    assert (out / "report.html").exists() and (out / "figures.json").exists()
    wide, narrow = s["regimes"]["wide"], s["regimes"]["narrow"]
    assert wide["width"] == 512 and wide["P"] > wide["nk"]
    assert wide["proof"]["status"] == "holds" and wide["proof"]["scope"] == "proven"
    rc = wide["run_check"]
    assert rc["passed"] and rc["stages_ok"] and rc["n_evaluations"] > 0
    assert rc["eval_above_bound"] == 0 and rc["points_outside_ball"] == 0
    assert rc["max_distance"] <= wide["proof"]["radius"]
    for r in (wide, narrow):
        assert r["zero_loss_proof"]["status"] == "unavailable" or r["P"] >= r["nk"]
        if r["proof"]["status"] == "holds":
            f = r["falsification"]
            assert f["counterexamples"] == [] and f["wrong_constant_caught"]
            assert r["run_check"]["passed"]
    assert narrow["P"] < narrow["nk"] and narrow["zero_loss_proof"]["status"] == "unavailable"
    # the notes are built from the numbers
    from rayleighflow.prove._print import fmt_down
    assert fmt_down(wide['proof']['rho']) in s["notes"][0]
    assert "obeys" in s["notes"][0] and "finds a counterexample" in s["notes"][0]
    labels = [c["label"] for c in s["certificates"]]
    assert any(lbl.startswith("wide: proven") for lbl in labels)
    figs = json.loads((out / "figures.json").read_text())
    assert {f["name"] for f in figs} == {"proof_wide", "proof_narrow"}


def test_proof_experiment_quick(tmp_path):
    _check(*_run(tmp_path, "--quick"))


@pytest.mark.slow
def test_proof_experiment_full(tmp_path):
    _check(*_run(tmp_path))
