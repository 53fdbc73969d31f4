"""The objects of a proof and the pieces every proof route shares (the square-loss search in
:mod:`.core`, softmax cross-entropy in :mod:`.ce`, linear least squares in :mod:`.linear`):
the constants at θ₀, ρ on one ball (:func:`rho_at`), the phases, the :class:`Proof`, and the
certificate of a proof that is unavailable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._io import finite_or_none
from ..certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from ..desingularizers import Log
from ._arb import arb, down, up

__all__ = ["Constants", "Phase", "Proof", "RhoAt", "rho_at"]


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
            return self.eta + (self.constants.loss0 - self.eta) * np.exp(  # type: ignore[union-attr]
                -2 * self.phases[0].rho * np.maximum(t, 0.0))
        if self.kind == "cross-entropy":
            from ..desingularizers import CrossEntropy
            mu = self.phases[0].rho * self.kl_c * (1 - 1e-12)
            b = CrossEntropy().bound(self.constants.loss0, mu, np.maximum(t, 0.0))  # type: ignore[union-attr]
            return np.maximum(np.asarray(b, dtype=np.float64), self.target)
        out = np.full(t.shape, self.target)
        for k, ph in enumerate(self.phases):
            # the phase starts at most at its top level (phase 1: L₀ ≤ both bounds) and, once
            # the flow has reached the phase's bottom level, it stays below it
            top = max(self.constants.loss0, ph.loss_top) if k == 0 else ph.loss_top  # type: ignore[union-attr]
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
            lam0 = math.log(math.expm1(self.constants.loss0))  # type: ignore[union-attr]
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
                       "target_min": [finite_or_none(a.target_min) for a in self.searched]},
            "certificate": self.certificate.to_dict(),
        }




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
