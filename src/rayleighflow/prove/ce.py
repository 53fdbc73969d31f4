"""rf.prove for softmax cross-entropy (mean convention, k ≥ 2 classes), one ball.

The argument, with g = ∇ℓ(f_θ) = softmax(f_θ) − e_y and κ = min_j ω_j:

* functional KL (CERTIFICATES.md §4, sharp): ‖g‖²_D ≥ c·(1 − e^{−L})², c = κ·k/(k − 1);
* ‖g_j‖² ≤ 2(1 − p_{j,y})² ≤ 2(1 − e^{−ℓ_j}), and by Jensen (1 − e^{−u} concave, Σω = 1)
  ‖g‖²_D ≤ 2(1 − e^{−L}) ≤ 2(1 − e^{−L₀}) on {L ≤ L₀};
* the softmax Jacobian diag(p) − ppᵀ has norm ≤ 1/2 (Popoviciu: a variance of values spread
  over ≤ √2), so ‖g_θ − g₀‖_D ≤ ½‖f_θ − f₀‖_D ≤ ½·Lip_F·r;
* directional route: √R ≥ (‖J₀*g₀‖ − ½‖J₀‖·Lip_F·r)/s_top − Lip_J·r with
  s_top = min(‖g₀‖_D + ½Lip_F·r, √(2(1 − e^{−L₀}))); definite route as for the square loss;
* with μ = c·ρ: φ′(L)‖∇L‖² ≥ μ for the cross-entropy desingularizer φ(u) = log(eᵘ − 1) −
  1/(eᵘ − 1), so φ(L_t) ≤ φ(L₀) − μt; the path length from L₀ down to L_target is
  ∫ dL/‖∇L‖ ≤ ∫ dL/(√μ(1 − e^{−L})) = (log(e^{L₀} − 1) − log(e^{L_target} − 1))/√μ, which must
  be < r. It is infinite for L_target → 0: cross-entropy proves targets, never zero loss.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from ..desingularizers import CrossEntropy
from ._arb import arb, down, up
from ._print import fmt_below, fmt_down, fmt_up
from ._proof import Phase, Proof, RhoAt, _assumptions, _unavailable
from ._search import _failed

__all__ = ["prove_ce"]


def _lam(u: arb) -> arb:
    """log(eᵘ − 1)."""
    return u.expm1().log()


def _phi(u: arb) -> arb:
    e = u.expm1()
    return e.log() - 1 / e


_SMALLEST_TARGET = 1e-300


def rho_at_ce(c, r: float, kl_c: float):

    if not r < c.r_cap:
        return RhoAt(r, 0.0, -math.inf, -math.inf, None, math.inf, math.inf, math.inf,
                     math.inf)
    R = arb(r)
    lipj = arb(c.lip_j)
    lip_f = c.lip_f(r)
    dist = up(arb(lip_f) * R)
    cap = (2 * (1 - (-arb(c.loss0)).exp())).sqrt()
    s_top = min(up(arb(c.s0) + arb(dist) / 2), up(cap))
    num = arb(c.a0) - arb(c.norm_j0) * arb(dist) / 2
    sqrt_dir = down(num / arb(s_top) - lipj * R)
    sqrt_def = down(arb(c.smin_j0) - lipj * R) if c.P >= c.nk else -math.inf
    best = max(sqrt_dir, sqrt_def)
    pert = up(arb(c.norm_j0) * arb(dist) / 2 + lipj * R * arb(s_top))
    if not best > 0:
        return RhoAt(r, 0.0, sqrt_def, sqrt_dir, None, lip_f, pert, math.inf, math.inf)
    rho = down(arb(best) ** 2)
    mu = arb(rho) * arb(kl_c)
    v = _lam(arb(c.loss0)) - R * mu.sqrt()
    target_min = up((v.exp()).log1p() * (1 + arb(2.0 ** -40)))
    # a target that underflows (or whose time overflows float64) is no reachable target
    if not target_min >= _SMALLEST_TARGET or not (
            (_phi(arb(c.loss0)) - _phi(arb(target_min))) / mu < arb(1e300)):
        target_min = math.inf
    return RhoAt(r, rho, sqrt_def, sqrt_dir,
                 "definite" if sqrt_def >= sqrt_dir else "directional", lip_f, pert,
                 target_min, math.inf)


def prove_ce(problem, c, grid, target, t0, convention):

    data = problem.data
    w = problem.omega(data).detach().cpu().double().numpy()
    k = c.nk // len(w)
    if convention != "mean" or k < 2:
        why = ("the sum convention" if convention != "mean" else "one output (use k ≥ 2 "
               "logits)")
        return _unavailable(problem, Reason.PROOF_UNSUPPORTED, t0,
                            f"no proof: cross-entropy proofs use the mean convention and the "
                            f"sharp constant κ·k/(k − 1); not available for {why}")
    kappa = float(w.min())
    kl_c = down(arb(kappa) * k / (k - 1))
    searched = [rho_at_ce(c, float(r), kl_c) for r in grid]
    positive = [a for a in searched if a.rho > 0]
    if target is None:
        best = min((a.target_min for a in positive), default=math.inf)
        ok = [a for a in positive if a.target_min <= best and math.isfinite(best)]
    else:
        ok = [a for a in positive if a.target_min <= target and target > 0]
    if not ok:
        if not positive:
            return _failed(problem, c, searched, target, t0)
        if not any(math.isfinite(a.target_min) for a in positive):
            b = max(positive, key=lambda a: a.rho)
            return _unavailable(
                problem, Reason.PROOF_PATH_TOO_LONG, t0,
                f"no proof: no positive target is reachable by this argument; at every radius "
                f"with ρ > 0 ({len(positive)} of {len(searched)}, ρ up to {b.rho:.4g}) the "
                f"target it proves underflows below {_SMALLEST_TARGET:g} (or its time exceeds "
                "float64's range)", c, searched, b)
        b = min(positive, key=lambda a: (a.target_min, -a.rho))
        want = "zero loss" if target == 0 else f"target {target:.4g}"
        text = (f"no proof of {want}: with cross-entropy the smallest provable target is "
                f"{b.target_min:.4g} (at r = {b.r:.4g}, ρ = {b.rho:.4g}, c = {kl_c:.4g})")
        if target == 0:
            text += ("; the path-length bound (log(e^(L₀) − 1) − log(e^L − 1))/√(cρ) grows "
                     "without limit as L → 0 (zero loss needs ‖θ‖ → ∞): only targets are "
                     "provable")
        return _unavailable(problem, Reason.PROOF_PATH_TOO_LONG, t0, text, c, searched, b)
    a = max(ok, key=lambda a: (a.rho, -a.r))
    goal = a.target_min if target is None else target
    mu = arb(a.rho) * arb(kl_c)
    path = up((_lam(arb(c.loss0)) - _lam(arb(goal))) / mu.sqrt())
    mu_f = down(mu)
    T = up((_phi(arb(c.loss0)) - _phi(arb(goal))) / arb(mu_f))
    if not path < a.r:
        return _failed(problem, c, searched, target, t0)
    ph = Phase(c.s0, 0.0, a.r, a.rho, a.route, a.lip_f, 0.0, T, 0.0, path)
    proof = Proof(None, c, [ph], goal, T, path, searched, 0.0, "",
                  f"one ball, radius searched over {len(searched)} values",
                  kind="cross-entropy", kl_c=kl_c)
    tgrid = np.linspace(0.0, T * (1 + 1e-9), 401)   # the horizon just past T (rounding)
    bound = proof.bound(tgrid)
    loss = np.full(tgrid.shape, np.nan)
    loss[0] = c.loss0
    formula = ("(σ_min(J₀) − Lip_J·r)²" if a.route == "definite" else
               "((‖J₀*∇ℓ₀‖ − ½‖J₀‖·Lip_F·r)/s_top − Lip_J·r)², s_top = min(‖∇ℓ₀‖_D + "
               "½Lip_F·r, √(2(1 − e^(−L₀))))")
    assumptions = _assumptions(c, a) + [
        Assumption(f"functional KL: ‖∇ℓ‖²_D ≥ c(1 − e^(−L))², c = κ·k/(k − 1) = {kl_c:.6g}",
                   True, f"softmax cross-entropy, mean convention, κ = min ω = {kappa:.6g}, "
                   f"k = {k} (CERTIFICATES.md §4)"),
        Assumption(f"R(K_θ; ∇ℓ) ≥ ρ = {a.rho:.6g} on B(θ₀, {a.r:.4g}) ∩ {{L ≤ L₀}}", True,
                   f"{a.route} route: ρ = {formula}; ‖∇ℓ(f) − ∇ℓ(f′)‖ ≤ ½‖f − f′‖"),
        Assumption("path length ≤ {} < r = {}".format(*fmt_below(path, a.r, 6)), True,
                   "(log(e^(L₀) − 1) − log(e^(L_target) − 1))/√(cρ)"),
    ]
    statement = (f"proven: from θ₀ the gradient flow reaches L ≤ {fmt_up(goal)} by t = "
                 f"{fmt_up(T)} without leaving B(θ₀, {fmt_up(a.r)}) (path length ≤ "
                 f"{fmt_up(path)}); until then φ(L_t) ≤ φ(L₀) − μt with the cross-entropy φ "
                 f"and μ = cρ = {fmt_down(mu_f)}; L stays ≤ {fmt_up(goal)} afterwards")
    seconds = time.perf_counter() - t0
    cert = Certificate(
        desingularizer=CrossEntropy(), mu=mu_f,
        mu_source=f"proven: c·ρ, c = {kl_c:.6g}, ρ = {a.rho:.6g} bounds R(K_θ; ∇ℓ) on "
        f"B(θ₀, {a.r:.4g}) ({a.route} route)",
        status=CertificateStatus.HOLDS, scope=Scope.PROVEN, convention=convention, t=tgrid,
        loss=loss, bound=bound, kl_ratio=np.full(tgrid.shape, np.nan), mu_star=math.nan,
        t_at_mu_star=math.nan, max_bound_violation=math.nan, rtol=0.0, atol=0.0,
        assumptions=tuple(assumptions),
        notes=(statement, f"model: {c.kind}; P = {c.P}, nk = {c.nk}; convention {convention}",
               *c.notes, f"proof computed in {seconds:.2f} s",
               "the bound curve is drawn in float64 from the proven μ and the upper bound on "
               "L₀; the statement's numbers are outward-rounded"))
    proof.certificate, proof.seconds, proof.statement = cert, seconds, statement
    return proof
