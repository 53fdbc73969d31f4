"""Materialized kernels: every algorithm against the dense jacrev reference and each other."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cases import CASES, assert_close, inputs
from rayleighflow.ntk import (
    KernelKind,
    NTKMethod,
    NTKOperator,
    _terms,
    empirical_ntk,
    group_ntk,
    kernel_matrix,
    plan_ntk,
)
from rayleighflow.problem import Model
from rayleighflow.reference import dense_gram, dense_jacobian

METHODS = ["jacobian", "kvp", "structured", "auto"]

# nn.MultiheadAttention (the "attention" case) warns from inside torch about vmap fallbacks.
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]



def _ref(model, x1, x2=None):
    return dense_gram(model, model.params, x1, x2)


@pytest.mark.oldest
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_symmetric_kernel_matches_dense_reference(name, method):
    case = CASES[name]
    model, x = case.build(), inputs(CASES[name], 5)
    k = empirical_ntk(model, x, convention="sum", method=method)
    assert k.shape[:2] == (5, 5) and k.shape[2] == k.shape[3]
    assert_close(kernel_matrix(k), _ref(model, x), what=f"{name}/{method}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_cross_kernel_with_uneven_tiles(name, method):
    case = CASES[name]
    model = case.build()
    x1, x2 = inputs(case, 5, seed=1), inputs(case, 4, seed=2)
    k = empirical_ntk(model, x1, x2, convention="sum", method=method, block_size=2)
    assert k.shape[:2] == (5, 4)
    assert_close(kernel_matrix(k), _ref(model, x1, x2), what=f"{name}/{method}")


@pytest.mark.parametrize("name", list(CASES))
def test_structured_path_accepts_and_refuses_the_expected_layers(name):
    case = CASES[name]
    plan = plan_ntk(case.build(), inputs(case, 4), method="structured")
    assert set(plan.structured_layers) == set(case.structured)
    refused = {r.split(" ")[0] for r in plan.rejected_layers}
    assert set(case.rejected) <= refused


KIND_CASES = [(name, method) for name in ("mlp_tanh", "tokens_layernorm", "conv1d")
              for method in ("jacobian", "kvp", "structured")] + [("cnn", "structured")]


@pytest.mark.parametrize("kind", ["trace", "diagonal"])
@pytest.mark.parametrize(("name", "method"), KIND_CASES)
def test_trace_and_diagonal_are_parts_of_the_exact_blocks(name, method, kind):
    case = CASES[name]
    model, x1, x2 = case.build(), inputs(case, 5), inputs(case, 3, seed=3)
    for second in (None, x2):
        full = empirical_ntk(model, x1, second, convention="sum", method="structured")
        part = empirical_ntk(model, x1, second, kind=kind, convention="sum", method=method,
                             block_size=2)
        diag = full.diagonal(dim1=2, dim2=3)
        assert_close(part, diag.sum(-1) if kind == "trace" else diag, what=kind)


@pytest.mark.parametrize("name", ["mlp_relu", "cnn", "tokens_layernorm"])
def test_mean_convention_with_weights_scales_by_root_weights(name):
    case = CASES[name]
    model, x1, x2 = case.build(), inputs(case, 6), inputs(case, 4, seed=5)
    w1 = torch.rand(6, dtype=torch.float64) + 0.1
    w1 /= w1.sum()
    w2 = torch.rand(4, dtype=torch.float64) + 0.1
    w2 /= w2.sum()
    g = _ref(model, x1, x2)
    kk = g.shape[0] // 6
    s1, s2 = w1.sqrt().repeat_interleave(kk), w2.sqrt().repeat_interleave(kk)
    got = empirical_ntk(model, x1, x2, weights1=w1, weights2=w2)
    assert_close(kernel_matrix(got), s1[:, None] * g * s2[None, :])
    uniform = empirical_ntk(model, x1)  # mean, uniform weights: G / n
    assert_close(kernel_matrix(uniform), _ref(model, x1) / 6)
    summed = empirical_ntk(model, x1, weights1=w1, convention="sum")  # ω = n w
    s = (6 * w1).sqrt().repeat_interleave(kk)
    assert_close(kernel_matrix(summed), s[:, None] * _ref(model, x1) * s[None, :])


@pytest.mark.parametrize("method", ["jacobian", "kvp", "structured"])
def test_group_kernels_sum_to_the_kernel_and_match_jacobian_blocks(method):
    case = CASES["tokens_layernorm"]
    model, x = case.build(), inputs(case, 5)
    parts = group_ntk(model, x, convention="sum", method=method, block_size=3)
    assert set(parts) == set(model.groups)
    jac = dense_jacobian(model, model.params, x)
    offsets, start = {}, 0
    for name, p in model.params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    for group, names in model.groups.items():
        cols = torch.cat([torch.arange(*offsets[n]) for n in names])
        jb = jac[..., cols].reshape(-1, cols.numel())
        assert_close(kernel_matrix(parts[group]), jb @ jb.T, what=group)
    assert_close(kernel_matrix(sum(parts.values())), _ref(model, x))


def test_group_split_of_weight_and_bias_in_the_structured_path():
    case = CASES["mlp_tanh"]
    model, x = case.build(), inputs(case, 4)
    groups = {"weights": [n for n in model.params if n.endswith("weight")],
              "biases": [n for n in model.params if n.endswith("bias")]}
    ref = group_ntk(model, x, groups=groups, method="jacobian", convention="sum")
    got = group_ntk(model, x, groups=groups, method="structured", convention="sum")
    for g in groups:
        assert_close(got[g], ref[g], what=g)


@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("method", ["jacobian", "structured"])
@pytest.mark.parametrize("name", list(CASES))
def test_block_symmetric_contraction_matches_dense_reference(name, method, kind, monkeypatch):
    # Diagonal tiles are contracted by block rows (upper block triangle, then mirrored) once
    # they have _SYM_ROWS rows per block; made tiny here so that small cases take that path.
    monkeypatch.setattr(_terms, "_SYM_ROWS", 2)
    case = CASES[name]
    model, x = case.build(), inputs(case, 7)
    got = empirical_ntk(model, x, convention="sum", method=method, kind=kind)
    ref = _ref(model, x)
    n = x.shape[0]
    k = ref.shape[0] // n
    if kind == "full":
        m = kernel_matrix(got)
        assert torch.equal(m, m.T)  # mirrored: exactly symmetric
        assert_close(m, ref, what=f"{name}/{method}")
        return
    diag = ref.view(n, k, n, k).permute(0, 2, 1, 3).diagonal(dim1=2, dim2=3)
    want = diag.sum(-1) if kind == "trace" else diag
    assert torch.equal(got, got.transpose(0, 1))
    assert_close(got, want, what=f"{name}/{method}/{kind}")


@pytest.mark.parametrize("use_grad", [False, True])
@pytest.mark.parametrize("name", ["cnn", "conv1d", "residual", "tokens_layernorm", "mlp_tanh"])
def test_both_contraction_orders_match_dense_reference(name, use_grad, monkeypatch):
    # Each structured layer is contracted either from its input-patch and output-signal
    # Grams or from per-sample gradients; the cost model picks one, both must be exact.
    from rayleighflow.ntk import plan as plan_mod

    real = plan_mod._layers_of

    def forced(*args):
        layers = real(*args)
        for ly in layers:
            ly.use_grad = use_grad
        return layers

    monkeypatch.setattr(plan_mod, "_layers_of", forced)
    monkeypatch.setattr(plan_mod, "_decide_order", lambda ly, outer, grad: ly.use_grad)
    case = CASES[name]
    model, x = case.build(), inputs(case, 5)
    got = empirical_ntk(model, x, convention="sum", method="structured")
    assert_close(kernel_matrix(got), _ref(model, x), what=f"{name}/use_grad={use_grad}")


def test_output_layer_takes_the_identity_shortcut():
    from rayleighflow.ntk._common import as_model
    from rayleighflow.ntk.kernel import _request
    from rayleighflow.ntk.plan import build_plan

    case = CASES["mlp_tanh"]
    model, x = as_model(case.build()), inputs(case, 4)
    req = _request(model, x, None, None, "full", "sum", None, None)
    _, engine = build_plan(req, {"all": list(req.params)}, NTKMethod.STRUCTURED, None, None,
                           None)
    with torch.enable_grad():
        terms = engine.features(x)
    assert [t.eye for t in terms] == [False] * (len(terms) - 1) + [True]


@pytest.mark.parametrize("name", ["mlp_gelu_single", "cnn", "attention"])
def test_symmetric_and_positive_semidefinite(name):
    case = CASES[name]
    model, x = case.build(), inputs(case, 9)
    m = kernel_matrix(empirical_ntk(model, x, block_size=4))
    assert torch.equal(m, m.T)  # the mirrored tiles are exact transposes
    lam = torch.linalg.eigvalsh(m)
    assert float(lam.min()) >= -1e-12 * float(lam.max())


@pytest.mark.parametrize("bias", [False, True])
def test_linear_model_kernel_is_gram_of_inputs_times_identity(bias):
    torch.manual_seed(0)
    net = nn.Linear(6, 4, bias=bias).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    xx = x @ x.T + (1.0 if bias else 0.0)
    want = torch.kron(xx, torch.eye(4, dtype=torch.float64))
    for method in ("jacobian", "kvp", "structured"):
        got = kernel_matrix(empirical_ntk(net, x, convention="sum", method=method))
        assert torch.allclose(got, want, rtol=1e-14, atol=1e-13), method


def test_float32_agrees_with_float64_reference_within_dtype_tolerance():
    case = CASES["cnn"]
    model64, x = case.build(), inputs(case, 6)
    ref = _ref(model64, x)
    model32 = Model(model64.module.float())
    for method in ("jacobian", "structured"):
        got = kernel_matrix(empirical_ntk(model32, x.float(), convention="sum", method=method))
        assert got.dtype == torch.float32
        assert_close(got, ref, torch.float32, what=method)


def test_auto_policy_picks_structured_for_layers_and_jacobian_for_functions():
    mlp = CASES["mlp_relu"]
    assert plan_ntk(mlp.build(), inputs(mlp, 8)).method is NTKMethod.STRUCTURED
    fn = CASES["callable"]
    plan = plan_ntk(fn.build(), inputs(fn, 8))
    assert plan.method in (NTKMethod.JACOBIAN, NTKMethod.KVP)
    assert plan.costs["jacobian"] > 0 and "structured" not in plan.costs


def test_small_memory_budget_tiles_and_still_matches():
    case = CASES["mlp_tanh"]
    model, x = case.build(), inputs(case, 23)
    plan = plan_ntk(model, x, max_memory=20_000)
    assert plan.n_tiles > 1 and plan.working_bytes <= 20_000
    got = empirical_ntk(model, x, convention="sum", max_memory=20_000)
    assert_close(kernel_matrix(got), _ref(model, x))


def test_jacobian_contracts_parameter_chunks_when_one_jacobian_does_not_fit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 3)).double()
    x = torch.randn(4, 40, dtype=torch.float64)
    plan = plan_ntk(net, x, method="jacobian", max_memory=300_000)
    assert plan.n_passes > 1
    got = empirical_ntk(net, x, convention="sum", method="jacobian", max_memory=300_000)
    assert_close(kernel_matrix(got), _ref(Model(net), x))


@pytest.mark.parametrize("method", ["jacobian", "kvp", "structured"])
def test_works_inside_no_grad(method):
    case = CASES["tokens_layernorm"]
    model, x = case.build(), inputs(case, 4)
    want = empirical_ntk(model, x, method=method)
    with torch.no_grad():
        got = empirical_ntk(model, x, method=method)
        op = NTKOperator(model, x)
        v = torch.ones(8, dtype=torch.float64)
        assert_close(op.matvec(v), kernel_matrix(want) @ v)
    assert_close(got, want)


def test_result_assembled_on_requested_device():
    case = CASES["mlp_relu"]
    got = empirical_ntk(case.build(), inputs(case, 4), out_device="cpu", block_size=3)
    assert got.device.type == "cpu"


@settings(max_examples=15, deadline=None)
@given(n1=st.integers(1, 9), n2=st.integers(1, 7), block=st.integers(1, 10),
       kind=st.sampled_from(list(KernelKind)), cross=st.booleans())
def test_any_sizes_and_blocks_no_divisibility(n1, n2, block, kind, cross):
    case = CASES["mlp_tanh"]
    model = case.build()
    x1, x2 = inputs(case, n1, seed=n1), inputs(case, n2, seed=100 + n2)
    second = x2 if cross else None
    want = empirical_ntk(model, x1, second, kind=kind, convention="sum", method="jacobian")
    got = empirical_ntk(model, x1, second, kind=kind, convention="sum", block_size=block)
    assert_close(got, want)


def _engine(model, x):
    from rayleighflow.ntk._common import as_model
    from rayleighflow.ntk.kernel import _request
    from rayleighflow.ntk.plan import build_plan

    req = _request(as_model(model), x, None, None, "full", "sum", None, None)
    return build_plan(req, {"all": list(req.params)}, NTKMethod.STRUCTURED, None, None,
                      None)[1]


@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_relu", "mlp_gelu_single"])
def test_sequential_chain_route_equals_the_autograd_route_and_the_dense_kernel(name,
                                                                              monkeypatch):
    from rayleighflow.ntk import structured

    case = CASES[name]
    model, x = case.build(), inputs(case, 6)
    assert _engine(model, x).chain is not None
    chain = empirical_ntk(model, x, convention="sum", method="structured")
    monkeypatch.setattr(structured, "chain_of", lambda *a: None)
    assert _engine(model, x).chain is None
    general = empirical_ntk(model, x, convention="sum", method="structured")
    assert_close(kernel_matrix(chain), kernel_matrix(general), what=f"{name} chain/autograd")
    assert_close(kernel_matrix(chain), _ref(model, x), what=f"{name} chain/dense")


class _MySequential(nn.Sequential):
    pass


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _lookalikes():
    def seq(*mods):
        torch.manual_seed(0)
        return nn.Sequential(*mods).double()

    hooked = seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    hooked[1].register_forward_hook(lambda m, a, out: 3.0 * out)
    instance = seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    inner = instance[2].forward
    instance[2].forward = lambda x: inner(x) + 1.0
    torch.manual_seed(0)
    return {
        "sequential subclass": _MySequential(nn.Linear(3, 5), nn.Tanh(),
                                             nn.Linear(5, 2)).double(),
        "forward hook": hooked,
        "instance forward": instance,
        "layer norm inside": seq(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2)),
        "activation last": seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Tanh()),
        "a Linear subclass": seq(nn.Linear(3, 5), nn.Tanh(), _ScaledLinear(5, 2)),
    }


@pytest.mark.parametrize("what", list(_lookalikes()))
def test_chain_lookalikes_take_the_autograd_route_and_stay_exact(what):
    net = _lookalikes()[what]
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _engine(net, x).chain is None
    model = Model(net)
    got = empirical_ntk(model, x, convention="sum", method="structured")
    assert_close(kernel_matrix(got), _ref(model, x), what=what)
