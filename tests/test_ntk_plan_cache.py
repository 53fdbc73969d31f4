"""Plan cache: the probe runs once per (structure, shapes, dtype, device, input shape)."""

import dataclasses

import torch
from torch import nn

from cases import CASES, assert_close, inputs
from rayleighflow.ntk import empirical_ntk, kernel_matrix, plan_ntk
from rayleighflow.ntk.plan import clear_plan_cache, plan_cache_info
from rayleighflow.problem import Model
from rayleighflow.reference import dense_gram


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_second_plan_reuses_the_probe_and_is_the_same_plan():
    clear_plan_cache()
    net, x = _net(), torch.randn(7, 4, dtype=torch.float64)
    first, second = plan_ntk(net, x), plan_ntk(net, x)
    assert (first.probe, second.probe) == ("probed", "cached")
    assert dataclasses.replace(second, probe="probed") == first
    info = plan_cache_info()
    assert info["hits"] == 1 and info["misses"] == 1 and info["entries"] == 1


def test_cached_kernel_matches_dense_reference_after_weights_change():
    clear_plan_cache()
    case = CASES["cnn"]
    model, x = case.build(), inputs(case, 5)
    empirical_ntk(model, x, convention="sum")
    with torch.no_grad():  # values change, structure does not: the cached plan still holds
        for p in model.module.parameters():
            p.mul_(1.5)
    model2 = type(model)(model.module)
    assert plan_ntk(model2, x).probe == "cached"
    k = empirical_ntk(model2, x, convention="sum")
    assert_close(kernel_matrix(k), dense_gram(model2, model2.params, x), what="cached cnn")


def test_new_input_shape_dtype_or_tying_is_a_new_probe():
    clear_plan_cache()
    net = _net()
    x = torch.randn(7, 4, dtype=torch.float64)
    plan_ntk(net, x)
    assert plan_ntk(net, x[:2]).probe == "probed"  # a probe batch of 2, not 3
    assert plan_ntk(net.float(), x.float()).probe == "probed"
    net = _net()
    plan_ntk(net, x)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    assert plan_ntk(tied, x).structured_layers == ("0", "2")
    tied[2].weight = tied[0].weight  # now tied: the structured path must refuse both
    plan = plan_ntk(tied, x)
    assert plan.probe == "probed" and plan.structured_layers == ()
    k = empirical_ntk(tied, x, convention="sum")
    m = Model(tied)
    assert_close(kernel_matrix(k), dense_gram(m, m.params, x), what="tied after cache")
