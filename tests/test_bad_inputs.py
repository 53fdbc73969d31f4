"""The bad-input catalogue (issue 11): every reproduction gives one clear line, never a traceback,
a non-zero exit code, and leaves either nothing or a run folder whose status is "failed".

CLI cases run ``rayleighflow.cli.main`` in-process; API cases call the library. A hypothesis
fuzz of the TOML loader checks that it raises nothing but ConfigError.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rayleighflow as rf
from rayleighflow.cli import main
from rayleighflow.experiments.config import ConfigError, load_config, parse_config
from rayleighflow.experiments.registry import (
    MAX_SEED,
    check_seed,
    default_run_dir,
    prepare_out,
    run_experiment,
)
from rayleighflow.experiments.runner import RunFailed
from rayleighflow.ntk import contrast_report

FACTORIES = '''
import torch
from torch import nn


class Boom(nn.Module):
    """Breaks after a number of calls: a model that raises in the middle of a flow."""

    def __init__(self, after=40):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom: the model broke mid-flow")
        return self.lin(x)


def boom(after=40):
    return Boom(after)


def raises():
    raise RuntimeError("factory exploded")


def not_module():
    return 42


def dropout():
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def stiff():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[2].weight.mul_(1e8)
    return net


def half():
    return nn.Linear(4, 3).half()
'''


def toml(model: str = 'kind = "mlp"\nwidths = [4]', *, data: str | None = None,
         loss: str = "cross-entropy",
         flow: str = "t_max = 0.5\n[flow.records]\nkind = \"log\"\nn = 4",
         top: str = "") -> str:
    data = data or 'kind = "sklearn"\nname = "iris"\nn_samples = 30'
    return (f"{top}\n[model]\n{model}\n\n[data]\n{data}\n\n[loss]\nname = \"{loss}\"\n\n"
            f"[flow]\n{flow}\n\n[diagnostics]\ngroups = false\n\n"
            "[certify]\ndesingularizers = [\"log\"]\n")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working folder with the factory file, a few TOML files and fake run folders."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factories.py").write_text(FACTORIES)
    files = {
        "ok.toml": toml(),
        "upper.TOML": toml(),
        "syntax.toml": "[model\nkind = 'mlp'\n",
        "typo.toml": toml(flow="t_mx = 0.5"),
        "latin1.toml": None,
        "empty.toml": "",
        "raises.toml": toml('kind = "import"\nfactory = "factories.py:raises"'),
        "nofile.toml": toml('kind = "import"\nfactory = "missing.py:net"'),
        "notmodule.toml": toml('kind = "import"\nfactory = "factories.py:not_module"'),
        "dropout.toml": toml('kind = "import"\nfactory = "factories.py:dropout"'),
        "boom.toml": toml('kind = "import"\nfactory = "factories.py:boom"',
                          flow="t_max = 5.0\n[flow.records]\nkind = \"log\"\nn = 20"),
        "nocsv.toml": toml(data='kind = "csv"\npath = "missing.csv"', loss="square"),
        "badtarget.toml": toml(data='kind = "csv"\npath = "d.csv"\ntarget = "nope"',
                               loss="square"),
        "toomany.toml": toml(data='kind = "sklearn"\nname = "iris"\nn_samples = 999'),
        "logistic3.toml": toml(loss="logistic"),
        "cuda.toml": toml(top='device = "cuda"'),
        "builtin_extra.toml": 'experiment = "demo"\nfoo = 1\n',
        "builtin_unknown.toml": 'experiment = "nope"\n',
        "builtin_param.toml": 'experiment = "demo"\n[params]\nwidht = 3\n',
        "builtin_seedtype.toml": 'experiment = "demo"\nseed = "x"\n',
        "negseed.toml": toml(top="seed = -1"),
    }
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,0.5\n3,4,1.5\n5,6,2.5\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("someone's file")
    (tmp_path / "emptydir").mkdir()
    run = tmp_path / "oldrun"  # a demo run folder killed before its summary
    (run / "trajectories").mkdir(parents=True)
    (run / "config.toml").write_text('experiment = "demo"\nseed = 0\ndevice = "cpu"\n'
                                     'dtype = "float64"\nquick = false\n\n[params]\n')
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "summary.json").write_text("{not json")
    return tmp_path


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse: usage errors exit, one line
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


# (argv, words the one line must contain); "{ws}" is the working folder
CLI_CASES = [
    (["run", "nope"], ["unknown experiment 'nope'"]),
    (["run", "demo", "--seed", "-1"], ["--seed", "out of range"]),
    (["run", "demo", "--seed", "1e23"], ["not an integer seed"]),
    (["run", "demo", "--seed", "100000000000000000000000"], ["out of range"]),
    (["run", "demo", "--seed", "abc"], ["not an integer seed"]),
    (["run", "demo", "--seed", str(MAX_SEED + 1)], ["out of range"]),
    (["run", "demo", "--dtype", "float16"], ["invalid choice"]),
    (["run", "demo", "--device", "tpu"], ["unknown device 'tpu'"]),
    (["run", "demo", "--out", ""], ["empty folder name"]),
    (["run", "demo", "--out", "   "], ["empty folder name"]),
    (["run", "demo", "--out", "a_file"], ["is a file"]),
    (["run", "demo", "--out", "a_file/sub"], ["cannot write into the run folder"]),
    (["run", "demo", "--out", "full"], ["already holds files", "--overwrite"]),
    (["run", "demo", "--out", "full", "--overwrite"], ["not a run folder"]),
    (["run", "demo", "--out", "oldrun"], ["already holds files", "--resume"]),
    (["run", "demo", "--out", ".", "--overwrite"], ["refuses to empty"]),
    (["run", "emptydir"], ["unknown experiment"]),
    (["run", "oldrun/"], ["unknown experiment"]),
    (["run", "missing.toml"], ["no experiment file"]),
    (["run", "missing.TOML"], ["no experiment file"]),
    (["run", "emptydir.toml"], ["no experiment file"]),
    (["run", "syntax.toml"], ["syntax.toml", "line", "not valid toml"]),
    (["run", "typo.toml"], ["typo.toml", "line", "t_mx", "t_max"]),
    (["run", "latin1.toml"], ["latin1.toml", "cannot read"]),
    (["run", "empty.toml"], ["empty.toml", "errors"]),
    (["run", "raises.toml"], ["factory exploded"]),
    (["run", "nofile.toml"], ["model.factory"]),
    (["run", "notmodule.toml"], ["not a torch.nn.Module"]),
    (["run", "dropout.toml"], ["dropout", "eval"]),
    (["run", "nocsv.toml"], ["missing.csv"]),
    (["run", "badtarget.toml"], ["'nope'", "not a column"]),
    (["run", "toomany.toml"], ["n_samples", "999"]),
    (["run", "logistic3.toml"], ["logistic", "2 classes"]),
    (["run", "negseed.toml"], ["seed"]),
    (["run", "builtin_extra.toml"], ["builtin_extra.toml", "foo"]),
    (["run", "builtin_unknown.toml"], ["unknown experiment 'nope'"]),
    (["run", "builtin_param.toml"], ["widht"]),
    (["run", "builtin_seedtype.toml"], ["builtin_seedtype.toml", "seed"]),
    (["run", "ok.toml", "--seed", "-5"], ["out of range"]),
    (["run", "ok.toml", "--out", "full"], ["already holds files"]),
    (["run", "--resume", "nowhere"], ["not a run folder"]),
    (["run", "--resume", "emptydir"], ["not a run folder"]),
    (["run", "--resume", "a_file"], ["is a file"]),
    (["run", "--resume", ""], ["empty folder name"]),
    (["run", "--resume", "oldrun", "--seed", "3"], ["--seed 3", "seed 0", "--force-new"]),
    (["run", "--resume", "oldrun", "--dtype", "float32"], ["--dtype float32"]),
    (["run", "--resume", "oldrun", "--device", "cuda"], ["--device cuda"]),
    (["run", "--resume", "oldrun", "--quick"], ["--quick"]),
    (["run", "toy2d", "--resume", "oldrun"], ["experiment 'toy2d'", "'demo'"]),
    (["run", "ok.toml", "--resume", "oldrun"], ["ok.toml", "not the configuration"]),
    (["run", "--resume", "oldrun", "--out", "elsewhere"], ["drop --out"]),
    (["run", "--resume", "oldrun", "--overwrite"], ["--force-new"]),
    (["run", "demo", "--force-new"], ["only with --resume"]),
    (["run", "demo", "surplus"], ["unrecognized arguments"]),
    (["run", "--bogus"], ["unrecognized arguments"]),
    (["frobnicate"], ["invalid choice"]),
    (["run", "toy2d", "--device", "meta"], ["unknown device 'meta'", "cuda:N"]),
    (["run", "toy2d", "--device", "cuda:x"], ["unknown device 'cuda:x'"]),
    (["run", "toy2d", "--device", "cpu:0"], ["unknown device 'cpu:0'"]),
    (["report", "nowhere"], ["does not exist"]),
    (["report", "a_file"], ["not a folder"]),
    (["report", "emptydir"], ["not a run folder"]),
    (["report", "corrupt"], ["nothing to report"]),
    (["report", ""], ["empty folder name"]),
    (["ntk", "demo"], ["built-in experiment", "rayleighflow run demo"]),
    (["ntk", "missing.toml"], ["no experiment file"]),
    (["ntk", "emptydir"], ["is a folder"]),
    (["ntk", "ok.toml", "--max-samples", "-3"], ["--max-samples", "at least 1"]),
    (["ntk", "ok.toml", "--max-samples", "0"], ["at least 1"]),
    (["ntk", "oldrun"], ["built-in experiment"]),
    (["ntk", "syntax.toml"], ["syntax.toml", "not valid toml"]),
    (["ntk", "d.csv"], ["takes a .toml"]),
]
if not torch.cuda.is_available():
    CLI_CASES += [
        (["run", "toy2d", "--device", "cuda"], ["CUDA is not available"]),
        (["run", "cuda.toml"], ["CUDA is not available"]),
    ]


@pytest.mark.parametrize(("argv", "needles"), CLI_CASES,
                         ids=[" ".join(a) or "empty" for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_leaves_nothing(ws, capsys, argv, needles):
    before = _listing(ws)
    code, _, err = cli(capsys, *argv)
    assert_one_line(code, err, *needles)
    assert code == 2
    assert _listing(ws) == before  # nothing created, nothing emptied, nothing rewritten
    assert (ws / "oldrun" / "config.toml").read_text().count("seed = 0") == 1


def test_model_raising_mid_flow_leaves_a_failed_run(ws, capsys):
    code, _, err = cli(capsys, "run", "boom.toml", "--out", "b")
    assert_one_line(code, err, "the run failed", "boom: the model broke mid-flow")
    assert code == 1
    s = json.loads((ws / "b" / "summary.json").read_text())
    assert s["status"] == "failed" and "boom" in s["error"] and "Traceback" in s["traceback"]
    assert s["loss_initial"] is not None and s["t_final"] is not None  # what was recorded
    html = (ws / "b" / "report.html").read_text()
    assert "Failed" in html and "Interrupted" not in html and "boom" in html
    traj = rf.Trajectory.load(ws / "b" / "trajectories" / "flow.jsonl")
    assert traj.status == "failed" and len(traj) >= 1
    code, out, err = cli(capsys, "report", "b")
    assert code == 0 and "Failed" in (ws / "b" / "report.html").read_text()


def test_folders_are_never_reused_silently(ws, capsys):
    code, _, err = cli(capsys, "run", "ok.toml")
    assert code == 0, err
    code, _, err = cli(capsys, "run", "ok.toml")
    assert code == 0, err
    runs = sorted(p.name for p in (ws / "runs").iterdir())
    assert runs == ["ok", "ok-2"]  # the second default folder is new, the first untouched
    # a saved config.toml runs into a folder named after its experiment, not "config"
    code, _, err = cli(capsys, "run", "runs/ok/config.toml")
    assert code == 0, err
    assert (ws / "runs" / "ok-3" / "summary.json").exists()
    # --overwrite empties the old run first: no stale trajectories remain
    (ws / "runs" / "ok" / "trajectories" / "stale.jsonl").write_text('{"type": "meta"}\n')
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "runs/ok", "--overwrite")
    assert code == 0, err
    assert not (ws / "runs" / "ok" / "trajectories" / "stale.jsonl").exists()
    # resuming a finished run: nothing to resume, exit 0, nothing rewritten
    before = (ws / "runs" / "ok" / "summary.json").read_text()
    code, _, err = cli(capsys, "run", "--resume", "runs/ok")
    assert code == 0 and "nothing to resume" in err
    assert (ws / "runs" / "ok" / "summary.json").read_text() == before
    # --force-new starts over with the new seed, and config.toml says so
    code, _, err = cli(capsys, "run", "--resume", "runs/ok", "--seed", "3", "--force-new")
    assert code == 0, err
    assert "seed = 3" in (ws / "runs" / "ok" / "config.toml").read_text()
    for name in ("summary.json", "report.html"):  # written 0644 like the rest, not 0600
        assert (ws / "runs" / "ok" / name).stat().st_mode & 0o044 == 0o044


def _stopped_early(ws, capsys, flow: str, status: str) -> None:
    (ws / "stiff.toml").write_text(toml('kind = "import"\nfactory = "factories.py:stiff"',
                                        flow=flow))
    code, _, err = cli(capsys, "run", "stiff.toml", "--out", "s")
    s = json.loads((ws / "s" / "summary.json").read_text())
    assert s["status"] == "complete" and code == 0, err
    assert [x["status"] for x in s["stopped_early"]] == [status]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: flow 'flow' stopped early")
    assert status in lines[0]
    html = (ws / "s" / "report.html").read_text()
    assert "stopped early" in html and status in html and "Interrupted" not in html


def test_stiff_model_within_a_budget_stops_early_with_one_line(ws, capsys):
    _stopped_early(ws, capsys, "t_max = 100.0\n[flow.records]\nkind = \"log\"\nn = 4\n"
                   "[flow.stop]\nmax_evals = 60", "step_budget")


@pytest.mark.slow
def test_stiff_model_stops_as_stalled_not_hanging(ws, capsys):
    start = time.perf_counter()
    _stopped_early(ws, capsys, "t_max = 100.0\n[flow.records]\nkind = \"log\"\nn = 4", "stalled")
    assert time.perf_counter() - start < 300


def test_half_precision_factory_is_cast_with_a_note(ws, capsys):
    (ws / "half.toml").write_text(toml('kind = "import"\nfactory = "factories.py:half"'))
    code, _, err = cli(capsys, "run", "half.toml", "--out", "h")
    assert code == 0, err
    notes = json.loads((ws / "h" / "summary.json").read_text())["notes"]
    assert any("float16 parameters were cast to float64" in n for n in notes)


def test_kill_then_resume_accumulates_run_time_and_keeps_settings(ws):
    (ws / "long.toml").write_text(toml(flow="t_max = 2.0\n[flow.records]\nkind = \"log\"\nn = 20"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rayleighflow.cli", "run", "long.toml",
                             "--out", "k", "--seed", "3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = ws / "k" / "trajectories" / "flow.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if path.exists() and path.read_text().count('"type": "row"') >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    else:
        pytest.fail("no records in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_time = torch.load(ws / "k" / "checkpoints" / "flow.pt", weights_only=True)["run_time"]
    assert killed_time > 0
    code = main(["run", "--resume", "k", "--seed", "4"])
    assert code == 2 and "seed = 3" in (ws / "k" / "config.toml").read_text()
    assert main(["run", "--resume", "k"]) == 0
    s = json.loads((ws / "k" / "summary.json").read_text())
    assert s["status"] == "complete" and s["run_time_s"] > killed_time
    assert "seed = 3" in (ws / "k" / "config.toml").read_text()


def test_interrupted_summary_shows_what_was_recorded(ws):
    """Ctrl-C mid-flow: the summary (terminal table) carries the recorded values."""
    from rayleighflow.experiments.runner import execute
    from rayleighflow.experiments.user import run_user_experiment

    assert execute  # the runner writes the summary; here the flow sees Ctrl-C at a record
    calls = {"n": 0}
    real = rf.flow.driver._Recorder.record

    def record(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    rf.flow.driver._Recorder.record = record
    try:
        s = run_user_experiment(ws / "ok.toml", ws / "i")
    finally:
        rf.flow.driver._Recorder.record = real
    assert s["status"] == "interrupted"
    assert s["loss_initial"] is not None and s["t_final"] is not None and s["P"] is not None
    assert any("rayleighflow run --resume" in n for n in s["notes"])


# ----------------------------------------------------------------------------- API cases


def _net(dtype=torch.float64):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _api_cases():
    iris = rf.load_sklearn("iris", n_samples=20)
    yield "Model(42)", TypeError, "nn.Module or a function", lambda: rf.Model(42)
    yield "half model", ValueError, "float16", lambda: rf.Model(nn.Linear(3, 1).half())
    yield "bfloat16 model", ValueError, "bfloat16", \
        lambda: rf.Model(nn.Linear(3, 1).to(torch.bfloat16))
    yield "meta model", ValueError, "meta device", \
        lambda: rf.Model(nn.Linear(3, 1, device="meta"))

    def all_frozen():
        net = nn.Linear(3, 1)
        net.requires_grad_(False)
        rf.Model(net)

    yield "all frozen", ValueError, "nothing to train", all_frozen
    yield "tuple data", TypeError, "Dataset.from_arrays", \
        lambda: rf.Problem(_net(), (iris.x, iris.y), "cross-entropy")

    def sampler_mismatch():
        sampler = rf.UniformBox(4, 1.0, rf.data.smooth_target)
        problem = rf.Problem(nn.Linear(4, 1).float(), sampler, "square")
        problem.validate(sampler.sample(5, torch.Generator().manual_seed(0)))

    yield "sampler dtype", ValueError, "dtype=torch.float32", sampler_mismatch
    yield "gradient_flow(net)", TypeError, "Problem", lambda: rf.gradient_flow(_net(), t_max=1)
    yield "t_max inf", ValueError, "finite", lambda: rf.gradient_flow(
        rf.Problem(_net(), iris, "cross-entropy"), t_max=float("inf"))
    yield "seed -1", ValueError, "seed must be", lambda: check_seed(-1)
    yield "seed bool", ValueError, "seed must be", lambda: check_seed(True)
    yield "seed 2^40", ValueError, "seed must be", lambda: check_seed(2**40)
    yield "out ''", ValueError, "empty string", lambda: run_experiment("demo", "")
    yield "run seed", ValueError, "seed must be", lambda: run_experiment("demo", "x", seed=-2)
    yield "prepare file", ValueError, "is a file", lambda: prepare_out(Path(__file__))
    yield "config dir", ConfigError, "cannot read", lambda: load_config(Path(__file__).parent)
    yield "config empty", ConfigError, "model", lambda: parse_config({})
    yield "config type", ConfigError, "seed", lambda: parse_config(
        {"seed": "x", "model": {"kind": "mlp"}, "data": {"kind": "sklearn", "name": "iris"},
         "loss": {"name": "cross-entropy"}})


API_CASES = list(_api_cases())


@pytest.mark.parametrize(("name", "exc", "needle", "call"), API_CASES,
                         ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_clear_error(tmp_path, monkeypatch, name, exc, needle, call):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc) as info:
        call()
    message = info.value.one_line() if isinstance(info.value, ConfigError) else str(info.value)
    assert needle in message and "\n" not in message, message
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_float32_model_with_float64_data_is_aligned():
    data = rf.load_sklearn("wine")                      # float64
    net = nn.Sequential(nn.Linear(13, 6), nn.Tanh(), nn.Linear(6, 3))   # float32
    problem = rf.Problem(rf.Model(net), data, "cross-entropy")
    assert problem.data.x.dtype == torch.float32 and problem.data.weights.dtype == torch.float32
    m = rf.measure(problem)
    assert m.loss > 0 and m.rayleigh > 0


def test_integer_inputs_are_cast_like_from_arrays():
    x = torch.randint(0, 5, (10, 3))
    d = rf.Dataset(x, torch.randn(10, 1, dtype=torch.float64),
                   torch.full((10,), 0.1, dtype=torch.float64))
    problem = rf.Problem(nn.Linear(3, 1).double(), d, "square")
    assert problem.data.x.dtype == torch.float64
    assert torch.equal(problem.data.x, x.double())
    # an embedding takes its integer inputs as they are
    emb = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 1)).double()
    assert rf.Problem(emb, d, "square").data.x.dtype == torch.int64


def test_frozen_parameters_stay_frozen_and_leave_p():
    data = rf.load_sklearn("iris", n_samples=30)
    net = _net()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    model = rf.Model(net)
    assert "0.weight" not in model.params and model.frozen == ("0.weight",)
    assert model.n_params == sum(p.numel() for p in net.parameters()) - frozen.numel()
    assert model.notes and "excluded from θ and P" in model.notes[0]
    result = rf.gradient_flow(rf.Problem(model, data, "cross-entropy"), t_max=1.0,
                              records=rf.LogSpaced(3))
    assert "0.weight" not in result.params
    assert torch.equal(net[0].weight, frozen)
    result.load_into(net)
    assert torch.equal(net[0].weight, frozen) and torch.equal(net[2].bias, result.params["2.bias"])


def test_contrast_report_at_the_trained_parameters():
    data = rf.load_sklearn("iris", n_samples=30)
    problem = rf.Problem(_net(), data, "cross-entropy")
    result = rf.gradient_flow(problem, t_max=1.0, records=rf.LogSpaced(3))
    start, end = contrast_report(problem), contrast_report(problem, params=result)
    assert start.rayleigh != end.rayleigh
    assert "θ_t of the flow result, t = 1" in str(end) and "θ₀" in str(start)
    assert end.rayleigh == pytest.approx(contrast_report(problem, params=result.params).rayleigh)


def test_default_run_dir_is_unique_and_named_after_the_experiment(tmp_path):
    saved = tmp_path / "x" / "config.toml"
    saved.parent.mkdir()
    saved.write_text('experiment = "toy2d"\n')
    assert default_run_dir(str(saved), tmp_path / "runs") == tmp_path / "runs" / "toy2d"
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert default_run_dir("demo", tmp_path / "runs") == tmp_path / "runs" / "demo"  # empty
    (tmp_path / "runs" / "demo" / "f").write_text("")
    (tmp_path / "runs" / "demo-2").mkdir()
    (tmp_path / "runs" / "demo-2" / "f").write_text("")
    assert default_run_dir("demo", tmp_path / "runs") == tmp_path / "runs" / "demo-3"


def test_run_failed_is_raised_through_the_api(ws):
    with pytest.raises(RunFailed, match="boom") as info:
        run_experiment(str(ws / "boom.toml"), ws / "api")
    assert info.value.summary["status"] == "failed" and info.value.out == ws / "api"


def test_catalogue_size():
    assert len(CLI_CASES) + len(API_CASES) >= 60


# ----------------------------------------------------------------------------- TOML fuzz

_KEYS = ["model", "data", "loss", "flow", "diagnostics", "certify", "kind", "name", "seed",
         "dtype", "device", "convention", "widths", "t_max", "step", "method", "path",
         "factory", "kwargs", "mu", "desingularizers", "n_samples", "classes", "target",
         "population", "dim", "outputs", "rtol", "atol", "experiment", "params", "x", "é", ""]
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.sampled_from(["mlp", "cnn", "import", "sklearn", "iris", "csv", "npz",
                               "square", "cross-entropy", "logistic", "euler", "adaptive",
                               "log", "cpu", "cuda", "float32", "mean", "x.py:f", "a:b"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner,
                                         max_size=5), max_leaves=12)
_DOCS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_DOCS)
def test_toml_fuzz_parse_config_raises_only_config_error(doc):
    try:
        parse_config(doc)
    except ConfigError as err:
        assert err.one_line()


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1",
                                                             "cp1252"]),
       raw=st.binary(max_size=64))
def test_toml_fuzz_load_config_raises_only_config_error(tmp_path, text, encoding, raw):
    path = tmp_path / "fuzz.toml"
    for data in (text.encode(encoding, errors="replace"), raw,
                 ("[model]\nkind = 'mlp'\n" + text).encode(encoding, errors="replace")):
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as err:
            assert err.one_line()


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parent.parent
                                            / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_toml_loads(example):
    cfg = load_config(example)
    assert cfg.source == example.resolve()
    if cfg.data.kind == "csv":  # examples/data.csv has a TOML that uses it
        assert cfg.data.path.exists()


# -- issue 21, item 5: the second round of bad inputs ---------------------------------------------


def _line_problem():
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
    return rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
                      rf.Dataset.from_arrays(x, 2 * x), "square")


@pytest.mark.parametrize("thing", [torch.nn.Linear(1, 1), "x"])
def test_measure_of_something_that_is_not_a_problem(thing):
    with pytest.raises(TypeError, match=r"measure needs a rayleighflow.Problem .*rf.Problem\("):
        rf.measure(thing)


def test_load_into_a_module_of_another_shape_is_refused():
    run = rf.gradient_flow(_line_problem(), rf.GradientDescent(0.5), t_max=2.0)
    other = torch.nn.Linear(2, 3).double()
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"other shapes \(weight: \(3, 2\) ≠ \(1, 1\)"):
        run.load_into(other)
    assert torch.equal(other.weight.detach(), before)     # nothing half-copied


@pytest.mark.parametrize("target", [-1.0, 0.0, float("nan"), float("inf")])
def test_times_to_an_impossible_target_are_refused(target):
    run = rf.gradient_flow(_line_problem(), rf.GradientDescent(0.5), t_max=2.0)
    cert = rf.certify(run.trajectory, "log")
    with pytest.raises(ValueError, match="target loss must be a finite number > 0"):
        cert.time_to(target)
    with pytest.raises(ValueError, match="target loss must be a finite number > 0"):
        cert.forecast_time_to(target)


def test_inputs_without_features_are_refused():
    with pytest.raises(ValueError, match=r"x has shape \(5, 0\): each sample has no input"):
        rf.Dataset.from_arrays(torch.zeros(5, 0), torch.zeros(5, 1))


@pytest.mark.parametrize("dtype, word", [(torch.complex128, "complex128"),
                                         (torch.int64, "int64")])
def test_parameters_that_are_not_real_floats_are_refused(dtype, word):
    w = torch.ones(1, 1, dtype=dtype)
    with pytest.raises(TypeError, match=f"parameter 'w' is {word}"):
        rf.Model(lambda p, x: x @ p["w"], {"w": w})


def test_a_fixed_step_run_that_would_never_end_is_refused_before_its_first_step():
    problem = _line_problem()
    with pytest.raises(ValueError, match=r"more than 1e308 steps > 1e\+08: .*MaxEvals"):
        rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=1e308)
    with pytest.raises(ValueError, match=r"is 2e\+09 steps"):
        rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=1e9)
    run = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=1e9, stops=[rf.MaxEvals(10)])
    assert run.status is rf.FlowStatus.STEP_BUDGET and run.n_grad_evals == 10


def test_record_counts_that_cannot_be_kept_are_refused():
    with pytest.raises(ValueError, match=r"LogSpaced: n = 1000000000 records > 1000000"):
        rf.LogSpaced(10**9)
    with pytest.raises(ValueError, match=r"Every\(1\) records 2e\+07 times"):
        rf.gradient_flow(_line_problem(), rf.GradientDescent(0.5), t_max=1e7,
                         records=rf.Every(1))


def test_a_toml_file_with_a_byte_order_mark_is_read(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / "my_experiment.toml").read_text()
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_config(bom).name == "wine-mlp"


def test_a_toml_seed_out_of_range_is_an_error_with_its_line(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / "my_experiment.toml").read_text()
    bad = tmp_path / "seed.toml"
    bad.write_text(text.replace("seed = 0", "seed = 100000000000000000000"))
    with pytest.raises(ConfigError, match=r"line 7: seed must be <= 4294967295"):
        load_config(bad)


def test_csv_labels_that_would_make_a_million_classes_are_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("a,b,label\n0.1,0.2,0\n0.3,0.1,1\n0.5,0.9,1000000\n")
    with pytest.raises(ValueError, match=r"labels \{0, 1, 1000000\} \(3 distinct\) would make "
                                         r"1000001 classes: renumber them 0..2"):
        rf.data.load_file(str(path))


def test_report_on_a_damaged_folder_says_what_is_damaged(tmp_path, capsys):
    from rayleighflow.report import report_problems

    out = tmp_path / "run"
    assert main(["run", "toy2d", "--quick", "--out", str(out)]) == 0
    assert report_problems(out) == ()                     # intact: no complaint
    summary = (out / "summary.json").read_text()
    flows = json.loads(summary)["flows"]
    assert flows and all((out / "trajectories" / f"{n}.jsonl").exists() for n in flows)
    (out / "summary.json").write_text("{not json")
    assert any("summary.json could not be read" in p for p in report_problems(out))
    (out / "summary.json").write_text(summary)
    traj = out / "trajectories" / f"{flows[0]}.jsonl"
    traj.write_text("".join(traj.read_text().splitlines(keepends=True)[:3]))   # truncated
    assert any("has no end line (truncated?)" in p for p in report_problems(out))
    traj.unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 2                # the command: non-zero, and says it
    err = capsys.readouterr().err
    assert f"trajectories/{flows[0]}.jsonl is missing" in err and (out / "report.html").exists()


def test_a_truncated_npz_is_refused_naming_the_file(tmp_path):
    good = tmp_path / "d.npz"
    np.savez(good, x=np.ones((4, 2)), y=np.arange(4) % 2)
    bad = tmp_path / "cut.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable NPZ archive .*truncated"):
        rf.data.load_file(str(bad))
    assert rf.data.load_file(str(good)).n == 4


# estimates and messages (round 2) ----------------------------------------------------------------

FACTORIES_2 = '''
import torch
from torch import nn


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.count = nn.Parameter(torch.tensor(3), requires_grad=False)   # frozen integer
        self.register_buffer("steps", torch.tensor(0))

    def forward(self, x):
        return self.lin(x)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).detach()


def complex_net():
    return nn.Linear(4, 3).to(torch.complex64)
'''


@pytest.fixture
def ws2(ws):
    (ws / "factories2.py").write_text(FACTORIES_2)
    return ws


def _write(ws, name, text):
    (ws / name).write_text(text)
    return name


def test_ntk_refuses_a_kernel_above_the_budget_before_building(ws, capsys, monkeypatch):
    import rayleighflow.experiments.user as user

    built = []
    monkeypatch.setattr(user, "build_problem", lambda *a: built.append(a))
    _write(ws, "w64.toml", toml('kind = "mlp"\nwidths = [64]'))     # P = 515 > nk = 90
    code, out, err = cli(capsys, "ntk", "w64.toml", "--max-memory", "100kB")
    assert_one_line(code, err, "the 90 × 90 kernel", "259 kB", "budget of 100 kB",
                    "--max-samples 18", "--force")
    assert code == 2 and out == "" and built == []          # refused before the forward
    # the default budget is read from free memory (psutil, else /proc)
    from rayleighflow.ntk import _common

    monkeypatch.setattr(_common, "available_bytes", lambda device: 200_000)
    code, _, err = cli(capsys, "ntk", "w64.toml")
    assert_one_line(code, err, "budget of 160 kB (80% of the 200 kB free on cpu)")
    assert built == []


def test_ntk_estimate_of_a_17m_parameter_kernel_is_refused():
    from rayleighflow.ntk._common import SpectrumEstimate, fmt_bytes

    e = SpectrumEstimate(100_000, 1, 17_051_649)     # widths [4096, 4096] on 64 features
    assert e.route == "dense" and fmt_bytes(e.bytes) == "320 GB"
    assert e.samples_within(2 * 10**9) == 7905 and 32 * 7905**2 <= 2e9 < 32 * 7906**2


def test_ntk_forced_runs_and_says_nothing_when_small(ws, capsys):
    _write(ws, "w64.toml", toml('kind = "mlp"\nwidths = [64]'))
    code, out, err = cli(capsys, "ntk", "w64.toml", "--max-memory", "100kB", "--force")
    assert code == 0 and "tangent kernel" in out and err == ""


def test_available_bytes_reads_psutil(monkeypatch):
    psutil = pytest.importorskip("psutil")
    from rayleighflow.ntk import _common

    assert abs(_common._host_free() - psutil.virtual_memory().available) < 2**30


def test_prove_refuses_a_proof_above_its_budget_with_the_estimate(ws, capsys):
    pytest.importorskip("flint")
    name = _write(ws, "pr.toml", toml(data='kind = "sklearn"\nname = "iris"\nn_samples = 30'))
    code, out, err = cli(capsys, "prove", name, "--max-memory", "10kB")
    assert_one_line(code, err, "J₀ is 90 × 35", "memory budget of 10 kB", "--force")
    assert code == 2 and out == ""


def test_prove_work_budget(ws, capsys, monkeypatch):
    pytest.importorskip("flint")
    import importlib

    pf = importlib.import_module("rayleighflow.prove.file")
    monkeypatch.setattr(pf, "PROOF_WORK_BUDGET", 10.0)
    code, _, err = cli(capsys, "prove", "ok.toml")
    assert_one_line(code, err, "multiply-adds", "work budget of 1e+01", "--force")


def test_printed_bounds_are_rounded_outward():
    from rayleighflow.prove._print import fmt_below, fmt_down, fmt_up

    assert fmt_up(0.0562341) == "0.05624" and fmt_down(0.0562341) == "0.05623"
    a, b = fmt_below(0.0562341, 0.05623412)       # was printed "0.0562341 < r = 0.05623"
    assert float(a) >= 0.0562341 and float(b) <= 0.05623412 and float(a) < float(b)
    assert fmt_up(100.0) == "100" and fmt_up(1234567.0) == "1.235e+06"


def test_a_stall_says_the_time_reached_and_why(ws, capsys):
    name = _write(ws, "far.toml", toml(flow="t_max = 1e12\n[flow.records]\nkind = \"log\"\nn = 4"))
    code, _, err = cli(capsys, "run", name, "--out", "far")
    assert code == 0
    assert "stopped at t = " in err and "the step did not collapse" in err
    assert "[flow] t_max" in err and "[flow.stop] max_evals" in err
    assert "max_steps" not in err and "euler" not in err and "collapsed, as" not in err


def test_a_frozen_integer_parameter_is_left_alone(ws2, capsys):
    name = _write(ws2, "cnt.toml", toml('kind = "import"\nfactory = "factories2.py:Counted"\n'
                                        "init_scale = 0.5"))
    code, _, err = cli(capsys, "run", name, "--out", "cnt")
    assert code == 0, err
    s = json.loads((ws2 / "cnt" / "summary.json").read_text())
    assert s["P"] == 15 and s["loss_final"] < s["loss_initial"]


def test_a_trainable_integer_parameter_is_refused():
    with pytest.raises(TypeError, match="parameter 'w' is int64: a gradient flow moves real"):
        rf.Model(lambda p, x: x * p["w"], {"w": torch.tensor([3])})


def test_a_detaching_forward_is_refused_with_one_line(ws2, capsys):
    data = rf.load_sklearn("iris", n_samples=20)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.lin(x).detach()

    with pytest.raises(ValueError, match=r"does not depend on its parameters .*\.detach\(\)"):
        rf.Problem(Detached(), data, "cross-entropy")
    name = _write(ws2, "det.toml", toml('kind = "import"\nfactory = "factories2.py:Detached"'))
    before = _listing(ws2)
    code, _, err = cli(capsys, "run", name, "--out", "det")
    assert_one_line(code, err, "does not depend on its parameters", ".detach()")
    assert code == 2 and _listing(ws2) == before


@pytest.mark.parametrize("factory, needle", [
    ("os:system", "os:system is a builtin_function_or_method"),
    ("subprocess:Popen", "a class that is not an nn.Module"),
    ("builtins:print", "builtins:print is a builtin_function_or_method")])
def test_a_factory_that_is_not_a_model_builder_is_not_called(ws, capsys, factory, needle):
    name = _write(ws, "sys.toml", toml(f'kind = "import"\nfactory = "{factory}"\n'
                                       '[model.kwargs]\ncommand = "touch pwned"'))
    before = _listing(ws)
    code, _, err = cli(capsys, "run", name, "--out", "sys")
    assert_one_line(code, err, needle, "it was not called")
    assert code == 2 and _listing(ws) == before and not (ws / "pwned").exists()


def test_negative_labels_are_not_class_indices(ws, capsys):
    (ws / "neg.csv").write_text("a,b,label\n0.1,0.2,0\n0.3,0.1,1\n0.5,0.9,-1\n0.2,0.2,1\n")
    name = _write(ws, "neg.toml", toml(data='kind = "csv"\npath = "neg.csv"'))
    code, _, err = cli(capsys, "run", name, "--out", "neg")
    assert_one_line(code, err, "labels include -1", "negative labels are not class indices")
    assert "real-valued" not in err


def test_a_directory_is_said_to_be_a_directory(ws, capsys):
    (ws / "sub.csv").mkdir()
    name = _write(ws, "dir.toml", toml(data='kind = "csv"\npath = "sub.csv"', loss="square"))
    code, _, err = cli(capsys, "run", name, "--out", "dir")
    assert_one_line(code, err, "sub.csv is a directory, not a file")
    assert "not found" not in err
    with pytest.raises(IsADirectoryError, match="is a directory, not a data file"):
        rf.data.load_file(str(ws / "sub.csv"))


def test_complex_factory_parameters_are_refused_before_any_cast(ws2, capsys):
    name = _write(ws2, "cx.toml", toml('kind = "import"\nfactory = "factories2.py:complex_net"'))
    code, _, err = cli(capsys, "run", name, "--out", "cx")
    assert_one_line(code, err, "parameter 'weight' is complex64", "view_as_real")


# run folders (round 2) ----------------------------------------------------------------------------
# issue 21, item 5: leftovers and contradictions. A run locks its folder, default folders are
# claimed atomically, an interrupted start-up leaves nothing, a write error names its file, and
# --resume refuses an edited config.toml.

from rayleighflow.rundir import LOCK_FILE, is_run_folder, release_lock  # noqa: E402


def _lock(folder: Path, pid: int) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                "started": "2024-01-01T00:00:00+00:00"}))
    return path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("argv", [["run", "ok.toml", "--out", "oldrun"],
                                  ["run", "demo", "--out", "oldrun", "--overwrite"],
                                  ["run", "--resume", "oldrun"],
                                  ["run", "--resume", "oldrun", "--force-new"]])
def test_a_folder_locked_by_a_live_run_is_refused_naming_its_pid(ws, capsys, live_pid, argv):
    _lock(ws / "oldrun", live_pid)
    before = _listing(ws)
    code, _, err = cli(capsys, *argv)
    assert_one_line(code, err, "in use by a running rayleighflow run", f"PID {live_pid}",
                    f"kill {live_pid}", "another --out")
    assert code == 2 and _listing(ws) == before


def test_a_stale_lock_is_taken_over_with_one_line_and_released(ws, capsys):
    _lock(ws / "stale", _dead_pid())
    assert not is_run_folder(ws / "stale")  # a lock alone does not make a run folder
    code, _, err = cli(capsys, "run", "--resume", "stale")
    assert_one_line(code, err, "not a run folder")
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "stale")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "stale lock" in lines[0]
    assert not (ws / "stale" / LOCK_FILE).exists()
    assert LOCK_FILE not in (ws / "stale" / "report.html").read_text()


def test_the_lock_is_held_for_the_run_and_released_on_every_ending(ws):
    seen = []

    def on_folder(folder):
        info = json.loads((folder / LOCK_FILE).read_text())
        seen.append((info["pid"], bool(info["host"])))

    run_experiment(str(ws / "ok.toml"), ws / "l", on_folder=on_folder)
    assert seen == [(os.getpid(), True)] and not (ws / "l" / LOCK_FILE).exists()
    with pytest.raises(RunFailed):
        run_experiment(str(ws / "boom.toml"), ws / "lb", on_folder=on_folder)
    assert len(seen) == 2 and not (ws / "lb" / LOCK_FILE).exists()
    # another process's lock is never removed by this one
    theirs = _lock(ws / "theirs", 1)
    assert release_lock(ws / "theirs") is False and theirs.exists()


def test_default_folders_are_claimed_atomically_by_concurrent_runs(tmp_path):
    import threading

    got: list[Path] = []
    barrier = threading.Barrier(6)

    def claim():
        barrier.wait()
        got.append(prepare_out(tmp_path / "runs" / "demo", lock=True, next_free=True))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == sorted(["demo"] + [f"demo-{i}" for i in range(2, 7)])
    for p in got:
        release_lock(p)
        assert list(p.iterdir()) == []


def test_a_default_folder_claimed_between_check_and_mkdir_moves_on(ws, capsys, monkeypatch):
    import rayleighflow.experiments.registry as registry

    real = registry.default_run_dir

    def racing(target, root):  # another run claims runs/ok right after this one looked
        found = real(target, root)
        _lock(found, os.getpid())
        return found

    monkeypatch.setattr(registry, "default_run_dir", racing)
    code, out, err = cli(capsys, "run", "ok.toml")
    assert code == 0, err
    assert "run folder: runs/ok-2" in " ".join(out.split())
    assert (ws / "runs" / "ok-2" / "summary.json").exists()
    assert [p.name for p in (ws / "runs" / "ok").iterdir()] == [LOCK_FILE]  # the other's


@pytest.mark.parametrize("out", ["st", "emptydir", None])
def test_an_interrupt_at_start_up_leaves_no_contradiction(ws, capsys, monkeypatch, out):
    import rayleighflow.experiments.runner as runner

    real = runner.atomic_write_text

    def interrupted(path, *a, **k):  # SIGTERM/Ctrl-C once trajectories/ exists, before config
        if Path(path).name == "config.toml":
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(runner, "atomic_write_text", interrupted)
    argv = ["run", "ok.toml"] + (["--out", out] if out else [])
    code, _, err = cli(capsys, *argv)
    assert code == 130
    assert_one_line(code, err, "interrupted during start-up", "before anything was recorded",
                    "run the command again")
    folder = ws / (out or "runs/ok")
    assert not folder.exists() or list(folder.iterdir()) == []
    assert (ws / "emptydir").is_dir()  # a folder that was there stays
    monkeypatch.setattr(runner, "atomic_write_text", real)
    code, _, err = cli(capsys, "run", "--resume", str(folder))
    assert_one_line(code, err, "not a run folder")
    code, out_text, err = cli(capsys, *argv)  # the rerun starts in the same folder
    assert code == 0, err
    assert (folder / "summary.json").exists() and not (ws / "runs" / "ok-2").exists()


class _FullDisk:
    """A file that fills the disk after ``room`` writes."""

    def __init__(self, fh, room):
        self._fh, self._room = fh, room

    def write(self, text):
        import errno

        self._room -= 1
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._fh.write(text)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_a_full_disk_mid_flow_fails_the_run_naming_the_file(ws, capsys, monkeypatch):
    real = rf.Trajectory._open
    monkeypatch.setattr(rf.Trajectory, "_open", lambda self, mode: _FullDisk(real(self, mode), 3))
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "w")
    assert_one_line(code, err, "the run failed", "cannot write",
                    str(Path("w") / "trajectories" / "flow.jsonl"), "No space left on device")
    assert code == 1 and "[Errno" not in err
    s = json.loads((ws / "w" / "summary.json").read_text())
    assert s["status"] == "failed" and "flow.jsonl" in s["error"]
    assert not (ws / "w" / LOCK_FILE).exists()


def test_a_full_disk_at_the_summary_leaves_no_summary_and_says_so(ws, capsys, monkeypatch):
    import errno

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)  # summary.json is the one file written with fsync
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "ws_")
    assert_one_line(code, err, "the run failed", str(Path("ws_") / "summary.json"),
                    "No space left on device", "could not be written either", "--resume")
    assert code == 1 and "[Errno" not in err
    assert sorted(p.name for p in (ws / "ws_").iterdir() if p.name.startswith(".")) == []
    assert not (ws / "ws_" / "summary.json").exists()  # never a half-written or "complete" one


def test_a_full_disk_at_config_toml_leaves_nothing(ws, capsys, monkeypatch):
    import errno
    import types

    import rayleighflow._io as io

    def mkstemp(**kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "c")
    assert_one_line(code, err, "cannot write", str(Path("c") / "config.toml"),
                    "No space left on device")
    assert code == 1 and not (ws / "c").exists()


def test_resume_refuses_a_config_toml_edited_after_the_start(ws, capsys, monkeypatch):
    real = rf.flow.driver._Recorder.record
    calls = {"n": 0}

    def record(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(rf.flow.driver._Recorder, "record", record)
    code, _, err = cli(capsys, "run", "ok.toml", "--out", "e")
    assert code == 130, err
    monkeypatch.setattr(rf.flow.driver._Recorder, "record", real)
    config = ws / "e" / "config.toml"
    text = config.read_text()
    assert json.loads((ws / "e" / "summary.json").read_text())["config_sha256"]
    config.write_text(text.replace("t_max = 0.5", "t_max = 0.7"))
    code, _, err = cli(capsys, "run", "--resume", "e")
    assert_one_line(code, err, str(Path("e") / "config.toml"), "was edited after the run started",
                    "summary.json",
                    "restore it", "--force-new")
    assert code == 2
    (ws / "e" / "summary.json").unlink()  # as after kill -9: the checkpoint holds the hash
    code, _, err = cli(capsys, "run", "--resume", "e")
    assert_one_line(code, err, "was edited", "checkpoints/flow.pt")
    config.write_text(text)  # restored: the run continues
    code, _, err = cli(capsys, "run", "--resume", "e")
    assert code == 0, err
    assert json.loads((ws / "e" / "summary.json").read_text())["status"] == "complete"
