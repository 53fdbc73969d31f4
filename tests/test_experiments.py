"""Every built-in experiment's --quick variant end to end, through the command line."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rayleighflow.cli import main
from rayleighflow.report import validate_summary
from rayleighflow.trajectory import Trajectory

REQUIRED = ["experiment", "status", "convention", "P", "nk", "loss_initial", "loss_final",
            "t_final", "rank", "lambda_min", "lambda_max", "rayleigh_min", "certificates"]


def _run(tmp_path_factory, name, *extra):
    out = tmp_path_factory.mktemp(name) / "run"
    assert main(["run", name, "--quick", "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, summary


def _check_folder(out: Path, summary: dict) -> None:
    assert validate_summary(summary) == []
    for key in REQUIRED:
        assert key in summary
    assert summary["status"] == "complete"
    assert (out / "config.toml").exists() and (out / "report.html").exists()
    declared = [f["name"] for f in json.loads((out / "figures.json").read_text())]
    for name in declared:  # every declared figure was drawn, as PNG and SVG
        assert (out / "figures" / f"{name}.png").exists(), name
        assert (out / "figures" / f"{name}.svg").exists(), name
    for cert in summary["certificates"]:
        assert {"desingularizer", "mu", "status", "bound_final"} <= set(cert)
    assert summary["max_bound_violation"] is not None and summary["max_bound_violation"] <= 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return _run(tmp_path_factory, "demo")


@pytest.fixture(scope="module")
def logistic(tmp_path_factory):
    return _run(tmp_path_factory, "logistic")


def test_demo_contrast(demo):
    out, s = demo
    _check_folder(out, s)
    assert s["P"] < s["nk"] and s["rank"] <= s["P"]
    assert s["lambda_min"] <= s["rank_threshold"] and s["rayleigh_min"] > 0
    assert all(c["status"] == "holds" for c in s["certificates"])
    assert s["loss_final"] < s["loss_initial"]


def test_toy2d(tmp_path_factory):
    out, s = _run(tmp_path_factory, "toy2d")
    _check_folder(out, s)
    assert (s["P"], s["nk"], s["rank"]) == (1, 2, 1)
    assert s["lambda_min"] <= s["rank_threshold"]
    assert s["rayleigh_min"] > 0.1
    assert s["loss_final"] < 1e-6 * s["loss_initial"]
    assert abs(s["s_final"] - math.pi / 2) < 1e-3


def test_definite_ntk(tmp_path_factory):
    out, s = _run(tmp_path_factory, "definite-ntk")
    _check_folder(out, s)
    over, under = s["regimes"]["over"], s["regimes"]["under"]
    assert over["P"] > over["nk"] and under["P"] < under["nk"]
    assert over["lambda_min"] > over["rank_threshold"]
    assert under["lambda_min"] <= under["rank_threshold"] and under["rank"] <= under["P"]
    assert s["pl_available_over"] and not s["pl_available_under"]
    assert under["certificates"][0]["status"] == "unavailable"
    composed_under = under["certificates"][-1]
    assert composed_under["status"] == "holds" and composed_under["mu"] > 0


def test_logistic_bounds_and_adversarial(logistic):
    out, s = logistic
    _check_folder(out, s)
    for key in ("margin", "isolation", "C", "mu_theory", "max_bound_violation"):
        assert s[key] is not None
    assert s["mu_theory"] == pytest.approx(s["isolation"] ** 2 * s["margin"] ** 2)
    adv = s["datasets"]["adversarial"]
    assert adv["loss_initial"] >= 1e9 and adv["all_finite"]
    assert adv["local_decrease_holds"] and adv["max_bound_violation"] <= 0
    for d in s["datasets"].values():
        assert d["local_decrease_holds"] and d["max_bound_violation"] <= 0
    traj = Trajectory.load(out / "trajectories" / "adversarial.jsonl")
    assert np.all(np.isfinite(traj["loss"])) and np.all(np.isfinite(traj["grad_sq"]))
    # Records at exactly zero loss say nothing about KL: they are counted, not minimized over.
    zero = int(np.sum(traj["loss"] == 0))
    assert adv["records_at_zero_loss"] == zero
    assert adv["min_local_decrease_ratio"] is not None
    assert adv["min_local_decrease_ratio"] >= 1 - 1e-9
    # Gradient descent with step 0.1 on inputs ×1e6 is far too large a step: said, not hidden.
    gd = [c for c in s["certificates"] if c["label"].startswith("adversarial GD")]
    assert gd and all(c["status"] == "violated" and c["scope"] == "path" for c in gd)
    assert all(c["reason"]["code"] == "no_sufficient_decrease" for c in gd)


def test_logistic_slide_form_fails_where_derived_holds(logistic):
    out, s = logistic
    ts = s["datasets"]["iris"]
    assert ts["slide_negative_within_run"]
    with np.load(out / "arrays.npz") as z:
        t, slide, bound = z["iris_t"], z["iris_slide"], z["iris_bound"]
    after = t > ts["slide_failure_time"]
    assert np.all(slide[after] < 0) and np.all(bound > 0)


def test_two_layer(two_layer_quick):
    # Through the command line; the summary's science is tested in tests/test_two_layer.py.
    out, s = two_layer_quick
    _check_folder(out, s)
    assert "lambda_min_zero_where_underparameterized" not in s  # could never be False
    for m, w in s["per_width"].items():
        assert w["below"] + w["failed"] + w["undecided"] == s["seeds"], m


def test_report_rerenders_from_files(demo):
    out, _ = demo
    (out / "report.html").unlink()
    for f in (out / "figures").iterdir():
        f.unlink()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "certificate" in html.lower()


def test_rerun_from_saved_config(demo, tmp_path):
    out, s = demo
    again = tmp_path / "again"
    assert main(["run", str(out / "config.toml"), "--out", str(again)]) == 0
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["loss_final"] == pytest.approx(s["loss_final"], rel=1e-12)


def test_list_and_version(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("demo", "toy2d", "definite-ntk", "logistic", "two-layer"):
        assert name in listed
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "rayleighflow" in capsys.readouterr().out


def test_unknown_experiment_and_parameter(tmp_path, capsys):
    assert main(["run", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('experiment = "demo"\n[params]\nwidht = 3\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "widht" in capsys.readouterr().err
    assert not (tmp_path / "y" / "summary.json").exists()


def _cli(*args):
    return [sys.executable, "-m", "rayleighflow.cli", *args]


def _wait_rows(path: Path, rows: int, proc, timeout: float = 120.0) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and path.read_text().count('"type": "row"') >= rows:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.1)
    pytest.fail("no records written in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_then_report_then_resume(tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT as at a terminal: a test run started in the background (no job control) inherits
    # SIG_IGN for it, and a Python started that way never raises KeyboardInterrupt
    proc = subprocess.Popen(_cli("run", "definite-ntk", "--quick", "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_rows(out / "trajectories" / "over.jsonl", 4, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGINT:
        assert code == 130, proc.stderr.read()
        assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists()
    before = Trajectory.load(out / "trajectories" / "over.jsonl")
    assert main(["run", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    traj = Trajectory.load(out / "trajectories" / "over.jsonl")
    assert len(traj) > len(before) >= 1
    assert np.all(np.diff(traj.t) > 0)
    assert summary["max_bound_violation"] <= 0


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("example", ["my_experiment.toml", "custom_model.toml"])
def test_user_toml_experiment(tmp_path, example):
    out = tmp_path / "mine"
    assert main(["run", str(EXAMPLES / example), "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    _check_folder(out, s)
    assert s["loss_final"] < s["loss_initial"]
    # config.toml is the full resolved configuration and runs again as it is.
    assert main(["run", str(out / "config.toml"), "--out", str(tmp_path / "again")]) == 0


def test_user_toml_typo_names_key_line_and_fix(tmp_path, capsys):
    text = (EXAMPLES / "my_experiment.toml").read_text().replace("t_max =", "t_mx =")
    bad = tmp_path / "typo.toml"
    bad.write_text(text)
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    line = 1 + text.splitlines().index(next(ln for ln in text.splitlines() if "t_mx" in ln))
    assert "flow.t_mx" in err and "t_max" in err and f"line {line}" in err
    assert not (tmp_path / "out").exists()


def test_ntk_command(capsys):
    assert main(["ntk", str(EXAMPLES / "my_experiment.toml")]) == 0
    out = capsys.readouterr().out
    assert "λ_min(K)" in out and "R(K; ∇ℓ)" in out and "P (parameters)" in out


def test_float32_run_and_unavailable_device(tmp_path, capsys):
    out = tmp_path / "f32"
    assert main(["run", "demo", "--quick", "--dtype", "float32", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["max_bound_violation"] <= 0
    if not __import__("torch").cuda.is_available():
        assert main(["run", "toy2d", "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_a_bare_command_prints_help_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out and not (tmp_path / "runs").exists()
