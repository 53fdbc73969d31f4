"""Forecast and stall diagnosis from the monitor's records. Every sentence is built from numbers.

* **forecast** (if the ratio stays ≥ μ): with μ̂ the smallest KL ratio φ'(L)‖∇L‖² over the last
  window and η_eff the observed effective step (loss decrease per step per unit ‖∇L‖²), the KL
  bound φ(L) decreasing by ≥ η_eff·μ̂ per step reaches a target after
  (φ(L_now) − φ(target)) / (η_eff μ̂) steps. It is a forecast, never a certificate: nothing
  guarantees that the ratio stays above μ̂ or that the steps keep their observed efficiency.
* **collapse** of R(K; ∇ℓ): the median over the last window falls below ``collapse`` times the
  best earlier window median; the message names the groups whose quotient fell most.
* **plateau**: the median KL ratio falls below ``plateau`` times its first-window median while
  decreasing over three consecutive windows (it trends to zero).
* **edge of stability**: η·λ_max(K) on the probe set above 2(1 + β)/c, c the largest curvature
  of the loss in f (1 for square loss, ½ for softmax cross-entropy, ¼ for logistic) and β the
  heavy-ball momentum: the Gauss–Newton part of the Hessian then exceeds the stability limit of
  gradient descent. Exact for square loss (edge of stability); a sufficient-condition bound for
  the others; not applicable to adaptive methods (Adam), which the message says.
* **non-finite** loss or gradients.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, final

import numpy as np

from ..desingularizers import Desingularizer
from ..losses import LOSS_NAMES, get_loss

__all__ = ["Diagnosis", "Forecast", "Diagnoser", "forecast"]



@final
@dataclass(frozen=True)
class Diagnosis:
    """A message at a step: ``kind`` in {collapse, plateau, rising, edge-of-stability, non-finite,
    loss-mismatch, clipped, voided, missing-gradients, frozen, update-rule, sampled, forecast,
    ...} (the distributed checks and the Hugging Face callback add their own)."""

    step: int
    kind: str
    message: str
    values: dict[str, Any] = field(default_factory=dict)


@final
@dataclass(frozen=True)
class Forecast:
    """A forecast (if the ratio stays ≥ μ) of the step at which the loss reaches ``target``."""

    target: float
    step: float | None           # None: no forecast (``reason`` says why)
    mu: float | None
    desingularizer: str
    eta_eff: float | None
    loss_now: float | None
    at_step: int | None
    source: str
    reason: str

    @property
    def text(self) -> str:
        if self.step is None:
            return f"no forecast for loss {self.target:.4g}: {self.reason}"
        if self.step == self.at_step:
            return (f"loss {self.loss_now:.4g} at step {self.at_step} is already ≤ the target "
                    f"{self.target:.4g}")
        return (f"forecast (if the ratio stays ≥ μ = {self.mu:.4g}, φ = {self.desingularizer}, "
                f"{self.source}): loss {self.target:.4g} at step ≈ {self.step:.0f} "
                f"(now {self.loss_now:.4g} at step {self.at_step}; effective step "
                f"η_eff = {self.eta_eff:.4g} from the observed decrease)")

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "step": self.step, "mu": self.mu,
                "desingularizer": self.desingularizer, "eta_eff": self.eta_eff,
                "loss_now": self.loss_now, "at_step": self.at_step, "source": self.source,
                "text": self.text, "kind": "forecast (if the ratio stays ≥ μ)"}


def forecast(phi: Desingularizer, target: float, steps: Sequence[float],
             loss: Sequence[float], grad_sq: Sequence[float], source: str) -> Forecast:
    """Forecast from records (step, L, ‖∇L‖²) in step order, oldest first.

    η_eff = (mean L over the first half − mean L over the second half) / (distance between the
    halves' mean steps × mean ‖∇L‖²); μ̂ = min φ'(L)‖∇L‖² over the records.
    """
    s, lv, gv = (np.asarray(v, dtype=np.float64) for v in (steps, loss, grad_sq))
    ok = np.isfinite(s) & np.isfinite(lv) & np.isfinite(gv) & (lv > 0)
    s, lv, gv = s[ok], lv[ok], gv[ok]
    none = dict(target=float(target), step=None, mu=None, desingularizer=phi.name,
                eta_eff=None, source=source)
    if s.size < 2:
        return Forecast(**none, loss_now=float(lv[-1]) if lv.size else None,
                        at_step=int(s[-1]) if s.size else None,
                        reason=f"{s.size} finite record(s) with L > 0 ({source}); 2 needed")
    half = s.size // 2
    l1, l2 = float(lv[:half].mean()), float(lv[half:].mean())
    d_step = float(s[half:].mean() - s[:half].mean())
    loss_now, at = float(lv[-1]), int(s[-1])
    if loss_now <= target:
        return Forecast(target=float(target), step=float(at), mu=None, desingularizer=phi.name,
                        eta_eff=None, loss_now=loss_now, at_step=at, source=source, reason="")
    gmean = float(gv.mean())
    if not (l1 > l2) or d_step <= 0 or gmean <= 0:
        return Forecast(**none, loss_now=loss_now, at_step=at,
                        reason=f"the mean loss did not decrease over steps {int(s[0])}–{at} "
                               f"({l1:.4g} then {l2:.4g}; {source})")
    eta_eff = (l1 - l2) / (d_step * gmean)
    ratios = np.asarray(phi.kl_ratio(lv, gv), dtype=np.float64)
    mu = float(np.nanmin(ratios)) if np.isfinite(ratios).any() else float("nan")
    if not (mu > 0 and math.isfinite(mu)):
        return Forecast(**none, loss_now=loss_now, at_step=at,
                        reason=f"the smallest KL ratio over steps {int(s[0])}–{at} is {mu:.4g} "
                               f"(φ = {phi.name}); a forecast needs μ > 0")
    t_needed = phi.time_to_reach(loss_now, mu, target)
    return Forecast(target=float(target), step=at + t_needed / eta_eff, mu=mu,
                    desingularizer=phi.name, eta_eff=eta_eff, loss_now=loss_now, at_step=at,
                    source=source, reason="")


def _median(v: np.ndarray) -> float:
    return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")


@dataclass
class _Window:
    first: int
    last: int
    rayleigh: float
    groups: dict[str, float]
    kl: float


@final
class Diagnoser:
    """Stateful stall rules over windows of ``window`` batch records (bounded memory)."""

    def __init__(self, phi: Desingularizer, window: int = 50, collapse: float = 0.1,
                 plateau: float = 0.1, rise: float = 4.0, rise_steps: int = 5,
                 every: int = 1) -> None:
        if window < 2:
            raise ValueError(f"the diagnosis window needs at least 2 records, got {window}")
        if not (0 < collapse < 1 and 0 < plateau < 1):
            raise ValueError("collapse and plateau are fractions in (0, 1): a collapse is R "
                             f"falling below that fraction of its best; got {collapse}, "
                             f"{plateau}")
        if not (rise > 1 and isinstance(rise_steps, int) and rise_steps >= 2):
            raise ValueError(f"a rising loss is rise > 1 times its floor over rise_steps ≥ 2 "
                             f"increasing steps; got rise = {rise}, rise_steps = {rise_steps}")
        self.phi, self.window, self.collapse, self.plateau = phi, window, collapse, plateau
        self.rise, self.rise_steps = rise, rise_steps
        self._unit = "steps" if every == 1 else f"recorded steps (one in {every})"
        # the rising-loss rule: the lowest level seen (the first loss, then window medians),
        # the run of consecutive increases, and whether it has been said
        self._floor: float | None = None
        self._prev_loss = math.nan
        self._increases = 0
        self._rising = False
        self._rows: list[tuple[int, float, float, dict[str, float], float]] = []
        self.windows: deque[_Window] = deque(maxlen=4)
        self._first_kl: float | None = None
        self._best: _Window | None = None
        self._collapsed = self._plateaued = False
        self._nonfinite = 0

    def update(self, rows: Sequence[dict[str, Any]], groups: Sequence[str]) -> list[Diagnosis]:
        out: list[Diagnosis] = []
        for r in rows:
            loss, gsq = r["loss"], r["grad_sq"]
            if not (math.isfinite(loss) and math.isfinite(gsq)):
                self._nonfinite += 1
                if self._nonfinite == 1 or self._nonfinite % 100 == 0:
                    out.append(Diagnosis(r["step"], "non-finite", (
                        f"step {r['step']}: non-finite values (L = {loss:.4g}, ‖∇L‖² = "
                        f"{gsq:.4g}); {self._nonfinite} such step(s) so far. With a GradScaler "
                        "these steps are skipped by scaler.step; otherwise lower the step size "
                        "or check the inputs"),
                        {"loss": loss, "grad_sq": gsq, "count": self._nonfinite}))
                continue
            out += self._rise_rule(r["step"], loss)
            kl = r.get(f"kl[{self.phi.name}]")
            if kl is None:
                kl = float(self.phi.kl_ratio(loss, gsq)) if loss > 0 else float("nan")
            self._rows.append((r["step"], r.get("rayleigh", float("nan")), kl,
                               {g: r.get(f"rayleigh[{g}]", float("nan")) for g in groups}, loss))
            if len(self._rows) >= self.window:
                out += self._close_window(groups)
        return out

    def _rise_rule(self, step: int, loss: float) -> list[Diagnosis]:
        """The loss increasing over ``rise_steps`` consecutive steps to ≥ ``rise`` times the
        lowest level seen: said once, before the run reaches inf (re-armed below 2× the
        floor). Mini-batch noise rarely rises that far that many steps in a row."""
        if self._floor is None:
            self._floor = loss
        self._increases = self._increases + 1 if loss > self._prev_loss else 0
        self._prev_loss = loss
        floor = self._floor
        if self._rising and loss < 2 * floor:
            self._rising = False
        if self._rising or not (self._increases >= self.rise_steps and floor > 0
                                and loss >= self.rise * floor):
            return []
        self._rising = True
        return [Diagnosis(step, "rising", (
            f"step {step}: the loss is rising: L = {loss:.4g}, ×{loss / floor:.3g} its lowest "
            f"level {floor:.4g}, and higher at each of the last {self._increases} {self._unit}; a "
            "step size past the edge of stability does this before the loss overflows: lower "
            "the learning rate (or clip)"), {"loss": loss, "floor": floor,
                                              "increases": self._increases})]

    def _close_window(self, groups: Sequence[str]) -> list[Diagnosis]:
        rows, self._rows = self._rows, []
        w = _Window(rows[0][0], rows[-1][0], _median(np.array([r[1] for r in rows])),
                    {g: _median(np.array([r[3][g] for r in rows])) for g in groups},
                    _median(np.array([r[2] for r in rows])))
        self.windows.append(w)
        level = _median(np.array([r[4] for r in rows]))
        if self._floor is not None and math.isfinite(level):
            self._floor = min(self._floor, level)
        out = []
        if self._first_kl is None and math.isfinite(w.kl):
            self._first_kl = w.kl
        if math.isfinite(w.rayleigh):
            best = self._best
            if best is not None and w.rayleigh < self.collapse * best.rayleigh:
                if not self._collapsed:
                    self._collapsed = True
                    out.append(self._collapse_message(w, best, groups))
            else:
                self._collapsed = False
            if best is None or w.rayleigh > best.rayleigh:
                self._best = w
        out += self._plateau(w)
        return out

    def _collapse_message(self, w: _Window, best: _Window, groups: Sequence[str]) -> Diagnosis:
        ratios = {g: w.groups[g] / best.groups[g] for g in groups
                  if best.groups[g] > 0 and math.isfinite(w.groups[g])}
        fell = sorted(ratios, key=ratios.get)[:3]
        parts = ", ".join(f"{g}: {best.groups[g]:.3g} → {w.groups[g]:.3g} (×{ratios[g]:.2g})"
                          for g in fell)
        return Diagnosis(w.last, "collapse", (
            f"R(K; ∇ℓ) collapsed: median {w.rayleigh:.4g} over steps {w.first}–{w.last} against "
            f"{best.rayleigh:.4g} over steps {best.first}–{best.last} "
            f"(×{w.rayleigh / best.rayleigh:.2g}, below the {self.collapse:g} threshold); the "
            f"layers that fell most: {parts or 'none recorded'}"),
            {"rayleigh": w.rayleigh, "best": best.rayleigh, "groups": ratios})

    def _plateau(self, w: _Window) -> list[Diagnosis]:
        first = self._first_kl
        kls = [x.kl for x in self.windows]
        if first is None or not math.isfinite(w.kl) or len(kls) < 3:
            return []
        falling = all(a > b for a, b in zip(kls[-3:-1], kls[-2:], strict=True))
        if w.kl < self.plateau * first and falling:
            if self._plateaued:
                return []
            self._plateaued = True
            return [Diagnosis(w.last, "plateau", (
                f"plateau: the KL ratio φ'(L)‖∇L‖² (φ = {self.phi.name}) trends to zero — "
                f"window medians {', '.join(f'{k:.3g}' for k in kls[-3:])} up to step {w.last}, "
                f"×{w.kl / first:.2g} of the first window's {first:.4g}; the loss decrease it "
                "drives is stalling"), {"kl": w.kl, "first": first})]
        if w.kl >= self.plateau * first:
            self._plateaued = False
        return []


def stability(step: int, lr: float, momentum: float, adaptive: bool, lambda_max: float,
              loss_name: str) -> Diagnosis | None:
    """Edge-of-stability check η·λ_max(K) against 2(1 + β)/c (see the module docstring)."""
    c = get_loss(loss_name).curvature if loss_name in LOSS_NAMES else None
    if c is None or not math.isfinite(lambda_max) or lr <= 0:
        return None
    value, limit = lr * lambda_max, 2.0 * (1.0 + momentum) / c
    if value <= limit:
        return None
    if adaptive:
        return Diagnosis(step, "edge-of-stability", (
            f"step {step}: η·λ_max(K) = {lr:.4g}·{lambda_max:.4g} = {value:.4g} on the probe set "
            f"exceeds {limit:.4g}, the gradient-descent stability limit for {loss_name} loss; "
            "the optimizer is adaptive (per-coordinate steps), so this limit does not apply "
            "directly"), {"eta_lambda_max": value, "limit": limit})
    kind = ("the edge of stability (square loss: the Hessian's Gauss–Newton part is η·λ_max(K))"
            if loss_name == "square" else "the Gauss–Newton stability bound (curvature ≤ "
            f"{c:g} for {loss_name})")
    return Diagnosis(step, "edge-of-stability", (
        f"step {step}: η·λ_max(K) = {lr:.4g}·{lambda_max:.4g} = {value:.4g} on the probe set "
        f"exceeds 2(1 + β)/c = {limit:.4g} (β = {momentum:g}, c = {c:g}): past {kind}; the loss "
        "may oscillate or rise"), {"eta_lambda_max": value, "limit": limit})
