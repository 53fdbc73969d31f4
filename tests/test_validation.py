"""Bad input gets one clear error naming the problem and the fix."""

import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.data import Dataset
from rayleighflow.flow import gradient_flow
from rayleighflow.problem import Model, NondeterministicModelError, Problem


def _net(*extra):
    return nn.Sequential(nn.Linear(3, 8), *extra, nn.Tanh(), nn.Linear(8, 2)).double()


def _data(n=5, y=None):
    x = torch.randn(n, 3, dtype=torch.float64)
    return Dataset.from_arrays(x, torch.randint(0, 2, (n,)) if y is None else y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_data(bad):
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        Dataset.from_arrays(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="y contains"):
        Dataset.from_arrays(torch.zeros(4, 3), torch.tensor([0.0, bad, 1.0, 2.0]))


def test_label_out_of_range():
    data = _data(y=torch.tensor([0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"label out of range.*\[0, 1\]"):
        Problem(Model(_net()), data, "cross-entropy")


def test_shape_mismatch_between_output_and_targets():
    data = Dataset.from_arrays(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"output has shape \(5, 2\).*\(5, 3\)"):
        Problem(Model(_net()), data, "square")


def test_sample_count_mismatch_and_empty_data():
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        Dataset.from_arrays(torch.randn(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        Dataset.from_arrays(torch.zeros(0, 3), torch.zeros(0))


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(8)])
def test_random_layers_in_training_mode_are_refused(layer):
    net = _net(layer)
    with pytest.raises(NondeterministicModelError, match="training mode.*eval()"):
        Model(net)
    Model(net.eval())  # eval mode is deterministic: accepted
    Model(net.train(), allow_nondeterministic=True)  # explicit opt-in: accepted


def test_random_function_is_detected():
    def noisy(params, x):
        return x @ params["W"] + 1e-3 * torch.randn(x.shape[0], 2, dtype=x.dtype)

    model = Model(noisy, {"W": torch.zeros(3, 2, dtype=torch.float64)})
    with pytest.raises(NondeterministicModelError, match="different outputs"):
        Problem(model, _data(), "cross-entropy")


def test_bad_weights_and_conventions():
    with pytest.raises(ValueError, match="sum to"):
        Dataset.from_arrays(torch.randn(2, 3), torch.zeros(2), torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="weights must be > 0"):
        Dataset.from_arrays(torch.randn(2, 3), torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="convention"):
        Problem(Model(_net()), _data(), "cross-entropy", "median")


def test_zero_parameter_model_and_unknown_group():
    with pytest.raises(ValueError, match="no parameters"):
        Model(nn.Tanh())
    with pytest.raises(ValueError, match="unknown parameter"):
        Model(_net(), groups={"a": ["nope"]})


def test_non_finite_initial_output():
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        Problem(Model(net), _data(), "cross-entropy")


def test_failed_flow_writes_complete_records(tmp_path):
    pb = Problem(Model(_net()), _data(), "cross-entropy")
    res = gradient_flow(pb, integrator=rf.GradientDescent(1e6), t_max=1e9,
                        path=tmp_path / "t.jsonl",
                        records=rf.Times([1e6 * k for k in range(1, 100)]))
    text = (tmp_path / "t.jsonl").read_text().splitlines()
    assert '"type": "end"' in text[-1] and res.status.value in text[-1]


def test_integer_inputs_are_cast_unless_indices():
    x = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert Dataset.from_arrays(x, torch.tensor([0, 1])).x.dtype == torch.float64
    kept = Dataset.from_arrays(x, torch.tensor([0, 1]), index_inputs=True)
    assert kept.x.dtype == torch.int64
    w = Dataset.from_arrays(x, torch.tensor([0, 1]), torch.tensor([0.5, 0.5000004]))
    assert float(w.weights.sum()) == 1.0
