"""Issue 22: the monitor's check that .grad is the declared loss's gradient (float64, plain
loops): the gradient read on the outputs voids label-smoothed steps from step 0, names an
undivided micro-batch loss; one message per condition; TensorBoard tags; log-folder reruns."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from rayleighflow.monitor import Monitor
from test_monitor_sinks import _tiny_lightning_module


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _batches(steps, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, dtype=torch.float64, generator=g),
             torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def _reference_rayleigh(net, x, y):
    """R(K; ∇ℓ) = ⟨ω g, K ω g⟩ / Σ ω‖g_i‖² with K = J Jᵀ from torch.func's Jacobian of the
    (n·k) outputs in the n_params parameters, g_i = softmax(f_i) − e_{y_i}, ω = 1/n."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)
    n, k = x.shape[0], 4
    J = torch.cat([j.reshape(n * k, -1) for j in jac.values()], dim=1)
    K = J @ J.T
    with torch.no_grad():
        f = net(x)
    g = (torch.softmax(f, -1) - F.one_hot(y, k).double()).reshape(-1)
    w = 1.0 / n
    return float(w * w * (g @ K @ g) / (w * (g @ g)))


def _train(net, batches, smoothing=0.0, **kw):
    said = []
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=said.append, sync_every=3, **kw)
    refs = []
    for x, y in batches:
        refs.append(_reference_rayleigh(net, x, y))
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y, label_smoothing=smoothing)
        loss.backward()
        mon.step(out, y, loss)
        opt.step()
    mon.close()
    return mon, said, refs


def test_plain_cross_entropy_gets_the_jacobian_quotient_on_every_step():
    mon, said, refs = _train(_net(), _batches(8))
    rows = list(mon.rows)
    assert len(rows) == 8
    for r, ref in zip(rows, refs, strict=True):
        assert r["rayleigh"] == pytest.approx(ref, rel=1e-8)
    assert not [d for d in mon.diagnoses if d.kind == "loss-mismatch"]


@pytest.mark.parametrize("smoothing", [0.02, 0.1])
def test_label_smoothing_voids_every_step_from_step_0_and_says_why(smoothing):
    net = _net()
    batches = _batches(6)
    # the trap: near initialisation the smoothed loss value is within 1e-4 of the declared one
    x, y = batches[0]
    with torch.no_grad():
        out = net(x)
        plain, smooth = F.cross_entropy(out, y), F.cross_entropy(out, y, label_smoothing=0.02)
    assert abs(float(smooth - plain)) < 1e-2 * float(plain)
    mon, said, _ = _train(net, batches, smoothing)
    assert [math.isnan(r["rayleigh"]) for r in mon.rows] == [True] * 6
    ds = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    assert len(ds) == 1 and ds[0].step == 0 and ds[0].values["cause"] == "label-smoothing"
    msg = ds[0].message
    assert "label smoothing" in msg and "declare the loss the training uses" in msg
    # the ε the message reads off the gradient difference is the one that was used
    assert f"ε ≈ {smoothing:.4g}" in msg
    assert any(msg in s for s in said)


def test_a_penalty_on_the_outputs_is_named_as_another_loss():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=None)
    for x, y in _batches(3):
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y) + 1e-3 * out.logsumexp(-1).square().mean()   # a z-loss
        loss.backward()
        mon.step(out, y, loss)
        opt.step()
    mon.close()
    assert all(math.isnan(r["rayleigh"]) for r in mon.rows)
    d = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    assert d[0].step == 0 and d[0].values["cause"] == "other-loss"
    assert "a penalty on the outputs" in d[0].message


def test_a_reshaped_output_is_still_checked():
    """out = model(x).squeeze(-1): the gradient read on the model's output is the one of out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randn(12, dtype=torch.float64)
    mon = Monitor(net, "square", echo=None)
    out = net(x).squeeze(-1)
    (0.5 * (out - y).square().mean()).backward()
    mon.step(out, y)
    assert math.isfinite(mon.rows[-1]["rayleigh"])
    net.zero_grad()
    out = net(x).squeeze(-1)
    (0.5 * (out - y).square().mean() + 1e-3 * out.square().mean()).backward()
    mon.step(out, y)       # no loss passed: only the gradient check can see the penalty
    mon.flush()
    assert math.isnan(mon.rows[-1]["rayleigh"])
    assert [d.values["cause"] for d in mon.diagnoses if d.kind == "loss-mismatch"] == ["other-loss"]


@pytest.mark.parametrize("with_loss", [True, False])
def test_an_undivided_micro_batch_loss_is_named_with_its_count(with_loss):
    """accumulate() fed each micro-batch's mean loss without /N: .grad is N × ∇L_B."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=None)
    for _ in range(3):
        opt.zero_grad()
        for x, y in _batches(3, n=8, seed=_):
            out = net(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            mon.accumulate(out, y, loss if with_loss else None)
        mon.step()
        opt.step()
    mon.close()
    assert all(math.isnan(r["rayleigh"]) for r in mon.rows)
    d = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    assert len(d) == 1 and d[0].values["cause"] == "undivided-micro-batches"
    assert "pass loss/N (N = 3)" in d[0].message


def test_an_undivided_micro_batch_loss_without_the_gradient_check():
    """With grad_check=False the loss value alone names the count."""
    net = _net()
    mon = Monitor(net, "cross-entropy", echo=None, grad_check=False)
    for x, y in _batches(4, n=8):
        out = net(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        mon.accumulate(out, y, loss)
    mon.step()
    d = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    assert d[0].values["cause"] == "undivided-micro-batches"
    assert "pass loss/N (N = 4)" in d[0].message


def test_divided_micro_batches_and_a_gradscaler_like_factor_pass():
    """loss/N per micro-batch gives R; a power-of-two factor on the backward (a GradScaler's
    scale, unscaled before step) with the loss passed is accepted and said once, quietly."""
    net = _net()
    mon = Monitor(net, "cross-entropy", echo=None)
    for x, y in _batches(2, n=8):
        out = net(x)
        loss = F.cross_entropy(out, y) / 2
        loss.backward()
        mon.accumulate(out, y, loss)
    mon.step()
    assert len(mon.rows) == 1 and math.isfinite(mon.rows[-1]["rayleigh"])
    net.zero_grad()
    x, y = _batches(1)[0]
    out = net(x)
    loss = F.cross_entropy(out, y)
    (loss * 2.0 ** 16).backward()
    for p in net.parameters():
        p.grad /= 2.0 ** 16
    mon.step(out, y, loss)
    mon.flush()
    assert len(mon.rows) == 2 and math.isfinite(mon.rows[-1]["rayleigh"])
    assert [d.kind for d in mon.diagnoses].count("loss-check") == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("smoothing", [0.02, 0.1])
def test_lightning_label_smoothing_voids_every_step_with_its_cause(smoothing, dtype):
    """The callback watches the module's output: the smoothed loss is named from step 0 (in
    float32 too, where the loss value alone passes its 1e-4 check near initialisation)."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from rayleighflow.monitor.lightning import RayleighMonitor

    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=dtype), torch.randint(0, 3, (32,))
    said: list[str] = []
    cb = RayleighMonitor("cross-entropy", echo=said.append)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_tiny_lightning_module(L, smoothing, dtype)(),
                DataLoader(TensorDataset(x, y), batch_size=8))
    rows = cb.monitor.rows
    assert len(rows) == 4 and all(math.isnan(r["rayleigh"]) for r in rows)
    ds = [d for d in cb.monitor.diagnoses if d.kind == "loss-mismatch"]
    assert ds[0].step == 0 and ds[0].values["cause"] == "label-smoothing"
    assert f"ε ≈ {smoothing:.4g}" in ds[0].message
    assert any("label smoothing" in m and "declare the loss the training uses" in m for m in said)


def test_a_float32_probe_says_the_dtype_note_once_per_monitor():
    """A float32 model whose probe spectrum has eigenvalues between float32's and float64's
    thresholds: ntk_spectrum warns at every probe (its numbers move); the monitor once."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))     # float32, P = 75
    probe = torch.randn(24, 5)                                            # nk = 72
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mon = Monitor(net, "cross-entropy", echo=None, probe=probe, probe_every=1)
            for x, y in _batches(6):
                x, y = x.float(), y % 3
                opt.zero_grad()
                out = net(x)
                loss = F.cross_entropy(out, y)
                loss.backward()
                mon.step(out, y, loss)
                opt.step()
            mon.close()
        notes = [w for w in caught if str(w.message).startswith("the dtype decides the answer")]
        return mon, notes

    mon, notes = run()
    assert len(mon.probe_rows) == 6 and len(notes) == 1
    assert "said once for this probe set" in str(notes[0].message)
    _, again = run()           # another monitor says it again, once
    assert len(again) == 1


def _short_run(sinks=(), log=None, steps=4):
    net = _net()
    mon = Monitor(net, "cross-entropy", echo=None, sinks=sinks, log=log, sync_every=2,
                  full_data=_batches(2, seed=7), full_every=2,
                  groups={"hidden": ["0.weight", "0.bias"], "head": ["2.weight", "2.bias"]})
    for x, y in _batches(steps):
        net.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        mon.step(out, y, loss)
    mon.close()
    return mon


def test_tensorboard_tags_are_the_logger_names_for_batch_and_full_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rayleighflow.monitor import TensorBoard
    from rayleighflow.monitor.sinks import metric_name

    mon = _short_run([TensorBoard(tmp_path / "tb")])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"rayleigh/R", "rayleigh/layer/hidden", "rayleigh/layer/head", "rayleigh/kl/log",
            "rayleigh/full/R", "rayleigh/full/layer/hidden", "rayleigh/full/layer/head",
            "rayleigh/full/kl/log"}
    assert want <= tags
    # every tag is the Callback sink's name, and nothing is left in the old spellings
    cols = {metric_name("main", c) for r in mon.rows for c in r} | {
        metric_name("full", c) for r in mon.full_rows for c in r}
    assert tags <= cols
    assert not [t for t in tags if t.startswith(("batch/", "layer_rayleigh/", "full/", "kl/"))]
    for g in ("hidden", "head"):
        batch = [e.value for e in acc.Scalars(f"rayleigh/layer/{g}")]
        full = [e.value for e in acc.Scalars(f"rayleigh/full/layer/{g}")]
        assert batch == pytest.approx([r[f"rayleigh[{g}]"] for r in mon.rows], rel=1e-6)
        assert full == pytest.approx([r[f"rayleigh[{g}]"] for r in mon.full_rows], rel=1e-6)


def test_a_rerun_into_a_used_folder_is_refused_with_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    from rayleighflow.monitor import TensorBoard

    _short_run([TensorBoard(tmp_path / "tb")], log=tmp_path / "run")
    with pytest.raises(ValueError) as err:
        _short_run(log=tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg and repr(str(tmp_path / "run")) in msg
    assert "choose another log= folder or delete that one" in msg
    with pytest.raises(ValueError) as err:
        TensorBoard(tmp_path / "tb")
    msg = str(err.value)
    assert "\n" not in msg and repr(str(tmp_path / "tb")) in msg and "twice" in msg
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1   # nothing added
    _short_run([TensorBoard(tmp_path / "tb2")], log=tmp_path / "run2")    # fresh folders run


def test_a_copy_of_the_monitored_model_is_not_watched():
    """copy.deepcopy (an EMA copy) and pickling of the model work, and the copy is inert."""
    import copy
    import io

    net = _net()
    mon = Monitor(net, "cross-entropy", echo=None)
    twin = copy.deepcopy(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    x, y = _batches(1)[0]
    F.cross_entropy(twin(x), y).backward()
    assert not mon._watched
    out = net(x)
    F.cross_entropy(out, y).backward()
    mon.step(out, y)
    assert math.isfinite(mon.rows[-1]["rayleigh"]) and mon.rows[-1].get("loss_passed") is None


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logits_above_the_checked_size_are_checked_on_strided_rows(smoothing):
    """A token model whose (B, T, V) logits exceed CHECKED_ELEMENTS: the check reads strided
    rows (float64 only there) with the batch's own n, and still tells plain cross-entropy (a
    quotient on every step) from label smoothing (none, the ε read off the gradient)."""
    from rayleighflow.monitor._batch import CHECKED_ELEMENTS

    torch.manual_seed(0)
    vocab, seq, b = 300, 64, 4
    assert b * seq * vocab > CHECKED_ELEMENTS
    net = nn.Sequential(nn.Embedding(vocab, 16), nn.Tanh(), nn.Linear(16, vocab)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=None, sync_every=2)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        tokens = torch.randint(0, vocab, (b, seq + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1), label_smoothing=smoothing)
        loss.backward()
        mon.step(out, y, loss)
        opt.step()
    mon.close()
    ds = [d for d in mon.diagnoses if d.kind == "loss-mismatch"]
    if smoothing == 0.0:
        assert not ds and all(math.isfinite(r["rayleigh"]) for r in mon.rows)
    else:
        assert all(math.isnan(r["rayleigh"]) for r in mon.rows)
        assert ds[0].step == 0 and ds[0].values["cause"] == "label-smoothing"
        assert f"ε ≈ {smoothing:.4g}" in ds[0].message
