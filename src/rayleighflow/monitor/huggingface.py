"""A Hugging Face ``TrainerCallback`` that runs :class:`rayleighflow.monitor.Monitor`
(extra ``[huggingface]``). One line in the Trainer::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[RayleighCallback(log="runs/hf")])

What it measures. The Trainer computes the loss inside the model, so the callback reads the
model's forward call through hooks: the ``labels`` keyword going in and ``logits`` coming out of
each training forward (modules in training mode with autograd on; evaluation forwards are
skipped). A forward is one of the step's micro-batches when its outputs reached the backward
that filled ``.grad`` (a gradient hook on its loss and outputs says so): an extra forward, of a
callback or of a ``compute_loss`` override, whose outputs were not backpropagated is ignored,
and that is said once. The step is recorded in ``on_pre_optimizer_step``, where ``.grad`` holds
the gradient of the step's batch (all micro-batches; under DDP already averaged). Targets, by
default:

* logits (B, C) with labels (B,): a classifier, one sample per row;
* logits (B, T, V) with labels (B, T): a token model; for ``*ForCausalLM`` / ``*LMHeadModel``
  models the labels are shifted by one as the model's loss does (logits[:, :-1] predict
  labels[:, 1:]); positions labelled −100 (``ignore_index``) are dropped;
* anything else: pass ``targets=lambda outputs, labels, module: (out, y)``.

The declared loss is softmax cross-entropy, the mean over the step's counted targets (the union
of its micro-batches). What was backpropagated is read, not assumed: the gradient hook on the
model's ``loss`` gives the factor c the Trainer applied to it before ``backward`` (1/accumulation
steps, 1 when it passed ``num_items_in_batch``, the world size with
``average_tokens_across_devices``; a GradScaler's scale is taken out once ``.grad`` is
unscaled), and the model's loss is compared with the cross-entropy recomputed on its outputs to
find its normalization d: the Trainer's count ``num_items_in_batch`` (language models divide by
it) or the micro-batch's own target count (models that ignore it, such as
``BertForSequenceClassification``, whose ``.grad`` under accumulation is then the sum of the
micro-batch means). Which one is said once. Then ``.grad`` = (c·N/d)·∇L_B with N the step's
targets, and the monitor divides by that scale and checks the backpropagated loss against the
recomputed one (a mismatch voids the step). Micro-batch means over micro-batches of unequal
sizes weigh a target 1/n_m, not 1/N: those steps get no quotient, and that is said.

Not measured exactly, and said: **gradient clipping** (``max_grad_norm > 0``, the Trainer's
default 1.0) runs before ``on_pre_optimizer_step``, so a clipped ``.grad`` is not ∇L_B; steps
whose ‖.grad‖ (the norm the clipping acted on) reached ``max_grad_norm`` get no quotient
(``max_grad_norm=0`` measures every step). ``label_smoothing_factor > 0`` changes the loss the
Trainer backpropagates: refused. A loss the model did not compute (``compute_loss_func``, a
``compute_loss`` override) cannot be checked: the step's ``.grad`` is then taken to be that of
the mean over the targets (over ``num_items_in_batch`` when the Trainer counted), as said once;
a step that backpropagated the model's loss of some forwards and only the outputs of others
(R-drop, a consistency penalty) gets no quotient.

Into the Trainer's logs: ``RayleighCallback(...).attach(trainer)`` adds the callback and, at
each of the Trainer's log events (``logging_steps``), reads the monitor back and passes the
current step's scalars to ``trainer.log``, so every ``report_to`` logger (W&B, MLflow,
TensorBoard) and ``state.log_history`` / ``trainer_state.json`` get them, named as the
:class:`~rayleighflow.monitor.sinks.Callback` sink names them: ``rayleigh/R``,
``rayleigh/layer/<group>``, ``rayleigh/kl/<φ>``, ... Steps between log events stay in the
monitor's own log only. Passed in ``callbacks=[...]`` without ``attach``, nothing reaches the
Trainer's logs (a callback is not handed the trainer, and loggers listed before it have already
written the log event).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Hugging Face callback needs transformers: "
                      "pip install 'rayleighflow[huggingface]'") from e

from ._monitor import Monitor, MonitorError
from ._readback import LOSS_RTOL
from .diagnose import Diagnosis
from .sinks import Callback

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


def _unscaled_by(optimizer: Any) -> Tensor | None:
    """The GradScaler's scale S when accelerate's scaler has already unscaled ``.grad`` (the
    Trainer's clipping does) while the backward ran on S·loss, so the gradient reaching the loss
    carries S; None without an enabled scaler or while ``.grad`` is still scaled (then both
    carry S and it cancels)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    state = getattr(scaler, "_per_optimizer_states", {}).get(id(_torch_optimizer(optimizer)))
    if state is None or state.get("stage") is not OptState.UNSCALED:
        return None
    scale = getattr(scaler, "_scale", None)
    return (scale.detach().reshape(()) if isinstance(scale, Tensor)
            else torch.tensor(float(scaler.get_scale()), dtype=torch.float64))


def _output_tensors(output: Any) -> list[Tensor]:
    """The top-level tensors of a forward's output (a ModelOutput, dict, tuple or tensor)."""
    if isinstance(output, Tensor):
        return [output]
    values = (output.values() if hasattr(output, "values")
              else output if isinstance(output, tuple | list) else ())
    return [v for v in values if isinstance(v, Tensor)]


@dataclass
class _Forward:
    """One training forward: its targets (or why there are none), the model's loss, the count
    the Trainer passed, and what its gradient hooks saw during the backward."""

    out: Tensor | None = None
    y: Tensor | None = None
    error: Exception | None = None
    loss: Tensor | None = None            # the model's loss (a detached copy)
    items: Any = None                     # num_items_in_batch passed to this forward
    factor: Tensor | None = None          # d(backpropagated loss)/d(model's loss)
    used: bool = False                    # some output received a gradient

    def loss_grad(self, g: Tensor) -> None:
        self.used = True
        g = g.detach()
        self.factor = g if self.factor is None else self.factor + g

    def output_grad(self, g: Tensor) -> None:
        self.used = True


_COUNT, _MEAN = "count", "mean"


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
        self._forwards: list[_Forward] = []
        self._optimizer: Any = None
        self._world_scale = 1
        self._normalizer: str | None = None   # how the model's loss is normalized, once seen
        self._said: set[str] = set()
        self._trainer: Any = None
        self._latest: dict[int, dict[str, float]] = {}   # monitor step -> its logger metrics
        self._logging = False

    def attach(self, trainer: Any) -> RayleighCallback:
        """Add this callback to ``trainer`` and send the monitor's scalars to its logs."""
        if not hasattr(trainer, "log") or not hasattr(trainer, "add_callback"):
            raise TypeError(f"RayleighCallback.attach needs a transformers Trainer, got "
                            f"{type(trainer).__name__}")
        self._trainer = trainer
        trainer.add_callback(self)
        return self

    def _collect(self, metrics: dict[str, float], step: int) -> None:
        self._latest.setdefault(step, {}).update(metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._trainer is None or self._logging or self.monitor is None:
            return
        self.monitor.flush()
        # the monitor counts optimizer steps from 0; the Trainer's global_step from 1
        metrics = self._latest.pop(state.global_step - 1, None)
        self._latest.clear()
        if metrics:
            self._logging = True   # trainer.log calls on_log again
            try:
                self._trainer.log(dict(metrics))
            finally:
                self._logging = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError("RayleighCallback: label_smoothing_factor > 0 makes the Trainer "
                             "backpropagate a smoothed loss, not the cross-entropy the monitor "
                             "declares: ‖∇L‖² = R·‖∇ℓ‖²_D would not hold")
        if model is None:
            raise MonitorError("RayleighCallback: the Trainer passed no model to on_train_begin")
        clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        self._optimizer = optimizer
        kwargs = dict(self.kwargs)
        if self._trainer is not None:
            kwargs["sinks"] = [*kwargs.get("sinks", ()), Callback(self._collect)]
        self.monitor = Monitor(model, "cross-entropy", log=self.log_dir,
                               optimizer=_torch_optimizer(optimizer),
                               clip_norm=clip if clip > 0 else None,
                               **{"name": "huggingface", **kwargs})
        world = int(getattr(args, "world_size", 1))
        if world > 1 and getattr(args, "average_tokens_across_devices", False):
            self._world_scale = world   # the Trainer multiplies the loss by the world size
        self._handles = [model.register_forward_pre_hook(self._inputs, with_kwargs=True),
                         model.register_forward_hook(self._outputs)]

    # -- hooks ------------------------------------------------------------------------------
    def _inputs(self, module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            self._labels = kwargs.get("labels")
            self._items = kwargs.get("num_items_in_batch")

    def _outputs(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.monitor is None:
            return
        labels, self._labels = self._labels, None
        rec = _Forward(items=self._items)
        self._items = None
        try:
            with torch.no_grad():
                out, y = self.targets(output, labels, module)
            rec.out, rec.y = out.detach(), y
        except Exception as e:   # raised only if this forward turns out to be a micro-batch
            rec.error = e
        loss = output.get("loss") if hasattr(output, "get") else None
        for t in _output_tensors(output):
            if not t.requires_grad:
                continue
            if t is loss:
                # a copy: the Trainer may rescale the loss in place (``loss *= world``); the
                # hook then still sees the gradient with respect to the model's own value
                rec.loss = loss.detach().clone()
                t.register_hook(rec.loss_grad)
            else:
                t.register_hook(rec.output_grad)
        self._forwards.append(rec)

    # -- the step ---------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        forwards, self._forwards = self._forwards, []
        micro = [r for r in forwards if r.used]
        if len(micro) < len(forwards):
            self._say_once("ignored", (
                f"{len(forwards) - len(micro)} training-mode forward(s) of optimizer step "
                f"{state.global_step} did not reach its backward (an extra forward of a "
                "callback or of a compute_loss override?): not counted as micro-batches; a "
                "step's batch is the forwards whose outputs were backpropagated"))
        if not micro:
            raise MonitorError(
                "RayleighCallback: no training forward of this step reached the backward (no "
                "output of the model received a gradient): nothing to measure")
        for r in micro:
            if r.error is not None:
                raise r.error
        unscaled = _unscaled_by(self._optimizer)
        for r in micro:
            assert r.out is not None and r.y is not None
            if r.factor is not None and unscaled is not None:
                r.factor = r.factor / unscaled.to(r.factor.device)
            # the loss this micro-batch contributed to the backward: c·(the model's loss)
            self.monitor.accumulate(r.out, r.y, None if r.factor is None or r.loss is None
                                    else r.factor * r.loss)
        scale, void = self._scale(micro)
        self.monitor.step(scale=scale, void=void)

    def _scale(self, micro: list[_Forward]) -> tuple[Tensor | float | None, str | None]:
        """(.grad / ∇L_B, a reason the step is void or None) for the step's micro-batches."""
        sizes = [int(r.y.shape[0]) for r in micro if r.y is not None]
        total = sum(sizes)
        with_loss = [r.factor is not None and r.loss is not None for r in micro]
        if not all(with_loss):
            if any(with_loss):
                return None, ("the backward used the model's loss of some micro-batches and "
                              "only the outputs of others (R-drop, a consistency penalty?): "
                              ".grad is not the gradient of the declared loss on their union")
            items = micro[0].items
            self._say_once("unchecked", (
                "the loss backpropagated is not the model's own (compute_loss_func, a "
                "compute_loss override, or no labels): it cannot be checked; .grad is taken "
                "to be the gradient of the mean cross-entropy over the step's targets"
                + (" divided by the Trainer's num_items_in_batch" if items is not None else "")))
            if items is None:
                return None, None
            return total * self._world_scale / torch.as_tensor(items).double().reshape(()), None
        factor = micro[0].factor
        assert factor is not None
        kind = self._normalization(micro, sizes)
        if kind == _COUNT:
            d = torch.as_tensor(micro[0].items).to(factor.device).double().reshape(())
        else:
            if len(set(sizes)) > 1:
                return None, (
                    f"the model's loss is each micro-batch's own mean and the micro-batches "
                    f"have unequal sizes ({', '.join(map(str, sizes))} targets): .grad weighs a "
                    "target of micro-batch m by 1/n_m, not by one over the step's count")
            d = torch.tensor(float(sizes[0]), dtype=torch.float64, device=factor.device)
        return factor.double() * total / d, None

    def _normalization(self, micro: list[_Forward], sizes: list[int]) -> str:
        """Whether the model divided its summed loss by the Trainer's ``num_items_in_batch``
        (count) or by the micro-batch's own target count (mean): decided, and said, at the
        first step where the two differ, from the model's loss against the cross-entropy
        recomputed on its outputs."""
        items = micro[0].items
        if items is None:
            return _MEAN
        if self._normalizer is not None:
            return self._normalizer
        count = float(torch.as_tensor(items).reshape(()))
        if all(n == count for n in sizes):
            return _COUNT             # one micro-batch holding every counted target: the same
        fits = {_COUNT: True, _MEAN: True}
        for r, n in zip(micro, sizes, strict=True):
            assert r.out is not None and r.y is not None and r.loss is not None
            f = r.out if r.out.dtype in (torch.float32, torch.float64) else r.out.float()
            summed = float(F.cross_entropy(f, r.y.long(), reduction="sum"))
            loss = float(r.loss)
            rtol = max(LOSS_RTOL.get(r.loss.dtype, 1e-4), LOSS_RTOL.get(r.out.dtype, 1e-4))
            for kind, d in ((_COUNT, count), (_MEAN, float(n))):
                fits[kind] &= abs(loss * d - summed) <= rtol * abs(summed) + 1e-12
        if fits[_COUNT] == fits[_MEAN]:
            return _COUNT             # neither (the monitor's loss check voids the step) or both
        self._normalizer = _COUNT if fits[_COUNT] else _MEAN
        if self._normalizer == _COUNT:
            self._say_once("normalization", (
                "the model's loss is its summed cross-entropy divided by the Trainer's "
                f"num_items_in_batch ({count:g} at this step, over {len(micro)} micro-batches "
                f"of {', '.join(map(str, sizes))} targets): .grad is (targets/count)·∇L_B, and "
                "the monitor divides by that"))
        else:
            self._say_once("normalization", (
                "the model's loss ignores num_items_in_batch: it is each micro-batch's own mean "
                f"(micro-batches of {', '.join(map(str, sizes))} targets, count "
                f"{count:g}), and the Trainer, which passed the count, did not divide it by the "
                "accumulation steps, so .grad is the sum of the micro-batch means' gradients: "
                "with equal micro-batches, (micro-batches)·∇L_B of the union mean; the monitor "
                "divides by that (steps with unequal micro-batches get no quotient)"))
        return self._normalizer

    def _say_once(self, key: str, message: str) -> None:
        if key in self._said or self.monitor is None:
            return
        self._said.add(key)
        m = self.monitor
        m._emit(Diagnosis(m._step, f"huggingface-{key}", f"step {m._step}: {message}"))

    def _finish(self, status: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._forwards = []
        if self.monitor is not None:
            self.monitor.close(status)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish("complete")
