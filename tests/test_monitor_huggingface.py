"""The Hugging Face TrainerCallback (marker ``huggingface``, extra ``[huggingface]``): tiny models
trained by the real Trainer on CPU in float64; every step's quotient against an independent
reference at the same parameters and batch (rf.measure, or a fresh forward/backward of the
explicit union-batch loss), and the run folder renders with ``rayleighflow report``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from rayleighflow.cli import main as cli_main  # noqa: E402
from rayleighflow.data import Dataset  # noqa: E402
from rayleighflow.monitor.huggingface import RayleighCallback  # noqa: E402
from rayleighflow.problem import Model, Problem  # noqa: E402
from rayleighflow.rayleigh import measure  # noqa: E402
from rayleighflow.report import validate_summary  # noqa: E402

pytestmark = pytest.mark.huggingface
RTOL = 1e-10


class Snapshot(transformers.TrainerCallback):
    """Test-side record of each step: the training forwards' inputs (a pre-hook of its own) and
    the parameters at on_pre_optimizer_step, i.e. where the monitor records the step."""

    def __init__(self):
        self.batches, self.current, self.params = [], [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        def grab(module, a, kwargs):
            if module.training and torch.is_grad_enabled():
                self.current.append({k: v.detach().clone() for k, v in kwargs.items()
                                     if isinstance(v, torch.Tensor)})
        model.register_forward_pre_hook(grab, with_kwargs=True)
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.batches.append(self.current)
        self.current = []
        self.params.append({k: v.detach().clone() for k, v in self.model.named_parameters()})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                learning_rate=0.2, optim="sgd", lr_scheduler_type="constant",
                max_grad_norm=0.0, report_to="none", save_strategy="no",
                logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def _close(a, b, what):
    assert abs(a - b) <= RTOL * abs(b), f"{what}: {a!r} vs {b!r}"


def test_sequence_classifier_matches_measure_and_renders(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).double()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 30, (6,), generator=g),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(12)]
    cb, snap = RayleighCallback(log=tmp_path / "run", echo=None, sync_every=2), Snapshot()
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data,
                         callbacks=[cb, snap]).train()
    rows = list(cb.monitor.rows)
    assert len(rows) == 3 == len(snap.params)

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    wrapped = Logits(model)
    for row, batch, params in zip(rows, snap.batches, snap.params, strict=True):
        (inputs,) = batch
        data_b = Dataset.from_arrays(inputs["input_ids"], inputs["labels"], index_inputs=True)
        ref = measure(Problem(Model(wrapped, {f"m.{k}": v for k, v in params.items()}), data_b,
                              "cross-entropy", "mean"))
        for key in ("loss", "grad_sq", "fgrad_sq", "rayleigh"):
            _close(row[key], getattr(ref, key), key)
        assert row["loss_passed"] == pytest.approx(row["loss"], rel=1e-12)   # model's loss
        layers = sum(v for k, v in row.items() if k.startswith("rayleigh["))
        assert layers == pytest.approx(row["rayleigh"], rel=1e-12)
    assert not [d for d in cb.monitor.diagnoses if d.kind in ("loss-mismatch", "clipped")]
    run = tmp_path / "run"
    assert validate_summary(json.loads((run / "summary.json").read_text())) == []
    assert cli_main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 1000


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _tokens(n=16, t=7):
    g = torch.Generator().manual_seed(2)
    data = []
    for i in range(n):
        ids = torch.randint(0, 20, (t,), generator=g)
        labels = ids.clone()
        labels[t - 1 - i % 3:] = -100          # padding at the end: ignored positions
        data.append({"input_ids": ids, "labels": labels})
    return data


def test_causal_lm_with_accumulation_matches_the_union_batch_loss(tmp_path):
    """GPT-2 with 2 micro-batches per step and −100 padding: the monitor's row equals a fresh
    forward/backward of the explicit loss — token cross-entropy averaged over the union of the
    micro-batches' counted tokens (labels shifted by one) — at the recorded parameters.

    The Trainer normalizes by its own ``num_items_in_batch`` (here it counts the unshifted
    labels, 31, while 25 targets are predicted), so .grad is (25/31)·∇L_B: the callback passes
    that scale. transformers' causal-LM loss casts the logits with ``.float()`` (float32 even
    for a float64 model), so .grad carries float32 rounding: 1e-6 here, not 1e-10."""
    model = _gpt2()
    cb, snap = RayleighCallback(echo=None), Snapshot()
    transformers.Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2,
                                                 per_device_train_batch_size=3),
                         train_dataset=_tokens(), callbacks=[cb, snap]).train()
    rows = list(cb.monitor.rows)
    assert len(rows) == 3
    ref_model = _gpt2()
    scales = []
    for row, batch, params in zip(rows, snap.batches, snap.params, strict=True):
        assert len(batch) == 2                                  # two micro-batches
        ref_model.load_state_dict(params, strict=False)
        ref_model.zero_grad()
        logits = torch.cat([ref_model(input_ids=b["input_ids"]).logits[:, :-1] for b in batch])
        labels = torch.cat([b["labels"][:, 1:] for b in batch])
        keep = labels != -100
        f, y = logits[keep], labels[keep]
        loss = F.cross_entropy(f, y)
        loss.backward()
        grad_sq = sum(float((p.grad ** 2).sum()) for p in ref_model.parameters()
                      if p.grad is not None)
        p = torch.softmax(f.detach(), -1)
        gi = p - F.one_hot(y, 20).double()
        fgrad_sq = float((gi * gi).sum(-1).mean())
        assert row["n"] == int(keep.sum())
        _close(row["loss"], float(loss), "loss")                 # from the outputs: float64
        _close(row["fgrad_sq"], fgrad_sq, "fgrad_sq")
        assert row["grad_sq"] == pytest.approx(grad_sq, rel=1e-6)
        assert row["rayleigh"] == pytest.approx(grad_sq / fgrad_sq, rel=1e-6)
        assert row["loss_passed"] == pytest.approx(float(loss), rel=1e-6)
        scales.append(float(keep.sum()) / float(batch[0]["num_items_in_batch"]))
    assert any(abs(s - 1) > 0.05 for s in scales)   # the Trainer's count differs: scale used
    assert not [d for d in cb.monitor.diagnoses if d.kind == "loss-mismatch"]


def test_clipped_steps_get_no_quotient_and_label_smoothing_is_refused(tmp_path):
    model = _gpt2()
    cb = RayleighCallback(echo=None)
    transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=1e-3),
                         train_dataset=_tokens(), callbacks=[cb]).train()
    rows = list(cb.monitor.rows)
    assert rows and all(math.isnan(r["rayleigh"]) for r in rows)
    assert [d.kind for d in cb.monitor.diagnoses].count("clipped") == 1
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        transformers.Trainer(model=_gpt2(), args=_args(tmp_path, label_smoothing_factor=0.1),
                             train_dataset=_tokens(),
                             callbacks=[RayleighCallback(echo=None)]).train()


# -- accumulation, clipping and extra forwards against a float64 reference (issue 22) ---------
class Recorder(transformers.Trainer):
    """The Trainer, recording each training_step's inputs and the loss it backpropagated (the
    value training_step returns) per optimizer step, and the parameters at
    on_pre_optimizer_step: the test's own view of a step, independent of the callback."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps, self._current = [], []
        self.add_callback(_StepEnd(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        kept = {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._current.append((kept, float(loss)))
        return loss


class _StepEnd(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kw):
        t = self.trainer
        params = {k: v.detach().clone() for k, v in t.model.named_parameters()}
        t.steps.append({"micro": t._current, "params": params})
        t._current = []


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).double()


def _sentences(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 60, (6,), generator=g),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def _gpt2_small():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _token_data(n=16, t=8):
    g = torch.Generator().manual_seed(2)
    data = []
    for i in range(n):
        ids = torch.randint(0, 50, (t,), generator=g)
        labels = ids.clone()
        labels[t - 1 - i % 4:] = -100          # padding at the end: ignored positions
        data.append({"input_ids": ids, "labels": labels})
    return data


def _reference(model, step, causal=False):
    """Float64 reference of one optimizer step from its parameters and union batch: L_B (the
    mean cross-entropy over the union's counted targets), ∇L_B by autograd, ‖∇ℓ‖²_D =
    (1/n) Σ_i ‖softmax(f_i) − e_{y_i}‖², R = ‖∇L_B‖² / ‖∇ℓ‖²_D; and the scale of what the
    Trainer backpropagated (the sum of training_step's returned losses) against L_B."""
    params = {k: v.clone().requires_grad_(True) for k, v in step["params"].items()}
    fs, ys = [], []
    for inputs, _ in step["micro"]:
        logits = torch.func.functional_call(model, params, (),
                                            {"input_ids": inputs["input_ids"]}).logits
        labels = inputs["labels"]
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        f, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = y != -100
        fs.append(f[keep])
        ys.append(y[keep])
    f, y = torch.cat(fs), torch.cat(ys)
    loss = F.cross_entropy(f, y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grad_sq = sum(float((g * g).sum()) for g in grads if g is not None)
    gi = torch.softmax(f.detach(), -1) - F.one_hot(y, f.shape[-1]).double()
    fgrad_sq = float((gi * gi).sum(-1).mean())
    backprop = sum(v for _, v in step["micro"])
    return {"loss": float(loss), "grad_sq": grad_sq, "fgrad_sq": fgrad_sq,
            "rayleigh": grad_sq / fgrad_sq, "n": int(y.numel()),
            "scale": backprop / float(loss)}


def _train(tmp_path, model, data, callbacks=(), trainer=Recorder, **kw):
    cb = RayleighCallback(echo=None, sync_every=3)
    t = trainer(model=model, args=_args(tmp_path, **{"max_steps": 4, **kw}), train_dataset=data,
                callbacks=[cb, *callbacks])
    t.train()
    return cb, t


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_bert_classifier_under_accumulation_equals_the_union_batch_reference(tmp_path,
                                                                            accumulation):
    """BertForSequenceClassification accepts **kwargs, so the Trainer passes num_items_in_batch
    and skips its division by the accumulation steps; the model ignores the count, so .grad is
    the sum of the micro-batch means (2·∇L_B of the union mean with 2 micro-batches). The
    callback finds that from the model's loss, says it once and divides; every step equals the
    float64 reference. max_grad_norm is set (large): the clip check runs and passes."""
    model = _bert()
    cb, t = _train(tmp_path, model, _sentences(), gradient_accumulation_steps=accumulation,
                   max_grad_norm=1e6)
    rows = list(cb.monitor.rows)
    assert len(rows) == 4 == len(t.steps)
    ref_model = _bert()
    errors = []
    for row, step in zip(rows, t.steps, strict=True):
        assert len(step["micro"]) == accumulation
        ref = _reference(ref_model, step)
        assert row["n"] == ref["n"] == 4 * accumulation
        for key in ("loss", "grad_sq", "fgrad_sq", "rayleigh"):
            errors.append(_rel(row[key], ref[key]))
            assert row[key] == pytest.approx(ref[key], rel=1e-10), key
        assert row["loss_passed"] == pytest.approx(ref["loss"], rel=1e-10)
        if t.model_accepts_loss_kwargs:   # the Trainer's count reached a model that ignores it
            assert ref["scale"] == pytest.approx(accumulation, rel=1e-12)
    kinds = [d.kind for d in cb.monitor.diagnoses]
    assert not {"loss-mismatch", "clipped", "voided"} & set(kinds)
    said = [d.message for d in cb.monitor.diagnoses if d.kind == "huggingface-normalization"]
    if accumulation == 2 and t.model_accepts_loss_kwargs:
        assert len(said) == 1 and "ignores num_items_in_batch" in said[0]
    print(f"bert accumulation={accumulation}: max relative error {max(errors):.3g}")


def test_bert_unequal_micro_batch_means_get_no_quotient_and_are_said(tmp_path):
    """14 samples in micro-batches of 4: the epoch's second step has micro-batches of 4 and 2.
    Their means weigh a sample 1/4 or 1/2, not 1/6: no quotient, said; the full steps match."""
    model = _bert()
    cb, t = _train(tmp_path, model, _sentences(14), gradient_accumulation_steps=2)
    rows = list(cb.monitor.rows)
    ref_model = _bert()
    for row, step in zip(rows, t.steps, strict=True):
        sizes = [int(m[0]["labels"].numel()) for m in step["micro"]]
        if t.model_accepts_loss_kwargs and sizes == [4, 2]:
            assert math.isnan(row["rayleigh"])
        else:
            assert row["rayleigh"] == pytest.approx(_reference(ref_model, step)["rayleigh"],
                                                    rel=1e-10)
    if t.model_accepts_loss_kwargs:
        voided = [d for d in cb.monitor.diagnoses if d.kind == "voided"]
        assert len(voided) == 1 and "unequal sizes (4, 2 targets)" in voided[0].message


@pytest.mark.parametrize("accumulation,clip", [(1, 0.42), (2, 0.65)])
def test_bert_clipping_voids_exactly_the_clipped_steps_by_the_real_grad_norm(tmp_path,
                                                                            accumulation, clip):
    """max_grad_norm between the steps' ‖.grad‖: a step is clipped iff the norm of what the
    Trainer backpropagated, scale·‖∇L_B‖ (scale 2 with 2 micro-batches), exceeds it. Clipped
    steps get no quotient and one message (whose ‖.grad‖ is the clipped one, ≤ max_grad_norm:
    dividing by the scale first would have let them pass); the others equal the reference."""
    model = _bert()
    cb, t = _train(tmp_path, model, _sentences(), gradient_accumulation_steps=accumulation,
                   max_grad_norm=clip, max_steps=8, learning_rate=0.5)
    rows = list(cb.monitor.rows)
    ref_model = _bert()
    clipped, errors = [], []
    for row, step in zip(rows, t.steps, strict=True):
        ref = _reference(ref_model, step)
        pre = ref["scale"] * math.sqrt(ref["grad_sq"])    # the norm clip_grad_norm_ saw
        clipped.append(pre > clip)
        if pre > clip:
            assert math.isnan(row["rayleigh"])
            assert math.sqrt(row["grad_sq"]) * ref["scale"] <= clip * (1 + 1e-9)
        else:
            errors.append(_rel(row["rayleigh"], ref["rayleigh"]))
            assert row["rayleigh"] == pytest.approx(ref["rayleigh"], rel=1e-10)
    assert any(clipped) and not all(clipped)
    print(f"bert clipping accumulation={accumulation}: {sum(clipped)} of {len(clipped)} "
          f"steps clipped, max relative error of the others {max(errors):.3g}")
    said = [d for d in cb.monitor.diagnoses if d.kind == "clipped"]
    assert len(said) == 1
    assert float(said[0].message.split("‖.grad‖ = ")[1].split()[0]) <= clip


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gpt2_under_accumulation_equals_the_union_batch_reference(tmp_path, accumulation):
    """A causal LM divides its summed token loss by num_items_in_batch (the Trainer's count,
    which may count unshifted labels: then scale ≠ 1); labels shifted by one, −100 dropped.
    transformers' causal-LM loss casts the logits to float32, hence 1e-6."""
    model = _gpt2_small()
    cb, t = _train(tmp_path, model, _token_data(), gradient_accumulation_steps=accumulation,
                   per_device_train_batch_size=3, max_grad_norm=1e6)
    rows = list(cb.monitor.rows)
    assert len(rows) == 4
    ref_model = _gpt2_small()
    errors = []
    for row, step in zip(rows, t.steps, strict=True):
        ref = _reference(ref_model, step, causal=True)
        assert row["n"] == ref["n"]
        for key in ("loss", "grad_sq", "fgrad_sq", "rayleigh"):
            errors.append(_rel(row[key], ref[key]))
            assert row[key] == pytest.approx(ref[key], rel=1e-6), key
    assert not [d for d in cb.monitor.diagnoses if d.kind in ("loss-mismatch", "voided")]
    print(f"gpt2 accumulation={accumulation}: max relative error {max(errors):.3g}")


def test_gpt2_unclipped_step_with_scale_below_one_gets_its_quotient(tmp_path):
    """The Trainer's count here exceeds the predicted tokens (scale < 1): with max_grad_norm
    between ‖.grad‖ and ‖.grad‖/scale nothing is clipped, and the step gets its quotient
    (‖.grad‖/scale ≥ max_grad_norm would have voided it)."""
    cb, t = _train(tmp_path, _gpt2_small(), _token_data(), gradient_accumulation_steps=2,
                   per_device_train_batch_size=3, max_steps=1, max_grad_norm=1e6)
    ref = _reference(_gpt2_small(), t.steps[0], causal=True)
    if not ref["scale"] < 0.99:
        pytest.skip("this transformers counts the shifted labels: scale 1")
    raw = ref["scale"] * math.sqrt(ref["grad_sq"])
    clip = raw * (1 + (1 / ref["scale"] - 1) / 2)
    cb, t = _train(tmp_path, _gpt2_small(), _token_data(), gradient_accumulation_steps=2,
                   per_device_train_batch_size=3, max_steps=1, max_grad_norm=clip)
    (row,) = cb.monitor.rows
    assert not [d for d in cb.monitor.diagnoses if d.kind == "clipped"]
    assert row["rayleigh"] == pytest.approx(ref["rayleigh"], rel=1e-6)


class _ExtraForwardCallback(transformers.TrainerCallback):
    """A reference computation of a callback: a training-mode forward with autograd on and no
    labels at each step begin, never backpropagated."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model

    def on_step_begin(self, args, state, control, **kw):
        self.model.train()
        ids = torch.randint(0, 60, (2, 6))
        self.out = self.model(input_ids=ids).logits.sum()


class _ExtraForwardTrainer(Recorder):
    """A compute_loss override with an extra training forward (with labels) whose loss is only
    logged, not backpropagated."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.logged = model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss.item()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_extra_training_forwards_are_ignored_and_said_once(tmp_path):
    model = _bert()
    cb, t = _train(tmp_path, model, _sentences(), callbacks=[_ExtraForwardCallback()],
                   trainer=_ExtraForwardTrainer, gradient_accumulation_steps=2)
    rows = list(cb.monitor.rows)
    assert len(rows) == 4
    ref_model = _bert()
    for row, step in zip(rows, t.steps, strict=True):
        ref = _reference(ref_model, step)
        assert row["n"] == ref["n"] == 8
        assert row["rayleigh"] == pytest.approx(ref["rayleigh"], rel=1e-10)
    said = [d.message for d in cb.monitor.diagnoses if d.kind == "huggingface-ignored"]
    assert len(said) == 1 and "did not reach its backward" in said[0]
    assert not [d for d in cb.monitor.diagnoses if d.kind in ("loss-mismatch", "voided")]


def test_a_grad_scaler_factor_is_taken_out_only_once_grad_is_unscaled():
    """Under fp16 the backward runs on S·loss, so the gradient reaching the model's loss carries
    S: it cancels while .grad is still scaled (no clipping) and is divided out once accelerate's
    clipping has unscaled .grad. (A stand-in for accelerate's AcceleratedOptimizer, which needs
    an initialized Accelerator: its ``optimizer`` and ``scaler`` attributes.)"""
    from types import SimpleNamespace

    from rayleighflow.monitor.huggingface import _unscaled_by

    net = nn.Linear(3, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = SimpleNamespace(optimizer=torch.optim.SGD(net.parameters(), lr=0.1), scaler=scaler)
    scaler.scale(net(torch.ones(1, 3)).sum()).backward()
    assert _unscaled_by(opt) is None
    scaler.unscale_(opt.optimizer)
    assert float(_unscaled_by(opt)) == 1024.0
    assert _unscaled_by(SimpleNamespace(optimizer=opt.optimizer, scaler=None)) is None


def _jsonl_rows(path):
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in lines if isinstance(r, dict) and "rayleigh" in r}


def test_attached_callback_feeds_the_trainers_log_history_and_trainer_state(tmp_path):
    """attach(trainer): at every log event (logging_steps=1) the Trainer's log_history gets the
    step's rayleigh/R, rayleigh/layer/<group> and rayleigh/kl/<φ>, equal to the monitor's own
    JSONL row of that step; trainer_state.json after save_state holds the same values."""
    model = _bert()
    t = transformers.Trainer(model=model, train_dataset=_sentences(),
                             args=_args(tmp_path, max_steps=4, logging_strategy="steps",
                                        logging_steps=1))
    cb = RayleighCallback(log=tmp_path / "run", echo=None, sync_every=3).attach(t)
    assert cb in t.callback_handler.callbacks
    t.train()
    t.save_state()
    own = _jsonl_rows(tmp_path / "run" / "trajectories" / "main.jsonl")
    assert sorted(own) == [0, 1, 2, 3]
    logged = [e for e in t.state.log_history if "rayleigh/R" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    seen_kl = False
    for e in logged:
        row = own[e["step"] - 1]
        assert e["rayleigh/R"] == row["rayleigh"]
        layers = {k[len("rayleigh["):-1]: v for k, v in row.items()
                  if k.startswith("rayleigh[") and isinstance(v, float)}
        assert layers and {k: e[f"rayleigh/layer/{k}"] for k in layers} == layers
        kls = {k[3:-1]: v for k, v in row.items() if k.startswith("kl[") and isinstance(v, float)
               and math.isfinite(v)}
        assert all(e[f"rayleigh/kl/{k}"] == v for k, v in kls.items())
        seen_kl = seen_kl or bool(kls)
    assert seen_kl, "no step logged a finite KL ratio"
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    saved = [e for e in state["log_history"] if "rayleigh/R" in e]
    assert [(e["step"], e["rayleigh/R"]) for e in saved] == \
        [(e["step"], own[e["step"] - 1]["rayleigh"]) for e in logged]


def test_unattached_callback_leaves_the_trainers_logs_alone_and_attach_checks_its_argument(
        tmp_path):
    t = transformers.Trainer(model=_bert(), train_dataset=_sentences(),
                             args=_args(tmp_path, max_steps=2, logging_strategy="steps",
                                        logging_steps=1),
                             callbacks=[RayleighCallback(echo=None)])
    t.train()
    assert not any(k.startswith("rayleigh/") for e in t.state.log_history for k in e)
    with pytest.raises(TypeError, match="needs a transformers Trainer"):
        RayleighCallback().attach(object())


def test_attached_callback_reaches_wandb_offline(tmp_path, monkeypatch):
    """report_to="wandb" in offline mode: the W&B run's summary holds the last rayleigh/R."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed (pip install wandb to run this check)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = transformers.Trainer(model=_bert(), train_dataset=_sentences(),
                             args=_args(tmp_path, max_steps=2, logging_strategy="steps",
                                        logging_steps=1, report_to="wandb"))
    cb = RayleighCallback(echo=None).attach(t)
    t.train()
    import wandb
    summary = dict(wandb.run.summary) if wandb.run is not None else {}
    wandb.finish()
    assert summary.get("train/rayleigh/R") == cb.monitor.rows[-1]["rayleigh"]
