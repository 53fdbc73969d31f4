"""Bad input: each a clear error, raised before anything large is allocated."""

import pytest
import torch
from torch import nn

from cases import CASES, inputs
from rayleighflow.ntk import (
    KernelTooLargeError,
    NTKOperator,
    empirical_ntk,
    ntk_spectrum,
    plan_ntk,
)
from rayleighflow.problem import Model, NondeterministicModelError


def test_mismatched_feature_shapes():
    case = CASES["mlp_relu"]
    with pytest.raises(ValueError, match="different feature shapes"):
        empirical_ntk(case.build(), inputs(case, 3), torch.randn(3, 5, dtype=torch.float64))


def test_empty_data():
    case = CASES["mlp_relu"]
    with pytest.raises(ValueError, match="empty"):
        empirical_ntk(case.build(), torch.empty(0, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        NTKOperator(case.build(), torch.empty(0, 4, dtype=torch.float64))


def test_zero_parameter_models():
    with pytest.raises(ValueError, match="no parameters"):
        empirical_ntk(nn.Sequential(nn.Tanh()), torch.randn(3, 2))
    case = CASES["mlp_relu"]
    with pytest.raises(ValueError, match="no parameters"):
        empirical_ntk(case.build(), inputs(case, 3), params={})


def test_nondeterministic_layers_refused_unless_allowed():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(NondeterministicModelError, match="dropout"):
        empirical_ntk(net, torch.randn(3, 3))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(NondeterministicModelError, match="batch-norm"):
        empirical_ntk(bn, torch.randn(3, 3))
    Model(net, allow_nondeterministic=True)  # allowed explicitly: accepted
    k = empirical_ntk(net.eval(), torch.randn(3, 3))
    assert k.shape == (3, 3, 2, 2)


def test_kernel_that_cannot_fit_says_so_with_the_size_needed():
    case = CASES["mlp_tanh"]
    with pytest.raises(KernelTooLargeError, match=r"needs about .* max_memory"):
        plan_ntk(case.build(), inputs(case, 10), max_memory="1kB")
    with pytest.raises(KernelTooLargeError, match="max_memory"):
        empirical_ntk(case.build(), inputs(case, 10), max_memory=500)


def test_result_larger_than_free_memory_is_refused_before_allocating():
    # 1e6 samples x 1e6 samples x 3 x 3 float64 = 72 TB: refused by the result check.
    case = CASES["mlp_tanh"]
    model = case.build()
    x = torch.zeros(1, 4, dtype=torch.float64).expand(1_000_000, 4)
    with pytest.raises(KernelTooLargeError, match=r"kernel itself needs .* TB"):
        empirical_ntk(model, x)


def test_bad_options():
    case = CASES["mlp_tanh"]
    model, x = case.build(), inputs(case, 3)
    with pytest.raises(ValueError, match="unknown NTK method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="unknown kernel kind"):
        empirical_ntk(model, x, kind="blocks")
    with pytest.raises(ValueError, match="convention"):
        empirical_ntk(model, x, convention="avg")
    with pytest.raises(ValueError, match="memory size"):
        empirical_ntk(model, x, max_memory="lots")
    with pytest.raises(ValueError, match="weights"):
        empirical_ntk(model, x, weights1=torch.ones(3))
    with pytest.raises(ValueError, match="block_size"):
        empirical_ntk(model, x, block_size=0)
    with pytest.raises(TypeError, match="Model or an nn.Module"):
        empirical_ntk(lambda p, x: x, x)
    with pytest.raises(ValueError, match="P < nk"):
        ntk_spectrum(model, x, route="dual")
