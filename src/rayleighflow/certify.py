"""Convergence certificates from a recorded trajectory (THEORY.md §3–4, §7).

A certificate for a desingularizer φ and a constant μ states: the KL ratio φ'(L_t)‖∇L_t‖² ≥ μ
at every record, hence L_t ≤ φ⁻¹(φ(L_0) − μ t), and checks that bound one-sidedly against the
recorded loss: L_t ≤ bound_t (1 + rtol) + atol. For a discretized flow the certificate is
empirical: it holds at the recorded points.

μ comes from one of three sources:

* ``observed``: μ* = min_t φ'(L_t)‖∇L_t‖² along the trajectory;
* ``user``: a stated μ, checked at every record (pass, or the first violation);
* ``composed``: μ = c · R_low, the loss's functional constant c (losses.FunctionalKL) times a
  lower bound R_low on R(K_θ; ∇ℓ) (observed minimum or user-given) — THEORY.md §4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, final

import numpy as np

from .desingularizers import Desingularizer, best_desingularizer, get_desingularizer
from .losses import FunctionalKL
from .trajectory import Trajectory

__all__ = ["CertificateStatus", "Assumption", "Certificate", "kl_ratios", "certify",
           "compose", "spectral", "rank_desingularizers"]


class CertificateStatus(str, Enum):
    HOLDS = "holds"            # every assumption checked at every record and the bound holds
    VIOLATED = "violated"      # a stated μ or the bound fails at some record (see first_violation)
    UNAVAILABLE = "unavailable"  # no positive constant exists on this trajectory (e.g. λ_min = 0)


@final
@dataclass(frozen=True)
class Assumption:
    name: str
    holds: bool
    detail: str


@final
@dataclass(frozen=True)
class Certificate:
    """A KL certificate and the evidence for it; ``to_dict`` gives the JSON form."""

    desingularizer: str
    mu: float
    mu_source: str
    status: CertificateStatus
    convention: str
    t: np.ndarray
    loss: np.ndarray
    bound: np.ndarray
    kl_ratio: np.ndarray
    mu_star: float
    t_at_mu_star: float
    max_bound_violation: float
    rtol: float
    atol: float
    assumptions: tuple[Assumption, ...]
    first_violation: tuple[float, str] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def bound_final(self) -> float:
        return float(self.bound[-1]) if self.bound.size else math.nan

    def time_to(self, target: float) -> float:
        """Certified time to reach ``target`` from the first record (inf if unavailable)."""
        if self.status is CertificateStatus.UNAVAILABLE or not self.mu > 0:
            return math.inf
        phi = get_desingularizer(self.desingularizer)
        return float(self.t[0]) + phi.time_to_reach(float(self.loss[0]), self.mu, target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "desingularizer": self.desingularizer, "mu": _num(self.mu),
            "mu_source": self.mu_source, "status": self.status.value,
            "convention": self.convention, "mu_star": _num(self.mu_star),
            "t_at_mu_star": _num(self.t_at_mu_star), "bound_final": _num(self.bound_final),
            "max_bound_violation": _num(self.max_bound_violation),
            "slack": {"rtol": self.rtol, "atol": self.atol},
            "first_violation": self.first_violation,
            "assumptions": [a.__dict__ for a in self.assumptions],
            "empirical": "holds at the recorded points of a discretized flow",
            "notes": list(self.notes),
        }


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def kl_ratios(traj: Trajectory, desingularizer: str | Desingularizer) -> np.ndarray:
    """φ'(L_t)‖∇L_t‖² at every record (NaN where L_t ≤ 0: the KL inequality is vacuous).

    A zero (or underflowed) gradient at a positive loss gives 0, not ∞·0 = NaN: such a record
    supports no μ > 0, so it must not be skipped.
    """
    phi = get_desingularizer(desingularizer)
    loss, grad_sq = traj["loss"], traj["grad_sq"]
    out = np.full(loss.shape, np.nan)
    ok = (loss > 0) & np.isfinite(loss) & np.isfinite(grad_sq)
    with np.errstate(invalid="ignore", over="ignore"):
        out[ok] = phi.kl_ratio(loss[ok], grad_sq[ok])
    out[ok & (grad_sq <= 0)] = 0.0
    return out


def _finite_records(traj: Trajectory) -> Assumption:
    loss, grad_sq = traj["loss"], traj["grad_sq"]
    bad = int(np.sum(~(np.isfinite(loss) & np.isfinite(grad_sq))))
    return Assumption("every record finite", bad == 0,
                      f"{bad} of {len(loss)} records have a non-finite loss or gradient norm")


def _observed_min(values: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(values)
    if not finite.any():
        return math.nan, math.nan
    i = int(np.nanargmin(np.where(finite, values, np.inf)))
    return float(values[i]), float(t[i])


def certify(
    traj: Trajectory,
    desingularizer: str | Desingularizer = "log",
    mu: float | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    extra_assumptions: tuple[Assumption, ...] = (),
    mu_source: str | None = None,
) -> Certificate:
    """Certificate for φ with a stated μ (checked at every record) or the observed μ*.

    The bound check is one-sided, L_t ≤ bound_t·(1 + rtol) + atol; atol defaults to 0 so that
    the check keeps its meaning at tiny losses.
    """
    phi = get_desingularizer(desingularizer)
    if mu is not None and not (math.isfinite(mu) and mu > 0):
        raise ValueError(
            f"mu must be a finite number > 0 (got {mu}): a KL constant is a positive lower bound "
            "on φ'(L)‖∇L‖²; omit it to use the observed minimum μ*"
        )
    if len(traj) < 2:
        raise ValueError("a certificate needs a trajectory with at least 2 records")
    t, loss = traj.t, traj["loss"]
    if np.any(np.diff(t) <= 0):
        raise ValueError("trajectory times must be strictly increasing")
    ratios = kl_ratios(traj, phi)
    mu_star, t_star = _observed_min(ratios, t)
    assumptions = [*extra_assumptions, _finite_records(traj)]
    if not (math.isfinite(loss[0]) and loss[0] > 0):
        return _unavailable(traj, phi, math.nan, mu_source or "observed", ratios, mu_star,
                            t_star, rtol, atol, tuple(assumptions),
                            "the first recorded loss is not positive: nothing to certify")
    violation = None
    if mu is None:
        mu, source = mu_star, mu_source or "observed"
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}", bool(mu > 0),
            f"μ* = min_t φ'(L_t)‖∇L_t‖² = {mu_star:.6g} at t = {t_star:.6g} "
            f"({int(np.isfinite(ratios).sum())} records)"))
    else:
        source = mu_source or "user"
        # 1e-12: a μ read off the records (c·min R) may sit one rounding below its ratio.
        bad = np.flatnonzero(np.isfinite(ratios) & (ratios < mu * (1 - 1e-12)))
        holds = bad.size == 0
        if not holds:
            i = int(bad[0])
            violation = (float(t[i]), f"φ'(L)‖∇L‖² = {ratios[i]:.6g} < μ = {mu:.6g}")
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}, μ = {mu:.6g}", holds,
            "holds at every record" if holds else f"first violated at t = {violation[0]:.6g}"))
    if not (math.isfinite(mu) and mu > 0):
        return _unavailable(traj, phi, mu, source, ratios, mu_star, t_star, rtol, atol,
                            tuple(assumptions))
    bound = phi.bound(float(loss[0]), mu, t - t[0])
    excess = loss - (bound * (1 + rtol) + atol)
    max_violation = float(np.nanmax(excess))
    bound_holds = max_violation <= 0
    if not bound_holds and violation is None:
        i = int(np.flatnonzero(excess > 0)[0])
        violation = (float(t[i]), f"loss {loss[i]:.6g} > bound {bound[i]:.6g}")
    assumptions.append(Assumption(
        "bound ≥ recorded loss", bound_holds,
        f"max(L − bound·(1+{rtol:g}) − {atol:g}) = {max_violation:.3g}"))
    ok = all(a.holds for a in assumptions)
    status = CertificateStatus.HOLDS if ok else CertificateStatus.VIOLATED
    return Certificate(phi.name, float(mu), source, status, traj.meta.get("convention", "mean"),
                       t, loss, bound, ratios, mu_star, t_star, max_violation, rtol, atol,
                       tuple(assumptions), violation)


def compose(
    traj: Trajectory,
    functional_kl: FunctionalKL,
    rayleigh_lower: float | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> Certificate:
    """THEORY.md §4: functional KL (φ, c) × R(K; ∇ℓ) ≥ R_low  ⇒  parametric KL with μ = c·R_low.

    Both assumptions are checked at every record: φ'(L)‖∇ℓ‖²_D ≥ c and R ≥ R_low.
    """
    phi = get_desingularizer(functional_kl.desingularizer)
    t, loss = traj.t, traj["loss"]
    ray, fgrad = traj["rayleigh"], traj["fgrad_sq"]
    r_min, t_rmin = _observed_min(ray, t)
    if rayleigh_lower is None:
        rayleigh_lower, src = r_min, "observed min"
    else:
        if not (math.isfinite(rayleigh_lower) and rayleigh_lower > 0):
            raise ValueError(f"rayleigh_lower must be a finite number > 0 (got {rayleigh_lower})")
        src = "given"
    ok = (loss > 0) & np.isfinite(fgrad)
    fkl = phi.kl_ratio(loss[ok], fgrad[ok])
    fkl_ok = bool(np.all(fkl >= functional_kl.c * (1 - 1e-9)))
    ray_ok = bool(np.all(ray[np.isfinite(ray)] >= rayleigh_lower * (1 - 1e-12)))
    assumptions = (
        Assumption(f"functional KL: φ'(ℓ)‖∇ℓ‖² ≥ c = {functional_kl.c:.6g}", fkl_ok,
                   f"{functional_kl.reason}; min over records "
                   f"{np.min(fkl) if fkl.size else 0:.6g}"),
        Assumption(f"Rayleigh bound R(K; ∇ℓ) ≥ {rayleigh_lower:.6g} ({src})", ray_ok,
                   f"observed min R = {r_min:.6g} at t = {t_rmin:.6g}"),
    )
    mu = functional_kl.c * rayleigh_lower
    if not (math.isfinite(mu) and mu > 0):
        ratios = kl_ratios(traj, phi)
        mu_star, t_star = _observed_min(ratios, t)
        return _unavailable(traj, phi, mu, "composed", ratios, mu_star, t_star, rtol, atol,
                            assumptions)
    return certify(traj, phi, mu, rtol=rtol, atol=atol, extra_assumptions=assumptions,
                   mu_source="composed")


def _unavailable(traj, phi, mu, source, ratios, mu_star, t_star, rtol, atol,
                 assumptions, why: str = "no positive KL constant on this trajectory",
                 ) -> Certificate:
    loss = traj["loss"]
    return Certificate(phi.name, mu, source, CertificateStatus.UNAVAILABLE,
                       traj.meta.get("convention", "mean"), traj.t, loss,
                       np.full(loss.shape, np.nan), ratios, mu_star, t_star, math.nan, rtol,
                       atol, tuple(assumptions), None, (why,))


def spectral(
    traj: Trajectory,
    functional_kl: FunctionalKL,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> Certificate:
    """T1 / the definite-NTK proposition: R(K; ∇ℓ) ≥ λ_min(K_θt), so if λ_min > 0 along the
    flow, μ = c · min_t λ_min. Needs the ``lambda_min`` and ``rank_threshold`` columns (a
    spectrum at records). Unavailable when λ_min is numerically zero at some record, which
    is forced when nk > P (rank K ≤ P)."""
    lam, thr = traj.get("lambda_min"), traj.get("rank_threshold")
    if lam is None or thr is None or not np.isfinite(lam).any():
        raise ValueError("a spectral certificate needs λ_min at records: record the NTK "
                         "spectrum (e.g. experiments.common.spectrum_diagnostic)")
    have = np.isfinite(lam)
    lam_min = float(np.min(lam[have]))
    zero = ~(lam[have] > thr[have])  # an unknown (NaN) threshold proves nothing: count as zero
    definite = Assumption(
        "definite NTK: λ_min(K_θt) > 0 at every record", not bool(zero.any()),
        f"min λ_min = {lam_min:.6g} over {int(have.sum())} spectra; "
        f"{int(zero.sum())} below the rank threshold")
    if zero.any():
        phi = get_desingularizer(functional_kl.desingularizer)
        ratios = kl_ratios(traj, phi)
        mu_star, t_star = _observed_min(ratios, traj.t)
        return _unavailable(traj, phi, 0.0, "spectral", ratios, mu_star, t_star, rtol, atol,
                            (definite,))
    cert = compose(traj, functional_kl, lam_min, rtol=rtol, atol=atol)
    return _replace_source(cert, "spectral", (definite,))


def _replace_source(cert: Certificate, source: str, extra: tuple[Assumption, ...]) -> Certificate:
    from dataclasses import replace

    return replace(cert, mu_source=source, assumptions=extra + cert.assumptions)


def rank_desingularizers(traj: Trajectory, candidates=None) -> list[dict]:
    """The family ranked by tightness of the observed-μ* bound at the final record."""
    t = traj.t
    return best_desingularizer(traj["loss"], traj["grad_sq"], t - t[0], candidates)
