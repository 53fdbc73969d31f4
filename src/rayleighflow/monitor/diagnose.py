"""Forecast and stall diagnosis from the monitor's records. Every sentence is built from numbers.

Thresholds are a :class:`Thresholds` (``Monitor(thresholds=Thresholds(flat_steps=500))``).
The level rules read the full-data rows when a ``full_data`` loader is given (exact L, ‖∇L‖²),
else medians over windows of batch records (robust to mini-batch noise). The *rate*
η‖∇L‖²/L is the fraction of the loss a plain gradient step would remove (first order; with
heavy-ball momentum β, η/(1 − β) in place of η; not judged for adaptive optimizers).

* **forecast** (if the ratio stays ≥ μ): with μ̂ the smallest KL ratio φ'(L)‖∇L‖² over the last
  window and η_eff the observed effective step (loss decrease per step per unit ‖∇L‖²), the KL
  bound φ(L) decreasing by ≥ η_eff·μ̂ per step reaches a target after
  (φ(L_now) − φ(target)) / (η_eff μ̂) steps. It is a forecast, never a certificate: nothing
  guarantees that the ratio stays above μ̂ or that the steps keep their observed efficiency.
  No forecast is made for a target below the level at which the loss is flat (plateau rule).
* **collapse** of R(K; ∇ℓ): the median over the last window falls below ``collapse`` times the
  best earlier window median; the message names the groups whose quotient fell most.
* **plateau** (KL trend): the median KL ratio falls below ``plateau`` times its first-window
  median while decreasing over three consecutive windows (it trends to zero).
* **plateau** (level): the loss level (full-data L, or the median batch loss of a window) fell
  by less than ``flat_decrease`` (relative) over ≥ ``flat_steps`` steps while it is at least
  ``flat_level`` times the first level (below that the run is taken as converged). Said once
  per episode, with the level, the span and the rate.
* **saddle**: a level plateau whose rate is below ``tiny_rate``: the gradient itself vanishes
  at a level far above the floor 0 (a saddle, or a minimum of this model, first-order
  information cannot tell which); R(K; ∇ℓ) small says the kernel annihilates ∇ℓ.
* **tiny-gradient**: the first window's median rate is below ``tiny_rate``: the run starts in a
  flat region (e.g. weights near zero in a deep network).
* **rising**: the loss higher at each of ``rise_steps`` consecutive records and ≥ ``rise``
  times its lowest level.
* **edge of stability**: η·λ_max(G) > ``stability``·2(1 + β), G the Gauss–Newton part of the
  Hessian, β the heavy-ball momentum. Square loss: G = K, so λ_max(G) = λ_max(K) on the probe
  set (exact). Cross-entropy and logistic: λ_max(G) is measured on the probe set at the current
  outputs, G ≅ H^{1/2} K H^{1/2} with H the per-sample Hessians ∇²_f ℓ_i (the curvature the
  loss has, not its worst case). Other losses: the bound λ_max(G) ≤ c·λ_max(K) with c the
  loss's largest curvature. Not applicable to adaptive methods (Adam), which the message says.
* **non-finite** loss or gradients.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, final

import numpy as np
import torch

from ..desingularizers import Desingularizer
from ..losses import LOSS_NAMES, get_loss

__all__ = ["Diagnosis", "Forecast", "Diagnoser", "Thresholds", "forecast",
           "gauss_newton_sharpness"]


@final
@dataclass(frozen=True)
class Thresholds:
    """The diagnosis rules' thresholds (module docstring); ``Monitor(thresholds=...)``.

    Attributes:
        collapse: R(K; ∇ℓ) window median below this fraction of its best: a collapse.
        plateau: KL-ratio window median below this fraction of the first window's (and falling
            over three windows): a plateau.
        rise, rise_steps: the loss ≥ ``rise`` × its lowest level after ``rise_steps``
            consecutive increases: rising.
        flat_steps: the span in optimizer steps over which a level plateau is judged.
        flat_decrease: the relative decrease of the level over ``flat_steps`` below which the
            loss is flat.
        flat_level: a flat loss is reported only at ≥ this fraction of the first level.
        tiny_rate: the rate η‖∇L‖²/L (fraction of the loss one gradient step removes, first
            order) below which the gradient counts as vanishing (saddle, tiny-gradient).
        stability: the edge-of-stability rule fires at η·λ_max(G) > stability·2(1 + β).
    """

    collapse: float = 0.1
    plateau: float = 0.1
    rise: float = 4.0
    rise_steps: int = 5
    flat_steps: int = 300
    flat_decrease: float = 0.02
    flat_level: float = 0.05
    tiny_rate: float = 1e-4
    stability: float = 1.0

    def __post_init__(self) -> None:
        for name in ("collapse", "plateau", "flat_decrease", "flat_level"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v < 1):
                raise ValueError(f"Thresholds.{name} is a fraction in (0, 1), got {v!r}")
        if not (isinstance(self.rise, int | float) and self.rise > 1):
            raise ValueError(f"Thresholds.rise must be > 1 (times the lowest level), got "
                             f"{self.rise!r}")
        for name, low in (("rise_steps", 2), ("flat_steps", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= low):
                raise ValueError(f"Thresholds.{name} must be an integer ≥ {low}, got {v!r}")
        for name in ("tiny_rate", "stability"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"Thresholds.{name} must be a positive number, got {v!r}")


@final
@dataclass(frozen=True)
class Diagnosis:
    """A message at a step: ``kind`` in {collapse, plateau, saddle, tiny-gradient, rising,
    edge-of-stability, non-finite,
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
             loss: Sequence[float], grad_sq: Sequence[float], source: str,
             floor: tuple[float, str] | None = None) -> Forecast:
    """Forecast from records (step, L, ‖∇L‖²) in step order, oldest first.

    η_eff = (mean L over the first half − mean L over the second half) / (distance between the
    halves' mean steps × mean ‖∇L‖²); μ̂ = min φ'(L)‖∇L‖² over the records. ``floor``: (the
    level at which the loss is flat, where that was seen) from :attr:`Diagnoser.floor`; a
    target below it gets no forecast (the records show the loss settled above it).
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
    if floor is not None and target < floor[0]:
        return Forecast(**none, loss_now=loss_now, at_step=at,
                        reason=f"the loss is flat at {floor[0]:.4g} ({floor[1]}): a target below "
                               "the level it has settled at is not forecast")
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


@dataclass(frozen=True)
class _Level:
    """A loss level for the level rules: a full-data row, or a window of batch records."""

    first: int
    last: int
    loss: float
    rate: float          # η‖∇L‖²/L (NaN without a learning rate)
    rayleigh: float

    @property
    def steps(self) -> str:
        return f"step {self.last}" if self.first == self.last else \
            f"steps {self.first}–{self.last}"


@final
class Diagnoser:
    """Stateful stall rules over windows of ``window`` batch records and over full-data rows
    (bounded memory). ``thresholds`` (default :class:`Thresholds`); keyword overrides of its
    fields (``collapse=0.2``) are accepted too. ``step_scale``: the factor from η‖∇L‖² to the
    first-order decrease of the optimizer's step (1 for plain SGD, 1/(1 − β) with heavy-ball
    momentum β), or None where η‖∇L‖² does not measure it (Adam and other adaptive methods):
    then no rule judges whether the gradient vanishes."""

    def __init__(self, phi: Desingularizer, window: int = 50,
                 thresholds: Thresholds | None = None, every: int = 1,
                 step_scale: float | None = 1.0, **overrides: Any) -> None:
        if window < 2:
            raise ValueError(f"the diagnosis window needs at least 2 records, got {window}")
        known = {f.name for f in fields(Thresholds)}
        if set(overrides) - known:
            raise TypeError(f"unknown threshold(s) {sorted(set(overrides) - known)}; the "
                            f"thresholds are {sorted(known)}")
        t = replace(thresholds or Thresholds(), **overrides)
        self.thresholds = t
        self.step_scale = step_scale
        self.phi, self.window, self.collapse, self.plateau = phi, window, t.collapse, t.plateau
        self.rise, self.rise_steps = t.rise, t.rise_steps
        self._unit = "steps" if every == 1 else f"recorded steps (one in {every})"
        # the rising-loss rule: the lowest level seen (the first loss, then window medians),
        # the run of consecutive increases, and whether it has been said
        self._floor: float | None = None
        self._prev_loss = math.nan
        self._increases = 0
        self._rising = False
        self._rows: list[tuple[int, float, float, dict[str, float], float, float]] = []
        self.windows: deque[_Window] = deque(maxlen=4)
        self._first_kl: float | None = None
        self._best: _Window | None = None
        self._collapsed = self._plateaued = False
        self._nonfinite = 0
        # the level rules: batch windows, or full-data rows once there is one
        self._levels: deque[_Level] = deque(maxlen=t.flat_steps // window + 3)
        self._full: deque[_Level] = deque()
        self._first_level: float | None = None
        self._lr = math.nan
        self._flat_said: float | None = None   # the level of the plateau said, until re-armed
        self._start_checked = False
        self.floor: tuple[float, str] | None = None   # (level, where) while the loss is flat

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
            lr = r.get("lr", math.nan)
            if math.isfinite(lr):
                self._lr = lr
            dec = r.get("gd_decrease", math.nan) * (self.step_scale or math.nan)
            rate = dec / loss if loss > 0 and math.isfinite(dec) else math.nan
            self._rows.append((r["step"], r.get("rayleigh", float("nan")), kl,
                               {g: r.get(f"rayleigh[{g}]", float("nan")) for g in groups}, loss,
                               rate))
            if len(self._rows) >= self.window:
                out += self._close_window(groups)
        return out

    def update_full(self, row: dict[str, Any]) -> list[Diagnosis]:
        """A full-data row (step, exact L, ‖∇L‖², R): from the first one on, the level rules
        read these rows instead of the batch windows (no sampling noise)."""
        loss, gsq = row["loss"], row["grad_sq"]
        if not (math.isfinite(loss) and math.isfinite(gsq) and loss > 0):
            return []
        scale = self.step_scale or math.nan
        lv = _Level(row["step"], row["step"], loss, scale * self._lr * gsq / loss,
                    row.get("rayleigh", math.nan))
        if not self._full:
            self._first_level = loss   # the rows the rules read from now on define the start
        self._full.append(lv)
        # keep the newest row at least flat_steps older than this one as the reference
        while len(self._full) > 2 and self._full[1].last <= lv.last - self.thresholds.flat_steps:
            self._full.popleft()
        return self._level_rule(self._full, "full-data estimates")

    def _level_rule(self, levels: deque[_Level], source: str) -> list[Diagnosis]:
        """The level plateau and saddle rules on the newest level against the newest one at
        least ``flat_steps`` older."""
        t, now = self.thresholds, levels[-1]
        ref = next((x for x in reversed(levels) if x.last <= now.last - t.flat_steps), None)
        first = self._first_level
        if ref is None or first is None or not ref.loss > 0:
            return []
        drop = (ref.loss - now.loss) / ref.loss
        if not (drop < t.flat_decrease and now.loss >= t.flat_level * first):
            self.floor = None
            # said once per episode: re-armed when the loss has left the level said by more
            # than the window medians' noise (4 × flat_decrease), not at each noisy window
            if self._flat_said is not None and now.loss < self._flat_said * (
                    1 - 4 * t.flat_decrease):
                self._flat_said = None
            return []
        self.floor = (now.loss, f"{ref.steps} → {now.steps}, {source}")
        if self._flat_said is not None:
            return []
        self._flat_said = now.loss
        span = now.last - ref.first
        change = (f"a relative decrease of {drop:.2g}" if drop >= 0 else
                  f"a relative increase of {-drop:.2g}")
        said = (f"the loss is flat at {now.loss:.4g} ({source}): {ref.loss:.4g} at {ref.steps}, "
                f"{now.loss:.4g} at {now.steps}, {change} over {span} steps (a decrease below "
                f"{t.flat_decrease:g}), ×{now.loss / first:.3g} the first level {first:.4g}")
        rr = f"; R(K; ∇ℓ) = {now.rayleigh:.3g}" if math.isfinite(now.rayleigh) else ""
        values = {"level": now.loss, "reference": ref.loss, "decrease": drop, "span": span,
                  "rate": now.rate, "first": first, "source": source}
        if math.isfinite(now.rate) and now.rate < t.tiny_rate:
            return [Diagnosis(now.last, "saddle", (
                f"saddle: {said}; and the gradient vanishes there: a gradient step removes "
                f"{now.rate:.2g} of the loss per step (η‖∇L‖²/L, below {t.tiny_rate:g}){rr}: a "
                "saddle or a minimum of this model far above the floor 0 (first-order "
                "information cannot tell which); a larger step size, initialization or model "
                "moves it"), values)]
        if math.isfinite(now.rate):
            why = (f"; a gradient step would remove {now.rate:.2g} of the loss per step "
                   "(η‖∇L‖²/L, first order) but the steps do not realise it: "
                   + ("mini-batch noise around a minimum or saddle of the full loss, or a step "
                      "size too large for the curvature (full_data= tells them apart)"
                      if source.startswith("median") else
                      "a step size too large for the curvature, or mini-batch noise"))
        elif self.step_scale is None:
            why = (" (the optimizer is adaptive: η‖∇L‖² does not measure its steps, so a "
                   "vanishing gradient is not judged)")
        else:
            why = " (no learning rate known: pass optimizer= to tell a saddle from noise)"
        return [Diagnosis(now.last, "plateau", f"plateau: {said}{why}{rr}", values)]

    def _start_rule(self, lv: _Level, source: str) -> list[Diagnosis]:
        """The first window's rate below ``tiny_rate``: a flat start, said once."""
        self._start_checked = True
        t = self.thresholds
        if not (math.isfinite(lv.rate) and lv.rate < t.tiny_rate):
            return []
        rr = f", R(K; ∇ℓ) = {lv.rayleigh:.3g}" if math.isfinite(lv.rayleigh) else ""
        need = f"≈ {1 / lv.rate:.3g}" if lv.rate > 0 else "unboundedly many"
        return [Diagnosis(lv.last, "tiny-gradient", (
            f"tiny gradient from the start: over {lv.steps} a gradient step removes "
            f"{lv.rate:.2g} of the loss per step ({source} of η‖∇L‖²/L, below {t.tiny_rate:g}; "
            f"L = {lv.loss:.4g}{rr}); at that rate the loss needs {need} steps to fall by a "
            "factor e: the run starts in a flat region or at a saddle (weights near zero in a "
            f"deep network?), or the step size η = {self._lr:.3g} is too small for this "
            "gradient"), {"rate": lv.rate, "loss": lv.loss, "rayleigh": lv.rayleigh})]

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
        if math.isfinite(level) and level > 0:
            lv = _Level(w.first, w.last, level, _median(np.array([r[5] for r in rows])),
                        w.rayleigh)
            out += self._batch_levels(lv)
        return out

    def _batch_levels(self, lv: _Level) -> list[Diagnosis]:
        """The level rules on window medians, unless full-data rows are there to read."""
        out: list[Diagnosis] = []
        if not self._start_checked:
            full = [x for x in self._full if x.last <= lv.last]
            if full:   # the exact rows of the first window, when there are some
                exact = [x for x in full if x.last >= lv.first] or full[:1]
                lv0 = _Level(exact[0].first, exact[-1].last,
                             _median(np.array([x.loss for x in exact])),
                             _median(np.array([x.rate for x in exact])),
                             _median(np.array([x.rayleigh for x in exact])))
                out = self._start_rule(lv0, "full-data median")
            else:
                self._first_level = lv.loss
                out = self._start_rule(lv, "window median")
        if self._full:
            return out
        self._levels.append(lv)
        return out + self._level_rule(self._levels, "medians of batch-loss windows")

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
              loss_name: str, sharpness: float | None = None,
              margin: float = 1.0) -> Diagnosis | None:
    """Edge-of-stability check η·λ_max(G) against margin·2(1 + β) (module docstring).

    ``sharpness``: λ_max(G) measured on the probe set (:func:`gauss_newton_sharpness`); without
    it, λ_max(G) = λ_max(K) for square loss and the bound c·λ_max(K) for the others."""
    c = get_loss(loss_name).curvature if loss_name in LOSS_NAMES else None
    if sharpness is None and loss_name == "square":
        sharpness = lambda_max
    if not math.isfinite(lambda_max) or lr <= 0 or (sharpness is None and c is None):
        return None
    measured = sharpness is not None and math.isfinite(sharpness)
    lam = float(sharpness) if measured else float(c) * lambda_max  # type: ignore[arg-type]
    value, limit = lr * lam, margin * 2.0 * (1.0 + momentum)
    if value <= limit:
        return None
    if loss_name == "square":
        what = f"η·λ_max(K) = {lr:.4g}·{lambda_max:.4g} = {value:.4g}"
        past = "the edge of stability (square loss: the Hessian's Gauss–Newton part is K)"
    elif measured:
        what = (f"η·λ_max(G) = {lr:.4g}·{lam:.4g} = {value:.4g} (G = H^½KH^½, the Gauss–Newton "
                f"part of the Hessian measured at the current outputs; λ_max(K) = "
                f"{lambda_max:.4g})")
        past = f"the edge of stability for {loss_name} loss"
    else:
        what = f"η·c·λ_max(K) = {lr:.4g}·{c:g}·{lambda_max:.4g} = {value:.4g}"
        past = f"the Gauss–Newton stability bound (curvature ≤ c = {c:g} for {loss_name})"
    bound = f"{margin:g}·2(1 + β)" if margin != 1.0 else "2(1 + β)"
    values = {"eta_lambda_max": value, "limit": limit, "sharpness": lam,
              "lambda_max": lambda_max, "measured": measured}
    if adaptive:
        return Diagnosis(step, "edge-of-stability", (
            f"step {step}: {what} on the probe set exceeds {limit:.4g}, the gradient-descent "
            f"stability limit for {loss_name} loss; the optimizer is adaptive (per-coordinate "
            "steps), so this limit does not apply directly"), values)
    return Diagnosis(step, "edge-of-stability", (
        f"step {step}: {what} on the probe set exceeds {bound} = {limit:.4g} (β = "
        f"{momentum:g}): past {past}; the loss may oscillate or rise"), values)


def _hessian_sqrt(loss_name: str, f: torch.Tensor) -> torch.Tensor | None:
    """H_i^{1/2} (n, k, k) for the per-sample Hessians ∇²_f ℓ_i, which for these losses do not
    depend on the labels: softmax cross-entropy diag(p) − ppᵀ, logistic σ(f)(1 − σ(f))."""
    if loss_name == "logistic":
        s = torch.sigmoid(f[:, :1])
        return (s * (1 - s)).sqrt().unsqueeze(-1)
    if loss_name == "cross-entropy":
        p = torch.softmax(f, dim=-1)
        h = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        e, v = torch.linalg.eigh(h)
        return (v * e.clamp(min=0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)
    return None


def gauss_newton_sharpness(probe: Any, loss_name: str, max_size: int = 4096) -> float | None:
    """λ_max(G) of the Gauss–Newton part of the Hessian of the probe-set loss, measured:

        G = Σ_i ω_i J_iᵀ H_i J_i  has the nonzero eigenvalues of  H^½ K H^½,

    K the probe set's tangent kernel (n·k × n·k, with the weights ω) and H = blockdiag(H_i).
    None for losses whose Hessian in f is not written here, or above ``max_size`` = n·k."""
    from ..ntk import KernelTooLargeError, empirical_ntk, kernel_matrix
    from ..problem import output_tensor
    from ._params import eval_mode

    x = probe.x
    with eval_mode(probe.module), torch.no_grad():
        out = output_tensor(probe.module(**x) if isinstance(x, Mapping) else probe.module(x))
    if out.dim() > 2:   # token outputs: the kernel's samples are not the probe's rows
        return None
    f = out.double() if out.dim() == 2 else out.double()[:, None]
    if f.shape[0] * f.shape[1] > max_size:
        return None
    root = _hessian_sqrt(loss_name, f)
    if root is None:
        return None
    try:
        with eval_mode(probe.module):
            kern = kernel_matrix(empirical_ntk(probe.module, x, params=probe._params(),
                                               convention=probe.convention)).double()
    except (KernelTooLargeError, MemoryError, torch.OutOfMemoryError):
        return None   # the stability rule falls back to the bound c·λ_max(K)
    s = torch.block_diag(*root.unbind(0))
    m = s @ kern.to(s.device) @ s
    return float(torch.linalg.eigvalsh((m + m.T) / 2)[-1])
