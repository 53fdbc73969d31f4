"""The refinement check of a certificate on an adaptive flow (issue 17).

A certificate on a Dopri5 run is about the numerical solution at its tolerance: the KL ratio at
every stage and the delayed check see only the computed path, and nothing bounds the solver's
global error. A dip of the ratio narrower than the steps is stepped over. The refinement check
re-integrates the same flow at rtol/factor and atol/factor, records at the same times, forms
the same claim (the same φ and μ) on the refined path, and compares:

* the refined path violates the claim with its constant lowered by ``tol``: VIOLATED, reason
  ``not_resolved``;
* the observed minimum μ* or the loss at some record moves by more than ``tol`` (relative):
  UNAVAILABLE, reason ``not_resolved``;
* otherwise the certificate keeps its verdict with one more assumption saying by how much the
  two solutions agree. A feature narrower than the refined run's steps still escapes both runs:
  the note says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ._time import TIME_RTOL
from .certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from .problem import Problem
from .trajectory import Trajectory

__all__ = ["refine", "REFINE_FACTOR", "REFINE_TOL"]

REFINE_FACTOR = 100.0
REFINE_TOL = 1e-3


def refine(cert: Certificate, traj: Trajectory, problem: Problem,
           claim: Callable[[Trajectory, float], Certificate], *,
           factor: float = REFINE_FACTOR, tol: float = REFINE_TOL) -> Certificate:
    """``cert`` checked against the flow re-integrated at rtol/factor (see the module doc).

    ``claim(trajectory, scale)`` forms the same certificate on another trajectory with its
    constant scaled by ``scale`` = 1 − tol (μ, or the Rayleigh lower bound of a composition):
    the refined path must keep the claim up to the stated relative amount.
    Only HOLDS certificates of adaptive runs are re-checked; others are returned unchanged.
    """
    meta = traj.meta
    if meta.get("method") != "adaptive" or cert.status is not CertificateStatus.HOLDS:
        return cert
    if not isinstance(problem, Problem):
        raise TypeError(f"refine needs the Problem the run was made from (got "
                        f"{type(problem).__name__})")
    from .flow import Dopri5, Implicit, Start, Times, gradient_flow

    rtol, atol = float(meta["rtol"]), float(meta["atol"])
    fine_rtol, fine_atol = rtol / factor, atol / factor
    t = traj.t
    later = t[1:]
    described = str(meta.get("integrator", ""))
    # the same family: a stiff run is re-integrated by its own solver (Dopri5 could not reach
    # its horizon), anything else adaptive by Dopri5
    fine_integrator = (Implicit(described.split()[1], fine_rtol, fine_atol)
                       if described.startswith("implicit ") else Dopri5(fine_rtol, fine_atol))
    run = gradient_flow(problem, fine_integrator, t_max=float(t[-1]),
                        records=Times(later, groups=False) if later.size else None,
                        start=Start(t=float(t[0])))
    fine = run.trajectory
    if len(fine) != len(traj) or not np.allclose(fine.t, t, rtol=TIME_RTOL, atol=0.0):
        return _downgrade(cert, CertificateStatus.UNAVAILABLE, rtol, fine_rtol,
                          f"the re-integrated flow stopped at t = {run.t_final:.6g} "
                          f"({run.message}) before the run's last record t = {t[-1]:.6g}")
    loss, fine_loss = traj["loss"], fine["loss"]
    if not math.isclose(fine_loss[0], loss[0], rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(f"refine: the problem's parameters do not start this trajectory "
                         f"(L = {fine_loss[0]:.10g} against the run's {loss[0]:.10g}): pass the "
                         "Problem the run was made from")
    again = claim(fine, 1 - tol)
    floor = cert.desingularizer.floor
    use = np.isfinite(loss) & (loss > floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_loss = float(np.max(np.abs(fine_loss[use] - loss[use]) / loss[use])) if use.any() \
            else 0.0
    d_mu = (abs(again.mu_star - cert.mu_star) / cert.mu_star
            if cert.mu_star and math.isfinite(cert.mu_star) else math.nan)
    d_mu = d_mu if math.isfinite(d_mu) else math.inf
    numbers = (f"re-integrated at rtol = {fine_rtol:.3g}, atol = {fine_atol:.3g} "
               f"({run.n_grad_evals} gradient evaluations): μ* {cert.mu_star:.6g} → "
               f"{again.mu_star:.6g} ({d_mu:.2g} relative), the loss at the records moves by up "
               f"to {d_loss:.2g} relative (allowed {tol:g})")
    if again.status is not CertificateStatus.HOLDS:
        where = "" if again.first_violation is None else (
            f"; at t = {again.first_violation[0]:.6g}: {again.first_violation[1]}")
        return _downgrade(cert, CertificateStatus.VIOLATED, rtol, fine_rtol,
                          f"the same claim fails on the refined path{where}; {numbers}",
                          again.first_violation)
    if d_mu > tol or d_loss > tol:
        return _downgrade(cert, CertificateStatus.UNAVAILABLE, rtol, fine_rtol, numbers)
    resolved = Assumption(f"resolved: the claim holds re-integrated at rtol = {fine_rtol:.3g}",
                          True, numbers)
    note = (f"scope {cert.scope.value}: about the numerical solution at rtol = {rtol:g}, which "
            f"re-integration at rtol = {fine_rtol:.3g} reproduces (μ* to {d_mu:.2g}, losses to "
            f"{d_loss:.2g} relative); a dip narrower than both runs' steps escapes both (no bound"
            " on the global error is computed)")
    return replace(cert, assumptions=(*cert.assumptions, resolved),
                   notes=(*_without_tolerance_note(cert.notes), note))


def _downgrade(cert: Certificate, status: CertificateStatus, rtol: float, fine_rtol: float,
               why: str, violation=None) -> Certificate:
    text = f"not resolved at rtol = {rtol:g}: {why}"
    failed = Assumption(f"resolved: the claim holds re-integrated at rtol = {fine_rtol:.3g}",
                        False, why)
    return replace(cert, status=status, scope=Scope.RECORDS, reason=Reason.NOT_RESOLVED,
                   first_violation=violation if violation is not None else cert.first_violation,
                   assumptions=(*cert.assumptions, failed),
                   notes=(text, *_without_tolerance_note(cert.notes)))


def _without_tolerance_note(notes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in notes if not n.startswith("not re-integrated"))
