"""Named inputs (a mapping of tensors sharing the batch dimension, Hugging Face style) for
empirical_ntk, NTKOperator, ntk_spectrum, dual_gram and the monitor's probe, against a float64
torch.func reference written here: jacrev of the whole batch's outputs, K = J Jᵀ.

The default suite uses a small hand-written keyword-input module (embedding, a per-position
Linear, masked self-attention with a data-dependent shortcut as Hugging Face's masks have, a
LayerNorm, a masked mean pool, a Linear head, and an output object with ``.logits``); the
``huggingface`` marker adds a tiny randomly initialised BERT classifier from transformers."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from rayleighflow.monitor import Monitor
from rayleighflow.ntk import (
    NTKOperator,
    ShardedNTKOperator,
    clear_plan_cache,
    dual_gram,
    empirical_ntk,
    kernel_matrix,
    ntk_spectrum,
    plan_ntk,
)
from rayleighflow.problem import Model

METHODS = ["structured", "jacobian", "kvp", "auto"]
TOL = 1e-10

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]


class Tagger(nn.Module):
    """A BERT-like classifier in miniature, called ``module(input_ids=..., attention_mask=...)``
    (optionally a float ``scale`` per token), returning an object with ``.logits``. With
    ``shortcut`` its forward branches on the mask's values (so vmap refuses it)."""

    def __init__(self, vocab: int = 11, d: int = 6, k: int = 3, shortcut: bool = True) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, input_ids, attention_mask, scale=None):
        h = self.emb(input_ids)
        if scale is not None:
            h = h * scale.unsqueeze(-1)
        h = torch.tanh(self.mix(h))
        scores = h @ h.transpose(-1, -2) / math.sqrt(h.shape[-1])
        if not (self.shortcut and bool((attention_mask == 1).all())):   # as Hugging Face's
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        h = torch.softmax(scores, -1) @ h
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (self.norm(h) * m).sum(1) / m.sum(1)
        return SimpleNamespace(logits=self.head(pooled))


def tagger(seed: int = 0, shortcut: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return Tagger(shortcut=shortcut).double().eval()


def named_batch(n: int = 5, length: int = 6, vocab: int = 11, seed: int = 1,
                scale: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1 % n, length - 2:] = 0        # padded samples
    mask[(n - 2) % n, 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if scale:
        out["scale"] = 0.5 + torch.rand(n, length, generator=g, dtype=torch.float64)
    return out


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def jacobian(module: nn.Module, batch: dict) -> torch.Tensor:
    """float64 reference: J (n·k, P) by jacrev of the whole batch's logits w.r.t. the params."""
    params = {k: v.detach().double() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def f(p):
        out = logits_of(functional_call(module, (p, buffers), (), batch))
        return out.reshape(out.shape[0], -1)

    jac = jacrev(f)(params)
    n, k = f(params).shape
    return torch.cat([jac[name].reshape(n * k, -1) for name in params], dim=1)


def reference(module: nn.Module, x1: dict, x2: dict | None = None) -> torch.Tensor:
    """K = J(x1) J(x2)ᵀ (n1·k × n2·k), the Euclidean Gram ("sum" convention)."""
    j1 = jacobian(module, x1)
    j2 = j1 if x2 is None else jacobian(module, x2)
    return j1 @ j2.T


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------------------------
# empirical_ntk


@pytest.mark.parametrize("shortcut", [True, False], ids=["data-dependent", "vmap"])
@pytest.mark.parametrize("method", METHODS)
def test_empirical_ntk_on_named_inputs_equals_the_float64_reference(method, shortcut):
    net, batch = tagger(shortcut=shortcut), named_batch()
    K = empirical_ntk(net, batch, convention="sum", method=method)
    assert K.shape == (5, 5, 3, 3)
    assert rel_err(kernel_matrix(K), reference(net, batch)) <= TOL


def test_structured_path_runs_its_layers_on_named_inputs():
    net, batch = tagger(), named_batch()
    plan = plan_ntk(net, batch, method="structured")
    assert set(plan.structured_layers) == {"mix", "head"}
    assert plan.probe_passes == (1, 1)   # the mask's full reduction ends the traced row proof


@pytest.mark.parametrize("method", METHODS)
def test_cross_kernel_tiles_and_float_entries(method):
    """x1 ≠ x2, tiles of 2 samples (rows of every entry sliced together), a float entry."""
    net = tagger()
    x1, x2 = named_batch(5, seed=1, scale=True), named_batch(4, seed=2, scale=True)
    K = empirical_ntk(net, x1, x2, convention="sum", method=method, block_size=2)
    assert K.shape == (5, 4, 3, 3)
    assert rel_err(kernel_matrix(K), reference(net, x1, x2)) <= TOL
    K = empirical_ntk(net, x1, convention="sum", method=method, block_size=2)
    assert rel_err(kernel_matrix(K), reference(net, x1)) <= TOL


def test_conventions_and_kinds_on_named_inputs():
    net, batch = tagger(), named_batch()
    ref = reference(net, batch).view(5, 3, 5, 3).permute(0, 2, 1, 3)
    mean = empirical_ntk(net, batch)                          # L²(D): G/n
    assert rel_err(mean * 5, ref) <= TOL
    trace = empirical_ntk(net, batch, kind="trace", convention="sum")
    assert rel_err(trace, ref.diagonal(dim1=-2, dim2=-1).sum(-1)) <= TOL
    diag = empirical_ntk(net, batch, kind="diagonal", convention="sum")
    assert rel_err(diag, ref.diagonal(dim1=-2, dim2=-1)) <= TOL


def test_a_plain_function_gets_the_mapping():
    net, batch = tagger(), named_batch()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, x):   # f(params, x) receives the mapping itself
        return functional_call(net, p, (), {"input_ids": x["input_ids"],
                                            "attention_mask": x["attention_mask"]}).logits

    K = empirical_ntk(Model(f, params), batch, convention="sum", method="jacobian")
    assert rel_err(kernel_matrix(K), reference(net, batch)) <= TOL


def test_float32_model_on_named_inputs():
    """Floating entries are cast to the parameters' dtype; the float64 spectrum of a float32
    model is that of its stored weights."""
    net = tagger().float()
    batch = named_batch(scale=True)
    K32 = empirical_ntk(net, batch, convention="sum")
    assert K32.dtype == torch.float32
    ref = reference(tagger(), {**batch, "scale": batch["scale"].float().double()})
    assert rel_err(kernel_matrix(K32).double(), ref) <= 1e-4
    spec = ntk_spectrum(net, batch, convention="sum")
    assert spec.computed_dtype == "float64"
    ref64 = reference(net.double(), batch)     # float64 inputs, as a tensor input is cast
    lam = torch.linalg.eigvalsh(ref64)
    assert abs(spec.lambda_max - float(lam[-1])) <= TOL * float(lam[-1])


def test_probe_cache_keys_on_the_names_shapes_and_dtypes():
    net = tagger()
    clear_plan_cache()
    assert plan_ntk(net, named_batch()).probe == "probed"
    assert plan_ntk(net, named_batch(seed=7)).probe == "cached"   # values do not matter
    assert plan_ntk(net, named_batch(length=4)).probe == "probed"
    assert plan_ntk(net, named_batch(scale=True)).probe == "probed"


# ----------------------------------------------------------------------------------------------
# NTKOperator, ntk_spectrum, dual_gram


def test_operator_matvec_and_rayleigh_on_named_inputs():
    net, batch = tagger(), named_batch()
    ref = reference(net, batch)
    v = torch.randn(15, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for bs in (None, 2):
        op = NTKOperator(net, batch, convention="sum", batch_size=bs)
        assert op.shape == (15, 15)
        assert rel_err(op.matvec(v), ref @ v) <= TOL
    op = NTKOperator(net, batch)                                   # mean: M = G/n
    assert rel_err(op.matvec(v), ref @ v / 5) <= TOL
    want = float(v @ ref @ v / 25) / float(v @ v / 5)              # ⟨u, Ku⟩_ω / ‖u‖²_ω
    assert abs(op.rayleigh(v) - want) <= TOL * want


def test_sharded_operator_on_named_inputs():
    """One process (no process group): the rank keeps all rows of every entry."""
    net, batch = tagger(), named_batch()
    v = torch.randn(15, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op = ShardedNTKOperator(net, batch, convention="sum")
    assert rel_err(op.matvec(v), reference(net, batch) @ v) <= TOL


@pytest.mark.parametrize("route", ["dense", "lanczos", "auto"])
def test_spectrum_on_named_inputs(route):
    net, batch = tagger(), named_batch()
    lam = torch.linalg.eigvalsh(reference(net, batch)).numpy()
    spec = ntk_spectrum(net, batch, convention="sum", route=route)
    assert spec.samples == 5 and spec.size == 15
    assert abs(spec.lambda_max - lam[-1]) <= TOL * lam[-1]
    if route != "lanczos":
        assert abs(spec.eigenvalues - lam).max() <= TOL * lam[-1]


def test_dual_gram_on_named_inputs():
    net, batch = tagger(), named_batch()
    J = jacobian(net, batch)
    phi = dual_gram(net, batch, convention="sum")
    assert rel_err(phi, J.T @ J) <= TOL


# ----------------------------------------------------------------------------------------------
# the monitor's probe


def _one_step(net, batch, y, probe):
    mon = Monitor(net, "cross-entropy", probe=probe, probe_every=1, echo=None, strict=True)
    out = net(**batch).logits
    loss = F.cross_entropy(out, y)
    net.zero_grad()
    loss.backward()
    mon.step(out, y, loss)
    return mon


def test_monitor_probe_spectrum_on_named_inputs():
    net, batch = tagger(), named_batch()
    y = torch.tensor([0, 1, 2, 1, 0])
    lam = float(torch.linalg.eigvalsh(reference(net, batch) / 5)[-1])   # "mean": G/n
    mon = _one_step(net, batch, y, batch)
    assert mon.probe_rows[0]["lambda_max"] == pytest.approx(lam, rel=TOL)
    # with targets: R(K; ∇ℓ) on the probe set equals the batch's quotient (same data, θ)
    mon = _one_step(net, batch, y, (batch, y))
    assert mon.probe_rows[0]["lambda_max"] == pytest.approx(lam, rel=TOL)
    assert mon.probe_rows[0]["rayleigh"] == pytest.approx(mon.rows[0]["rayleigh"], rel=TOL)
    f = net(**batch).logits.detach()
    g = (torch.softmax(f, -1) - F.one_hot(y, 3)).reshape(-1)
    want = float(g @ reference(net, batch) @ g / 25) / float(g @ g / 5)
    assert mon.probe_rows[0]["rayleigh"] == pytest.approx(want, rel=TOL)
    assert mon.probe_rows[0]["loss"] == pytest.approx(float(F.cross_entropy(f, y)), rel=TOL)


# ----------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("bad, match", [
    ({}, r"x1 is an empty mapping"),
    ({"input_ids": torch.zeros(5, 6, dtype=torch.long), "attention_mask": [1, 1]},
     r"x1\['attention_mask'\] is a list, not a Tensor"),
    ({"input_ids": torch.zeros(5, 6, dtype=torch.long),
      "attention_mask": torch.ones(4, 6, dtype=torch.long)},
     r"x1\['attention_mask'\] has 4 rows but x1\['input_ids'\] has 5"),
    ({"input_ids": torch.zeros(5, 6, dtype=torch.long), "attention_mask": torch.tensor(1)},
     r"x1\['attention_mask'\] is a 0-dimensional tensor"),
    ({"input_ids": torch.zeros(0, 6, dtype=torch.long),
      "attention_mask": torch.ones(0, 6, dtype=torch.long)}, r"x1 is empty"),
    ({0: torch.zeros(5, 6, dtype=torch.long)}, r"x1 has the key 0 \(int\).*must be a str"),
])
def test_bad_mappings_are_refused_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        empirical_ntk(tagger(), bad)


def test_bad_mappings_are_refused_everywhere():
    bad = {"input_ids": torch.zeros(5, 6, dtype=torch.long),
           "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"x\['attention_mask'\] has 3 rows"):
        NTKOperator(tagger(), bad)
    with pytest.raises(ValueError, match=r"x\['attention_mask'\] has 3 rows"):
        ntk_spectrum(tagger(), bad)
    with pytest.raises(ValueError, match=r"probe\['attention_mask'\] has 3 rows"):
        Monitor(tagger(), "cross-entropy", probe=bad, probe_every=1, echo=None)


def test_cross_kernels_need_inputs_of_the_same_kind():
    net, batch = tagger(), named_batch()
    with pytest.raises(ValueError, match="both be tensors or both be mappings"):
        empirical_ntk(net, batch, torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"x2 has \['input_ids'\]"):
        empirical_ntk(net, batch, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match=r"pad both to the same length"):
        empirical_ntk(net, batch, named_batch(length=4))


def test_an_output_that_is_not_a_tensor_is_refused_with_the_fix():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match=r"returned a tuple, not a Tensor.*wrap the module"):
        empirical_ntk(Pair(), {"x": torch.zeros(4, 3, dtype=torch.float64)})


# ----------------------------------------------------------------------------------------------
# a tiny randomly initialised BERT classifier (transformers; -m huggingface)


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    net = transformers.BertForSequenceClassification(cfg).eval().double()
    return net, named_batch(5, 6, vocab=50), reference(net, named_batch(5, 6, vocab=50))


@pytest.mark.huggingface
@pytest.mark.parametrize("method", METHODS)
def test_bert_empirical_ntk_equals_the_float64_reference(bert, method):
    net, batch, ref = bert
    K = empirical_ntk(net, batch, convention="sum", method=method)
    assert rel_err(kernel_matrix(K), ref) <= TOL


@pytest.mark.huggingface
def test_bert_structured_plan_uses_its_linear_layers(bert):
    net, batch, _ = bert
    plan = plan_ntk(net, batch, method="structured")
    assert "classifier" in plan.structured_layers
    assert any("attention.self.query" in p for p in plan.structured_layers)


@pytest.mark.huggingface
def test_bert_operator_and_spectrum(bert):
    net, batch, ref = bert
    v = torch.randn(15, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    op = NTKOperator(net, batch, convention="sum", batch_size=2)
    assert rel_err(op.matvec(v), ref @ v) <= TOL
    lam = torch.linalg.eigvalsh(ref).numpy()
    spec = ntk_spectrum(net, batch, convention="sum")
    assert abs(spec.eigenvalues - lam).max() <= TOL * lam[-1]
    spec = ntk_spectrum(net, batch, convention="sum", route="lanczos")
    assert abs(spec.lambda_max - lam[-1]) <= TOL * lam[-1]


@pytest.mark.huggingface
def test_bert_monitor_probe(bert):
    net, batch, ref = bert
    y = torch.tensor([0, 1, 2, 1, 0])
    mon = _one_step(net, batch, y, (batch, y))
    lam = float(torch.linalg.eigvalsh(ref / 5)[-1])
    assert mon.probe_rows[0]["lambda_max"] == pytest.approx(lam, rel=TOL)
    assert mon.probe_rows[0]["rayleigh"] == pytest.approx(mon.rows[0]["rayleigh"], rel=TOL)
