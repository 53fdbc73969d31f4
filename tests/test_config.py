"""Experiment configuration: validation messages, TOML round trip, and problem building."""

import dataclasses
import doctest
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rayleighflow as rf
from rayleighflow.data import Dataset, Sampler
from rayleighflow.experiments import builders, config
from rayleighflow.experiments.builders import build_problem, flow_kwargs
from rayleighflow.experiments.config import (
    CNNConfig,
    ConfigError,
    ExperimentConfig,
    FlowConfig,
    LogRecordsConfig,
    StochasticGDConfig,
    config_to_toml,
    load_config,
    parse_config,
)
from rayleighflow.flow import FlowStatus, gradient_flow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE = {"model": {"kind": "mlp", "widths": [8]}, "data": {"kind": "sklearn", "name": "wine"},
        "loss": {"name": "cross-entropy"}}


def _with(**sections) -> dict:
    """BASE with sections replaced or updated: _with(flow={...}, loss={"name": "square"})."""
    out = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        if isinstance(v, dict) and k in out and "kind" not in v and "name" not in v:
            out[k].update(v)
        else:
            out[k] = v
    return out


def _errors(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ----------------------------------------------------------------------------- round trip


def _round_trip(cfg: ExperimentConfig, tmp_path: Path) -> None:
    text = config_to_toml(cfg)
    other = tmp_path / "elsewhere" / "resolved.toml"  # another folder: paths must be absolute
    other.parent.mkdir(exist_ok=True)
    other.write_text(text)
    again = load_config(other)
    assert again == cfg, text
    assert config_to_toml(again) == text


@pytest.mark.parametrize("raw", [
    BASE,
    _with(model={"kind": "cnn", "channels": [4], "input_shape": [1, 8, 8], "pool": 1,
                 "output_dim": 3},
          data={"kind": "sklearn", "name": "digits", "n_samples": 50, "classes": [0, 1, 2]},
          loss={"name": "square", "one_hot": True}),
    _with(data={"kind": "uniform", "dim": 3, "population": True, "radius": 2.5},
          loss={"name": "square"}, convention="sum", dtype="float32", seed=7,
          flow={"integrator": {"kind": "stochastic-gd", "step": 0.05, "batch_size": 32},
                "eval_size": 100, "stop": {"loss_below": 1e-5, "max_evals": 1000},
                "t_max": 3.0}),
    _with(data={"kind": "teacher-student", "dim": 4, "outputs": 3, "classify": True,
                "n_samples": 30},
          certify={"desingularizers": ["log", "power:0.5"], "mu": {"power:0.5": 0.25},
                   "rayleigh_lower": 0.01},
          diagnostics={"spectrum_every": 5, "groups": False}),
])
def test_config_to_toml_round_trips(raw, tmp_path):
    _round_trip(parse_config(raw), tmp_path)


def test_round_trip_of_files_and_imports(tmp_path):
    for name in ("my_experiment.toml", "custom_model.toml"):
        _round_trip(load_config(EXAMPLES / name), tmp_path)
    cfg = load_config(_write(tmp_path, f"""
        [model]
        kind = "import"
        factory = "{EXAMPLES / 'my_model.py'}:make"
        [model.kwargs]
        input_dim = 2
        output_dim = 1
        note = "a \\"quoted\\" string\\twith a tab"
        deep = {{ a = [1, 2], "odd key" = 1e-300 }}
        [data]
        kind = "csv"
        path = "{EXAMPLES / 'data.csv'}"
        target = "y"
        [loss]
        name = "logistic"
        """))
    assert cfg.model.kwargs["deep"] == {"a": [1, 2], "odd key": 1e-300}
    _round_trip(cfg, tmp_path)


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(["adaptive", "euler"]),
       t_max=st.floats(1e-3, 1e6), rtol=st.floats(1e-14, 1.0), step=st.floats(1e-9, 10.0),
       n_records=st.integers(2, 10_000), target=st.none() | st.floats(1e-30, 1.0))
def test_flow_section_round_trips(method, t_max, rtol, step, n_records, target):
    integrator = ({"kind": "gradient-descent", "step": step} if method == "euler"
                  else {"kind": "dopri5", "rtol": rtol})
    flow = {"t_max": t_max, "integrator": integrator, "records": {"kind": "log", "n": n_records}}
    if target is not None:
        flow["stop"] = {"loss_below": target}
    cfg = parse_config(_with(flow=flow))
    assert parse_config(tomllib.loads(config_to_toml(cfg))) == cfg


# ----------------------------------------------------------------------------- errors


def test_unknown_key_names_path_suggestion_allowed_keys_and_line(tmp_path):
    path = _write(tmp_path, """
        seed = 1
        [model]
        kind = "mlp"
        [data]
        kind = "sklearn"
        name = "iris"
        [loss]
        name = "cross-entropy"
        [flow]
        t_mx = 10.0
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert [(i.path, i.line) for i in err.issues] == [("flow.t_mx", 10)]
    msg = str(err)
    assert str(path) in msg and "line 10:" in msg
    assert "unknown key `flow.t_mx`" in msg and "did you mean `t_max`?" in msg
    assert "allowed keys in [flow]: t_max, eval_size, integrator, records, stop" in msg


def test_unknown_keys_at_top_level_in_dotted_and_inline_tables(tmp_path):
    path = _write(tmp_path, """
        sede = 1
        flow.n_record = 5
        [model]
        kind = "mlp"
        [data]
        kind = "sklearn"
        name = "iris"
        [loss]
        name = "cross-entropy"
        [certify]
        desingularizers = ["log"]
        mu = { lgo = 0.5 }
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = {i.path: (i.line, i.message) for i in info.value.issues}
    assert found["sede"][0] == 1 and "did you mean `seed`?" in found["sede"][1]
    assert "the top level" in found["sede"][1]
    assert found["flow.n_record"][0] == 2 and "`records`" in found["flow.n_record"][1]
    assert found["certify.mu.lgo"][0] == 12 and "did you mean `log`?" in found["certify.mu.lgo"][1]


def test_bad_enum_value():
    err = _errors(_with(loss={"name": "hinge"}))
    assert "loss.name 'hinge' is not one of square, cross-entropy, logistic" in str(err)
    err = _errors(_with(model={"kind": "rnn"}))
    assert "model.kind 'rnn' is not one of mlp, cnn, import" in str(err)


def test_wrong_types_are_named():
    err = _errors(_with(flow={"t_max": "10"}, seed=True, model={"kind": "mlp", "widths": 64}))
    msg = str(err)
    assert 'flow.t_max must be a number, got string "10"' in msg
    assert "seed must be an integer, got boolean true" in msg
    assert "model.widths must be an array of integers, got integer 64" in msg


def test_out_of_range_values():
    err = _errors(_with(flow={"integrator": {"kind": "dopri5", "rtol": -1},
                              "records": {"kind": "log", "n": 1}, "t_max": float("inf")},
                        model={"kind": "mlp", "widths": [8, 0], "init_scale": 0}))
    msg = str(err)
    assert "flow.integrator.rtol must be > 0 (got -1)" in msg
    assert "flow.records.n must be >= 2 (got 1)" in msg
    assert "flow.t_max must be a finite number (got inf)" in msg
    assert "model.widths[1] must be >= 1 (got 0)" in msg
    assert "model.init_scale must be > 0 (got 0)" in msg


def test_missing_required_keys_and_tables():
    err = _errors({"model": {"kind": "mlp"}, "data": {"kind": "sklearn"}})
    msg = str(err)
    assert "missing required table [loss]" in msg
    assert "missing required key `data.name` (one of iris, wine, breast_cancer, digits)" in msg
    err = _errors(_with(data={"kind": "uniform", "dim": 2}, loss={"name": "square"}))
    assert "data.n_samples is required for a fixed sample" in str(err)


def test_integrator_keys_belong_to_their_kind():
    assert "flow.integrator.step" in str(_errors(_with(flow={"integrator": {"kind": "dopri5",
                                                                            "step": 0.1}})))
    assert "flow.integrator.rtol" in str(_errors(_with(flow={"integrator": {
        "kind": "gradient-descent", "step": 0.1, "rtol": 1e-3}})))


def test_batch_size_needs_sampler_data_and_euler():
    sampler = {"kind": "uniform", "dim": 2, "population": True}
    cfg = parse_config(_with(data=sampler, loss={"name": "square"},
                             flow={"integrator": {"kind": "stochastic-gd", "step": 0.1,
                                                  "batch_size": 8}}))
    assert cfg.flow.integrator == StochasticGDConfig(0.1, 8)
    assert "'stochastic-gd' draws fresh samples each step: it needs sampler data" in str(
        _errors(_with(flow={"integrator": {"kind": "stochastic-gd", "step": 0.1,
                                           "batch_size": 8}})))
    assert "data.n_samples applies only to a fixed sample" in str(
        _errors(_with(data={**sampler, "n_samples": 5}, loss={"name": "square"})))


def test_loss_and_data_must_agree():
    assert "loss.name = 'logistic' needs exactly 2 classes but the data has 3" in str(
        _errors(_with(loss={"name": "logistic"})))
    parse_config(_with(loss={"name": "logistic"},
                       data={"kind": "sklearn", "name": "wine", "classes": [0, 2]}))
    assert "needs class labels, but data.kind = 'uniform' has real-valued targets" in str(
        _errors(_with(data={"kind": "uniform", "dim": 2, "n_samples": 4})))
    assert "does not apply to kind = 'sklearn' (it is a key of kind uniform)" in str(
        _errors(_with(data={"kind": "sklearn", "name": "wine", "radius": 2.0})))
    assert "data.classes [0, 5] must be distinct class ids in 0..2" in str(
        _errors(_with(data={"kind": "sklearn", "name": "wine", "classes": [0, 5]})))


def test_file_data_keys_follow_the_format():
    csv = str(EXAMPLES / "data.csv")
    assert "data.target does not apply to kind = 'npz' (it is a key of kind uniform, " \
        "gaussian, csv)" in str(_errors(_with(data={"kind": "npz", "path": csv, "target": "y"})))
    assert "data.path must end in .npz for kind = 'npz' (got data.csv)" in str(
        _errors(_with(data={"kind": "npz", "path": csv})))


def test_certify_section_is_checked():
    msg = str(_errors(_with(certify={"desingularizers": ["log", "hinge", "pl"],
                                     "mu": {"log": -1.0, "reciprocal": 1.0},
                                     "rayleigh_lower": 0})))
    assert "certify.desingularizers[1]: unknown desingularizer 'hinge'" in msg
    assert "certify.desingularizers[2] 'pl' repeats 'log'" in msg
    assert "certify.mu.log must be > 0 (got -1.0)" in msg
    assert "certify.mu.reciprocal: a stated μ must name one of certify.desingularizers" in msg
    assert "certify.rayleigh_lower must be > 0 (got 0)" in msg


def test_all_errors_reported_together_one_per_line():
    err = _errors(_with(flow={"rtol": -1, "t_mx": 1.0}, loss={"name": "hinge"}, dtype="half"))
    assert len(err.issues) == 4
    lines = str(err).splitlines()
    assert lines[0] == "4 errors in the experiment configuration:"
    assert len(lines) == 5 and all(line.startswith("  ") for line in lines[1:])


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: not valid TOML"):
        load_config(_write(tmp_path, "seed = 0\nname = \n"))
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path / "absent.toml")


def test_missing_data_file_is_resolved_against_the_toml_folder(tmp_path):
    msg = str(_errors(_with(data={"kind": "csv", "path": "nope.csv"})))
    assert "data.path: file not found" in msg and "nope.csv" in msg
    cfg = load_config(_write(tmp_path, f"""
        [model]
        kind = "mlp"
        [data]
        kind = "csv"
        path = "{EXAMPLES / 'data.csv'}"
        [loss]
        name = "logistic"
        """))
    assert cfg.data.path == EXAMPLES / "data.csv"


# ----------------------------------------------------------------------------- building


def _output(problem):
    return problem.model(problem.params, problem.data.x)


def test_mlp_on_wine_matches_data():
    problem, info = build_problem(parse_config(BASE))
    assert _output(problem).shape == (178, 3)
    assert (info["n"], info["k"], info["P"]) == (178, 3, 13 * 8 + 8 + 8 * 3 + 3)
    assert info["groups"] == ["fc1", "out"] and info["model"] == "MLP 13 → 8 → 3 (tanh)"


def test_cnn_on_digits_reshaped_to_image():
    cfg = parse_config(_with(model={"kind": "cnn", "channels": [4, 6], "input_shape": [1, 8, 8],
                                    "pooling": "avg"},
                             data={"kind": "sklearn", "name": "digits", "n_samples": 40}))
    problem, info = build_problem(cfg)
    assert problem.data.x.shape == (40, 1, 8, 8)
    assert _output(problem).shape == (40, info["k"]) and info["k"] == 10
    assert info["groups"] == ["conv1", "conv2", "out"]
    assert isinstance(problem.model.module.pool1, torch.nn.AvgPool2d)
    assert "model.input_shape is required for kind = 'cnn'" in str(
        _errors(_with(model={"kind": "cnn"}, data={"kind": "sklearn", "name": "digits"})))
    too_deep = _with(model={"kind": "cnn", "channels": [2, 2, 2, 2], "input_shape": [1, 8, 8]},
                     data={"kind": "sklearn", "name": "digits", "n_samples": 20})
    with pytest.raises(ConfigError, match="too small for 4 stages of pool 2"):
        build_problem(parse_config(too_deep))


def test_import_factory_from_example_file():
    cfg = load_config(EXAMPLES / "custom_model.toml")
    problem, info = build_problem(cfg)
    assert _output(problem).shape == (120, 3)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in problem.model.module.modules())


def test_import_factory_errors(tmp_path):
    (tmp_path / "bad_model.py").write_text(
        "def not_a_module(**kw):\n    return 3\n\ndef make(width):\n    return None\n")

    def build(factory, kwargs=None):
        raw = _with(model={"kind": "import", "factory": factory, "kwargs": kwargs or {}})
        with pytest.raises(ConfigError) as info:
            build_problem(parse_config(raw, tmp_path / "exp.toml"))
        return str(info.value)

    assert "bad_model.py has no 'absent'; its public callables are: make, not_a_module" in build(
        "bad_model.py:absent")
    assert "returned a int, not a torch.nn.Module" in build("bad_model.py:not_a_module")
    assert "its signature is make(width)" in build("bad_model.py:make", {"depth": 2})
    assert "cannot import module 'no_such_pkg.models'" in build("no_such_pkg.models:make")
    assert "model.factory must be a string" in str(_errors(_with(
        model={"kind": "import", "factory": "just-a-name"})))
    msg = str(_errors(_with(model={"kind": "import", "factory": "missing.py:make"})))
    assert "model.factory: file not found" in msg


def test_wrong_output_width_of_imported_model():
    raw = _with(model={"kind": "import", "factory": f"{EXAMPLES / 'my_model.py'}:make",
                       "kwargs": {"input_dim": 13, "output_dim": 5}})
    with pytest.raises(ConfigError, match="returns 5 outputs per sample but loss "
                                          "'cross-entropy' on this data needs 3"):
        build_problem(parse_config(raw))


def test_csv_and_npz_loading(tmp_path):
    cfg = parse_config(_with(data={"kind": "csv", "path": str(EXAMPLES / "data.csv"),
                                   "n_samples": 30}, loss={"name": "logistic"}))
    problem, info = build_problem(cfg)
    assert (info["n"], info["k"]) == (30, 1) and _output(problem).shape == (30, 1)
    typo = _with(data={"kind": "csv", "path": str(EXAMPLES / "data.csv"), "target": "label"})
    with pytest.raises(ConfigError, match="'label' is not a column.*its header is x1, x2, y"):
        build_problem(parse_config(typo))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(25, 3)), y=rng.normal(size=(25, 2)))
    cfg = parse_config(_with(data={"kind": "npz", "path": "d.npz"}, loss={"name": "square"}),
                       tmp_path / "exp.toml")
    problem, info = build_problem(cfg)
    assert (info["n"], info["k"]) == (25, 2) and _output(problem).shape == (25, 2)
    with pytest.raises(ConfigError, match="integer class labels"):
        build_problem(dataclasses.replace(cfg, loss=config.LossConfig("cross-entropy")))


def test_population_data_gives_a_sampler_and_runs_stochastic_euler():
    cfg = parse_config(_with(data={"kind": "gaussian", "dim": 3, "population": True},
                             loss={"name": "square"},
                             flow={"integrator": {"kind": "stochastic-gd", "step": 0.1,
                                                  "batch_size": 16},
                                   "t_max": 0.5, "records": {"kind": "log", "n": 3},
                                   "eval_size": 64}))
    problem, info = build_problem(cfg)
    assert isinstance(problem.data, Sampler) and info["n"] is None and info["k"] == 1
    batch = problem.data.sample(5, torch.Generator().manual_seed(0))
    assert batch.x.shape == (5, 3) and batch.y.shape == (5, 1)
    result = gradient_flow(problem, **flow_kwargs(cfg))
    assert result.status is FlowStatus.T_MAX


def test_synthetic_fixed_samples_and_square_one_hot():
    cfg = parse_config(_with(data={"kind": "teacher-student", "dim": 4, "outputs": 3,
                                   "classify": True, "n_samples": 20},
                             loss={"name": "square", "one_hot": True}))
    problem, info = build_problem(cfg)
    assert isinstance(problem.data, Dataset) and problem.data.y.shape == (20, 3)
    assert set(problem.data.y.sum(1).tolist()) == {1.0} and info["k"] == 3
    cfg = parse_config(_with(data={"kind": "uniform", "dim": 2, "n_samples": 10},
                             loss={"name": "square"}, dtype="float32"))
    problem, _ = build_problem(cfg)
    assert problem.data.x.dtype == torch.float32 and problem.params["out.weight"].dtype == \
        torch.float32


def test_seeded_initialization_and_init_scale():
    state = torch.random.get_rng_state()
    a, _ = build_problem(parse_config(BASE))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b, _ = build_problem(parse_config(BASE))
    c, _ = build_problem(parse_config({**BASE, "seed": 1}))
    d, _ = build_problem(parse_config(_with(model={"init_scale": 2.0})))
    w = "fc1.weight"
    assert torch.equal(a.params[w], b.params[w]) and not torch.equal(a.params[w], c.params[w])
    assert torch.allclose(d.params[w], 2 * a.params[w])


def test_shape_conflicts_are_config_errors():
    assert "model.output_dim = 2 but loss 'cross-entropy' on this data needs 3" in str(
        _errors(_with(model={"output_dim": 2})))
    assert "model.input_dim = 5 but the data has 13 features" in str(
        _errors(_with(model={"input_dim": 5})))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            build_problem(parse_config({**BASE, "device": "cuda"}))
    assert "device 'tpu' is not one of cpu, cuda, cuda:N" in str(_errors({**BASE,
                                                                          "device": "tpu"}))


def test_example_experiment_loads_builds_and_flows():
    cfg = load_config(EXAMPLES / "my_experiment.toml")
    assert isinstance(cfg.flow, FlowConfig) and cfg.name == "wine-mlp"
    problem, info = build_problem(cfg)
    assert _output(problem).shape == (info["n"], info["k"])
    short = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, t_max=0.5,
                                                              records=LogRecordsConfig(3)))
    result = gradient_flow(problem, **flow_kwargs(short))
    assert result.status is FlowStatus.T_MAX
    assert result.trajectory["loss"][-1] < result.trajectory["loss"][0]


def test_docstring_examples(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    for module in (config, builders):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_cnn_config_defaults_are_documented():
    assert CNNConfig().channels == (8, 16) and CNNConfig().input_shape is None


# model, data and loss of the flow-table files below: lines 1-7 once dedented
_IRIS_MLP = """
        [model]
        kind = "mlp"
        [data]
        kind = "sklearn"
        name = "iris"
        [loss]
        name = "cross-entropy"
"""


def test_flow_tables_read_check_and_round_trip(tmp_path):
    raw = _with(flow={"t_max": 5.0, "integrator": {"kind": "gradient-descent", "step": 0.1},
                      "records": {"kind": "every", "steps": 10},
                      "stop": {"loss_below": 1e-4, "max_evals": 200}})
    cfg = parse_config(raw)
    kw = cfg.flow.kwargs()
    assert kw["integrator"] == rf.GradientDescent(0.1) and kw["records"] == rf.Every(10)
    assert kw["stops"] == [rf.LossBelow(1e-4), rf.MaxEvals(200)]
    text = config_to_toml(cfg)
    assert "[flow.integrator]" in text and 'kind = "every"' in text
    assert parse_config(tomllib.loads(text)) == cfg
    path = _write(tmp_path, _IRIS_MLP + """\
        [flow]
        step = 0.1
        [flow.integrator]
        kind = "dopri5"
        stepp = 0.1
        [flow.records]
        kind = "every"
        steps = 3
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = {i.path: (i.line, i.message) for i in info.value.issues}
    assert found["flow.step"][0] == 9
    assert "belongs in [flow.integrator] (kind = 'gradient-descent'" in found["flow.step"][1]
    assert found["flow.integrator.stepp"][0] == 12
    assert "allowed keys in [flow.integrator]: kind, rtol, atol" in found[
        "flow.integrator.stepp"][1]
    assert "with kind = 'dopri5' use records kind = 'log'" in found["flow.records.kind"][1]


def test_flat_flow_keys_get_one_error_naming_their_table(tmp_path):
    path = _write(tmp_path, _IRIS_MLP + """\
        [flow]
        method = "euler"
        step = 0.2
        t_max = 4.0
        n_records = 7
        loss_target = 0.01
        max_steps = 10
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = {i.path: i.message for i in info.value.issues}
    assert "belongs in [flow.integrator] as kind = 'gradient-descent'" in found["flow.method"]
    assert "belongs in [flow.records] as n" in found["flow.n_records"]
    assert "belongs in [flow.stop] as loss_below" in found["flow.loss_target"]
    assert "belongs in [flow.stop] as max_evals" in found["flow.max_steps"]
    from rayleighflow.cli import main

    with pytest.raises(SystemExit):   # the migrate command is gone with the flat form
        main(["migrate", str(path)])
