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
from ._arb import arb, down, gamma, gram_bounds, norm_up, sqrt_nonneg, up
from .identity import check_identity
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
    r_cap: float = math.inf   # balls of radius ≥ r_cap leave the region where the proof's
    #                           function is torch's (softplus threshold): ρ = 0 there

    def lip_f(self, r: float) -> float:
        """sup_{θ∈B(θ₀,r)} ‖J_θ‖ ≥ the Lipschitz constant of θ ↦ f_θ in L²(D) on the ball."""
        return up(arb(self.norm_j0) + arb(self.lip_j) * arb(r))


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


def rho_at(c: Constants, r: float, s_top: float | None = None) -> RhoAt:
    """ρ(r) on B(θ₀, r) ∩ {‖∇ℓ‖_D ≤ s_top} (default s_top = s₀, i.e. L ≤ L₀) and the
    smallest target provable from s_top with this one ball, all in ball arithmetic."""
    if not r < c.r_cap:
        return RhoAt(r, 0.0, -math.inf, -math.inf, None, math.inf, math.inf, math.inf,
                     math.inf)
    R = arb(r)
    top = arb(c.s0 if s_top is None else s_top)
    lipj = arb(c.lip_j)
    lip_f = c.lip_f(r)
    dist = min(up(arb(lip_f) * R), up(arb(c.s0) + top))
    num = arb(c.a0) - arb(c.norm_j0) * arb(dist)
    sqrt_dir = down(num / top - lipj * R)
    sqrt_def = down(arb(c.smin_j0) - lipj * R) if c.P >= c.nk else -math.inf
    best = max(sqrt_dir, sqrt_def)
    pert = up(arb(c.norm_j0) * arb(dist) + lipj * R * top)
    if not best > 0:
        return RhoAt(r, 0.0, sqrt_def, sqrt_dir, None, lip_f, pert, math.inf, math.inf)
    route = "definite" if sqrt_def >= sqrt_dir else "directional"
    sq = arb(best)
    rho = down(sq * sq)
    path_zero = up(top / sq)
    gap = top - R * sq        # √(2L_t) must exceed this
    if gap < 0:
        target_min = 0.0
    else:
        target_min = up(gap * gap / 2 * (1 + arb(2.0 ** -40)) + arb(1e-300))
    return RhoAt(r, rho, sqrt_def, sqrt_dir, route, lip_f, pert, target_min, path_zero)


@dataclass(frozen=True)
class Phase:
    """One step of a proof: while ‖∇ℓ‖_D ∈ (s_bottom, s_top], θ_t ∈ B(θ₀, r) and
    R(K_θ; ∇ℓ) ≥ ρ there; it starts by t_start with path ≤ path_start and ends (‖∇ℓ‖_D ≤
    s_bottom) by t_end with path ≤ path_end < r. s_bottom = 0 and t_end = ∞: the last phase of a
    convergence-to-zero proof."""

    s_top: float
    s_bottom: float
    r: float
    rho: float
    route: str
    lip_f: float
    t_start: float
    t_end: float
    path_start: float
    path_end: float

    @property
    def loss_top(self) -> float:
        return up(arb(self.s_top) ** 2 / 2)

    @property
    def loss_bottom(self) -> float:
        return up(arb(self.s_bottom) ** 2 / 2)


@dataclass
class Proof:
    """A proof attempt: the certificate and everything behind it.

    A proof is a list of phases (one ball for the single-ball argument; nested balls for the
    chained one). ``target`` is the proven loss level (0: convergence to zero), ``time`` the
    time by which it is reached (for a zero proof: the time to 1e-8·L₀).
    """

    certificate: Certificate
    constants: Constants | None
    phases: list[Phase]
    target: float | None
    time: float | None
    path_bound: float | None
    searched: list[RhoAt]
    seconds: float
    statement: str
    method: str = ""
    kind: str = "square"       # or "cross-entropy" (one phase; bound with the CE φ)
    kl_c: float = 2.0          # the functional KL constant c (square: ‖∇ℓ‖² = 2ℓ)
    eta: float = 0.0           # linear least squares: the proven upper bound η ≥ L*

    @property
    def radius(self) -> float | None:
        """The largest ball used (θ_t stays inside it until the target is reached)."""
        return max((p.r for p in self.phases), default=None)

    @property
    def rho(self) -> float:
        """min ρ over the phases: L_t ≤ L₀e^{−2ρt} holds until the target (weaker than the
        piecewise bound :meth:`bound`)."""
        return min((p.rho for p in self.phases), default=0.0)

    def bound(self, t: np.ndarray) -> np.ndarray:
        """The proven piecewise-exponential bound on L_t, valid at every t ≥ 0 (NaN without a
        proof): L ≤ L_top·e^{−2ρ_k(t − t_start)} in phase k, ≤ the target afterwards."""
        t = np.asarray(t, dtype=np.float64)
        if self.target is None or not self.phases:
            return np.full(t.shape, np.nan)
        if self.kind == "linear-plateau":
            return self.eta + (self.constants.loss0 - self.eta) * np.exp(
                -2 * self.phases[0].rho * np.maximum(t, 0.0))
        if self.kind == "cross-entropy":
            from ..desingularizers import CrossEntropy
            mu = self.phases[0].rho * self.kl_c * (1 - 1e-12)
            b = CrossEntropy().bound(self.constants.loss0, mu, np.maximum(t, 0.0))
            return np.maximum(np.asarray(b, dtype=np.float64), self.target)
        out = np.full(t.shape, self.target)
        for k, ph in enumerate(self.phases):
            # the phase starts at most at its top level (phase 1: L₀ ≤ both bounds) and, once
            # the flow has reached the phase's bottom level, it stays below it
            top = max(self.constants.loss0, ph.loss_top) if k == 0 else ph.loss_top
            floor = max(ph.loss_bottom if ph.s_bottom > 0 else 0.0, self.target)
            inside = (t >= ph.t_start) & (t <= ph.t_end) if k else (t <= ph.t_end)
            out[inside] = np.maximum(top * np.exp(-2 * ph.rho * (t[inside] - ph.t_start)),
                                     floor)
        return out

    def envelope(self, loss: np.ndarray) -> np.ndarray:
        """The proven bound on ‖θ_t − θ₀‖ when L_t = loss ≥ target (NaN below the target)."""
        loss = np.asarray(loss, dtype=np.float64)
        if self.kind == "linear-plateau":       # global: no bound on the distance is claimed
            return np.full(loss.shape, np.inf)
        if self.kind == "cross-entropy":
            mu = self.phases[0].rho * self.kl_c
            lam0 = math.log(math.expm1(self.constants.loss0))
            with np.errstate(divide="ignore"):
                return (lam0 - np.log(np.expm1(np.maximum(loss, 0)))) / math.sqrt(mu)
        s = np.sqrt(2 * np.maximum(loss, 0))
        out = np.full(s.shape, np.nan)
        for ph in self.phases:
            band = (s > ph.s_bottom) & (s <= ph.s_top) if ph is not self.phases[0] else \
                (s > ph.s_bottom)
            out[band] = ph.path_start + (ph.s_top - s[band]) / math.sqrt(ph.rho)
        return out

    def to_dict(self) -> dict[str, Any]:
        c = self.constants
        return {
            "statement": self.statement, "status": self.certificate.status.value,
            "scope": self.certificate.scope.value, "method": self.method,
            "radius": self.radius, "rho": self.rho, "target": self.target, "time": self.time,
            "path_bound": self.path_bound, "seconds": self.seconds,
            "phases": [p.__dict__ for p in self.phases],
            "constants": None if c is None else {
                "norm_J0": c.norm_j0, "sigma_min_J0": c.smin_j0, "J0_star_grad": c.a0,
                "grad_norm0": c.s0, "loss0_upper": c.loss0, "loss0_lower": c.loss0_lo,
                "Lip_J": c.lip_j, "P": c.P, "nk": c.nk, "how": c.how,
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
        from .ce import prove_ce
        return prove_ce(problem, c, grid, target, t0, convention)
    if c.lip_j == 0.0 and c.kind.startswith("linear") and c.P < c.nk and radius is None:
        from .linear import prove_linear_plateau
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


def _single_phase(c: Constants, a: RhoAt, goal: float) -> list[Phase]:
    s_bot = down((2 * arb(goal)).sqrt()) if goal > 0 else 0.0
    if goal > 0:
        path = up((arb(c.s0) - arb(s_bot)) / arb(a.rho).sqrt())
        t_end = up((arb(c.loss0) / arb(goal)).log() / (2 * arb(a.rho)))
    else:
        path, t_end = a.path_zero, math.inf
    return [Phase(c.s0, s_bot, a.r, a.rho, a.route, a.lip_f, 0.0, t_end, 0.0, path)]


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
    return Phase(s_top, s_next, r, a.rho, a.route, a.lip_f, t_now, up(arb(t_now) + arb(dt)),
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


def _assumptions(c: Constants, a: RhoAt | None) -> list[Assumption]:
    out = [
        Assumption(*_loss_assumption(c)),
        Assumption(f"‖J₀‖ ≤ {c.norm_j0:.6g}", True, c.how["norm_j0"]),
        Assumption(f"σ_min(J₀) ≥ {c.smin_j0:.6g}", True, c.how["smin_j0"]),
        Assumption(f"‖J₀*∇ℓ(f₀)‖ ≥ {c.a0:.6g}", True, c.how["a0"]),
        Assumption(f"‖∇ℓ(f₀)‖_D ∈ [{c.s0_lo:.6g}, {c.s0:.6g}]", True, c.how["s0"]),
        Assumption(f"L₀ ∈ [{c.loss0_lo:.6g}, {c.loss0:.6g}]", True, "in arb from f₀"),
        Assumption(f"Lip_J ≤ {c.lip_j:.6g}", True, c.how["lip_j"]),
    ]
    out += [Assumption(f"{name} ≤ {value:.6g}", True, how) for name, value, how in c.extra]
    if a is not None:
        out.append(Assumption(f"Lip_F ≤ {a.lip_f:.6g} on B(θ₀, {a.r:.4g})", True,
                              "sup_B ‖J_θ‖ ≤ ‖J₀‖ + Lip_J·r"))
    return out


def _loss_assumption(c: Constants) -> tuple[str, bool, str]:
    if "softmax" in c.how["s0"]:
        return ("softmax cross-entropy", True, "∇ℓ_j = softmax(f_j) − e_(y_j)")
    return ("square loss", True, "‖∇ℓ‖²_D = Σ ω_j‖f_j − y_j‖² = 2ℓ exactly")


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
            f"{ph.route} route: ρ = {formula}; path {ph.path_start:.4g} → {ph.path_end:.4g} "
            f"< r; {ends}"))
        del k
    if len(phases) > len(shown):
        assumptions.append(Assumption(
            f"phases 4…{len(phases) - 2} of {len(phases)}", True,
            f"each verified in arb like the ones listed: ρ from {min(p.rho for p in phases):.4g}"
            f" to {max(p.rho for p in phases):.4g}, r from {min(p.r for p in phases):.4g} to "
            f"{r_max:.4g}"))
    if target > 0:
        statement = (f"proven: from θ₀ the gradient flow reaches L ≤ {target:.4g} by t = {T:.4g} "
                     f"without leaving B(θ₀, {r_max:.4g}) (path length ≤ {path:.4g}; "
                     f"{method}); until then L_t ≤ L₀e^(−2ρt) with ρ = {rho:.4g}"
                     + (", the smallest phase rate (the piecewise bound is tighter)"
                        if len(phases) > 1 else "")
                     + f"; L stays ≤ {target:.4g} afterwards")
    else:
        statement = (f"proven: from θ₀ the gradient flow stays in B(θ₀, {r_max:.4g}) forever "
                     f"(path length ≤ {path:.4g}) and L_t ≤ {c.loss0:.4g}·e^(−2·{rho:.4g}·t) "
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
    return Proof(cert, c, [], None, None, None, list(searched), seconds, text)

