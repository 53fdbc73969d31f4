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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from ..data import Dataset
from ..desingularizers import Log
from ..problem import Problem
from ._arb import arb, down, gamma, gram_bounds, norm_up, up
from .models import ModelBounds, UnsupportedModel, model_bounds

__all__ = ["prove", "prove_details", "Proof", "Constants", "proof_constants", "rho_at"]

DEFAULT_RADII = np.geomspace(1e-6, 1e4, 401)


@dataclass(frozen=True)
class Constants:
    """Rigorous bounds at θ₀ (every field is a true bound, rounded outward)."""

    norm_j0: float      # ‖J₀‖ upper
    smin_j0: float      # σ_min(J₀) lower (0 when P < nk)
    a0: float           # ‖J₀*∇ℓ(f₀)‖ lower
    s0: float           # ‖∇ℓ(f₀)‖_D upper
    s0_lo: float        # lower
    loss0: float        # L₀ upper
    loss0_lo: float     # L₀ lower
    lip_j: float        # ‖J_θ − J₀‖ ≤ lip_j ‖θ − θ₀‖
    P: int
    nk: int
    how: dict[str, str] = field(default_factory=dict)
    extra: list[tuple[str, float, str]] = field(default_factory=list)
    kind: str = ""
    notes: tuple[str, ...] = ()

    def lip_f(self, r: float) -> float:
        """sup_{θ∈B(θ₀,r)} ‖J_θ‖ ≥ the Lipschitz constant of θ ↦ f_θ in L²(D) on the ball."""
        return up(arb(self.norm_j0) + arb(self.lip_j) * arb(r))


def proof_constants(problem: Problem, data: Dataset | None = None) -> Constants:
    """The model- and data-dependent constants of a proof, in outward-rounded arithmetic."""
    data = _finite_data(problem, data)
    mb: ModelBounds = model_bounds(problem, data)
    gb = gram_bounds(mb.jhat, mb.jerr)
    g_hat = np.array([float(b.mid()) for b in mb.resid])
    g_err = np.array([up(abs(b - arb(float(b.mid())))) for b in mb.resid])
    s0 = sum((b * b for b in mb.resid), arb(0)).sqrt()
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
    loss0 = s0 * s0 / 2
    how = {
        "norm_j0": f"√λ_max of fl(ĴĴᵀ) proven by LDLᵀ in arb, + Higham's γ_p bound on the "
                   f"Gram rounding (‖Δ‖_F ≤ {gb['gram_err']:.3g}) and ‖J − Ĵ‖_F ≤ "
                   f"{gb['e_j']:.3g} (Weyl)",
        "smin_j0": ("structural 0: P < nk, rank K ≤ P" if P < nk else
                    f"√λ_min of fl(ĴĴᵀ) proven by LDLᵀ in arb (λ_min ≥ {gb['lam_min_lo']:.6g}), "
                    "minus the same rounding bounds (Weyl)"),
        "a0": f"‖fl(Ĵᵀĝ)‖ minus γ_(nk+1)‖|Ĵ|ᵀ|ĝ|‖ ({e_prod:.3g}), ‖Ĵ‖·‖g − ĝ‖ and "
              "‖J − Ĵ‖·‖g‖",
        "s0": "√(Σ ω_j ‖f₀(x_j) − y_j‖²) with f₀ summed over the hidden units in arb",
        "lip_j": mb.lip_j_how,
    }
    return Constants(
        norm_j0=gb["norm_up"], smin_j0=gb["smin_lo"] if P >= nk else 0.0, a0=max(a0, 0.0),
        s0=up(s0), s0_lo=down(s0), loss0=up(loss0), loss0_lo=down(loss0), lip_j=up(mb.lip_j),
        P=P, nk=nk, how=how, extra=list(mb.constants), kind=mb.kind, notes=tuple(mb.notes))


def _finite_data(problem: Problem, data: Dataset | None) -> Dataset:
    data = problem.data if data is None else data
    if not isinstance(data, Dataset):
        raise UnsupportedModel("proofs need a finite dataset (a Sampler's infinite support has "
                               "no finite Jacobian)")
    return data


@dataclass(frozen=True)
class RhoAt:
    r: float
    rho: float              # ρ lower bound (0 when no positive bound)
    sqrt_def: float         # σ_min(J₀) − Lip_J r (may be ≤ 0)
    sqrt_dir: float         # directional √R lower bound (may be ≤ 0)
    route: str | None
    lip_f: float
    pert: float             # ‖J₀‖·min(Lip_F r, 2s₀) + Lip_J r s₀: the perturbation of ‖J*g‖
    target_min: float       # smallest L_target with path < r (inf when ρ = 0)
    path_zero: float        # √(2L₀/ρ) (inf when ρ = 0)


def rho_at(c: Constants, r: float) -> RhoAt:
    """ρ(r) and the smallest provable target at radius r, all in ball arithmetic."""
    R = arb(r)
    lipj = arb(c.lip_j)
    lip_f = c.lip_f(r)
    dist = min(up(arb(lip_f) * R), up(2 * arb(c.s0)))
    num = arb(c.a0) - arb(c.norm_j0) * arb(dist)
    sqrt_dir = down(num / arb(c.s0) - lipj * R)
    sqrt_def = down(arb(c.smin_j0) - lipj * R) if c.P >= c.nk else -math.inf
    best = max(sqrt_dir, sqrt_def)
    pert = up(arb(c.norm_j0) * arb(dist) + lipj * R * arb(c.s0))
    if not best > 0:
        return RhoAt(r, 0.0, sqrt_def, sqrt_dir, None, lip_f, pert, math.inf, math.inf)
    route = "definite" if sqrt_def >= sqrt_dir else "directional"
    sq = arb(best)
    rho = down(sq * sq)
    path_zero = up(arb(c.s0) / sq)
    gap = arb(c.s0) - R * sq        # √(2L_t) must exceed this
    if gap < 0:
        target_min = 0.0
    else:
        target_min = up(gap * gap / 2 * (1 + arb(2.0 ** -40)) + arb(1e-300))
    return RhoAt(r, rho, sqrt_def, sqrt_dir, route, lip_f, pert, target_min, path_zero)


@dataclass
class Proof:
    """A proof attempt: the certificate and everything behind it."""

    certificate: Certificate
    constants: Constants | None
    chosen: RhoAt | None
    target: float | None            # the proven L_target (0: convergence to zero)
    time: float | None              # T: L ≤ target by T (None for UNAVAILABLE)
    path_bound: float | None        # path length bound to the target
    searched: list[RhoAt]
    seconds: float
    statement: str

    @property
    def radius(self) -> float | None:
        return None if self.chosen is None else self.chosen.r

    @property
    def rho(self) -> float:
        return 0.0 if self.chosen is None else self.chosen.rho

    def to_dict(self) -> dict[str, Any]:
        c = self.constants
        return {
            "statement": self.statement, "status": self.certificate.status.value,
            "scope": self.certificate.scope.value,
            "radius": self.radius, "rho": self.rho, "route": getattr(self.chosen, "route", None),
            "target": self.target, "time": self.time, "path_bound": self.path_bound,
            "seconds": self.seconds,
            "constants": None if c is None else {
                "norm_J0": c.norm_j0, "sigma_min_J0": c.smin_j0, "J0_star_grad": c.a0,
                "grad_norm0": c.s0, "loss0_upper": c.loss0, "loss0_lower": c.loss0_lo,
                "Lip_J": c.lip_j,
                "Lip_F": None if self.chosen is None else self.chosen.lip_f,
                "P": c.P, "nk": c.nk, "how": c.how,
                "activation": {n: v for n, v, _ in c.extra}},
            "search": {"radii": len(self.searched),
                       "r": [a.r for a in self.searched],
                       "rho": [a.rho for a in self.searched],
                       "target_min": [_fin(a.target_min) for a in self.searched]},
            "certificate": self.certificate.to_dict(),
        }


def _fin(x: float) -> float | None:
    return x if math.isfinite(x) else None


def prove(problem: Problem, radius: float | None = None, target: float | None = None, *,
          data: Dataset | None = None) -> Certificate:
    """A PROVEN certificate for the exact gradient flow from the problem's θ₀, or UNAVAILABLE
    with the reason in numbers (see :func:`prove_details` for everything behind it).

    ``radius``: the ball B(θ₀, r) (default: searched over 1e-6…1e4). ``target``: the loss to
    reach (0 asks for convergence to zero; default: the strongest statement the bounds allow).
    """
    return prove_details(problem, radius=radius, target=target, data=data).certificate


def prove_details(problem: Problem, radius: float | None = None, target: float | None = None,
                  *, data: Dataset | None = None, radii: np.ndarray | None = None) -> Proof:
    t0 = time.perf_counter()
    if target is not None and not (target >= 0 and math.isfinite(target)):
        raise ValueError(f"target must be a finite loss ≥ 0 (got {target!r})")
    if radius is not None and not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite positive number (got {radius!r})")
    convention = problem.convention.value
    if problem.loss.name != "square":
        return _unavailable(problem, Reason.PROOF_UNSUPPORTED, t0,
                            f"no proof: loss {problem.loss.name!r}; rf.prove covers the square "
                            "loss (cross-entropy through its functional KL constant is not "
                            "implemented yet)")
    try:
        c = proof_constants(problem, data)
    except UnsupportedModel as exc:
        return _unavailable(problem, Reason.PROOF_UNSUPPORTED, t0, f"no proof: {exc}")
    grid = np.array([radius]) if radius is not None else (DEFAULT_RADII if radii is None
                                                           else np.asarray(radii))
    searched = [rho_at(c, float(r)) for r in grid]
    positive = [a for a in searched if a.rho > 0]
    if target is None:
        ok = [a for a in positive if math.isfinite(a.target_min)]
        best_t = min((a.target_min for a in ok), default=math.inf)
        ok = [a for a in ok if a.target_min <= best_t]
    else:
        ok = [a for a in positive if a.target_min <= target]
    if not ok:
        return _failed(problem, c, searched, target, t0)
    chosen = max(ok, key=lambda a: (a.rho, -a.r))
    proven_target = chosen.target_min if target is None else target
    return _holds(problem, c, chosen, proven_target, searched, t0, convention)


def _assumptions(c: Constants, a: RhoAt | None) -> list[Assumption]:
    out = [
        Assumption("square loss", True, "‖∇ℓ‖²_D = Σ ω_j‖f_j − y_j‖² = 2ℓ exactly"),
        Assumption(f"‖J₀‖ ≤ {c.norm_j0:.6g}", True, c.how["norm_j0"]),
        Assumption(f"σ_min(J₀) ≥ {c.smin_j0:.6g}", True, c.how["smin_j0"]),
        Assumption(f"‖J₀*∇ℓ(f₀)‖ ≥ {c.a0:.6g}", True, c.how["a0"]),
        Assumption(f"‖∇ℓ(f₀)‖_D ∈ [{c.s0_lo:.6g}, {c.s0:.6g}]", True, c.how["s0"]),
        Assumption(f"L₀ ∈ [{c.loss0_lo:.6g}, {c.loss0:.6g}]", True, "s₀²/2 in arb"),
        Assumption(f"Lip_J ≤ {c.lip_j:.6g}", True, c.how["lip_j"]),
    ]
    out += [Assumption(f"{name} ≤ {value:.6g}", True, how) for name, value, how in c.extra]
    if a is not None:
        out.append(Assumption(f"Lip_F ≤ {a.lip_f:.6g} on B(θ₀, {a.r:.4g})", True,
                              "sup_B ‖J_θ‖ ≤ ‖J₀‖ + Lip_J·r"))
    return out


def _holds(problem, c: Constants, a: RhoAt, target: float, searched, t0, convention) -> Proof:
    rho = a.rho
    if target > 0:
        path = up((arb(c.s0) - (2 * arb(target)).sqrt()) / arb(rho).sqrt())
        horizon_target = target
    else:
        path = a.path_zero
        horizon_target = c.loss0 * 1e-8
    T = up((arb(c.loss0) / arb(horizon_target)).log() / (2 * arb(rho)))
    tgrid = np.linspace(0.0, T, 201)
    bound = np.maximum(c.loss0 * np.exp(-2 * rho * tgrid), target)
    loss = np.full(tgrid.shape, np.nan)
    loss[0] = c.loss0
    route_formula = ("(σ_min(J₀) − Lip_J·r)²" if a.route == "definite" else
                     "((‖J₀*∇ℓ₀‖ − ‖J₀‖·min(Lip_F·r, 2s₀))/s₀ − Lip_J·r)²")
    assumptions = _assumptions(c, a) + [
        Assumption(f"R(K_θ; ∇ℓ) ≥ ρ = {rho:.6g} on B(θ₀, {a.r:.4g}) ∩ {{L ≤ L₀}}", True,
                   f"{a.route} route: ρ = {route_formula}; " + _other_route(a)),
        Assumption(f"path length ≤ {path:.6g} < r = {a.r:.4g}", True,
                   "(√(2L₀) − √(2L_target))/√ρ" if target > 0 else "√(2L₀/ρ)"),
    ]
    if target > 0:
        statement = (f"proven: from θ₀ the gradient flow reaches L ≤ {target:.4g} by t = {T:.4g} "
                     f"(L ≤ L₀e^(−2ρt) until then, ρ = {rho:.4g}) without leaving "
                     f"B(θ₀, {a.r:.4g}); loss stays ≤ {target:.4g} afterwards")
    else:
        statement = (f"proven: from θ₀ the gradient flow stays in B(θ₀, {a.r:.4g}) forever and "
                     f"L_t ≤ {c.loss0:.4g}·e^(−2·{rho:.4g}·t) for every t ≥ 0 (convergence to "
                     f"zero loss; ≤ 1e-8·L₀ by t = {T:.4g})")
    seconds = time.perf_counter() - t0
    notes = (statement, f"model: {c.kind}; P = {c.P}, nk = {c.nk}; convention {convention}",
             *c.notes,
             f"radius searched over {len(searched)} value(s); proof computed in {seconds:.2f} s",
             "the bound curve is drawn in float64 from the proven ρ and the upper bound on L₀; "
             "the statement's numbers are outward-rounded")
    cert = Certificate(
        desingularizer=Log(), mu=2 * rho, mu_source=f"proven: 2ρ, ρ = {rho:.6g} bounds "
        f"R(K_θ; ∇ℓ) on B(θ₀, {a.r:.4g}) ({a.route} route)",
        status=CertificateStatus.HOLDS, scope=Scope.PROVEN, convention=convention, t=tgrid,
        loss=loss, bound=bound, kl_ratio=np.full(tgrid.shape, np.nan), mu_star=math.nan,
        t_at_mu_star=math.nan, max_bound_violation=math.nan, rtol=0.0, atol=0.0,
        assumptions=tuple(assumptions), notes=notes)
    return Proof(cert, c, a, target, T, path, searched, seconds, statement)


def _other_route(a: RhoAt) -> str:
    if a.route == "definite":
        return (f"the directional route gives √ρ ≥ {a.sqrt_dir:.4g}" if a.sqrt_dir > 0 else
                "the directional route gives no positive bound here")
    if a.sqrt_def == -math.inf:
        return "the definite route does not apply (P < nk: λ_min(K) = 0)"
    return (f"the definite route gives √ρ ≥ {a.sqrt_def:.4g}" if a.sqrt_def > 0 else
            f"the definite route gives no positive bound here (σ_min(J₀) − Lip_J·r = "
            f"{a.sqrt_def:.3g})")


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
                f" L₀ ≤ {c.loss0:.4g}); the smallest provable target is {a.target_min:.4g} "
                f"(at r = {a.r:.4g})")
        if c.P < c.nk and target == 0:
            text += f"; σ_min(J₀) = 0 since P = {c.P} < nk = {c.nk}"
        elif target == 0:
            need = up(4 * arb(c.lip_j) * arb(c.s0))
            text += (f"; convergence to zero needs the definite route, possible at some r only "
                     f"if σ_min(J₀)² > 4·Lip_J·‖∇ℓ₀‖_D: {c.smin_j0 ** 2:.4g} vs {need:.4g}")
    return _unavailable(problem, reason, t0, text, c, searched, a)


def _unavailable(problem, reason: Reason, t0, text: str, c: Constants | None = None,
                 searched=(), a: RhoAt | None = None) -> Proof:
    seconds = time.perf_counter() - t0
    assumptions = _assumptions(c, a) if c is not None else []
    assumptions.append(Assumption("proof", False, text))
    empty = np.array([], dtype=np.float64)
    loss = np.array([c.loss0]) if c is not None else empty
    cert = Certificate(
        desingularizer=Log(), mu=math.nan, mu_source="proven (unavailable)",
        status=CertificateStatus.UNAVAILABLE, scope=Scope.PROVEN,
        convention=problem.convention.value, t=np.array([0.0]) if c is not None else empty,
        loss=loss, bound=np.full(loss.shape, np.nan), kl_ratio=np.full(loss.shape, np.nan),
        mu_star=math.nan, t_at_mu_star=math.nan, max_bound_violation=math.nan, rtol=0.0,
        atol=0.0, assumptions=tuple(assumptions), reason=reason,
        notes=(text, f"proof attempt took {seconds:.2f} s"))
    return Proof(cert, c, a, None, None, None, list(searched), seconds, text)

