"""Plan cache: the probe runs once per (structure, shapes, dtype, device, input shape), and it
is one forward pass (a backward too only for functions outside the traced row-wise ones)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
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


# ----------------------------------------------------------------------------------------------
# the probe costs one forward pass: counted, not timed


def _count_passes(monkeypatch, module: nn.Module | None) -> dict[str, int]:
    """Counts calls of the model's forward (a pre-hook on the root module) and of autograd."""
    seen = {"forwards": 0, "backwards": 0}
    if module is not None:
        module.register_forward_pre_hook(lambda *_: seen.__setitem__("forwards",
                                                                   seen["forwards"] + 1))
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        seen["backwards"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return seen


TRACED = ("mlp_tanh", "mlp_relu", "mlp_gelu_single", "cnn", "conv1d", "tokens_layernorm",
          "linear", "tied", "direct_use", "grouped_conv", "residual")


@pytest.mark.parametrize("name", [n for n in CASES if n != "callable"])
def test_cold_plan_runs_one_forward_and_a_warm_plan_none(monkeypatch, name):
    clear_plan_cache()
    case = CASES[name]
    model, x = case.build(), inputs(case, 6)
    seen = _count_passes(monkeypatch, model.module)
    cold = plan_ntk(model, x, method="structured")
    # one forward; a backward (on the ≤ 3 probe samples) only outside the traced vocabulary
    assert seen == {"forwards": 1, "backwards": 0 if name in TRACED else 1}, seen
    assert cold.probe == "probed" and cold.probe_passes == (1, seen["backwards"])
    warm = plan_ntk(model, x, method="structured")
    assert seen["forwards"] == 1 and warm.probe == "cached"
    assert warm.probe_passes == cold.probe_passes  # what the probe behind the plan ran


def test_plain_function_model_is_probed_with_one_forward(monkeypatch):
    case = CASES["callable"]
    model = case.build()
    calls = [0]
    fn = model._fn

    def counted(p, x):
        calls[0] += 1
        return fn(p, x)

    model._fn = counted
    seen = _count_passes(monkeypatch, None)
    plan = plan_ntk(model, inputs(case, 5))
    assert calls[0] == 1 and seen["backwards"] == 0 and plan.probe_passes == (1, 0)


def _two_layer(mix) -> Model:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(torch.tanh(mix(self.a(x))))

    torch.manual_seed(0)
    return Model(Net().double())


ROW_WISE = {  # per-sample functions the trace must prove (no backward needed)
    "centre features": lambda h: h - h.mean(1, keepdim=True),
    "softmax over features": lambda h: torch.softmax(h, -1) * h,
    "unsqueeze/squeeze": lambda h: h.unsqueeze(1).squeeze(1) * 2,
    "slice and reduce": lambda h: h + h[:, :3].sum(-1, keepdim=True),
    "concatenate features": lambda h: torch.cat([h, h], 1)[:, :5],
    "layer norm": lambda h: F.layer_norm(h, (5,)),
    "constant matrix": lambda h: h @ torch.eye(5, dtype=h.dtype),
    "reshape per sample": lambda h: h.reshape(h.shape[0], 5, 1).flatten(1),
}
MIXING = {  # samples of the batch interact: layer "a" must be refused
    "centre the batch": lambda h: h - h.mean(0, keepdim=True),
    "roll the batch": lambda h: torch.roll(h, 1, 0) + h,
    "softmax over the batch": lambda h: torch.softmax(h, 0) * h,
    "gram over the batch": lambda h: h @ (h.T @ h) / 10,
    "rotate by concatenation": lambda h: torch.cat([h[1:], h[:1]], 0) + h,
    "flatten the batch": lambda h: h.reshape(-1).flip(0).reshape(h.shape) + h,
    "einsum over the batch": lambda h: torch.einsum("bi,ci->bi", h, h),
}


@pytest.mark.parametrize("name", list(ROW_WISE))
def test_row_wise_forwards_are_proved_by_the_trace(monkeypatch, name):
    clear_plan_cache()
    model = _two_layer(ROW_WISE[name])
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = _count_passes(monkeypatch, model.module)
    plan = plan_ntk(model, x, method="structured")
    assert seen == {"forwards": 1, "backwards": 0}
    assert plan.structured_layers == ("a", "b") and plan.rejected_layers == ()
    k = empirical_ntk(model, x, convention="sum", method="structured", block_size=4)
    assert_close(kernel_matrix(k), dense_gram(model, model.params, x), what=name)


@pytest.mark.parametrize("name", list(MIXING))
def test_batch_mixing_falls_back_to_the_backward_check(monkeypatch, name):
    clear_plan_cache()
    model = _two_layer(MIXING[name])
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = _count_passes(monkeypatch, model.module)
    plan = plan_ntk(model, x, method="structured")
    assert seen == {"forwards": 1, "backwards": 1}
    assert plan.structured_layers == ("b",)
    assert plan.rejected_layers == ("a (samples of a batch interact through it)",)
