"""Linear least squares with more equations than unknowns (nk > P): a global proof, no ball.

f_θ = f₀ + J(θ − θ₀) exactly, so L is quadratic with minimum L* at θ*; if J has full column
rank with σ = σ_min(J) > 0, then L − L* = ½‖J(θ − θ*)‖²_D and ∇L = J*J(θ − θ*), hence
‖∇L‖² ≥ σ²‖J(θ − θ*)‖²_D = 2σ²(L − L*). With any η ≥ L* (here η = L(θ̂), θ̂ a float least-squares
solution, evaluated in arb), ‖∇L‖² ≥ 2σ²(L − η) while L > η: the plateau desingularizer
log(L − η) with μ = 2σ² gives L_t ≤ η + (L₀ − η)e^{−2σ²t} for every t ≥ 0, from any θ₀. And
L* ≥ L(θ̂) − ‖∇L(θ̂)‖²/(2σ²) (the same inequality at θ̂): a target below that lower bound is
provably never reached.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from ..desingularizers import Plateau
from ._arb import arb, down, gram_bounds, up
from ._proof import Phase, Proof, _assumptions, _unavailable

__all__ = ["prove_linear_plateau"]


def _ball(mid: float, rad: float) -> arb:
    return arb(float(mid), float(rad)) if rad > 0 else arb(float(mid))


def prove_linear_plateau(problem, c, mb, resid, target, t0, convention):

    J, E = mb.jhat, mb.jerr
    nk, P = J.shape
    gb = gram_bounds(J, E)                     # the P × P side: λ_min(ĴᵀĴ) bounded below
    lam = arb(gb["lam_min_lo"])
    if not lam > 0:
        return None
    sigma = lam.sqrt() - arb(gb["e_j"])
    if not sigma > 0:
        return None
    g_mid = np.array([float(b.mid()) for b in resid])
    delta = np.linalg.lstsq(J, -g_mid, rcond=None)[0]
    r = []
    for i in range(nk):
        acc = resid[i]
        for q in range(P):
            if delta[q] != 0.0 and (J[i, q] != 0.0 or E[i, q] != 0.0):
                acc += _ball(J[i, q], E[i, q]) * arb(float(delta[q]))
        r.append(acc)
    eta_ball = sum((b * b for b in r), arb(0)) / 2
    grad = [sum((_ball(J[i, q], E[i, q]) * r[i] for i in range(nk) if J[i, q] != 0.0
                 or E[i, q] != 0.0), arb(0)) for q in range(P)]
    g2 = sum((b * b for b in grad), arb(0))
    sig2 = sigma * sigma
    eta = up(eta_ball)
    lstar_lo = max(0.0, down(eta_ball - g2 / (2 * sig2)))
    mu = down(2 * sig2)
    L0 = c.loss0
    what = (f"least-squares minimum L* ∈ [{lstar_lo:.6g}, {eta:.6g}] (η = L(θ̂) in arb at a "
            f"float solution θ̂; the lower end from ‖∇L(θ̂)‖²/(2σ²))")
    if target is not None and not target > eta:
        why = (f"no proof of target {target:.4g}: " + (
            f"it is below the least-squares minimum L* ≥ {lstar_lo:.4g}, so the flow provably "
            f"never reaches it" if target < lstar_lo else
            f"the least-squares minimum L* lies in [{lstar_lo:.4g}, {eta:.4g}] and may be above "
            f"it"))
        return _unavailable(problem, Reason.PROOF_PATH_TOO_LONG, t0, why, c)
    goal = eta if target is None else target
    if L0 <= goal:
        T = 0.0
    else:
        stop = goal if target is not None else eta + 1e-8 * (L0 - eta)
        T = up((arb(L0 - eta) / arb(stop - eta)).log() / arb(mu)) if stop > eta else math.inf
    ph = Phase(c.s0, 0.0, math.inf, down(sig2), "definite (global)", c.norm_j0, 0.0,
               math.inf, 0.0, math.inf)
    proof = Proof(None, c, [ph], goal, T, math.inf, [], 0.0, "",
                  "global (linear least squares)", kind="linear-plateau", eta=eta)
    tgrid = np.linspace(0.0, max(T, 1e-12) * (1 + 1e-9), 401)
    bound = eta + (L0 - eta) * np.exp(-mu * tgrid)
    loss = np.full(tgrid.shape, np.nan)
    loss[0] = L0
    assumptions = _assumptions(c, None) + [
        Assumption(f"σ_min(J) ≥ {down(sigma):.6g} (full column rank, P = {P} < nk = {nk})", True,
                   "√λ_min(ĴᵀĴ) proven by LDLᵀ in arb, minus the rounding bounds (Weyl)"),
        Assumption(f"η = {eta:.6g} ≥ L*", True, what),
        Assumption(f"‖∇L‖² ≥ μ(L − η), μ = 2σ² = {mu:.6g}, for every θ with L > η", True,
                   "L − L* = ½‖J(θ − θ*)‖²_D and ‖J*w‖ ≥ σ‖w‖ on range(J)"),
    ]
    statement = (f"proven (global, f linear in θ): L_t ≤ {eta:.4g} + ({L0:.4g} − {eta:.4g})·"
                 f"e^(−{mu:.4g}·t) for every t ≥ 0 and every path (no ball needed); the flow "
                 f"converges to the least-squares minimum L* ∈ [{lstar_lo:.4g}, {eta:.4g}]"
                 + (f"; L ≤ {target:.4g} by t = {T:.4g}" if target is not None else ""))
    seconds = time.perf_counter() - t0
    cert = Certificate(
        desingularizer=Plateau(eta), mu=mu, mu_source=f"proven: 2σ_min(J)², η = {eta:.6g} ≥ L*",
        status=CertificateStatus.HOLDS, scope=Scope.PROVEN, convention=convention, t=tgrid,
        loss=loss, bound=bound, kl_ratio=np.full(tgrid.shape, np.nan), mu_star=math.nan,
        t_at_mu_star=math.nan, max_bound_violation=math.nan, rtol=0.0, atol=0.0,
        assumptions=tuple(assumptions),
        notes=(statement, f"model: {c.kind}; P = {P}, nk = {nk}; convention {convention}",
               *c.notes, f"proof computed in {seconds:.2f} s"))
    proof.certificate, proof.seconds, proof.statement = cert, seconds, statement
    return proof
