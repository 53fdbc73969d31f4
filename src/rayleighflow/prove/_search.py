"""The radius search behind a square-loss proof: one ball for a target, nested balls (the
chained argument), the last definite-route ball to zero loss, and the certificate's explanation
when no ball works.
"""

from __future__ import annotations

import math

import numpy as np

from ..certificate import Reason
from ._arb import arb, down, up
from ._proof import Constants, Phase, Proof, RhoAt, _unavailable, rho_at


def _single_phase(c: Constants, a: RhoAt, goal: float) -> list[Phase]:
    s_bot = down((2 * arb(goal)).sqrt()) if goal > 0 else 0.0
    if goal > 0:
        path = up((arb(c.s0) - arb(s_bot)) / arb(a.rho).sqrt())
        t_end = up((arb(c.loss0) / arb(goal)).log() / (2 * arb(a.rho)))
    else:
        path, t_end = a.path_zero, math.inf
    return [Phase(c.s0, s_bot, a.r, a.rho, a.route, a.lip_f, 0.0, t_end, 0.0, path)]  # type: ignore[arg-type]


def _chain(c: Constants, target: float | None, h0: float = 0.05, h_min: float = 1e-3,
           max_phases: int = 2000) -> list[Phase]:
    """Nested balls: from level s_top, find the smallest ball B(θ₀, r) with
    path_start + (s_top − s_next)/√ρ(r, s_top) < r (a fixed point, verified in arb), step down,
    and repeat; the step shrinks when no ball works. Stops at the target (or, for convergence to
    zero, as soon as a definite-route ball can carry the flow from the current level to 0)."""
    s_goal = down((2 * arb(target)).sqrt()) if target else 0.0
    phases: list[Phase] = []
    s_top, path, t_now, h = c.s0, 0.0, 0.0, h0
    while len(phases) < max_phases and s_top > s_goal:
        if target is None or target == 0:
            z = _zero_phase(c, s_top, path, t_now)
            if z is not None:
                phases.append(z)
                return phases
        s_next = max(s_top * (1 - h), s_goal)
        ph = _phase(c, s_top, s_next, path, t_now)
        if ph is None:
            if h <= h_min:
                break
            h = max(h / 2, h_min)
            continue
        phases.append(ph)
        s_top, path, t_now = ph.s_bottom, ph.path_end, ph.t_end
        h = min(h * 1.5, h0)
    if target is not None and (not phases or phases[-1].s_bottom > s_goal):
        return [] if target > 0 or not phases or phases[-1].s_bottom > 0 else phases
    if target == 0 and (not phases or phases[-1].s_bottom > 0):
        return []
    return phases


def _phase(c: Constants, s_top: float, s_next: float, path: float, t_now: float) -> Phase | None:
    ds = arb(s_top) - arb(s_next)
    r = max(path, 1e-12)
    for _ in range(60):
        a = rho_at(c, r, s_top)
        if a.rho <= 0:
            return None
        new = up(arb(path) + ds / arb(a.rho).sqrt())
        if new <= r:
            break
        if new > 1e6:
            return None
        r = new * (1 + 1e-6)
    r = up(arb(r) * (1 + arb(1e-9)))
    a = rho_at(c, r, s_top)
    if a.rho <= 0:
        return None
    end = arb(path) + ds / arb(a.rho).sqrt()
    if not end < arb(r):
        return None
    dt = up((arb(s_top) / arb(s_next)).log() / arb(a.rho))
    return Phase(s_top, s_next, r, a.rho, a.route, a.lip_f, t_now, up(arb(t_now) + arb(dt)),  # type: ignore[arg-type]
                 path, up(end))


def _zero_phase(c: Constants, s_top: float, path: float, t_now: float) -> Phase | None:
    """A last phase to zero loss: the definite route on B(θ₀, r) with path + s_top/√ρ < r."""
    if c.P < c.nk or c.smin_j0 <= 0:
        return None
    hi = c.smin_j0 / c.lip_j if c.lip_j > 0 else max(1e3, 10 * path + 10)
    for r in np.geomspace(max(path, 1e-9) * (1 + 1e-9), max(hi, path * 2), 80):
        a = rho_at(c, float(r), s_top)
        if a.rho <= 0 or a.route != "definite" and a.sqrt_def <= 0:
            continue
        sq = arb(max(a.sqrt_def, 0.0))
        if not sq > 0:
            continue
        end = arb(path) + arb(s_top) / sq
        if end < arb(float(r)):
            rho = down(sq * sq)
            return Phase(s_top, 0.0, float(r), rho, "definite", a.lip_f, t_now, math.inf,
                         path, up(end))
    return None


def _failed(problem, c: Constants, searched: list[RhoAt], target, t0) -> Proof:
    positive = [a for a in searched if a.rho > 0]
    if not positive:
        # the radius where the bound comes closest to positive
        a = max(searched, key=lambda s: max(s.sqrt_dir, s.sqrt_def))
        reason = Reason.PROOF_RHO_NONPOSITIVE
        where = (f"at every radius tried ({len(searched)}, "
                 f"{searched[0].r:.3g}…{searched[-1].r:.3g})" if len(searched) > 1
                 else f"on B(θ₀, {a.r:.4g})")
        text = (f"no proof: ρ ≤ 0 {where}; closest at r = {a.r:.4g}: the perturbation term "
                f"{a.pert:.4g} exceeds ‖J₀*∇ℓ₀‖ = {c.a0:.4g}"
                + (f" and Lip_J·r = {c.lip_j * a.r:.4g} ≥ σ_min(J₀) = {c.smin_j0:.4g}"
                   if c.P >= c.nk else f" (σ_min(J₀) = 0: P = {c.P} < nk = {c.nk})"))
    else:
        a = min(positive, key=lambda s: (s.target_min, -s.rho))
        reason = Reason.PROOF_PATH_TOO_LONG
        want = "zero loss" if target == 0 else f"target {target:.4g}"
        path = (a.path_zero if target == 0 else
                up((arb(c.s0) - (2 * arb(target)).sqrt()) / arb(a.rho).sqrt()))
        text = (f"no proof of {want}: length bound {path:.4g} ≥ r = {a.r:.4g} (ρ = {a.rho:.4g},"
                f" L₀ ≤ {c.loss0:.4g}); with one ball the smallest provable target is "
                f"{a.target_min:.4g} "
                f"(at r = {a.r:.4g})")
        best = _chain(c, None)
        if best and best[-1].s_bottom > 0 and best[-1].loss_bottom < a.target_min:
            text += (f"; chaining {len(best)} nested balls proves L ≤ "
                     f"{best[-1].loss_bottom:.4g} by t = {best[-1].t_end:.4g}")
        if c.P < c.nk and target == 0:
            text += f"; σ_min(J₀) = 0 since P = {c.P} < nk = {c.nk}"
        elif target == 0:
            s_low = best[-1].s_bottom if best else c.s0
            need = up(4 * arb(c.lip_j) * arb(s_low))
            text += (f"; convergence to zero needs a last ball on the definite route, which "
                     f"from a level ‖∇ℓ‖_D = s needs at least σ_min(J₀)² > 4·Lip_J·s: "
                     f"{c.smin_j0 ** 2:.4g} vs {need:.4g} at the lowest level reached, "
                     f"s = {s_low:.4g}")
    return _unavailable(problem, reason, t0, text, c, searched, a)
