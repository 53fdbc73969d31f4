"""rf.Monitor: R(K; ∇ℓ), per-layer quotients and KL ratios for the user's own training loop."""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, final

import torch
from torch import Tensor, nn

from .._types import Convention
from ..desingularizers import get_desingularizer
from ..losses import Loss, get_loss
from ._batch import (
    OutputGrad,
    PendingStep,
    eager_sums,
    flatten_batch,
    grad_check_sums,
    grad_norms,
)
from ._params import ParamLayout
from ._ranks import RankGroup, unwrap
from ._readback import LOSS_RTOL, ReadBack
from ._reports import Reports
from .diagnose import Diagnoser, Diagnosis, Forecast, Thresholds
from .probe import ProbeSet
from .sinks import RunFolder, Sink

__all__ = ["Monitor", "MonitorError", "DEFAULT_DESINGULARIZERS"]

DEFAULT_DESINGULARIZERS = ("log", "reciprocal", "cross-entropy")

_GRAD, _LR = attrgetter("grad"), itemgetter("lr")

# autograd nodes that keep an output's values in order (``out = model(x).squeeze(-1)``): the
# gradient read on the model's output is then that of the tensor passed to step()
_ORDER_KEEPING = ("ViewBackward", "UnsafeViewBackward", "SqueezeBackward", "UnsqueezeBackward",
                  "ReshapeAliasBackward", "AliasBackward")


def _no_hook(module: nn.Module, args: Any, output: Any) -> None:
    """What a copy of the model keeps in place of the monitor's forward hook."""


def _no_hook_factory() -> Callable[..., None]:
    return _no_hook


class _OutputHook:
    """The forward hook that has the monitor watch the model's output. It holds the monitor
    weakly, and a deep copy or a pickle of the model (an EMA copy, ``torch.save(model)``) gets
    :func:`_no_hook` instead: the copy is not the monitored model."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = weakref.ref(monitor)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        monitor = self._monitor()
        if monitor is not None and type(output) is Tensor:
            monitor.watch(output)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _no_hook

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _no_hook_factory, ()


def _step_scale(opt: torch.optim.Optimizer | None) -> float | None:
    """η‖∇L‖² → the first-order decrease of an SGD step: 1/(1 − β) with momentum β; None for
    adaptive optimizers, whose steps it does not measure (no optimizer: no η either way)."""
    if opt is None:
        return 1.0
    if not isinstance(opt, torch.optim.SGD):
        return None
    beta = float(opt.param_groups[0].get("momentum", 0.0))
    return 1.0 / (1.0 - beta) if beta < 1 else None


class MonitorError(RuntimeError):
    """The monitor was used in a way that makes its numbers meaningless (e.g. no gradients)."""


@final
class Monitor(ReadBack, Reports):
    """Watches a training loop: per step, from the outputs and the gradients already in ``.grad``

        L_B,  ‖∇L_B‖² = Σ_p ‖p.grad‖²,  ‖∇ℓ‖²_D = Σ ω_i ‖g_i‖²,  R(K; ∇ℓ) = ‖∇L_B‖² / ‖∇ℓ‖²_D,

    per-group quotients R(K_b; ∇ℓ) (they sum to R) and the KL ratios φ'(L_B)‖∇L_B‖² — with no
    second forward or backward pass. Weights ω_i are 1/n (``convention="mean"``: the loss is a
    mean over the n samples of the step, like ``F.cross_entropy``) or 1 (``"sum"``).

    Call :meth:`step` after ``loss.backward()`` (and after ``scaler.unscale_(opt)`` with a
    GradScaler) and before ``optimizer.zero_grad()``; with gradient accumulation, call
    :meth:`accumulate` after each micro-batch's backward and :meth:`step` before the optimizer
    step. Values stay on the device and are read back every ``sync_every`` steps.

    The identity ‖∇L‖² = R·‖∇ℓ‖²_D holds only if ``.grad`` is the gradient of the declared loss
    on these outputs. Two checks, and a step failing either gets no quotient (NaN) and a
    diagnosis naming the likely cause and the fix: (1) a hook on the model's output reads the
    gradient G that reached it in the backward, and G must equal ω_i·∂ℓ_i/∂f_i of the declared
    loss (label smoothing, a penalty on the outputs, an undivided micro-batch loss or another
    reduction change G even where they leave the loss value almost unchanged, as near
    initialisation); (2) the loss you pass must equal the declared loss recomputed from the
    outputs (this also catches a penalty on the parameters).

    Under DistributedDataParallel (``torch.distributed`` initialized with more than one rank,
    or ``distributed=True``) a step's batch is the union of the ranks' batches. DDP already
    averaged ``.grad``, the gradient of (1/W)·Σ_r L_r; the per-rank sums Σℓ_i, Σ‖g_i‖² and n_r
    are combined at each read-back by one all-gather, with the weights that averaging gives:
    for "mean", 1/(W·n_r) on rank r's samples, i.e. the global-batch mean when the ranks'
    batches are equal (unequal ones are recorded with DDP's weights and said); for "sum",
    ∇(Σ_i ℓ_i) = W·``.grad``. So the quotient equals the single-process one on the concatenated
    batch. The gathered gradient norms check that DDP did synchronize ``.grad`` (steps where
    ranks differ get no quotient). Every rank calls :meth:`step`, :meth:`flush` and
    :meth:`close`; only rank 0 writes sinks and echoes (``all_ranks_write=True``: all ranks);
    every rank keeps :attr:`rows`. Assumes DDP's default averaging (no communication hook
    that rescales) and unsharded parameters (not FSDP).

    >>> import torch, torch.nn.functional as F
    >>> from rayleighflow.monitor import Monitor
    >>> net = torch.nn.Linear(3, 2, dtype=torch.float64)
    >>> x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(8, 3)
    >>> y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    >>> monitor = Monitor(net, "cross-entropy", echo=None)
    >>> out = net(x)
    >>> loss = F.cross_entropy(out, y)
    >>> loss.backward()
    >>> monitor.step(out, y, loss)      # the first step is read back at once
    >>> row = monitor.rows[-1]
    >>> g2 = sum(float((p.grad ** 2).sum()) for p in net.parameters())     # ‖∇L_B‖²
    >>> abs(row["grad_sq"] - g2) <= 1e-12 * g2 and abs(row["loss"] - loss.item()) <= 1e-12
    True
    >>> abs(row["rayleigh[weight]"] + row["rayleigh[bias]"] - row["rayleigh"]) <= 1e-12
    True

    Example::

        monitor = rf.Monitor(model, "cross-entropy", log="runs/mine", optimizer=opt)
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            monitor.step(out, y, loss)
            opt.step()
        monitor.close()          # then: rayleighflow report runs/mine

    Args:
        model: the ``nn.Module`` being trained. Parameters with ``requires_grad=False`` are
            excluded (and said so); the parameter set is fixed at construction.
        loss: "cross-entropy", "square" (ℓ_i = ½‖f_i − y_i‖²), "logistic" or a :class:`Loss`.
        log: a run folder for ``rayleighflow report`` (shorthand for ``sinks=[RunFolder(log)]``).
        sinks: more :class:`Sink` objects (TensorBoard, CSV, RichTable).
        optimizer: lets the monitor say which update rule runs, read η for η‖∇L‖² and the
            stability check. Never modified.
        desingularizers: the KL family recorded as ``kl[<name>]`` columns.
        sync_every: steps between read-backs (default 20).
        full_data: an iterable of (x, y) batches (a DataLoader) streamed every
            ``full_every`` steps for the exact full-data L, ‖∇L‖², ‖∇ℓ‖²_D and R.
        full_every: the steps between full-data estimates (with ``full_data``).
        probe: a probe set (x or (x, y)) whose NTK spectrum is taken every
            ``probe_every`` steps; x is a tensor (n, ...) or a mapping of named inputs
            sharing dimension 0 (a Hugging Face batch, passed as ``model(**x)``).
        probe_every: the steps between probe spectra (with ``probe``).
        target_loss: forecast the step at which the loss reaches it (if the ratio stays ≥ μ).
        window: records per diagnosis window.
        echo: called with each diagnosis message (default ``print``; None for silence).
        keep: how many per-step rows :attr:`rows` keeps in memory.
        distributed: None (default) combines the ranks' batches when torch.distributed is
            initialized with more than one rank; True requires it; False monitors each
            process alone (no collective).
        process_group: the group DDP averages over (default: the DDP module's, else the
            default group).
        all_ranks_write: under DDP, let every rank write its sinks and echo (default rank 0).
        clip_norm: the max_norm of a gradient clipping that runs before :meth:`step` (better:
            call step before clipping). A clipped ``.grad`` is not ∇L_B: steps whose ‖.grad‖
            (the norm of the gradients in ``.grad``, before a ``scale`` correction: the norm
            the clipping acted on) reached clip_norm·(1 − 1e-5) − 1e-6 get no quotient, and
            that is said.
        strict: let a failed full-data estimate or probe spectrum (a non-finite loss, a
            singular eigenproblem on a diverging run) raise into the training loop. By default
            it is recorded as a diagnosis, said once, and the run goes on.
        every: measure one optimizer step in ``every`` (steps 0, every, 2·every, …; default
            1, each step). The other calls return at once, reading nothing; rows keep the
            optimizer step index, and the log, the summary and the rules say that only those
            steps were measured. Full-data estimates and probe spectra keep their own schedule.
        thresholds: the diagnosis rules' thresholds (:class:`~rayleighflow.monitor.diagnose.
            Thresholds`: plateau span and decrease, saddle rate, collapse, rise, stability).
        grad_check: hook the model's forward (tensor outputs, forwards with autograd on) to
            read the gradient that reaches its output in the backward and compare it with the
            declared loss's (default True). It applies when the ``out`` passed to :meth:`step`
            is that output or a reshape of it; otherwise only the loss value is checked (said
            once). Integrations call :meth:`watch` on the outputs they pass.
    """

    def __init__(
        self, model: nn.Module, loss: str | Loss = "cross-entropy", *,
        log: str | Path | None = None, sinks: Iterable[Sink] = (),
        convention: Convention | str = "mean",
        groups: Mapping[str, Sequence[str]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        desingularizers: Sequence[str] = DEFAULT_DESINGULARIZERS,
        sync_every: int = 20,
        full_data: Iterable[Any] | None = None, full_every: int | None = None,
        split: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        probe: Tensor | Mapping[str, Tensor] | tuple[Tensor | Mapping[str, Tensor], Tensor]
        | None = None, probe_every: int | None = None,
        target_loss: float | None = None, window: int = 50,
        echo: Callable[[str], None] | None = print, keep: int = 100_000,
        name: str = "monitor", max_stored_elements: int = 1 << 22,
        distributed: bool | None = None, process_group: Any = None,
        all_ranks_write: bool = False, clip_norm: float | None = None, strict: bool = False,
        every: int = 1, thresholds: Thresholds | None = None, grad_check: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor watches an nn.Module, got {type(model).__name__}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or None), got {clip_norm!r}")
        self.clip_norm = clip_norm
        self.strict = strict
        self._periodic_failed: dict[str, int] = {}
        self._clipped = 0
        self._voided: dict[str, int] = {}
        self.ranks = RankGroup.resolve(model, distributed, process_group)
        model = unwrap(model)
        if self.ranks is not None and self.ranks.rank != 0 and not all_ranks_write:
            log, sinks, echo = None, (), None   # rank 0 writes; every rank keeps the rows
        for what, v in (("sync_every", sync_every), ("full_every", full_every),
                        ("probe_every", probe_every), ("every", every)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{what} must be a positive integer number of steps, got {v!r}")
        if (full_data is None) != (full_every is None):
            raise ValueError("full-data estimates need both full_data (a loader) and full_every")
        if (probe is None) != (probe_every is None):
            raise ValueError("probe-set spectra need both probe (x or (x, y)) and probe_every")
        self.model = model
        self.loss = get_loss(loss)
        self.convention = Convention.parse(convention)
        self.layout = ParamLayout.of(model, groups)
        self.optimizer = optimizer
        self.family = [get_desingularizer(d) for d in desingularizers]
        self.phi = get_desingularizer(self.loss.desingularizer)
        self.sync_every, self.full_every, self.probe_every = sync_every, full_every, probe_every
        self.full_data, self.split = full_data, split
        self.target_loss = target_loss
        self.echo = echo
        self.name = name
        self.max_stored = max_stored_elements
        self.sinks: list[Sink] = ([RunFolder(log)] if log is not None else []) + list(sinks)
        self.every = every
        self.diagnoser = Diagnoser(self.phi, window, thresholds, every=every,
                                   step_scale=_step_scale(optimizer))
        self.probe: ProbeSet | None = None
        if probe is not None:
            px, py = probe if isinstance(probe, tuple | list) else (probe, None)
            self.probe = ProbeSet(model, self.layout, self.loss, self.convention, px, py)
        self.rows: deque[dict[str, Any]] = deque(maxlen=keep)
        self.full_rows: list[dict[str, Any]] = []
        self.probe_rows: list[dict[str, Any]] = []
        self.diagnoses: list[Diagnosis] = []
        self.last_forecast: Forecast | None = None
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=window)
        self._pending: list[PendingStep | tuple] = []
        self._micro: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._eager: list[Tensor] | None = None
        self._step = 0
        self._first_loss: float | None = None
        self._rayleigh_min = math.inf
        self._k: int | None = None
        self._loss_dtype: torch.dtype | None = None  # the passed losses' dtype, once seen
        self._batch_n: float | None = None
        self._rtol: float | None = None
        self._mismatches = 0
        self._mismatch_causes: dict[str, int] = {}
        self._amp_said = False
        self._unsynced = 0
        self._unequal_said = False
        self._gd_since_full = 0.0
        self._targets_checked = False
        self._unstable = False
        self._closed = False
        self._begin = time.perf_counter()
        self._group_of_param = self._optimizer_groups()
        self._opened = False
        self._fast = False   # set after the first step: _fast_step needs its width and dtype
        self._fast_shapes: tuple[torch.Size, torch.Size] | None = None
        self._params = self.layout.params
        self._lr_groups = None if optimizer is None else optimizer.param_groups
        self._periodic = full_every is not None or probe_every is not None
        self._watched: dict[int, list[Any]] = {}   # id(output) -> [weakref, gradient read]
        self._watching = True          # False during the monitor's own forwards
        self._gsum: Tensor | None = None   # the step's grad_check_sums so far
        self._gcount = 0
        self._unchecked_said = False
        self._forward_hook = model.register_forward_hook(_OutputHook(self)) if grad_check \
            else None
        self._say_setup(all_ranks_write)

    # -- setup ------------------------------------------------------------------------------
    def _optimizer_groups(self) -> list[int] | None:
        if self.optimizer is None:
            return None
        where = {id(p): i for i, g in enumerate(self.optimizer.param_groups)
                 for p in g["params"]}
        return [where.get(id(p), -1) for p in self.layout.params]

    def update_rule(self) -> tuple[bool, str]:
        """(is the update −η∇L_B?, the sentence that says which update runs)."""
        opt = self.optimizer
        if opt is None:
            return False, ("update rule unknown (no optimizer given): the quotient and KL ratios "
                           "describe the gradient, not necessarily the step taken")
        kind = type(opt).__name__
        g0 = opt.param_groups[0]
        plain = (isinstance(opt, torch.optim.SGD) and all(
            g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0
            and not g.get("maximize", False) for g in opt.param_groups))
        if plain:
            return True, (f"{kind} without momentum or weight decay: each update is −η∇L_B, a "
                          f"gradient step on the batch (η = {g0['lr']:g} in group 0); "
                          "η‖∇L_B‖² is the first-order decrease such a step would certify")
        detail = ", ".join(f"{k} = {g0[k]}" for k in ("momentum", "betas", "weight_decay")
                           if k in g0)
        return False, (f"{kind} ({detail}): the update is not −η∇L, so R(K; ∇ℓ) and the KL "
                       "ratios are diagnostics of the gradient, not of the step taken; "
                       "η‖∇L_B‖² is the decrease a plain gradient step would certify")

    def _say_setup(self, all_ranks_write: bool = False) -> None:
        lay = self.layout
        if lay.frozen:
            self._emit(Diagnosis(0, "frozen", (
                f"{len(lay.frozen)} frozen parameter tensor(s) ({lay.frozen_numel} values, "
                f"requires_grad=False) excluded: {', '.join(lay.frozen[:6])}"
                f"{' …' if len(lay.frozen) > 6 else ''}; the quotient is that of the kernel of "
                f"the {lay.n_params} trainable values"), {"frozen": list(lay.frozen)}), echo=True)
        _, sentence = self.update_rule()
        self._emit(Diagnosis(0, "update-rule", sentence), echo=False)
        if self.every > 1:
            k = self.every
            self._emit(Diagnosis(0, "sampled", (
                f"measured one optimizer step in {k} (steps 0, {k}, {2 * k}, …): the rows, "
                "rules and forecasts see those steps only; the gradients of the others are not "
                "read"), {"every": k}), echo=False)
        if self.ranks is not None:
            w = self.ranks.world
            self._emit(Diagnosis(0, "distributed", (
                f"distributed: {w} ranks; a step's batch is the union of the ranks' batches "
                f"and .grad is DDP's average (1/{w})·Σ_r ∇L_r. "
                + ("With equal per-rank batches that is the gradient of the global-batch mean; "
                   "unequal ones are weighted 1/(W·n_r), as DDP does (said when seen). "
                   if self.convention is Convention.MEAN else
                   f"For the sum convention ∇(Σ_i ℓ_i) = {w}·.grad is recorded. ")
                + "Every rank calls step, flush and close (one all-gather per read-back); "
                + ("every rank writes its sinks." if all_ranks_write else
                   "only rank 0 writes the sinks.")), {"world_size": w}), echo=False)

    def _meta(self) -> dict[str, Any]:
        from ..rundir import versions

        main = ["t", "step", "loss", "grad_sq", "fgrad_sq", "rayleigh",
                *(f"rayleigh[{g}]" for g in self.layout.groups),
                *(f"kl[{d.name}]" for d in self.family), "n", "loss_passed", "lr",
                "gd_decrease"]
        full = ["t", "step", "loss", "grad_sq", "fgrad_sq", "rayleigh", "n_samples",
                *(f"rayleigh[{g}]" for g in self.layout.groups),
                *(f"kl[{d.name}]" for d in self.family), "decrease_ratio"]
        probe = ["t", "step", "lambda_max", "lambda_min", "lambda_min_plot", "lambda_min_label",
                 "lambda_min_nonzero", "rank", "rank_threshold", "rayleigh", "loss", "nk"]
        return {"experiment": self.name, "source": "rayleighflow.Monitor",
                "convention": self.convention.value, "loss": self.loss.name,
                "P": self.layout.n_params, "n_params": self.layout.n_params,
                "groups": list(self.layout.groups),
                "desingularizers": [d.name for d in self.family],
                "time_axis": "t is the optimizer step index, not flow time",
                "update_rule": self.update_rule()[1],
                "frozen": list(self.layout.frozen), "full_every": self.full_every,
                "world_size": 1 if self.ranks is None else self.ranks.world,
                "probe_every": self.probe_every, "every": self.every, "versions": versions(),
                "columns": {"main": main, "full": full, "probe": probe}}

    def _open(self) -> None:
        if not self._opened:
            self._opened = True
            meta = self._meta()
            for s in self.sinks:
                s.open(meta)

    # -- the gradient that reaches the outputs ---------------------------------------------------
    def watch(self, out: Tensor) -> None:
        """Read the gradient that reaches ``out`` in the coming backward (a tensor hook), for the
        check that ``.grad`` is the declared loss's gradient; kept until the next step. The
        model's forward hook calls it on the model's output."""
        if not (self._watching and torch.is_grad_enabled() and out.requires_grad):
            return
        key = id(out)
        entry = self._watched.get(key)
        if entry is not None and entry[0]() is out:
            return
        entry = [weakref.ref(out), None]

        def read(grad: Tensor, entry: list[Any] = entry) -> None:
            entry[1] = grad

        try:
            out.register_hook(read)
        except RuntimeError:   # a tensor autograd will not hook (inside a torch.func transform)
            return
        self._watched[key] = entry

    def _out_grad(self, out: Tensor) -> Tensor | None:
        """The gradient read on ``out``, or on the watched tensor it is a reshape of."""
        entry = self._watched.pop(id(out), None)
        if entry is not None and entry[0]() is out:
            return entry[1]
        node, hops = out.grad_fn, 0
        while node is not None and hops < 4 and type(node).__name__.startswith(_ORDER_KEEPING):
            node, hops = node.next_functions[0][0], hops + 1
            for key, (ref, grad) in self._watched.items():
                t = ref()
                if t is not None and t.grad_fn is node and t.numel() == out.numel():
                    del self._watched[key]
                    return grad
        return None

    def _check_sums(self, out: Tensor, f: Tensor, yf: Tensor,
                    defer: bool = False) -> Tensor | OutputGrad | None:
        """grad_check_sums of this micro-batch, or None (no gradient read for these outputs);
        ``defer``: the gradient read, for the read-back to sum with the other steps'."""
        grad = self._out_grad(out) if self._watched else None
        if grad is None:
            if out.grad_fn is not None and self._forward_hook is not None \
                    and not self._unchecked_said:
                self._unchecked_said = True
                self._emit(Diagnosis(self._step, "loss-check", (
                    f"step {self._step}: the outputs passed are not the tensor the model "
                    "returned (nor a reshape of it), so the gradient that reached them was not "
                    "read: only the loss value is checked against the declared loss (pass the "
                    "model's output, or call monitor.watch(out) before backward)")), echo=False)
            return None
        if f.numel() > self.max_stored:
            return None   # float64 copies of very large outputs: the loss value is checked
        if defer:
            return OutputGrad(grad)
        if not self._targets_checked:
            yf = self.loss.check_targets(f, yf)
        return grad_check_sums(self.loss, f, yf, grad)

    # -- per step ---------------------------------------------------------------------------
    def accumulate(self, out: Tensor, y: Tensor, loss: Tensor | float | None = None) -> None:
        """Add one micro-batch's outputs, targets and (optionally) the loss it backpropagated.

        The union of the micro-batches of a step is the step's batch; the gradient in ``.grad``
        must be that of the declared loss on the union (for the mean convention, divide each
        micro-batch loss by the number of equal-sized micro-batches)."""
        self._check_open()
        f, yf = flatten_batch(self.loss, out, y)
        if self._k is None:
            self._k = int(f.shape[1])
            self._rtol = LOSS_RTOL.get(f.dtype, 1e-4)
        elif f.shape[1] != self._k:
            raise ValueError(f"outputs have width {f.shape[1]} but earlier steps had {self._k}")
        lt = None
        if loss is not None:
            lt = (loss.detach() if isinstance(loss, Tensor)
                  else torch.tensor(float(loss), dtype=torch.float64))  # a Python float is a double
            if lt.numel() != 1:
                raise ValueError(f"pass the scalar loss that was backpropagated, got shape "
                                 f"{tuple(lt.shape)}")
            if lt.ndim:
                lt = lt.reshape(())
            if lt.dtype is not self._loss_dtype:
                # a loss computed in lower precision than the outputs is checked to its precision
                self._loss_dtype = lt.dtype
                self._rtol = max(self._rtol, LOSS_RTOL.get(lt.dtype, 1e-4))
        gs = self._check_sums(out, f, yf)
        if gs is not None:
            self._gsum = gs if self._gsum is None else self._gsum + gs
            self._gcount += 1
        if f.numel() * self.sync_every > self.max_stored:
            sums = eager_sums(self.loss, f, yf, check=not self._targets_checked)
            self._targets_checked = True
            self._eager = list(sums) if self._eager is None else [
                a + b for a, b in zip(self._eager, sums, strict=True)]
            self._micro.append((f[:0], yf[:0], lt))
        else:
            self._micro.append((f, yf, lt))

    def step(self, out: Tensor | None = None, y: Tensor | None = None,
             loss: Tensor | float | None = None, *, scale: Tensor | float | None = None,
             void: str | None = None) -> None:
        """Record one optimizer step: the outputs, targets and loss of its (last) micro-batch,
        and the gradients now in ``.grad``. Call it before ``optimizer.zero_grad()``.

        ``scale``: the loss that was backpropagated is ``scale`` × the declared loss L_B (e.g.
        a sum divided by another count than the batch's): the passed loss is divided by it and
        ‖∇L_B‖² = ‖.grad‖² / scale². The clipping check (``clip_norm``) reads ‖.grad‖ itself.

        ``void``: the reason the caller knows ``.grad`` is not ``scale``·∇L_B at this step (e.g.
        micro-batches weighted unequally): the step is recorded with no quotient and the reason
        is said (the first time, then every 100th step voided for it)."""
        if self.every > 1 and self._step % self.every:
            self._skip()
            return
        if self._fast and scale is None and void is None and self._fast_step(out, y, loss):
            return
        self._check_open()
        if scale is not None:
            scale = (scale.detach().reshape(()) if isinstance(scale, Tensor)
                     else torch.tensor(float(scale), dtype=torch.float64))
        if out is not None:
            if y is None:
                raise ValueError("monitor.step(out, y): the targets y are needed with the outputs")
            self.accumulate(out, y, loss)
        if not self._micro:
            raise ValueError("monitor.step() has no batch: pass step(out, y[, loss]) or call "
                             "accumulate(out, y) after each micro-batch")
        grads = list(map(_GRAD, self._params))
        missing: tuple[str, ...] = ()
        if not all(g is not None for g in grads):
            missing = tuple(n for n, g in zip(self.layout.names, grads, strict=True) if g is None)
        if len(missing) == len(grads):
            self._micro, self._eager = [], None
            raise MonitorError(
                "no parameter has a gradient (.grad is None everywhere): call monitor.step after "
                "loss.backward() and before optimizer.zero_grad() (which sets .grad to None)")
        norms = grad_norms(grads)
        if missing:
            self._note_missing(missing)
            self._fast = False   # parameters unused in the forward: no use trying each step
        pending = PendingStep(self._step, norms, [m[0] for m in self._micro],
                              [m[1] for m in self._micro],
                              [m[2] for m in self._micro if m[2] is not None], self._lrs(), missing)
        if len(pending.losses) not in (0, len(self._micro)):
            pending.losses = []  # a partial sum would not be the backpropagated loss
        if self._eager is not None:
            if any(m[0].shape[0] for m in self._micro):
                raise ValueError("mixing very large and small micro-batches in one step is not "
                                 "supported: use equal micro-batch sizes")
            pending.computed = tuple(self._eager)
        pending.scale = scale
        pending.void = void
        if self._gcount == len(self._micro):   # every micro-batch's gradient was read
            pending.gcheck = self._gsum
        self._gsum, self._gcount = None, 0
        self._watched.clear()
        self._micro, self._eager = [], None
        self._push(pending)

    def _skip(self) -> None:
        """A step that ``every`` leaves unmeasured: counted, its micro-batches dropped; a
        full-data estimate or probe spectrum due at it still runs."""
        self._check_open()
        self._micro, self._eager = [], None
        self._gsum, self._gcount = None, 0
        self._watched.clear()
        i = self._step
        self._step = i + 1
        if self._periodic and ((self.full_every is not None and i % self.full_every == 0)
                               or (self.probe_every is not None and i % self.probe_every == 0)):
            self._due(i)

    def _fast_step(self, out: Tensor, y: Tensor, loss: Tensor | float | None) -> bool:
        """The common step in fewer operations, or False to take the general path: one batch
        of (n, k) outputs with (n,) labels on their device, the loss (if passed) a 0-d tensor
        of an earlier step's dtype, kept until the flush, every gradient present. It makes the
        general path's checks and queues the same step; on a small network the monitor's
        Python is a visible share of a training step (benchmarks/monitor.py)."""
        if type(out) is not Tensor or type(y) is not Tensor or self._micro:
            return False
        if (out.shape, y.shape) != self._fast_shapes and not self._fast_shapes_ok(out, y):
            return False
        if y.requires_grad:
            return False
        if loss is None:
            losses = []
        elif type(loss) is Tensor and loss.dtype is self._loss_dtype and not loss.ndim:
            losses = [loss.detach()]
        else:
            return False
        try:
            norms = torch._foreach_norm(list(map(_GRAD, self._params)))
        except TypeError:   # a .grad is None: the general path says which
            return False
        f = out.detach()
        gcheck = self._check_sums(out, f, y, defer=True) \
            if self._watched or out.grad_fn is not None else None
        self._watched.clear()
        i = self._step
        self._pending.append((i, norms, f, y, losses, self._lrs(), gcheck))
        self._step = i + 1
        if self._periodic or len(self._pending) >= self.sync_every:
            self._due(i)
        return True

    def _lrs(self) -> tuple[float, ...]:
        """The optimizer's learning rate per parameter group now (empty without one)."""
        return () if self._lr_groups is None else tuple(map(float, map(_LR, self._lr_groups)))

    def _fast_shapes_ok(self, out: Tensor, y: Tensor) -> bool:
        shape = out.shape
        ok = (len(shape) == 2 and shape[1] == self._k and y.shape == shape[:1]
              and out.numel() * self.sync_every <= self.max_stored and y.device == out.device)
        if ok:
            self._fast_shapes = (shape, y.shape)
        return ok

    def _push(self, pending: PendingStep) -> None:
        self._pending.append(pending)
        self._step += 1
        if pending.index == 0:
            self._open()
            self._first_step_check()
            self._fast = self.loss.targets == "labels"
        self._due(pending.index)

    def _due(self, index: int) -> None:
        """Read back when due: every ``sync_every`` steps, and before a full-data estimate or a
        probe spectrum at this step."""
        due_full = self.full_every is not None and index % self.full_every == 0
        due_probe = self.probe_every is not None and index % self.probe_every == 0
        if due_full or due_probe or len(self._pending) >= self.sync_every:
            self.flush()
        if not (due_full or due_probe):
            return
        self._watching = False   # the monitor's own forwards are not the training's
        try:
            if due_full:
                self._guarded("full-data estimate", index, self._full)
            if due_probe:
                self._guarded("probe spectrum", index, self._probe)
        finally:
            self._watching = True

    def _first_step_check(self) -> None:
        rows = self.flush()
        r = rows[0]
        if r["grad_sq"] == 0 and r["fgrad_sq"] > 0:
            raise MonitorError(
                f"every gradient is exactly zero while ‖∇ℓ‖²_D = {r['fgrad_sq']:.4g} > 0: "
                "monitor.step was called after optimizer.zero_grad(set_to_none=False) or before "
                "loss.backward(); call it after backward and before zero_grad")

    def _note_missing(self, missing: tuple[str, ...]) -> None:
        if not getattr(self, "_missing_said", False):
            self._missing_said = True
            self._emit(Diagnosis(self._step, "missing-gradients", (
                f"step {self._step}: {len(missing)} trainable parameter tensor(s) have no "
                f"gradient (.grad is None: unused in this forward pass): "
                f"{', '.join(missing[:6])}; counted as zero")))

    # -- messages, summary, close -----------------------------------------------------------
    def _emit(self, d: Diagnosis, echo: bool = True) -> None:
        self.diagnoses.append(d)
        for s in self.sinks:
            s.message(d)
        if echo and self.echo is not None:
            self.echo(f"[rayleighflow] {d.message}")

    def _check_open(self) -> None:
        if self._closed:
            raise MonitorError("the monitor is closed: create a new one for another run")

    def close(self, status: str = "complete") -> dict[str, Any]:
        """Flush, write the summary to every sink and close them; returns the summary."""
        if self._closed:
            return {}
        self.flush()
        if self.target_loss is not None and self._step:
            self._update_forecast()
        summary = self.summary(status)
        self._closed = True
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        self._watched.clear()
        self._fast = False   # step() then reaches the closed check
        if not self._opened:
            self._open()
        for s in self.sinks:
            s.close(summary)
        return summary

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("complete")
        else:
            self.close("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
