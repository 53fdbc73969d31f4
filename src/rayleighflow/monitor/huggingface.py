"""A Hugging Face ``TrainerCallback`` that runs :class:`rayleighflow.monitor.Monitor`
(extra ``[huggingface]``). One line in the Trainer::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[RayleighCallback(log="runs/hf")])

What it measures. The Trainer computes the loss inside the model, so the callback reads the
model's forward call through hooks: the ``labels`` keyword going in and ``logits`` coming out of
each training forward (modules in training mode with autograd on; evaluation forwards are
skipped). Each micro-batch's (logits, labels) is handed to :meth:`Monitor.accumulate`; the step
is recorded in ``on_pre_optimizer_step``, where ``.grad`` holds the gradient of the step's batch
(all micro-batches; under DDP already averaged). Targets, by default:

* logits (B, C) with labels (B,): a classifier, one sample per row;
* logits (B, T, V) with labels (B, T): a token model; for ``*ForCausalLM`` / ``*LMHeadModel``
  models the labels are shifted by one as the model's loss does (logits[:, :-1] predict
  labels[:, 1:]); positions labelled −100 (``ignore_index``) are dropped;
* anything else: pass ``targets=lambda outputs, labels, module: (out, y)``.

The declared loss is softmax cross-entropy, the mean over the step's counted targets: the loss
of HF classifiers and language models (with gradient accumulation the Trainer passes
``num_items_in_batch``, so the loss is the mean over all micro-batches' tokens, the union mean the
monitor assumes). With one micro-batch per step the model's own ``outputs.loss`` is passed to the
monitor, which checks it against the cross-entropy it recomputes (a mismatch voids the step).

Not measured exactly, and said: **gradient clipping** (``max_grad_norm > 0``, the Trainer's
default 1.0) runs before ``on_pre_optimizer_step``, so a clipped ``.grad`` is not ∇L_B; steps
whose ‖.grad‖ reached ``max_grad_norm`` get no quotient (``max_grad_norm=0`` measures every
step). ``label_smoothing_factor > 0`` changes the loss the Trainer backpropagates: refused.
A ``compute_loss`` override is not visible to the callback: its loss must be the declared one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Hugging Face callback needs transformers: "
                      "pip install 'rayleighflow[huggingface]'") from e

from ._monitor import Monitor, MonitorError

__all__ = ["RayleighCallback", "default_targets"]

IGNORE_INDEX = -100


def _is_causal(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def default_targets(outputs: Any, labels: Tensor | None,
                    module: nn.Module) -> tuple[Tensor, Tensor]:
    """(outputs (n, k), labels (n,)) of one training forward: see the module docstring."""
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else (
        outputs[0] if isinstance(outputs, tuple | list) else outputs)
    if labels is None:
        raise MonitorError("RayleighCallback: the training forward got no `labels` keyword, so "
                           "the monitor has no targets: pass targets=lambda outputs, labels, "
                           "module: (out, y)")
    if not isinstance(logits, Tensor):
        raise MonitorError(f"RayleighCallback: cannot read logits from {type(outputs).__name__}: "
                           "pass targets=lambda outputs, labels, module: (out, y)")
    if logits.dim() == 3 and labels.dim() == 2:
        if _is_causal(module):
            logits, labels = logits[:, :-1, :], labels[:, 1:]
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
    elif not (logits.dim() == 2 and labels.dim() == 1):
        raise MonitorError(f"RayleighCallback: logits of shape {tuple(logits.shape)} with labels "
                           f"of shape {tuple(labels.shape)} are neither a classifier's nor a "
                           "token model's: pass targets=lambda outputs, labels, module: (out, y)")
    keep = labels != IGNORE_INDEX
    if not bool(keep.all()):
        logits, labels = logits[keep], labels[keep]
    return logits, labels


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or None)."""
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


class RayleighCallback(TrainerCallback):
    """Hugging Face Trainer callback: R(K; ∇ℓ), per-layer quotients, KL ratios, forecasts and
    diagnoses of the Trainer's own steps (see the module docstring for what is measured).

    Args:
        log: a run folder for ``rayleighflow report`` (written by the main process only).
        targets: (outputs, labels, module) -> (out (n, k), y (n,)) for other heads.
        **monitor_kwargs: passed to :class:`Monitor` (sinks, full_data, probe, sync_every, ...).
    """

    def __init__(self, log: str | Path | None = None, *,
                 targets: Callable[[Any, Tensor | None, nn.Module], tuple[Tensor, Tensor]]
                 | None = None, **monitor_kwargs: Any) -> None:
        super().__init__()
        self.log_dir = log
        self.targets = targets or default_targets
        self.kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._handles: list[Any] = []
        self._labels: Tensor | None = None
        self._items: Any = None
        self._kept = 0
        self._ga = 1
        self._world_scale = 1

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError("RayleighCallback: label_smoothing_factor > 0 makes the Trainer "
                             "backpropagate a smoothed loss, not the cross-entropy the monitor "
                             "declares: ‖∇L‖² = R·‖∇ℓ‖²_D would not hold")
        if model is None:
            raise MonitorError("RayleighCallback: the Trainer passed no model to on_train_begin")
        clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        self.monitor = Monitor(model, "cross-entropy", log=self.log_dir,
                               optimizer=_torch_optimizer(optimizer),
                               clip_norm=clip if clip > 0 else None,
                               **{"name": "huggingface", **self.kwargs})
        self._ga = int(getattr(args, "gradient_accumulation_steps", 1))
        world = int(getattr(args, "world_size", 1))
        if world > 1 and getattr(args, "average_tokens_across_devices", False):
            self._world_scale = world   # the Trainer multiplies the loss by the world size
        self._handles = [model.register_forward_pre_hook(self._inputs, with_kwargs=True),
                         model.register_forward_hook(self._outputs)]

    def _inputs(self, module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            self._labels = kwargs.get("labels")
            self._items = kwargs.get("num_items_in_batch")

    def _outputs(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.monitor is None:
            return
        out, y = self.targets(output, self._labels, module)
        loss = None
        if self._items is not None or self._ga == 1:
            loss = output.get("loss") if hasattr(output, "get") else None
        self.monitor.accumulate(out, y, loss)
        self._kept += int(y.shape[0])
        self._labels = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        scale = None
        if self._items is not None:
            # The model's loss is Σℓ_i / num_items_in_batch over the step's micro-batches (the
            # Trainer's count, which need not be the number of targets kept here): the
            # backpropagated loss is (kept / num_items)·L_B.
            items = torch.as_tensor(self._items).double().reshape(())
            scale = self._kept * self._world_scale / items
        self.monitor.step(scale=scale)
        self._kept, self._items = 0, None

    def _finish(self, status: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.close(status)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish("complete")
