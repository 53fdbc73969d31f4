"""Issue 17: identity before proof. rf.prove reads the function from the module's structure;
each model here looks like a supported one and computes something else (or is the supported
one, and must still be proven). Every refusal must come with the reason, and every proof
must be about the function torch evaluates: torch's own L₀ (float64) inside the proof's
enclosure, and the proof's P equal to the trained values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rayleighflow as rf
from rayleighflow.certificate import CertificateStatus, Reason, Scope
from rayleighflow.prove import prove_details
from rayleighflow.prove.identity import check_identity
from rayleighflow.prove.models import UnsupportedModel
from rayleighflow.theorems.two_layer import TwoLayer


def _data(n=10, d=3, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return rf.Dataset.from_arrays(x, y)


def _seq(act: nn.Module, seed=1, bias=True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), act, nn.Linear(16, 1, bias=bias)).double()


def _torch_loss(net: nn.Module, data: rf.Dataset) -> float:
    with torch.no_grad():
        return float(0.5 * ((net(data.x) - data.y) ** 2).sum(-1).mean())


def _proof(net, data=None):
    data = _data() if data is None else data
    return prove_details(rf.Problem(rf.Model(net), data, "square"))


def _refused(net, *words, data=None):
    proof = _proof(net, data)
    cert = proof.certificate
    assert cert.status is CertificateStatus.UNAVAILABLE, proof.statement
    assert cert.reason is Reason.PROOF_UNSUPPORTED
    for w in words:
        assert w in proof.statement, (w, proof.statement)
    return proof


# -- the four false proofs of the issue -----------------------------------------------------

@pytest.mark.parametrize("threshold", [1.0, 0.0, -50.0])
def test_softplus_below_its_pre_activations_is_refused_with_the_numbers(threshold):
    net = _seq(nn.Softplus(beta=1, threshold=threshold))
    with torch.no_grad():
        z_max = float(net[0](_data().x).max())
    assert z_max > threshold   # torch computes z itself on some unit: another function
    proof = _refused(net, f"threshold={threshold:g}", "reaches")
    # the number printed is an upper bound on the largest pre-activation at θ₀
    reached = float(proof.statement.split("reaches ")[1].split(":")[0])
    assert z_max <= reached <= z_max * (1 + 1e-3)


def test_softplus_threshold_caps_every_ball_the_proof_uses():
    data = _data()
    net = _seq(nn.Softplus(beta=1, threshold=3.0))
    with torch.no_grad():
        z = net[0](data.x)
    assert float(z.max()) < 3.0
    proof = _proof(net, data)
    x_tilde = torch.cat([data.x, torch.ones(data.n, 1, dtype=torch.float64)], 1)
    cap = (3.0 - float(z.max())) / float(x_tilde.norm(dim=1).max())
    assert proof.constants.r_cap <= cap * (1 + 1e-9)
    if proof.certificate.holds:   # every phase's ball stays where torch's softplus is log1p(eᶻ)
        assert proof.radius < proof.constants.r_cap
    assert any("threshold = 3" in n for n in proof.certificate.notes)
    # the default threshold (20) is far above these pre-activations: proven, caveat in numbers
    ok = _proof(_seq(nn.Softplus()), data)
    assert ok.certificate.holds and ok.radius < ok.constants.r_cap
    assert any("threshold = 20" in n for n in ok.certificate.notes)


def test_twolayer_with_an_output_bias_is_refused():
    net = TwoLayer(3, 16, generator=torch.Generator().manual_seed(2))
    net.out = nn.Linear(16, 1).double()
    p = rf.Problem(rf.Model(net), _data(), "square")
    assert p.model.n_params == 81
    _refused(net, "out.bias")


def test_forward_hooks_pre_hooks_and_global_hooks_are_refused():
    net = _seq(nn.Tanh())
    handle = net.register_forward_hook(lambda m, i, o: o * 3)
    assert _torch_loss(net, _data()) > 2 * _proof(_seq(nn.Tanh())).constants.loss0
    _refused(net, "forward hooks", "root module")
    handle.remove()
    net[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    _refused(net, "1 (Tanh)", "forward pre hooks")
    plain = _seq(nn.Tanh())
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        _refused(plain, "global module hook")
    finally:
        handle.remove()
    assert _proof(plain).certificate.holds


def test_a_subclass_with_its_own_forward_is_refused():
    class Doubled(nn.GELU):
        def forward(self, z):
            return 2 * torch.relu(z)

    _refused(_seq(Doubled()), "subclass of nn.GELU")

    class MySeq(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 3

    torch.manual_seed(1)
    net = MySeq(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    _refused(net, "subclass of Sequential")

    class MyTwoLayer(TwoLayer):
        def forward(self, x):
            return super().forward(x) + self.shift

    tl = MyTwoLayer(3, 8, generator=torch.Generator().manual_seed(0))
    tl.register_buffer("shift", torch.ones(1, dtype=torch.float64))   # a buffer that matters
    _refused(tl, "subclass of TwoLayer")


# -- lookalikes of the same kind --------------------------------------------------------------

def test_extra_modules_tied_weights_and_wrappers_are_refused():
    torch.manual_seed(0)
    extra = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Identity(), nn.Linear(16, 1)).double()
    _refused(extra, "Sequential(Linear, Tanh, Identity, Linear)")
    dropout = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5),
                            nn.Linear(16, 1)).double().eval()
    _refused(dropout, "Dropout")
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    data = rf.Dataset.from_arrays(_data().x, torch.zeros(10, 3, dtype=torch.float64))
    _refused(tied, "tied", "'0.weight'", data=data)
    compiled = torch.compile(_seq(nn.Tanh()), backend="eager")
    _refused(compiled, "torch.compile", "_orig_mod")
    with pytest.raises(TypeError, match="TorchScript"):
        rf.Model(torch.jit.script(_seq(nn.Tanh())))
    with pytest.raises(UnsupportedModel, match="GELU\\(approximate='tanh'\\)"):
        from rayleighflow.prove.models import _activation_name
        _activation_name(nn.GELU(approximate="tanh"))


def test_an_instance_forward_is_caught_by_torchs_own_loss():
    net = _seq(nn.Tanh())
    lin = net[2]
    lin.forward = lambda z: 3 * F.linear(z, lin.weight, lin.bias)   # type is still nn.Linear
    data = _data()
    proof = _refused(net, "torch's L₀ =", "outside the proof's enclosure", data=data)
    printed = float(proof.statement.split("torch's L₀ = ")[1].split(" ")[0])
    assert math.isclose(printed, _torch_loss(net, data), rel_tol=1e-5)


def test_check_identity_refuses_an_enclosure_that_misses_torch():
    net = _seq(nn.Tanh())
    problem = rf.Problem(rf.Model(net), _data(), "square")
    good = prove_details(problem)
    assert good.certificate.holds
    assert any(n.startswith("identity checked") for n in good.certificate.notes)
    from rayleighflow.prove._arb import arb
    from rayleighflow.prove.models import model_bounds
    mb = model_bounds(problem, problem.data)
    shifted = [b + arb(1e-6) for b in mb.outputs]
    loss0 = sum(((b - arb(float(y))) ** 2 for b, y in zip(mb.outputs, problem.data.y.flatten(),
                                                            strict=True)), arb(0)) / 2 / 10
    note = check_identity(problem, problem.data, mb.used, mb.jhat.shape[1], mb.outputs, loss0)
    assert "identity checked" in note
    with pytest.raises(UnsupportedModel, match="f₀\\(x_0\\)_0 = .* outside"):
        check_identity(problem, problem.data, mb.used, mb.jhat.shape[1], shifted, loss0)
    with pytest.raises(UnsupportedModel, match="P = 80 parameters, the model trains 81"):
        check_identity(problem, problem.data, mb.used, 80, mb.outputs, loss0)
    with pytest.raises(UnsupportedModel, match="trains 2.bias"):
        check_identity(problem, problem.data, mb.used[:-1], 81, mb.outputs, loss0)


# -- supported models still get proofs, about torch's function --------------------------------

@pytest.mark.parametrize("build", [
    lambda: _seq(nn.Tanh()),
    lambda: _seq(nn.Sigmoid(), bias=False),
    lambda: _seq(nn.GELU()),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(3, 1)).double(),
    lambda: TwoLayer(3, 64, activation="softplus", generator=torch.Generator().manual_seed(4)),
    lambda: _seq(nn.Tanh()).float(),
], ids=["tanh", "sigmoid-no-out-bias", "gelu", "flatten-linear", "twolayer-softplus",
        "float32"])
def test_supported_models_are_proven_and_torchs_loss_is_inside(build):
    net = build()
    data = _data()
    if next(net.parameters()).dtype == torch.float32:
        data = rf.Dataset.from_arrays(data.x.float(), data.y.float())
    proof = _proof(net, data)
    cert = proof.certificate
    assert cert.holds and cert.scope is Scope.PROVEN, proof.statement
    c = proof.constants
    assert c.P == sum(p.numel() for p in net.parameters())
    aligned = rf.Problem(rf.Model(net), data, "square").data   # the weights the flow uses
    with torch.no_grad():
        torch_l0 = float((0.5 * ((net.double()(aligned.x.double()) - aligned.y.double()) ** 2)
                          .sum(-1) * aligned.weights.double()).sum())
    assert c.loss0_lo * (1 - 1e-9) <= torch_l0 <= c.loss0 * (1 + 1e-9)
    assert "a-priori argument" in cert.describe() and "0 records" not in cert.describe()


def test_frozen_layers_count_only_the_trained_values():
    net = _seq(nn.Tanh())
    net[2].weight.requires_grad_(False)
    proof = _proof(net)
    assert proof.certificate.holds, proof.statement
    assert proof.constants.P == 3 * 16 + 16 + 1
