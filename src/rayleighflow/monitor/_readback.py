"""The monitor's read-back: pending steps turned into rows (one host synchronization), the
checks that void a step's quotient (rank spread, clipping, loss mismatch) and the KL columns.
A mixin of :class:`~rayleighflow.Monitor`, which holds the state it reads."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._types import Convention
from ._batch import OutputGrad, PendingStep, evaluate_steps, grad_check_sums_steps
from .diagnose import Diagnosis

__all__ = ["ReadBack", "LOSS_RTOL", "clip_threshold"]

# Relative tolerance of the loss-consistency check, by the outputs' dtype.
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
              torch.bfloat16: 1e-2}

# Largest relative difference of ‖.grad‖² pieces between ranks still read as synchronized.
_RANK_SPREAD = 1e-6


def clip_threshold(clip_norm: float) -> float:
    """The ‖.grad‖ from which a step counts as clipped by ``clip_grad_norm_(max_norm=clip_norm)``.

    torch scales by max_norm / (‖g‖ + 1e-6) when that is < 1, so a clipped ``.grad`` has norm
    max_norm·‖g‖/(‖g‖ + 1e-6) > max_norm − 1e-6 and an unclipped one ‖g‖ ≤ max_norm − 1e-6;
    1e-5 relative covers the rounding of the norm (float32 gradients)."""
    return clip_norm * (1 - 1e-5) - 1e-6


class ReadBack:
    """flush() and the per-step row (mixed into Monitor)."""

    # -- read-back --------------------------------------------------------------------------
    def flush(self) -> list[dict[str, Any]]:
        """Read back pending steps (one host synchronization), write them to the sinks, run the
        diagnosis; returns the new per-step rows."""
        if not self._pending:
            return []
        self._sum_deferred_checks()
        pending = [p if type(p) is PendingStep else PendingStep(p[0], p[1], [p[2]], [p[3]], p[4],
                                                                p[5], gcheck=p[6])
                   for p in self._pending]   # _fast_step queues tuples
        self._pending = []
        if not self._targets_checked and any(p.computed is None for p in pending):
            self._targets_checked = True  # evaluate_steps checks the labels it concatenates
        vals = evaluate_steps(self.loss, pending, self.convention, self.ranks)
        rows = [self._row(p, vals, i) for i, p in enumerate(pending)]
        self._kl_columns(rows)
        self.rows.extend(rows)
        for s in self.sinks:
            s.write("main", rows)
        for d in self.diagnoser.update(rows, list(self.layout.groups)):
            self._emit(d)
        if self.target_loss is not None:
            self._update_forecast()
        return rows

    def _sum_deferred_checks(self) -> None:
        """Replace the gradients ``_fast_step`` queued (OutputGrad) by their check sums, one
        batch per output shape."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, p in enumerate(self._pending):
            if type(p) is not PendingStep and type(p[6]) is OutputGrad:
                by_shape.setdefault(tuple(p[2].shape), []).append(j)
        for idx in by_shape.values():
            f = torch.stack([self._pending[j][2] for j in idx])
            y = torch.stack([self._pending[j][3] for j in idx])
            if not self._targets_checked:
                self.loss.check_targets(f.reshape(-1, f.shape[-1]), y.flatten(0, 1))
            sums = grad_check_sums_steps(self.loss, f, y,
                                         torch.stack([self._pending[j][6].grad for j in idx]))
            for j, row in zip(idx, sums, strict=True):
                self._pending[j] = (*self._pending[j][:6], row)

    def _row(self, p: PendingStep, vals: dict[str, list], i: int) -> dict[str, Any]:
        loss, fg, n = vals["loss"][i], vals["fgrad_sq"][i], vals["n"][i]
        param_sq = vals["param_sq"][i]
        group_sq = self.layout.group_sums(param_sq)
        grad_sq = float(sum(group_sq.values()))
        row: dict[str, Any] = {"t": p.index, "step": p.index, "loss": loss, "grad_sq": grad_sq,
                               "fgrad_sq": fg}
        passed = vals["loss_passed"][i]
        ok = True
        if self.ranks is not None:
            ok = self._rank_checks(p.index, vals["spread"][i], bool(vals["unequal"][i]))
        raw = math.sqrt(vals["raw_grad_sq"][i])   # ‖.grad‖ itself, before any scale correction
        if ok and self.clip_norm is not None and raw >= clip_threshold(self.clip_norm):
            ok = False
            self._clipped += 1
            if self._clipped == 1 or self._clipped % 100 == 0:
                self._emit(Diagnosis(p.index, "clipped", (
                    f"step {p.index}: ‖.grad‖ = {raw:.6g} reached the clipping "
                    f"norm {self.clip_norm:g}: .grad was (or may have been) rescaled, so it is "
                    f"not ∇L_B and ‖∇L‖² = R·‖∇ℓ‖²_D does not hold; {self._clipped} such step(s) "
                    "get no quotient (measure before clipping, or max_grad_norm=0)"),
                    {"clip_norm": self.clip_norm}))
        if ok and p.void is not None:
            ok = False
            self._void_step(p.index, p.void)
        if ok and p.gcheck is not None:
            ok = self._gradient_matches(p, vals["gcheck"][i], bool(p.losses))
        if ok and p.losses and math.isfinite(passed) and math.isfinite(loss):
            eps = 10 * torch.finfo(torch.float32 if self._rtol > 1e-9 else torch.float64).eps
            ok = abs(passed - loss) <= self._rtol * abs(loss) + eps
            if not ok:
                self._mismatch(p.index, passed, loss, len(p.outputs), n)
        if fg > 0 and ok:
            row["rayleigh"] = grad_sq / fg
            row.update({f"rayleigh[{g}]": v / fg for g, v in group_sq.items()})
            if math.isfinite(row["rayleigh"]):
                self._rayleigh_min = min(self._rayleigh_min, row["rayleigh"])
        else:
            row["rayleigh"] = math.nan
            row.update({f"rayleigh[{g}]": math.nan for g in group_sq})
        row["n"] = n
        if p.losses:
            row["loss_passed"] = passed
        if p.lrs:
            lr_of = [p.lrs[j] if j >= 0 else 0.0 for j in self._group_of_param]
            row["lr"] = p.lrs[0]
            row["gd_decrease"] = float(sum(a * b for a, b in zip(lr_of, param_sq, strict=True)))
            if math.isfinite(row["gd_decrease"]):
                self._gd_since_full += row["gd_decrease"]
        if self._first_loss is None and math.isfinite(loss):
            self._first_loss = loss
        self._batch_n = n
        if math.isfinite(loss) and math.isfinite(grad_sq):
            self._recent.append((p.index, loss, grad_sq))
        if p.index > 0 and grad_sq == 0 and fg > 0:
            self._emit(Diagnosis(p.index, "zero-gradient", (
                f"step {p.index}: every gradient is exactly zero while ‖∇ℓ‖²_D = {fg:.4g} > 0 "
                "(monitor.step after zero_grad(set_to_none=False)?)")))
        return row

    def _rank_checks(self, step: int, spread: float, unequal: bool) -> bool:
        """Under DDP: False (no quotient) when the ranks' gradients differ; the weights of
        unequal per-rank batches said once."""
        if unequal and self.convention is Convention.MEAN and not self._unequal_said:
            self._unequal_said = True
            self._emit(Diagnosis(step, "unequal-rank-batches", (
                f"step {step}: the ranks' batches differ in size: DDP averages the ranks' "
                "mean-loss gradients, so .grad is the gradient of (1/W)·Σ_r L_r, which weighs a "
                "sample of rank r by 1/(W·n_r), not the global-batch mean; L_B, ‖∇ℓ‖²_D and "
                "R(K; ∇ℓ) are recorded with those weights (the quotient of the kernel in that "
                "weighted L²)")))
        if spread > _RANK_SPREAD:
            self._unsynced += 1
            if self._unsynced == 1:
                self._emit(Diagnosis(step, "unsynchronized-gradients", (
                    f"step {step}: the ranks hold different gradients (relative difference "
                    f"{spread:.3g} of ‖.grad‖²): .grad is not DDP's all-reduced average (model "
                    "not wrapped in DistributedDataParallel, or no_sync() on the last "
                    "micro-batch), so ‖∇L‖² = R·‖∇ℓ‖²_D does not hold on the union batch; such "
                    "steps get no quotient (distributed=False monitors each rank alone)")))
            return False
        return True

    def _kl_columns(self, rows: list[dict[str, Any]]) -> None:
        """kl[φ] = φ'(L_B)‖∇L_B‖² for the family, one vectorized call per φ; NaN where the
        quotient is void (loss mismatch) or L_B ≤ 0."""
        loss = np.array([r["loss"] for r in rows], dtype=np.float64)
        gsq = np.array([r["grad_sq"] for r in rows], dtype=np.float64)
        void = np.array([math.isnan(r["rayleigh"]) and r["fgrad_sq"] > 0 for r in rows])
        ok = ~void & np.isfinite(loss) & (loss > 0)
        for d in self.family:
            with np.errstate(over="ignore", invalid="ignore"):
                kl = np.where(ok, np.asarray(d.kl_ratio(np.where(ok, loss, 1.0), gsq),
                                             dtype=np.float64), np.nan).tolist()
            key = f"kl[{d.name}]"
            for r, v in zip(rows, kl, strict=True):
                r[key] = v

    def _void_step(self, step: int, reason: str) -> None:
        """A step the caller voided (``step(void=...)``): the reason said the first time it is
        given and every 100th step voided for it."""
        seen = self._voided.get(reason, 0) + 1
        self._voided[reason] = seen
        if seen == 1 or seen % 100 == 0:
            self._emit(Diagnosis(step, "voided", (
                f"step {step}: {reason}; ‖∇L‖² = R·‖∇ℓ‖²_D does not hold, so {seen} such "
                "step(s) get no quotient"), {"reason": reason}))

    def _say_mismatch(self, step: int, cause: str, text: str, data: dict[str, Any]) -> None:
        """A step voided because .grad is not the declared loss's gradient: said the first time
        for each cause and every 100th step for it."""
        self._mismatches += 1
        seen = self._mismatch_causes.get(cause, 0) + 1
        self._mismatch_causes[cause] = seen
        if seen == 1 or seen % 100 == 0:
            what, _, fix = text.partition(". Fix: ")
            self._emit(Diagnosis(step, "loss-mismatch", (
                f"step {step}: {what}; so .grad is not ∇L_B of the declared loss, "
                f"‖∇L‖² = R·‖∇ℓ‖²_D does not hold and {seen} such step(s) get no quotient. "
                f"Fix: {fix}"), {"cause": cause, **data}))

    def _grad_tolerance(self) -> tuple[float, float]:
        """(relative tolerance, rounding unit) of the output-gradient check, by the precision
        of the outputs and the loss (float64 1e-6, float32 1e-4, half precision 1e-2)."""
        if self._rtol <= 1e-9:
            return 1e-6, float(torch.finfo(torch.float64).eps)
        if self._rtol <= 1e-4:
            return 1e-4, float(torch.finfo(torch.float32).eps)
        return 1e-2, float(torch.finfo(torch.float16).eps)

    def _gradient_matches(self, p: PendingStep, sums: list[float], with_loss: bool) -> bool:
        """Is the gradient G read on the outputs ω·g of the declared loss (``scale`` times)?

        ‖G − λg‖² = ‖G‖² − 2λ⟨G, g⟩ + λ²‖g‖² from float64 sums; it may be tol²·‖G‖² plus the
        rounding of G itself (4·eps·λ per sample: G's entries are differences such as p − 1).
        A factor 2^j from a GradScaler (G is read before unscale_) is accepted when the loss is
        passed (its value check then catches a reduction that happens to be 2^j) or ≥ 256."""
        a, b, c, floor, _, _, n_loc = sums
        if not all(math.isfinite(v) for v in (a, b, c)) or (b == 0 and c == 0):
            return True   # non-finite steps have their own diagnosis
        w = (1.0 / n_loc if self.convention is Convention.MEAN else 1.0) \
            * (1.0 if p.scale is None else float(p.scale))
        tol, eps = self._grad_tolerance()

        def fits(lam: float) -> bool:
            return c - 2 * lam * a + lam * lam * b <= tol * tol * c + (4 * eps * lam) ** 2 * floor

        if fits(w):
            return True
        kappa = a / (w * b) if b > 0 else math.nan
        if kappa >= 2 and (with_loss or kappa >= 256):
            j = round(math.log2(kappa))
            if fits(w * 2.0 ** j):
                if not self._amp_said:
                    self._amp_said = True
                    self._emit(Diagnosis(p.index, "loss-check", (
                        f"step {p.index}: the gradient that reached the outputs is 2^{j} × the "
                        "declared loss's: read as a GradScaler's scale (.grad unscaled before "
                        "step)"), {"factor": 2.0 ** j}), echo=False)
                return True
        self._grad_mismatch(p, sums, w, kappa, fits(w * kappa) if b > 0 else False, tol)
        return False

    def _grad_mismatch(self, p: PendingStep, sums: list[float], w: float, kappa: float,
                       proportional: bool, tol: float) -> None:
        """Say why the output gradient differs, from the shape of the difference d = G/w − g."""
        a, b, c, _, Gu, gu, n_loc = sums
        m = len(p.outputs)
        name, conv = self.loss.name, self.convention.value
        rel = math.sqrt(max(c - 2 * w * a + w * w * b, 0.0) / c) if c > 0 else math.inf
        head = (f"the gradient that reached the outputs in the backward differs from that of "
                f"the declared {name} loss ({conv} convention) by {rel:.3g} relative "
                f"(tolerance {tol:g})")
        declare = ("declare the loss the training uses (Monitor(model, loss=<its rf.Loss>)) or "
                   f"train on the declared {name}")
        k = self._k or 1
        smoothing = math.nan
        if math.isfinite(Gu) and k > 1:
            uu = n_loc * (1 - 1 / k)                      # ‖u‖², u_i = e_{y_i} − 1/k
            dd = (c - 2 * w * a + w * w * b) / (w * w)    # ‖d‖²
            eps_hat = (Gu / w - gu) / uu
            if 0 < eps_hat < 1 and dd - eps_hat * eps_hat * uu <= 1e-2 * dd:
                smoothing = eps_hat
        if proportional and m > 1 and abs(kappa - m) <= 1e-3 * m:
            cause, text = "undivided-micro-batches", (
                f"{head}: it is {kappa:.6g} × the declared gradient with {m} micro-batches in the "
                f"step: each micro-batch's loss was backpropagated undivided. Fix: pass loss/N "
                f"(N = {m}) to backward and to accumulate")
        elif proportional and self.convention is Convention.MEAN and n_loc > 1 \
                and abs(kappa - n_loc) <= 1e-3 * n_loc:
            cause, text = "sum-reduction", (
                f"{head}: it is {kappa:.6g} = n × the declared gradient: the loss was summed over "
                "the batch, not averaged. Fix: Monitor(..., convention='sum'), or reduce by the "
                "mean")
        elif proportional and self.convention is Convention.SUM and n_loc > 1 \
                and abs(kappa * n_loc - 1) <= 1e-3:
            cause, text = "mean-reduction", (
                f"{head}: it is 1/n × the declared gradient: the loss was averaged, not summed. "
                "Fix: Monitor(..., convention='mean'), or reduce by the sum")
        elif math.isfinite(smoothing):
            cause, text = "label-smoothing", (
                f"{head}: the difference is that of label smoothing, targets (1 − ε)·onehot + "
                f"ε/k with ε ≈ {smoothing:.4g}. Fix: {declare} (label_smoothing=0)")
        elif proportional:
            cause, text = "factor", (
                f"{head}: it is {kappa:.6g} × the declared gradient (another reduction or a loss "
                f"scale). Fix: {declare}, or pass step(..., scale={kappa:.6g}) if the factor is "
                "meant")
        else:
            cause, text = "other-loss", (
                f"{head}: the training loss is not the declared one (label smoothing, a penalty "
                f"on the outputs, another loss or reduction?). Fix: {declare}")
        self._say_mismatch(p.index, cause, text, {"relative": rel})

    def _mismatch(self, step: int, passed: float, loss: float, micro: int, n: float) -> None:
        ratio = passed / loss if loss else math.nan
        close = lambda v: abs(ratio - v) <= 10 * self._rtol * v  # noqa: E731
        if micro > 1 and close(micro):
            cause, hint = "undivided-micro-batches", (
                f"it is {ratio:.6g} × the declared loss with {micro} micro-batches in the step: "
                f"each micro-batch's loss was passed (and backpropagated?) undivided. Fix: pass "
                f"loss/N (N = {micro}) to backward and to accumulate")
        elif self.convention is Convention.MEAN and n > 1 and close(n):
            cause, hint = "sum-reduction", (
                f"it is {ratio:.6g} = n × the declared loss: the loss was summed, not averaged. "
                "Fix: Monitor(..., convention='sum'), or reduce by the mean")
        else:
            cause, hint = "loss-value", (
                "a penalty, label smoothing, another reduction?. Fix: declare the loss the "
                "training uses (Monitor(model, loss=<its rf.Loss>)) or train on the declared "
                f"{self.loss.name}")
        self._say_mismatch(step, cause, (
            f"the loss passed ({passed:.8g}) differs from the declared {self.loss.name} loss "
            f"({self.convention.value} convention) recomputed from the outputs ({loss:.8g}; "
            f"relative {abs(passed - loss) / max(abs(loss), 1e-300):.2g} > {self._rtol:g}): "
            f"{hint}"), {"passed": passed, "declared": loss})
