"""The lean path of full-batch gradient descent: θ and ∇L in one flat buffer each, updated in
place, the model called directly (no ``functional_call``), the loss and its functional gradient
in as few tensor operations as the loss allows, and the per-iterate log (L, ‖∇L‖², ‖∇ℓ‖²_D)
kept as tensors until the next record.

Cross-entropy uses log-softmax while L ≥ 1e-4·(1 + max|f|) (max over the last record's
outputs): there its rounding error is below ~1e-11 relative. Below that, and at every record,
it uses the precise forms of :class:`~rayleighflow.losses.SoftmaxCrossEntropy` (log1p of the
wrong-class mass, g_y summed without cancellation), as the generic path always does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._types import Params
from ..data import Dataset
from ..losses import SoftmaxCrossEntropy, SquareLoss
from ..problem import Problem

# Cross-entropy switches to the precise forms below FAST_FLOOR·(1 + max|f|).
FAST_FLOOR = 1e-4


class LeanUnavailable(Exception):
    """This model cannot run on the lean path (the generic path is used instead)."""


class LeanGD:
    """θ as views into one flat buffer, the model's own call, in-place updates."""

    def __init__(self, problem: Problem, theta: Params, data: Dataset) -> None:
        model = problem.model
        if model.allow_nondeterministic:
            raise LeanUnavailable("nondeterministic model")
        kinds = {(p.dtype, p.device) for p in theta.values()}
        if len(kinds) != 1:
            raise LeanUnavailable("parameters of mixed dtypes or devices")
        self.names = list(theta)
        self.flat = torch.cat([theta[n].detach().reshape(-1) for n in self.names]).clone()
        self.grad = torch.zeros_like(self.flat)
        self.views: Params = {}
        self.grads: Params = {}
        i = 0
        for n in self.names:
            size = theta[n].numel()
            self.views[n] = self.flat[i:i + size].view_as(theta[n])
            self.grads[n] = self.grad[i:i + size].view_as(theta[n])
            i += size
        self.forward = self._module_forward(model, data) if model.module is not None \
            else self._function_forward(model, data)
        self.problem, self.data = problem, data
        self.omega = problem.omega(data)
        uniform = bool((self.omega == self.omega[0]).all())
        self.w: float | None = float(self.omega[0]) if uniform else None
        self.omega_col = self.omega.unsqueeze(-1)
        self.y: Tensor | None = None
        self.onehot: Tensor | None = None
        loss = problem.loss
        self.kind = ("ce" if isinstance(loss, SoftmaxCrossEntropy)
                     else "square" if isinstance(loss, SquareLoss) else "generic")
        self.fast = self.kind != "generic"  # CE: log-softmax while L ≥ floor
        self.floor = 0.0

    def set_floor(self, fd: Tensor) -> None:
        """The loss below which cross-entropy leaves log-softmax for the precise forms."""
        if self.kind == "ce" and self.fast:
            self.floor = FAST_FLOOR * (1.0 + float(fd.abs().max()))

    def _module_forward(self, model, data: Dataset) -> Callable[[], Tensor]:
        try:
            work = copy.deepcopy(model.module)
        except Exception as exc:  # a module that cannot be copied runs the generic path
            raise LeanUnavailable(f"the module cannot be copied ({exc})") from None
        named = dict(work.named_parameters())
        for n in self.names:
            if n not in named:
                raise LeanUnavailable(f"no parameter {n} in the module")
            p = named[n]
            p.data = self.views[n]
            p.grad = self.grads[n]
        for n, p in named.items():
            if n not in self.views:
                p.requires_grad_(False)  # frozen: held fixed, as in Model
        x = data.x
        return lambda: work(x)

    def _function_forward(self, model, data: Dataset) -> Callable[[], Tensor]:
        leaves = {}
        for n in self.names:
            p = torch.nn.Parameter(self.views[n])
            p.grad = self.grads[n]
            leaves[n] = p
        fn, x = model._fn, data.x
        return lambda: fn(leaves, x)

    # -- the loss --------------------------------------------------------------------------
    def fast_terms(self, fd: Tensor) -> tuple[float, Tensor, Tensor]:
        """(L, the backward seed ω_i g_i, a tensor s with ‖∇ℓ‖²_D = :meth:`fgrad_sq` (s)) in
        the fewest operations the loss allows (cross-entropy through log-softmax)."""
        if self.y is None:
            self._targets(fd)
        if self.kind == "ce":
            logp = torch.log_softmax(fd, dim=-1)
            if self.w is not None:
                value = float(F.nll_loss(logp, self.y, reduction="sum")) * self.w
                # seed = w·(softmax − e_y) in one operation after the exponential
                seed = torch.add(self.neg_onehot_w, logp.exp_(), alpha=self.w)
                return value, seed, torch.linalg.vector_norm(seed)
            value = float(torch.dot(self.omega, F.nll_loss(logp, self.y, reduction="none")))
            g = logp.exp_().sub_(self.onehot)
        else:  # square: ℓ = ½‖∇ℓ‖²_D
            g = fd - self.y
        if self.w is not None:
            seed = g * self.w
            norm = torch.linalg.vector_norm(seed)
            if self.kind == "square":
                value = 0.5 * float(norm) ** 2 / self.w
            return value, seed, norm
        seed = g * self.omega_col
        fsq = torch.dot(seed.reshape(-1), g.reshape(-1))
        if self.kind == "square":
            value = 0.5 * float(fsq)
        return value, seed, fsq

    def precise_terms(self, fd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L, g, seed) in the loss's precise forms (what the generic path computes)."""
        if self.y is None:
            self._targets(fd)
        loss = self.problem.loss.value(fd, self.y, self.omega)
        g = self.problem.loss.functional_grad(fd, self.y)
        return loss, g, g * self.w if self.w is not None else g * self.omega_col

    def precise_stored(self, g: Tensor, seed: Tensor) -> Tensor:
        """What :meth:`fgrad_sq` takes, from the precise g (same form as the fast path's)."""
        if self.w is not None:
            return torch.linalg.vector_norm(seed)
        return torch.dot(seed.reshape(-1), g.reshape(-1))

    def fgrad_sq(self, stored: list[Tensor]) -> list[float]:
        """‖∇ℓ‖²_D from what :meth:`fast_terms` returned: ‖seed‖²/w for uniform weights."""
        vals = torch.stack(stored)
        return (vals * vals / self.w if self.w is not None else vals).tolist()

    def _targets(self, fd: Tensor) -> None:
        self.y = self.problem.targets(self.data, fd)
        if self.kind == "ce":
            self.onehot = F.one_hot(self.y, fd.shape[-1]).to(fd.dtype)
            if self.w is not None:
                self.neg_onehot_w = self.onehot * -self.w

    def outputs(self) -> Tensor:
        out = self.forward()
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out.reshape(out.shape[0], -1) if out.dim() != 2 else out

    def params(self) -> Params:
        """θ now, as fresh tensors (the flat buffer keeps changing)."""
        return {n: v.detach().clone() for n, v in self.views.items()}


def log_evaluations(log: Any, ts: list[float], losses: list[float], gsq: list[float],
                    fsq: list[float]) -> int | None:
    """Append the pending evaluations to the trajectory's log; returns the index of the first
    one with a non-finite ‖∇L‖² (neither it nor any after it is logged), else None."""
    for j, (t, loss, gs, fs) in enumerate(zip(ts, losses, gsq, fsq, strict=True)):
        if not math.isfinite(gs):
            return j
        log.add_evaluation(t, loss, gs, fs)
    return None
