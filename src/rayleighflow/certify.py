"""Convergence certificates from a recorded run (THEORY.md §3–4, CERTIFICATES.md §2–3, §6).

A certificate for a desingularizer φ and a constant μ checks the KL ratio φ′(L)‖∇L‖² ≥ μ and
the bound L ≤ B one-sidedly (L ≤ B·(1 + rtol) + atol) and says where it checked (its scope):

* gradient descent (:class:`~rayleighflow.GradientDescent`, trajectory ``method`` "euler"):
  the exact discrete certificate of :mod:`rayleighflow.discrete`,
  L_K ≤ φ⁻¹(φ(L₀) − μ Σ α_k η), checked at every iterate (PATH);
* a flow: B(t) = φ⁻¹(φ(L₀) − μ(t − t₀)) against the records; the KL ratio at every gradient
  evaluation the integrator logged (each Runge–Kutta stage) plus the delayed check
  L(t_a) ≤ B(t_{a+1}) give scope PATH, the records alone scope RECORDS.

μ comes from one of four sources: ``observed`` (μ* = min of the ratio over every checked point),
a stated μ (``user``, or a theorem's constant, e.g. "theory: κ²ε²"), ``composed`` (c·R_low,
THEORY.md §4) and ``spectral`` (c·min λ_min(K), the definite-NTK proposition).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ._checks import _bad_points, _min_at, _ratios
from ._io import finite_or_none
from ._time import within
from .certificate import (
    Assumption,
    Certificate,
    CertificateStatus,
    DelayedCheck,
    Reason,
    Scope,
)
from .desingularizers import _DEFAULT_CANDIDATES, Desingularizer, get_desingularizer
from .problem import Problem
from .rounding import start_loss
from .trajectory import Trajectory

__all__ = ["certify", "delayed_check", "kl_ratios", "rank_desingularizers"]

# A μ read off the records (c·min R) may sit one rounding below its own ratio.
_MU_RTOL = 1e-12


def kl_ratios(traj: Trajectory, desingularizer: str | Desingularizer) -> np.ndarray:
    """φ′(L_t)‖∇L_t‖² at every record (NaN where L_t is at or below φ's floor: KL is silent).

    A zero (or underflowed) gradient at a positive loss gives 0, not ∞·0 = NaN; an infinite
    ratio stays infinite (a failure, never a pass). Losses and gradient norms are in the
    trajectory's convention.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> traj = rf.Trajectory()
        >>> for t in np.linspace(0.0, 2.0, 5):  # L = e^(−2t), ‖∇L‖² = 2L: PL with μ = 2
        ...     traj.append({"t": t, "loss": np.exp(-2 * t), "grad_sq": 2 * np.exp(-2 * t)})
        >>> rf.kl_ratios(traj, "log")            # ‖∇L‖²/L
        array([2., 2., 2., 2., 2.])
        >>> rf.kl_ratios(traj, "reciprocal")     # ‖∇L‖²/L² = 2e^(2t) grows
        array([ 2.        ,  5.43656366, 14.7781122 , 40.17107385, 109.19630007])
    """
    return _ratios(get_desingularizer(desingularizer), traj["loss"], traj["grad_sq"])


def certify(
    traj: Trajectory,
    desingularizer: str | Desingularizer = "log",
    mu: float | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    extra_assumptions: tuple[Assumption, ...] = (),
    mu_source: str | None = None,
    use_evaluations: bool = True,
    refine: Problem | None = None,
) -> Certificate:
    """Certificate for φ with a stated μ or the observed μ*, in the strongest scope the run
    supports (see the module docstring). ``use_evaluations=False`` checks the records only.

    On an adaptive (Dopri5) run the checks see the numerical solution at its tolerance only.
    ``refine=problem`` (the Problem the run was made from) re-integrates the flow at rtol/100
    and forms the same claim there: a claim the refined path breaks is VIOLATED, one whose μ*
    or record losses move by more than 1e-3 is UNAVAILABLE, both with reason ``not_resolved``
    (:func:`rayleighflow.refine.refine`).

    The bound check is one-sided, L ≤ bound·(1 + rtol) + atol; atol defaults to 0 so that the
    check keeps its meaning at tiny losses.

    The KL inequality φ′(L)‖∇L‖² ≥ μ on the checked points gives the bound
    L(θ_t) ≤ B(t) = φ⁻¹(φ(L₀) − μ(t − t₀)); μ* = min φ′(L)‖∇L‖² when ``mu`` is None.
    Losses are in the trajectory's convention (``traj.meta["convention"]``).

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> traj = rf.Trajectory()
        >>> for t in np.linspace(0.0, 2.0, 5):  # L = e^(−2t), ‖∇L‖² = 2L: PL with μ = 2
        ...     traj.append({"t": t, "loss": np.exp(-2 * t), "grad_sq": 2 * np.exp(-2 * t)})
        >>> cert = rf.certify(traj, "log")       # observed μ* = min ‖∇L‖²/L
        >>> cert.status.value, cert.scope.value, cert.mu   # no solver evaluations: records
        ('holds', 'records', 2.0)
        >>> bad = rf.certify(traj, "log", mu=3.0)          # a stated μ the run does not have
        >>> bad.status.value, bad.reason.code
        ('violated', 'kl_below_mu')
    """
    phi = get_desingularizer(desingularizer)
    if mu is not None and not (isinstance(mu, int | float) and math.isfinite(mu) and mu > 0):
        raise ValueError(
            f"mu must be a finite number > 0 (got {mu!r}): a KL constant is a positive lower "
            "bound on φ'(L)‖∇L‖²; omit it to use the observed minimum μ*")
    if not isinstance(traj, Trajectory):
        raise TypeError(f"certify needs a Trajectory (got {type(traj).__name__}); pass "
                        "result.trajectory of gradient_flow")
    if len(traj) == 0:
        raise ValueError("a certificate needs a trajectory with records (this one is empty)")
    if len(traj) < 2:  # a flow stopped at its first record: nothing between two points
        return _unavailable(traj, phi, mu_source or ("observed" if mu is None else "user"),
                            Reason.NO_CHECKED_POINT, (), "a certificate needs at least 2 "
                            "records; the run stopped at its first one", rtol, atol)
    if np.any(np.diff(traj.t) <= 0):
        raise ValueError("trajectory times must be strictly increasing")
    evals = traj.evaluations if use_evaluations else None
    if evals is not None and traj.meta.get("method") == "euler":
        from .discrete import gd_certificate

        return gd_certificate(traj, phi, mu, rtol=rtol, atol=atol, mu_source=mu_source,
                              extra_assumptions=extra_assumptions)
    cert = _flow_certificate(traj, phi, mu, evals, rtol, atol, mu_source, extra_assumptions)
    if refine is None:
        return cert
    from .refine import refine as refined

    return refined(cert, traj, refine, lambda fine, scale: certify(
        fine, phi, cert.mu * scale, rtol=rtol, atol=atol, use_evaluations=use_evaluations))


def _flow_certificate(traj, phi, mu, evals, rtol, atol, mu_source, extra) -> Certificate:
    t, loss, grad_sq = traj.t, traj["loss"], traj["grad_sq"]
    ratios = _ratios(phi, loss, grad_sq)
    ck = _checked_points(traj, evals)
    ck_t, ck_loss, ck_g = ck["t"], ck["loss"], ck["grad_sq"]
    ck_ratios = _ratios(phi, ck_loss, ck_g)
    mu_star, t_star = _min_at(ck_ratios, ck_t)
    n_evals = int(ck["t"].size) - len(traj)
    base = dict(convention=traj.meta.get("convention", "mean"), t=t,
                loss=loss, kl_ratio=ratios, mu_star=mu_star, t_at_mu_star=t_star, rtol=rtol,
                atol=atol, n_records=len(traj), n_grad_evals=n_evals)
    where = (f"{len(traj)} records" + (f" and {n_evals} gradient evaluations" if n_evals else ""))
    assumptions = list(extra)
    source = mu_source or ("observed" if mu is None else "user")

    def unavailable(reason: Reason, why: str, mu_value: float = math.nan) -> Certificate:
        assumptions.append(Assumption(f"KL with φ = {phi.name}", False, why))
        return Certificate.unavailable(phi, reason, why, mu=mu_value, mu_source=source,
                                       assumptions=tuple(assumptions), **base)

    if not (math.isfinite(loss[0]) and loss[0] > phi.floor):
        return unavailable(Reason.NOTHING_TO_CERTIFY,
                           f"the first recorded loss {loss[0]:.6g} is not above φ's floor "
                           f"{phi.floor:g}: nothing to certify")
    bad = _bad_points(ck_loss, ck_g, ck_ratios, phi)
    violation, reason = None, None
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        violation, reason = (float(ck_t[i]), "non-finite loss, gradient norm or KL ratio"), \
            Reason.NON_FINITE
        assumptions.append(Assumption("every checked point finite", False,
                                      f"{int(bad.sum())} of {ck_t.size} checked points are not "
                                      "finite"))
    if mu is None:
        mu = mu_star
        if not (math.isfinite(mu) and mu > 0):
            return unavailable(Reason.NO_POSITIVE_CONSTANT if reason is None else reason,
                               f"μ* = min φ'(L)‖∇L‖² = {mu_star:.6g} at t = {t_star:.6g} over "
                               f"{where}: no positive constant", mu)
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}", True,
            f"μ* = min φ'(L)‖∇L‖² = {mu_star:.6g} at t = {t_star:.6g} over {where}"))
    else:
        below = np.flatnonzero(ck_ratios < mu * (1 - _MU_RTOL))
        if below.size:
            i = int(below[np.argmin(ck_t[below])])
            if violation is None or ck_t[i] < violation[0]:
                violation = (float(ck_t[i]), f"φ'(L)‖∇L‖² = {ck_ratios[i]:.6g} < μ = {mu:.6g}")
            reason = reason or Reason.KL_BELOW_MU
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}, μ = {mu:.6g}", below.size == 0,
            f"held at {where}" if below.size == 0 else
            f"below μ at {below.size} of {ck_t.size} checked points; min {mu_star:.6g} at "
            f"t = {t_star:.6g}"))
    start = start_loss(traj.meta, float(loss[0]))
    if start > loss[0]:
        assumptions.append(Assumption(
            "the bound starts from L(θ₀) in float64", True,
            f"L(θ₀) = {start:.10g} in float64, {loss[0]:.10g} as recorded: B₀ = the larger"))
    bound = phi.bound(start, mu, t - t[0])
    excess = loss - (bound * (1 + rtol) + atol)
    max_violation = float(np.nanmax(excess))
    bound_ok = max_violation <= 0
    if not bound_ok:
        i = int(np.flatnonzero(excess > 0)[0])
        if violation is None:
            violation = (float(t[i]), f"loss {loss[i]:.6g} > bound {bound[i]:.6g}")
        reason = reason or Reason.BOUND_BELOW_LOSS
    assumptions.append(Assumption(
        "bound ≥ recorded loss", bound_ok,
        f"max(L − bound·(1+{rtol:g}) − {atol:g}) = {max_violation:.3g} over {len(traj)} records"))
    delayed = delayed_check(t, loss, bound, rtol, atol, phi.floor)
    ok = all(a.holds for a in assumptions)
    path = ok and evals is not None and delayed.passed
    notes = [_scope_note(evals is not None, delayed, traj.meta.get("method"))]
    if traj.meta.get("method") == "adaptive":
        solver = traj.meta.get("integrator")
        of = f" of {solver}" if solver else ""
        notes.append(f"not re-integrated: the checks are about the numerical solution{of} at "
                     f"rtol = {traj.meta.get('rtol')}, atol = {traj.meta.get('atol')}, whose "
                     "global error nothing bounds (certify(..., refine=problem) re-runs the flow "
                     "at rtol/100 and compares)")
    return Certificate(desingularizer=phi, mu=float(mu), mu_source=source,
                       status=CertificateStatus.HOLDS if ok else CertificateStatus.VIOLATED,
                       scope=Scope.PATH if path else Scope.RECORDS, bound=bound,
                       max_bound_violation=max_violation, assumptions=tuple(assumptions),
                       reason=None if ok else (reason or Reason.KL_BELOW_MU),
                       first_violation=violation, delayed_check=delayed, notes=tuple(notes),
                       **base)


def _checked_points(traj: Trajectory, evals: dict[str, np.ndarray] | None
                    ) -> dict[str, np.ndarray]:
    """Records and, if logged, every gradient evaluation: t, loss, grad_sq, fgrad_sq."""
    rec = {"t": traj.t, "loss": traj["loss"], "grad_sq": traj["grad_sq"],
           "fgrad_sq": traj.get("fgrad_sq")}
    if rec["fgrad_sq"] is None:
        rec["fgrad_sq"] = np.full(len(traj), np.nan)
    if evals is None:
        return rec  # type: ignore[return-value]
    # Stages of the last step past the last record lie beyond the checked horizon.
    inside = within(evals["t"], float(traj.t[-1]))
    return {k: np.concatenate([rec[k], evals[k][inside]]) for k in rec}


def _scope_note(have_evals: bool, delayed: DelayedCheck, method: str | None) -> str:
    parts = []
    if method == "euler":
        parts.append("gradient descent with fresh batches (or a separate evaluation set): the "
                     "flow bound is compared at the records only")
    elif have_evals:
        parts.append("KL ratio checked at every gradient evaluation of the integrator")
    else:
        parts.append("KL ratio checked at the records only")
    if delayed.passed:
        parts.append(f"delayed check L(t_a) ≤ B(t_(a+1)) passed on all {delayed.intervals} "
                     "record intervals after the first")
    else:
        parts.append(f"delayed check L(t_a) ≤ B(t_(a+1)) failed on {delayed.failures} of the "
                     f"{delayed.intervals} record intervals after the first (first on "
                     f"[{delayed.first_failure[0]:.4g}, {delayed.first_failure[1]:.4g}])")  # type: ignore[index]
    return "; ".join(parts)


def delayed_check(t: np.ndarray, loss: np.ndarray, bound: np.ndarray, rtol: float,
                  atol: float, floor: float = 0.0) -> DelayedCheck:
    """CERTIFICATES.md §2: L(t_a) ≤ B(t_{a+1})·(1 + rtol) + atol for consecutive records.

    The first interval is not checked: B starts at L(t_0), so L(t_0) > B(t_1) always; only the
    KL ratio at the evaluations inside it covers it. Intervals starting at or below the floor
    are skipped (the bound sits at its floor there).
    """
    if loss.size < 3:
        return DelayedCheck(True, 0, math.nan)
    start, nxt = loss[:-1], bound[1:] * (1 + rtol) + atol
    use = np.isfinite(start) & (start > floor)
    use[0] = False
    if not use.any():
        return DelayedCheck(True, 0, math.nan)
    slack = (nxt - start)[use] / start[use]
    fails = np.flatnonzero(use & ~(nxt >= start))
    first = (float(t[fails[0]]), float(t[fails[0] + 1])) if fails.size else None
    return DelayedCheck(fails.size == 0, int(use.sum()), float(np.min(slack)), first,
                        int(fails.size))


def _unavailable(traj: Trajectory, phi: Desingularizer, source: str, reason: Reason,
                 assumptions: tuple[Assumption, ...], why: str, rtol: float,
                 atol: float) -> Certificate:
    loss = traj["loss"]
    ratios = _ratios(phi, loss, traj["grad_sq"])
    mu_star, t_star = _min_at(ratios, traj.t)
    evals = traj.evaluations
    return Certificate.unavailable(
        phi, reason, why, t=traj.t, loss=loss, kl_ratio=ratios, mu_source=source,
        convention=traj.meta.get("convention", "mean"), rtol=rtol, atol=atol,
        assumptions=assumptions, mu_star=mu_star, t_at_mu_star=t_star, n_records=len(traj),
        n_grad_evals=0 if evals is None else int(evals["t"].size))


def rank_desingularizers(
    traj: Trajectory, candidates: Iterable[str | Desingularizer] | None = None,
) -> list[dict]:
    """The family ranked by tightness over the whole run (CERTIFICATES.md; issue 7 item 8).

    Each candidate gets its observed-μ* certificate. Only those that HOLD at every checked
    point are ranked, by the mean of log(bound/L) over the checked points (0 is exact); the
    others follow, unranked, with their status and reason.

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> traj = rf.Trajectory()
        >>> for t in np.linspace(0.0, 2.0, 5):  # L = e^(−2t), ‖∇L‖² = 2L: PL with μ = 2
        ...     traj.append({"t": t, "loss": np.exp(-2 * t), "grad_sq": 2 * np.exp(-2 * t)})
        >>> best = rf.rank_desingularizers(traj)[0]   # log (PL) is exact on this run
        >>> best["name"], best["rank"], best["tightness"]
        ('log', 1, 0.0)
    """
    rows = []
    for spec in candidates if candidates is not None else _DEFAULT_CANDIDATES:
        cert = certify(traj, spec)
        use = np.isfinite(cert.bound) & (cert.loss > cert.desingularizer.floor)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.log(cert.bound[use] / cert.loss[use]) if use.any() else np.array([])
        rows.append({
            "name": cert.desingularizer.name, "status": cert.status.value,
            "scope": cert.scope.value, "mu_star": finite_or_none(cert.mu_star),
            "t_at_min": finite_or_none(cert.t_at_mu_star),
            "tightness": finite_or_none(float(np.mean(gap))) if gap.size and cert.holds else None,
            "final_ratio": finite_or_none(cert.bound_final / float(cert.loss[-1]))
            if cert.loss[-1] > 0 else None,
            "reason": None if cert.reason is None else cert.reason.code})
    held = sorted((r for r in rows if r["status"] == "holds" and r["tightness"] is not None),
                  key=lambda r: r["tightness"])  # type: ignore[arg-type, return-value]
    for i, r in enumerate(held):
        r["rank"] = i + 1
    rest = [dict(r, rank=None) for r in rows if r not in held]
    return held + rest


