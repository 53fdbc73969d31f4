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
