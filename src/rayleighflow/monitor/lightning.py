"""A Lightning callback that runs :class:`rayleighflow.monitor.Monitor` (extra ``[lightning]``).

One line in the Trainer::

    trainer = L.Trainer(callbacks=[RayleighMonitor("cross-entropy", log="runs/lit")])

The callback reads the LightningModule's forward output through a forward hook (so
``training_step`` must call ``self(x)``, or name the submodule it calls with ``output_of``),
takes the targets from the batch (``batch[1]`` by default, or ``target=lambda batch: ...``),
feeds each micro-batch after its backward and records the step in ``on_before_optimizer_step``:
there Lightning has unscaled AMP gradients and not yet clipped them. With
``accumulate_grad_batches`` Lightning divides each micro-batch loss by the count, which is the
union-batch mean the monitor assumes for equal micro-batches. The training_step's loss must be
the declared loss of that output, and it is checked twice: the loss Lightning backpropagates
(``on_before_backward``) against the declared loss recomputed from the output, and the gradient
that reached the output in the backward (a tensor hook) against the declared loss's, so that
label smoothing or a penalty on the output voids every step, from the first, with its cause
named.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError("the Lightning callback needs Lightning: "
                          "pip install 'rayleighflow[lightning]'") from e

from ._monitor import Monitor, MonitorError
from .sinks import Callback as LoggerSink

__all__ = ["RayleighMonitor"]


def _second(batch: Any) -> Any:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict) and "y" in batch:
        return batch["y"]
    raise TypeError("cannot find the targets in the batch: pass target=lambda batch: ... to "
                    "RayleighMonitor")


class RayleighMonitor(Callback):
    """Lightning callback: R(K; ∇ℓ), per-layer quotients, KL ratios, forecasts and diagnoses.

    Args:
        loss: the declared loss of the module's output ("cross-entropy", "square", ...).
        log: a run folder for ``rayleighflow report``.
        target: batch -> targets (default ``batch[1]``).
        output_of: attribute name of the submodule whose output is the model output (default:
            the LightningModule itself); ``output`` maps that output to a tensor.
        to_loggers: hand every recorded scalar to each of the Trainer's loggers
            (``logger.log_metrics(metrics, step)``: CSVLogger, TensorBoard, W&B, MLflow, ...),
            named ``rayleigh/R``, ``rayleigh/layer/<group>``, ``rayleigh/kl/<φ>``, ... and
            stamped with the optimizer step the row is about (rows arrive at read-backs).
        **monitor_kwargs: passed to :class:`Monitor` (full_data, full_every, probe, ...).
    """

    def __init__(self, loss: str = "cross-entropy", log: str | Path | None = None, *,
                 target: Callable[[Any], torch.Tensor] | None = None,
                 output_of: str | None = None,
                 output: Callable[[Any], torch.Tensor] | None = None,
                 to_loggers: bool = True, **monitor_kwargs: Any) -> None:
        super().__init__()
        self.loss, self.log_dir = loss, log
        self.target = target or _second
        self.output_of, self.output = output_of, output
        self.kwargs = monitor_kwargs
        self.to_loggers = to_loggers
        self.monitor: Monitor | None = None
        self._handle = None
        self._out: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0] if trainer.optimizers else None
        kwargs = dict(self.kwargs)
        if self.to_loggers and trainer.loggers:
            def log_fn(metrics: dict[str, float], step: int) -> None:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)

            kwargs["sinks"] = [*kwargs.get("sinks", ()), LoggerSink(log_fn)]
        self.monitor = Monitor(pl_module, self.loss, log=self.log_dir, optimizer=opt, **kwargs)
        hooked = pl_module if self.output_of is None else getattr(pl_module, self.output_of)
        self._handle = hooked.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._out = output if self.output is None else self.output(output)
            if isinstance(self._out, torch.Tensor) and self.monitor is not None:
                self.monitor.watch(self._out)   # the gradient the backward brings to it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._y, self._out = self.target(batch), None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the loss Lightning backpropagates (already divided under accumulation): the monitor
        # checks it against the declared loss, so that a loss of another form (label smoothing,
        # a penalty) voids the quotient with a message instead of giving a wrong R
        self._loss = loss.detach()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._out is None:
            raise MonitorError("RayleighMonitor saw no forward output in this training step: "
                               "training_step must call self(x), or pass output_of='<name of "
                               "the submodule it calls>'")
        self.monitor.accumulate(self._out, self._y, self._loss)
        self._out = self._loss = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.monitor.step()

    def _finish(self, status: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close(status)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish("complete")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")
