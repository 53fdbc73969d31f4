"""rf.Monitor against measure() in float64 (1e-10), accumulation, AMP, bad input, diagnosis."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayleighflow.data import Dataset
from rayleighflow.desingularizers import get_desingularizer
from rayleighflow.monitor import Monitor, MonitorError, full_data_estimate
from rayleighflow.monitor.diagnose import Diagnoser, forecast, stability
from rayleighflow.problem import Model, Problem
from rayleighflow.rayleigh import measure

RTOL = 1e-10


def _net(k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(),
                         nn.Linear(6, k)).double()


def _data(n=24, loss="cross-entropy", k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, dtype=torch.float64, generator=g)
    y = (torch.randint(0, k, (n,), generator=g) if loss != "square"
         else torch.randn(n, k, dtype=torch.float64, generator=g))
    return x, y


def _torch_loss(name, out, y, convention):
    red = "mean" if convention == "mean" else "sum"
    if name == "square":
        per = 0.5 * ((out - y) ** 2).sum(-1)
        return per.mean() if red == "mean" else per.sum()
    return F.cross_entropy(out, y, reduction=red)


def _reference(net, x, y, loss, convention, params=None):
    model = Model(net) if params is None else Model(net, params)
    return measure(Problem(model, Dataset.from_arrays(x, y), loss, convention))


def _assert_matches(row, ref, groups=None):
    assert row["rayleigh"] == pytest.approx(ref.rayleigh, rel=RTOL)
    assert row["grad_sq"] == pytest.approx(ref.grad_sq, rel=RTOL)
    assert row["fgrad_sq"] == pytest.approx(ref.fgrad_sq, rel=RTOL)
    assert row["loss"] == pytest.approx(ref.loss, rel=RTOL)
    for g, r in ref.group_rayleigh.items():
        assert row[f"rayleigh[{g}]"] == pytest.approx(r, rel=RTOL, abs=1e-300)
    per_layer = sum(row[f"rayleigh[{g}]"] for g in ref.group_rayleigh)
    assert per_layer == pytest.approx(row["rayleigh"], rel=1e-12)


@pytest.mark.oldest
@pytest.mark.parametrize("loss", ["cross-entropy", "square"])
@pytest.mark.parametrize("convention", ["mean", "sum"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_batch_quotient_equals_measure(loss, convention, optim):
    net = _net()
    x, y = _data(loss=loss)
    opt = (torch.optim.SGD(net.parameters(), lr=0.05) if optim == "sgd"
           else torch.optim.Adam(net.parameters(), lr=1e-2))
    mon = Monitor(net, loss, convention=convention, optimizer=opt, sync_every=3, echo=None)
    refs = []
    for i in range(7):
        xb, yb = x[3 * i:3 * i + 6], y[3 * i:3 * i + 6]
        out = net(xb)
        lv = _torch_loss(loss, out, yb, convention)
        opt.zero_grad()
        lv.backward()
        refs.append(_reference(net, xb, yb, loss, convention))
        mon.step(out, yb, lv)
        opt.step()
    mon.close()
    with pytest.raises(MonitorError, match="the monitor is closed"):
        mon.step(out, yb, lv)
    rows = list(mon.rows)
    assert [r["step"] for r in rows] == list(range(7))
    for row, ref in zip(rows, refs, strict=True):
        _assert_matches(row, ref)
        for name in ("log", "reciprocal", "cross-entropy"):
            kl = float(get_desingularizer(name).kl_ratio(ref.loss, ref.grad_sq))
            assert row[f"kl[{name}]"] == pytest.approx(kl, rel=RTOL)
    plain, sentence = mon.update_rule()
    assert plain == (optim == "sgd")
    assert ("not −η∇L" in sentence) == (optim == "adam")


@pytest.mark.oldest
def test_gradient_accumulation_is_the_union_batch():
    net = _net()
    x, y = _data(n=12)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=None)
    opt.zero_grad()
    for i in range(3):
        xb, yb = x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
        out = net(xb)
        lv = F.cross_entropy(out, yb) / 3
        lv.backward()
        mon.accumulate(out, yb, lv)
    ref = _reference(net, x, y, "cross-entropy", "mean")
    mon.step()
    mon.flush()
    row = mon.rows[-1]
    _assert_matches(row, ref)
    assert row["n"] == 12
    assert row["loss_passed"] == pytest.approx(ref.loss, rel=1e-12)
    assert not [d for d in mon.diagnoses if d.kind == "loss-mismatch"]


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_clip_check_reads_the_real_grad_norm_not_the_scaled_one(scale):
    """The backpropagated loss is scale·L_B; clip_grad_norm_ acts on ‖.grad‖ = scale·‖∇L_B‖.
    With scale 2 and max_norm between ‖∇L_B‖ and 2‖∇L_B‖ the step is clipped (its ‖.grad‖/scale
    is below max_norm: dividing first would miss it); with scale 1/2 and max_norm between
    ‖∇L_B‖/2 and ‖∇L_B‖ nothing is clipped (‖.grad‖/scale is above max_norm: dividing first
    would void a step whose quotient is exact)."""
    net = _net()
    x, y = _data(n=12)
    ref = _reference(net, x, y, "cross-entropy", "mean")
    g = math.sqrt(ref.grad_sq)
    clip = g * (1.5 if scale > 1 else 0.75)
    mon = Monitor(net, "cross-entropy", clip_norm=clip, echo=None)
    out = net(x)
    lv = scale * F.cross_entropy(out, y)
    lv.backward()
    pre = float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip))
    assert pre == pytest.approx(scale * g, rel=1e-12)
    mon.step(out, y, lv, scale=scale)
    row = mon.rows[-1]
    clipped = [d for d in mon.diagnoses if d.kind == "clipped"]
    if scale > 1:
        assert math.isnan(row["rayleigh"]) and len(clipped) == 1
        assert "‖.grad‖ = " in clipped[0].message
        assert float(clipped[0].message.split("‖.grad‖ = ")[1].split()[0]) <= clip
    else:
        assert not clipped
        _assert_matches(row, ref)


def test_a_step_voided_by_the_caller_gets_no_quotient_and_its_reason():
    net = _net()
    x, y = _data(n=8)
    mon = Monitor(net, "cross-entropy", echo=None)
    for void in (None, "weighted micro-batches", "weighted micro-batches"):
        net.zero_grad()
        out = net(x)
        lv = F.cross_entropy(out, y)
        lv.backward()
        mon.step(out, y, lv, void=void)
    mon.flush()
    r = [row["rayleigh"] for row in mon.rows]
    assert math.isfinite(r[0]) and math.isnan(r[1]) and math.isnan(r[2])
    said = [d for d in mon.diagnoses if d.kind == "voided"]
    assert len(said) == 1 and "weighted micro-batches" in said[0].message
    assert said[0].step == 1


def test_token_outputs_count_tokens_as_samples():
    torch.manual_seed(0)
    net = nn.Linear(4, 5).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 6))
    out = net(x)
    lv = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1))
    lv.backward()
    mon = Monitor(net, "cross-entropy", echo=None)
    mon.step(out, y, lv)
    ref = _reference(net, x.reshape(-1, 4), y.reshape(-1), "cross-entropy", "mean")
    _assert_matches(mon.rows[-1], ref)


def test_amp_bfloat16_on_cpu_to_its_precision():
    net = _net().float()
    x, y = _data(n=32)
    x = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        lv = F.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16
    lv.backward()
    mon = Monitor(net, "cross-entropy", echo=None)
    mon.step(out, y, lv)
    row = mon.rows[-1]
    ref = _reference(net.double(), x.double(), y, "cross-entropy", "mean")
    # bfloat16 keeps 8 significant bits (eps = 2^-7): the forward and backward run in it.
    assert row["rayleigh"] == pytest.approx(ref.rayleigh, rel=0.05)
    assert row["loss"] == pytest.approx(ref.loss, rel=0.02)
    assert not [d for d in mon.diagnoses if d.kind == "loss-mismatch"]


@pytest.mark.parametrize("convention", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cross-entropy", "square"])
def test_full_data_estimate_equals_measure_and_leaves_grad_alone(convention, loss):
    net = _net()
    x, y = _data(n=23, loss=loss)
    loader = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)]   # last batch smaller
    out = net(x[:4])
    _torch_loss(loss, out, y[:4], convention).backward()
    before = [p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    from rayleighflow.losses import get_loss
    est = full_data_estimate(net, loader, get_loss(loss), convention=convention)
    ref = _reference(net, x, y, loss, convention)
    assert est.rayleigh == pytest.approx(ref.rayleigh, rel=RTOL)
    assert est.loss == pytest.approx(ref.loss, rel=RTOL)
    assert est.grad_sq == pytest.approx(ref.grad_sq, rel=RTOL)
    assert est.fgrad_sq == pytest.approx(ref.fgrad_sq, rel=RTOL)
    for g, r in ref.group_rayleigh.items():
        assert est.group_rayleigh[g] == pytest.approx(r, rel=RTOL)
    assert (est.n_samples, est.n_batches) == (23, 5)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert net.training


def test_monitor_is_an_observer():
    """Training with the monitor (full-data and probe estimates on) gives bitwise the same
    parameters as without it."""
    def run(with_monitor):
        net = _net(seed=3)
        x, y = _data(n=20)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        mon = (Monitor(net, "cross-entropy", optimizer=opt, sync_every=2, echo=None,
                       full_data=[(x, y)], full_every=2, probe=(x[:4], y[:4]), probe_every=3)
               if with_monitor else None)
        torch.manual_seed(5)
        for _ in range(6):
            idx = torch.randperm(20)[:5]
            out = net(x[idx])
            lv = F.cross_entropy(out, y[idx])
            opt.zero_grad()
            lv.backward()
            if mon is not None:
                mon.step(out, y[idx], lv)
            opt.step()
        if mon is not None:
            mon.close()
            assert len(mon.full_rows) == 3 and len(mon.probe_rows) == 2
        return [p.detach().clone() for p in net.parameters()], torch.rand(3)

    (a, ra), (b, rb) = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(ra, rb)


def test_full_batch_gd_decrease_ratio_is_the_sufficient_decrease():
    net = _net()
    x, y = _data(n=16)
    lr = 0.02
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    mon = Monitor(net, "cross-entropy", optimizer=opt, full_data=[(x, y)], full_every=1,
                  echo=None)
    losses, gsq = [], []
    for _ in range(4):
        out = net(x)
        lv = F.cross_entropy(out, y)
        opt.zero_grad()
        lv.backward()
        losses.append(float(lv.detach()))
        gsq.append(sum(float((p.grad ** 2).sum()) for p in net.parameters()))
        mon.step(out, y, lv)
        opt.step()
    mon.close()
    alpha = [(losses[k] - losses[k + 1]) / (lr * gsq[k]) for k in range(3)]
    got = [r["decrease_ratio"] for r in mon.full_rows[1:]]
    assert got == pytest.approx(alpha, rel=1e-9)
    assert all(0.9 < a <= 1.0 + 1e-9 for a in got)   # descent lemma: α ≥ 1 − βη/2


def test_frozen_parameters_are_excluded_and_said():
    net = _net()
    net[0].weight.requires_grad_(False)
    x, y = _data(n=8)
    out = net(x)
    lv = F.cross_entropy(out, y)
    lv.backward()
    msgs = []
    mon = Monitor(net, "cross-entropy", echo=msgs.append)
    mon.step(out, y, lv)
    trainable = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    ref = _reference(net, x, y, "cross-entropy", "mean", params=trainable)
    _assert_matches(mon.rows[-1], ref)
    frozen = [d for d in mon.diagnoses if d.kind == "frozen"]
    assert frozen and "0.weight" in frozen[0].message and "35 values" in frozen[0].message
    assert msgs and "0.weight" in msgs[0]


def test_unused_parameters_count_as_zero_and_are_said():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()

        def forward(self, x):
            return self.body(x)

    net = TwoHeads()
    x, y = _data(n=8)
    out = net(x)
    lv = F.cross_entropy(out, y)
    lv.backward()
    mon = Monitor(net, "cross-entropy", echo=None)
    mon.step(out, y, lv)
    row = mon.rows[-1]
    assert row["rayleigh[unused]"] == 0.0
    assert any(d.kind == "missing-gradients" and "unused.weight" in d.message
               for d in mon.diagnoses)


def test_every_kind_of_step_in_one_run_equals_measure():
    # The common step takes a shorter path (_fast_step); any other kind of step in the same
    # run (new batch size, loss as a float or not passed, micro-batches, then a parameter
    # without a gradient) takes the general one. Each row must equal measure() on its batch.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = _net(), nn.Linear(3, 3).double()
            self.use_extra = True

        def forward(self, x):
            out = self.body(x)
            return self.extra(out) if self.use_extra else out

    net = Net()
    x, y = _data(n=48)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    mon = Monitor(net, "cross-entropy", optimizer=opt, sync_every=2, echo=None)
    # (batch size, how the loss is passed, micro-batches, use the extra layer)
    plan = [(6, "tensor", 1, True), (6, "tensor", 1, True), (4, "tensor", 1, True),
            (4, "float", 1, True), (4, None, 1, True), (6, "tensor", 2, True),
            (6, "tensor", 1, True), (6, "tensor", 1, False), (6, "tensor", 1, False)]
    refs, start = [], 0
    for size, how, micro, extra in plan:
        xb, yb = x[start:start + size], y[start:start + size]
        start += size
        net.use_extra = extra
        opt.zero_grad()
        h = size // micro
        for j in range(micro):
            out = net(xb[j * h:(j + 1) * h])
            lv = F.cross_entropy(out, yb[j * h:(j + 1) * h]) / micro
            lv.backward()
            if j < micro - 1:
                mon.accumulate(out, yb[j * h:(j + 1) * h], lv)
        refs.append(_reference(net, xb, yb, "cross-entropy", "mean"))
        passed = {"tensor": lv, "float": lv.item(), None: None}[how]
        mon.step(out, yb[(micro - 1) * h:], passed)
        opt.step()
    mon.close()
    rows = list(mon.rows)
    assert [r["step"] for r in rows] == list(range(len(plan)))
    for row, ref, (size, how, _, _) in zip(rows, refs, plan, strict=True):
        _assert_matches(row, ref)
        assert row["n"] == size
        if how is None:
            assert "loss_passed" not in row
        else:
            assert row["loss_passed"] == pytest.approx(ref.loss, rel=1e-12)
    assert rows[-1]["rayleigh[extra]"] == 0.0
    assert [d.step for d in mon.diagnoses if d.kind == "missing-gradients"] == [7]
    assert not [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    with pytest.raises(MonitorError, match="the monitor is closed"):
        mon.step(out, yb[(micro - 1) * h:], lv)


def test_bad_input_is_refused_clearly():
    net = _net()
    x, y = _data(n=8)
    mon = Monitor(net, "cross-entropy", echo=None)
    out = net(x)
    with pytest.raises(MonitorError, match="no parameter has a gradient"):
        mon.step(out, y)                                   # before backward
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(out, y).backward()
    opt.zero_grad()                                        # set_to_none=True (default)
    with pytest.raises(MonitorError, match="before optimizer.zero_grad"):
        mon.step(out, y)
    out = net(x)
    F.cross_entropy(out, y).backward()
    opt.zero_grad(set_to_none=False)
    with pytest.raises(MonitorError, match="exactly zero"):
        Monitor(net, "cross-entropy", echo=None).step(out, y)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        mon.step(out, y[:5])
    with pytest.raises(ValueError, match="square loss: outputs have shape"):
        Monitor(net, "square", echo=None).step(out, torch.zeros(8, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="label out of range"):
        m = Monitor(net, "cross-entropy", echo=None)
        F.cross_entropy(net(x), y).backward()
        m.step(net(x), torch.full((8,), 7))
    with pytest.raises(ValueError, match="no trainable parameter"):
        Monitor(nn.Linear(2, 2).requires_grad_(False), echo=None)
    with pytest.raises(ValueError, match="need both full_data"):
        Monitor(net, full_every=3, echo=None)


def test_loss_mismatch_breaks_the_identity_and_is_reported():
    net = _net()
    x, y = _data(n=8)
    out = net(x)
    lv = F.cross_entropy(out, y, label_smoothing=0.1)
    lv.backward()
    mon = Monitor(net, "cross-entropy", echo=None)
    mon.step(out, y, lv)
    row = mon.rows[-1]
    assert math.isnan(row["rayleigh"]) and math.isnan(row["kl[log]"])
    d = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    passed = f"{float(lv.detach()):.8g}"
    assert d and passed in d[0].message and f"{row['loss']:.8g}" in d[0].message


def test_nonfinite_gradients_are_diagnosed():
    net = _net()
    x, y = _data(n=8)
    with torch.no_grad():
        net[4].weight[0, 0] = float("nan")
    out = net(x)
    lv = F.cross_entropy(out, y)
    lv.backward()
    mon = Monitor(net, "cross-entropy", echo=None)
    mon.step(out, y, lv)
    assert [d.kind for d in mon.diagnoses if d.kind == "non-finite"] == ["non-finite"]


def _rows(r, groups, start=0):
    return [{"step": start + i, "loss": 1.0, "grad_sq": v, "rayleigh": v,
             **{f"rayleigh[{g}]": v * w for g, w in groups.items()}} for i, v in enumerate(r)]


def test_collapse_names_the_layers_that_fell():
    d = Diagnoser(get_desingularizer("log"), window=5)
    assert d.update(_rows([1.0] * 10, {"a": 0.5, "b": 0.5}), ["a", "b"]) == []
    out = d.update(_rows([0.05] * 5, {"a": 0.02, "b": 0.98}, 10), ["a", "b"])
    assert [x.kind for x in out] == ["collapse"]
    msg = out[0].message
    assert "0.05 over steps 10–14" in msg and "a: 0.5 → 0.001" in msg
    assert msg.index("a:") < msg.index("b:")
    # once per episode
    assert d.update(_rows([0.05] * 5, {"a": 0.02, "b": 0.98}, 15), ["a", "b"]) == []


def test_plateau_when_the_kl_ratio_trends_to_zero():
    d = Diagnoser(get_desingularizer("log"), window=3)
    rows = [{"step": i, "loss": 1.0, "grad_sq": 10.0 ** (-i / 3), "rayleigh": 1.0}
            for i in range(15)]
    kinds = [x.kind for x in d.update(rows, [])]
    assert kinds == ["plateau"]


def test_forecast_matches_an_exact_exponential_decay():
    mu, c, l0, target = 0.5, 0.01, 2.0, 1e-3
    steps = np.arange(40, dtype=float)
    loss = l0 * np.exp(-c * steps)
    grad_sq = mu * loss                   # PL with constant exactly μ: φ = log
    f = forecast(get_desingularizer("log"), target, steps, loss, grad_sq, "synthetic")
    truth = np.log(l0 / target) / c
    assert f.mu == pytest.approx(mu, rel=1e-12)
    assert f.step == pytest.approx(truth, rel=0.02)
    assert f.text.startswith("forecast (if the ratio stays ≥ μ = 0.5")
    flat = forecast(get_desingularizer("log"), target, steps, np.ones(40), grad_sq, "flat")
    assert flat.step is None and "did not decrease" in flat.text


def test_stability_limit():
    assert stability(3, 0.1, 0.0, False, 15.0, "square") is None       # 1.5 < 2
    d = stability(3, 0.1, 0.0, False, 25.0, "square")
    assert d is not None and "2.5" in d.message and "edge of stability" in d.message
    assert stability(3, 0.1, 0.9, False, 25.0, "square") is None       # 2.5 < 3.8
    adam = stability(3, 0.1, 0.0, True, 25.0, "square")
    assert adam is not None and "adaptive" in adam.message


def test_edge_of_stability_from_the_probe_spectrum():
    torch.manual_seed(0)
    net = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(x.T @ x / 8)[-1])        # λ_max(K) of a linear model
    opt = torch.optim.SGD(net.parameters(), lr=3.0 / lam)
    mon = Monitor(net, "square", optimizer=opt, probe=(x, y), probe_every=1, echo=None)
    out = net(x)
    lv = 0.5 * ((out - y) ** 2).sum(-1).mean()
    lv.backward()
    mon.step(out, y, lv)
    assert mon.probe_rows[0]["lambda_max"] == pytest.approx(lam, rel=1e-10)
    assert mon.probe_rows[0]["rayleigh"] == pytest.approx(mon.rows[0]["rayleigh"], rel=1e-10)
    assert mon.probe_rows[0]["lambda_min_label"] == "structural"      # nk = 8 > P = 4
    eos = [d for d in mon.diagnoses if d.kind == "edge-of-stability"]
    assert eos and "= 3 on the probe set" in eos[0].message


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e10])
def test_fused_cross_entropy_matches_the_loss_reference(scale):
    """The one-pass cross-entropy sums keep full relative precision from random logits to
    confident ones (ℓ_i ~ e^{-scale}) and logits of size 1e10."""
    from rayleighflow.losses import get_loss
    from rayleighflow.monitor._batch import batch_sums

    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 7, dtype=torch.float64, generator=g) * scale
    y = f.argmax(-1)
    y[:10] = torch.randint(0, 7, (10,), generator=g)          # some wrong-class samples
    ce = get_loss("cross-entropy")
    ell, gsq = batch_sums(ce, f, y)
    ref_g = ce.functional_grad(f, y)
    assert ell.tolist() == pytest.approx(ce.per_sample(f, y).tolist(), rel=1e-12, abs=0)
    assert gsq.tolist() == pytest.approx((ref_g * ref_g).sum(-1).tolist(), rel=1e-12, abs=0)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
def test_cross_entropy_sums_no_grad_path_equals_the_autograd_path(scale):
    """The monitor's in-place, one-exponential path (detached outputs) and the out-of-place
    path used under autograd (full-data estimates) give the same sums, and the autograd one
    differentiates to the functional gradient."""
    from rayleighflow.losses import get_loss
    from rayleighflow.monitor._batch import batch_sums

    g = torch.Generator().manual_seed(1)
    f = torch.randn(40, 9, dtype=torch.float64, generator=g) * scale
    y = torch.randint(0, 9, (40,), generator=g)
    ce = get_loss("cross-entropy")
    ell0, gsq0 = batch_sums(ce, f, y)
    fa = f.clone().requires_grad_(True)
    ell1, gsq1 = batch_sums(ce, fa, y)
    assert ell1.requires_grad
    assert ell0.tolist() == pytest.approx(ell1.detach().tolist(), rel=1e-13, abs=0)
    assert gsq0.tolist() == pytest.approx(gsq1.detach().tolist(), rel=1e-13, abs=0)
    (grad,) = torch.autograd.grad(ell1.sum(), fa)
    assert torch.allclose(grad, ce.functional_grad(f, y), rtol=1e-12, atol=1e-300)
    assert torch.equal(f, fa.detach())                      # the inputs are not modified


def test_distributed_options_without_a_process_group():
    net = _net()
    assert Monitor(net, echo=None).ranks is None            # one process: no collective
    assert Monitor(net, echo=None, distributed=False).ranks is None
    with pytest.raises(ValueError, match="initialized process group"):
        Monitor(net, echo=None, distributed=True)


def _diverge(strict: bool, messages: list) -> Monitor:
    """SGD at a step far past the edge of stability: the loss overflows to inf, then NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    opt = torch.optim.SGD(net.parameters(), lr=3.0)
    mon = Monitor(net, "square", optimizer=opt, probe=(x[:16], y[:16]), probe_every=10,
                  echo=messages.append, sync_every=5, strict=strict)
    for _ in range(60):
        opt.zero_grad()
        out = net(x)
        loss = 0.5 * ((out - y) ** 2).sum(-1).mean()
        loss.backward()
        mon.step(out, y, loss)
        opt.step()
    assert not all(bool(torch.isfinite(p).all()) for p in net.parameters())   # it diverged
    return mon


@pytest.mark.filterwarnings("ignore:the dtype decides the answer")
def test_a_diverging_run_with_a_probe_never_raises_into_the_loop():
    messages: list = []
    mon = _diverge(False, messages)
    failed = [m for m in messages if "the probe spectrum failed" in m]
    assert len(failed) == 1 and "training goes on" in failed[0]   # said once, not per probe
    assert len(mon.probe_rows) == 2                  # steps 0 and 10 were finite, later not
    notes = mon.close()["notes"]
    assert "the probe spectrum failed at 4 due step(s)" in notes   # steps 20, 30, 40, 50
    with pytest.raises((FloatingPointError, torch.linalg.LinAlgError)):
        _diverge(True, [])


def test_a_rising_loss_is_said_before_it_overflows():
    d = Diagnoser(get_desingularizer("log"), window=5)
    rows = [{"step": i, "loss": 1.0 * 1.5 ** max(0, i - 10), "grad_sq": 1.0, "rayleigh": 1.0}
            for i in range(30)]            # flat, then ×1.5 per step from step 11
    said = [x for x in d.update(rows, []) if x.kind == "rising"]
    # L ≥ 4× the floor 1.0 first at step 14 (1.5⁴ = 5.06), after 4 increases; 5 by step 15
    assert len(said) == 1 and said[0].step == 15 and "lower the learning rate" in said[0].message
    assert said[0].values["floor"] == 1.0 and said[0].values["loss"] == pytest.approx(1.5 ** 5)


def test_mini_batch_noise_is_not_a_rising_loss():
    rng = np.random.default_rng(0)
    d = Diagnoser(get_desingularizer("log"), window=20)
    loss = np.exp(-np.arange(2000) / 400) * rng.lognormal(0.0, 0.5, 2000)   # noisy descent
    rows = [{"step": i, "loss": float(v), "grad_sq": float(v), "rayleigh": 1.0}
            for i, v in enumerate(loss)]
    assert [x for x in d.update(rows, []) if x.kind == "rising"] == []


def test_a_diverging_monitored_run_says_rising_before_non_finite():
    messages: list = []
    _diverge(False, messages)
    kinds = [m.split(":")[0] for m in messages]
    rising = next(i for i, m in enumerate(messages) if "the loss is rising" in m)
    nonfinite = next(i for i, m in enumerate(messages) if "non-finite values" in m)
    assert rising < nonfinite, kinds


def test_every_kth_step_equals_measure_at_those_steps_and_says_so():
    net = _net()
    x, y = _data(loss="cross-entropy")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    lines: list[str] = []
    mon = Monitor(net, "cross-entropy", optimizer=opt, sync_every=2, every=3,
                  full_data=[(x, y)], full_every=4, echo=lines.append)
    refs = {}
    for i in range(10):
        xb, yb = x[2 * i:2 * i + 6], y[2 * i:2 * i + 6]
        out = net(xb)
        lv = F.cross_entropy(out, yb)
        opt.zero_grad()
        lv.backward()
        if i % 3 == 0:
            refs[i] = _reference(net, xb, yb, "cross-entropy", "mean")
        mon.step(out, yb, lv)
        opt.step()
    summary = mon.close()
    assert [r["step"] for r in mon.rows] == [0, 3, 6, 9]
    for row in mon.rows:
        _assert_matches(row, refs[row["step"]])
    assert [r["step"] for r in mon.full_rows] == [0, 4, 8]   # their own schedule
    assert summary["steps"] == 10 and summary["steps_measured"] == 4
    assert any("measured one optimizer step in 3 (steps 0, 3, 6, …)" in n
               for n in summary["notes"])
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Monitor(net, "cross-entropy", every=0)
