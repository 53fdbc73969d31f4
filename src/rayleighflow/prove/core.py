"""rf.prove: an a-priori convergence proof for the exact gradient flow from θ₀ (scope PROVEN).

The argument (square loss ℓ = Σ ω_j ½‖f_j − y_j‖², any convention; ‖∇ℓ‖²_D = 2ℓ):

1. Let B = B(θ₀, r) and ρ > 0 with R(K_θ; ∇ℓ(f_θ)) ≥ ρ for every θ ∈ B with L(θ) ≤ L₀.
   Along the flow L is non-increasing, so while θ_t ∈ B: ‖∇L‖² = R·‖∇ℓ‖²_D ≥ 2ρL, hence
   L_t ≤ L₀e^{−2ρt}, and the path length to the time L reaches L_target is
   ∫‖∇L‖dt = ∫(−dL)/‖∇L‖ ≤ ∫_{L_target}^{L₀} dL/√(2ρL) = (√(2L₀) − √(2L_target))/√ρ.
   If that is < r the flow cannot leave B first (a continuity argument on the first exit time),
   so L reaches L_target by T = log(L₀/L_target)/(2ρ), inside B; afterwards L stays below it.
   L_target = 0: θ_t stays in B for every t and L_t ≤ L₀e^{−2ρt} for every t.
2. ρ from perturbation bounds around θ₀ (g = ∇ℓ(f_θ), s = ‖g‖_D ≤ s₀ = ‖g₀‖_D):
   * definite route (needs P ≥ nk): σ_min(J_θ) ≥ σ_min(J₀) − ‖J_θ − J₀‖ (Weyl), so
     R(K_θ; u) ≥ λ_min(K_θ) ≥ (σ_min(J₀) − Lip_J r)²₊ for every u;
   * directional route: ‖J_θ*g‖ ≥ ‖J₀*g₀‖ − ‖J₀‖·‖f_θ − f₀‖_D − ‖J_θ − J₀‖·s with
     ‖f_θ − f₀‖_D ≤ min(Lip_F r, 2s₀), Lip_F = ‖J₀‖ + Lip_J r ≥ sup_B ‖J_θ‖; divided by s this is
     decreasing in s, so √R ≥ (‖J₀*g₀‖ − ‖J₀‖·min(Lip_F r, 2s₀))/s₀ − Lip_J r.
   ρ is the larger of the two squares. The directional route alone can never prove convergence
   to zero (it needs Lip_F·r ≥ ‖g₀‖, where its numerator is ≤ 0); it proves a target.
3. Every constant is an upper (or lower) bound computed in outward-rounded arithmetic: balls
   (python-flint arb) for the scalars, Higham's a-posteriori bound and Weyl for the matrix norms
   (prove/_arb.py), closed-form Lipschitz constants (prove/models.py, prove/activations.py).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from ..data import Dataset
from ..desingularizers import Log
from ..problem import Problem
from ._arb import arb, down, gamma, gram_bounds, norm_up, sqrt_nonneg, up
from ._print import fmt_below, fmt_down, fmt_up
from ._proof import Constants, Phase, Proof, _assumptions, _unavailable, rho_at
from ._search import _chain, _failed, _single_phase
from .ce import prove_ce
from .identity import check_identity
from .linear import prove_linear_plateau
from .models import ModelBounds, UnsupportedModel, model_bounds

__all__ = ["prove", "prove_details", "proof_constants"]

DEFAULT_RADII = np.geomspace(1e-6, 1e4, 401)


def proof_constants(problem: Problem, data: Dataset | None = None) -> Constants:
    """The model- and data-dependent constants of a proof, in outward-rounded arithmetic."""
    data = _finite_data(problem, data)
    mb: ModelBounds = model_bounds(problem, data)
    gb = gram_bounds(mb.jhat, mb.jerr)
    resid, loss0, how_s0 = _residual(problem, data, mb)
    identity = check_identity(problem, data, mb.used, mb.jhat.shape[1], mb.outputs, loss0)
    g_hat = np.array([float(b.mid()) for b in resid])
    g_err = np.array([up(abs(b - arb(float(b.mid())))) for b in resid])
    s0 = sqrt_nonneg(sum((b * b for b in resid), arb(0)))
    # ‖Jᵀg‖ ≥ ‖fl(Ĵᵀĝ)‖ − γ_nk‖|Ĵ|ᵀ|ĝ|‖ − ‖Ĵ‖‖g − ĝ‖ − ‖J − Ĵ‖‖g‖
    nk, P = mb.jhat.shape
    v = mb.jhat.T @ g_hat
    v_lo = down(arb(float(np.dot(v, v))) * (1 - arb(gamma(P))))
    v_norm_lo = down(arb(max(v_lo, 0.0)).sqrt()) if v_lo > 0 else 0.0
    gk = gamma(nk + 1)
    e_prod = norm_up(np.abs(mb.jhat.T) @ np.abs(g_hat)) * up(arb(gk) / (1 - arb(gk)))
    jhat_norm = up(arb(gb["norm_up"]) + arb(gb["e_j"]))
    a0 = down(arb(v_norm_lo) - arb(e_prod) - arb(jhat_norm) * arb(norm_up(g_err))
              - arb(gb["e_j"]) * s0)
    how = {
        "norm_j0": f"√λ_max of fl(ĴĴᵀ) proven by LDLᵀ in arb, + Higham's γ_p bound on the "
                   f"Gram rounding (‖Δ‖_F ≤ {gb['gram_err']:.3g}) and ‖J − Ĵ‖_F ≤ "
                   f"{gb['e_j']:.3g} (Weyl)",
        "smin_j0": ("structural 0: P < nk, rank K ≤ P" if P < nk else
                    f"√λ_min of fl(ĴĴᵀ) proven by LDLᵀ in arb (λ_min ≥ {gb['lam_min_lo']:.6g}), "
                    "minus the same rounding bounds (Weyl)"),
        "a0": f"‖fl(Ĵᵀĝ)‖ minus γ_(nk+1)‖|Ĵ|ᵀ|ĝ|‖ ({e_prod:.3g}), ‖Ĵ‖·‖g − ĝ‖ and "
              "‖J − Ĵ‖·‖g‖",
        "s0": how_s0,
        "lip_j": mb.lip_j_how,
    }
    return Constants(
        norm_j0=gb["norm_up"], smin_j0=gb["smin_lo"] if P >= nk else 0.0, a0=max(a0, 0.0),
        s0=up(s0), s0_lo=max(down(s0), 0.0), loss0=up(loss0), loss0_lo=max(down(loss0), 0.0),
        lip_j=up(mb.lip_j),
        P=P, nk=nk, how=how, extra=list(mb.constants), kind=mb.kind,
        notes=(*mb.notes, identity), r_cap=mb.r_cap)


def _residual(problem: Problem, data: Dataset, mb: ModelBounds):
    """√ω_j ∇ℓ_j(f₀(x_j)) as balls (row order of J), L₀ as a ball, and how."""
    omega = [arb(float(w)) for w in problem.omega(data).detach().cpu().double().numpy()]
    f = mb.outputs
    n = len(omega)
    k = len(f) // n
    y = problem.targets(data, problem.model(problem.params, data.x)).detach().cpu()
    if problem.loss.name == "square":
        yv = y.double().numpy().reshape(n, k)
        r = [omega[j].sqrt() * (f[j * k + c] - arb(float(yv[j, c])))
             for j in range(n) for c in range(k)]
        loss0 = sum((b * b for b in r), arb(0)) / 2
        return r, loss0, "√(Σ ω_j ‖f₀(x_j) − y_j‖²), f₀ summed in arb"
    # softmax cross-entropy: ∇ℓ_j = softmax(f_j) − e_{y_j}, ℓ_j = logsumexp(f_j) − f_{j,y_j}
    labels = y.long().numpy().reshape(n)
    r, loss0 = [], arb(0)
    for j in range(n):
        fj = f[j * k:(j + 1) * k]
        top = max(fj, key=lambda b: float(b.mid()))
        ex = [(b - top).exp() for b in fj]
        z = sum(ex, arb(0))
        p = [e / z for e in ex]
        loss0 += omega[j] * (z.log() + top - fj[int(labels[j])])
        r += [omega[j].sqrt() * (p[c] - (1 if c == labels[j] else 0)) for c in range(k)]
    return r, loss0, "√(Σ ω_j ‖softmax(f₀(x_j)) − e_(y_j)‖²), softmax in arb"


def _finite_data(problem: Problem, data: Dataset | None) -> Dataset:
    data = problem.data if data is None else data  # type: ignore[assignment]
    if not isinstance(data, Dataset):
        raise UnsupportedModel("proofs need a finite dataset (a Sampler's infinite support has "
                               "no finite Jacobian)")
    return data


def prove(problem: Problem, radius: float | None = None, target: float | None = None, *,
          data: Dataset | None = None) -> Certificate:
    """A PROVEN certificate for the exact gradient flow from the problem's θ₀, or UNAVAILABLE
    with the reason in numbers (see :func:`prove_details` for everything behind it).

    ``radius``: one ball B(θ₀, r) (default: searched over 1e-6…1e4, and the chained argument
    over nested balls). ``target``: the loss to reach (0 asks for convergence to zero; default:
    the strongest statement the bounds allow).

    The argument (square loss; cross-entropy for targets): R(K_θ; ∇ℓ) ≥ ρ on B(θ₀, r) ∩
    {L ≤ L₀} gives ‖∇L‖² ≥ 2ρL there (the L²(D) or Euclidean convention of the problem),
    L_t ≤ L₀e^(−2ρt), and a path-length bound below r keeps the flow in the ball.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(3, 4), torch.randn(3, 1))
        >>> net = torch.nn.Linear(4, 1).double()              # P = 5 ≥ nk = 3: definite kernel
        >>> cert = rf.prove(rf.Problem(rf.Model(net), data, "square"))
        >>> cert.status.value, cert.scope.value, cert.desingularizer.name
        ('holds', 'proven', 'log')
    """
    return prove_details(problem, radius=radius, target=target, data=data).certificate


def prove_details(problem: Problem, radius: float | None = None, target: float | None = None,
                  *, data: Dataset | None = None, radii: np.ndarray | None = None,
                  chain: bool = True) -> Proof:
    t0 = time.perf_counter()
    if target is not None and not (target >= 0 and math.isfinite(target)):
        raise ValueError(f"target must be a finite loss ≥ 0 (got {target!r})")
    if radius is not None and not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite positive number (got {radius!r})")
    convention = problem.convention.value
    if problem.loss.name not in ("square", "cross-entropy"):
        return _unavailable(problem, Reason.PROOF_UNSUPPORTED, t0,
                            f"no proof: loss {problem.loss.name!r}; rf.prove covers the square "
                            "loss and softmax cross-entropy")
    try:
        c = proof_constants(problem, data)
    except UnsupportedModel as exc:
        return _unavailable(problem, Reason.PROOF_UNSUPPORTED, t0, f"no proof: {exc}")
    grid = np.array([radius]) if radius is not None else (DEFAULT_RADII if radii is None
                                                           else np.asarray(radii))
    if problem.loss.name == "cross-entropy":
        return prove_ce(problem, c, grid, target, t0, convention)
    if c.lip_j == 0.0 and c.kind.startswith("linear") and c.P < c.nk and radius is None:
        d = _finite_data(problem, data)
        mb = model_bounds(problem, d)
        resid, _, _ = _residual(problem, d, mb)
        lin = prove_linear_plateau(problem, c, mb, resid, target, t0, convention)
        if lin is not None:
            return lin
    searched = [rho_at(c, float(r)) for r in grid]
    positive = [a for a in searched if a.rho > 0]
    if target is None:
        ok = [a for a in positive if math.isfinite(a.target_min)]
        best_t = min((a.target_min for a in ok), default=math.inf)
        ok = [a for a in ok if a.target_min <= best_t]
    else:
        ok = [a for a in positive if a.target_min <= target]
    candidates: list[tuple[float, float, list[Phase], str]] = []
    if ok:
        a = max(ok, key=lambda a: (a.rho, -a.r))
        goal = a.target_min if target is None else target
        ph = _single_phase(c, a, goal)
        if ph[-1].path_end < a.r:   # re-verified after rounding the level √(2·goal) down
            what = (f"one ball, radius searched over {len(searched)} values"
                    if len(searched) > 1 else "one ball")
            candidates.append((goal, ph[-1].t_end if goal > 0 else 0.0, ph, what))
    if chain and radius is None and positive:
        phases = _chain(c, target)
        if phases:
            goal = phases[-1].loss_bottom if phases[-1].s_bottom > 0 else 0.0
            if target is None or goal <= target:
                candidates.append((target if target is not None else goal,
                                   phases[-1].t_end if goal > 0 else 0.0, phases,
                                   f"{len(phases)} nested balls (chained argument)"))
    if not candidates:
        return _failed(problem, c, searched, target, t0)
    goal, _, phases, method = min(candidates, key=lambda x: (x[0], x[1]))
    return _holds(problem, c, phases, goal, searched, t0, convention, method)


def _holds(problem, c: Constants, phases: list[Phase], target: float, searched, t0,
           convention, method) -> Proof:
    rho = min(p.rho for p in phases)
    r_max = max(p.r for p in phases)
    last = phases[-1]
    path = last.path_end
    if target > 0:
        T = last.t_end
    else:
        low = c.loss0 * 1e-8
        top = c.loss0 if len(phases) == 1 else last.loss_top
        T = last.t_start + max(0.0, up((arb(top) / arb(low)).log() / (2 * arb(last.rho))))
    proof = Proof(None, c, phases, target, T, path, searched, 0.0, "", method)  # type: ignore
    tgrid = np.union1d(np.linspace(0.0, T * (1 + 1e-9), 401),   # horizon just past T
                       [p.t_start for p in phases if p.t_start <= T])
    bound = proof.bound(tgrid)
    loss = np.full(tgrid.shape, np.nan)
    loss[0] = c.loss0
    assumptions = _assumptions(c, None) + [
        Assumption(f"Lip_F ≤ {max(p.lip_f for p in phases):.6g} on B(θ₀, {r_max:.4g})", True,
                   "sup_B ‖J_θ‖ ≤ ‖J₀‖ + Lip_J·r")]
    shown = phases if len(phases) <= 6 else [*phases[:3], *phases[-2:]]
    for k, ph in enumerate(shown):
        idx = phases.index(ph) + 1
        formula = ("(σ_min(J₀) − Lip_J·r)²" if ph.route == "definite" else
                   "((‖J₀*∇ℓ₀‖ − ‖J₀‖·min(Lip_F·r, s₀ + s_top))/s_top − Lip_J·r)²")
        lo = "0" if ph.s_bottom == 0 else f"{ph.loss_bottom:.4g}"
        ends = ("forever" if ph.t_end == math.inf else f"by t = {ph.t_end:.4g}")
        assumptions.append(Assumption(
            f"phase {idx}/{len(phases)}: R(K_θ; ∇ℓ) ≥ ρ = {ph.rho:.6g} on B(θ₀, {ph.r:.4g}) "
            f"while L ∈ ({lo}, {ph.loss_top:.4g}]", True,
            f"{ph.route} route: ρ = {formula}; path {fmt_down(ph.path_start)} → "
            "{} < r = {}; {}".format(*fmt_below(ph.path_end, ph.r), ends)))
        del k
    if len(phases) > len(shown):
        assumptions.append(Assumption(
            f"phases 4…{len(phases) - 2} of {len(phases)}", True,
            f"each verified in arb like the ones listed: ρ from {min(p.rho for p in phases):.4g}"
            f" to {max(p.rho for p in phases):.4g}, r from {min(p.r for p in phases):.4g} to "
            f"{r_max:.4g}"))
    if target > 0:
        statement = (f"proven: from θ₀ the gradient flow reaches L ≤ {fmt_up(target)} by t = "
                     f"{fmt_up(T)} without leaving B(θ₀, {fmt_up(r_max)}) (path length ≤ "
                     f"{fmt_up(path)}; {method}); until then L_t ≤ L₀e^(−2ρt) with ρ = "
                     f"{fmt_down(rho)}"
                     + (", the smallest phase rate (the piecewise bound is tighter)"
                        if len(phases) > 1 else "")
                     + f"; L stays ≤ {fmt_up(target)} afterwards")
    else:
        statement = (f"proven: from θ₀ the gradient flow stays in B(θ₀, {fmt_up(r_max)}) "
                     f"forever (path length ≤ {fmt_up(path)}) and L_t ≤ "
                     f"{fmt_up(c.loss0)}·e^(−2·{fmt_down(rho)}·t) "
                     f"for every t ≥ 0: convergence to zero loss ({method}; ≤ 1e-8·L₀ by "
                     f"t = {T:.4g})")
    seconds = time.perf_counter() - t0
    notes = (statement, f"model: {c.kind}; P = {c.P}, nk = {c.nk}; convention {convention}",
             *c.notes,
             f"method: {method}; proof computed in {seconds:.2f} s",
             "the bound curve is drawn in float64 from the proven ρ's and the upper bound on L₀;"
             " the statement's numbers are outward-rounded")
    cert = Certificate(
        desingularizer=Log(), mu=2 * rho, mu_source=f"proven: 2ρ, ρ = {rho:.6g} = min over "
        f"{len(phases)} phase(s) of a lower bound of R(K_θ; ∇ℓ) on B(θ₀, r ≤ {r_max:.4g})",
        status=CertificateStatus.HOLDS, scope=Scope.PROVEN, convention=convention, t=tgrid,
        loss=loss, bound=bound, kl_ratio=np.full(tgrid.shape, np.nan), mu_star=math.nan,
        t_at_mu_star=math.nan, max_bound_violation=math.nan, rtol=0.0, atol=0.0,
        assumptions=tuple(assumptions), notes=notes)
    proof.certificate, proof.seconds, proof.statement = cert, seconds, statement
    return proof
