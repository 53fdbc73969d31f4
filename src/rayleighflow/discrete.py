"""The exact certificate for gradient descent (CERTIFICATES.md §3): no flow needed.

Gradient descent θ_{k+1} = θ_k − η∇L(θ_k). With the observed sufficient decrease
α_k = (L_k − L_{k+1}) / (η‖∇L_k‖²) > 0 and the KL ratio φ′(L_k)‖∇L_k‖² ≥ μ at every iterate,
a desingularizer with φ′ non-increasing gives, by the mean value theorem,
φ(L_k) − φ(L_{k+1}) ≥ μ α_k η, hence at every iterate

    L_K ≤ φ⁻¹( φ(L₀) − μ Σ_{k<K} α_k η ).

Every quantity is observed at an iterate and gradient descent has nothing between iterates:
the certificate has scope PATH with no gap. A step with α_k ≤ 0 (the loss did not decrease)
violates it: the step was too large.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import _bad_points
from ._time import within
from .certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from .desingularizers import Desingularizer
from .rounding import rounding_level, start_loss
from .trajectory import Trajectory

__all__ = ["gd_certificate", "iterates"]

_MU_RTOL = 1e-12


def iterates(traj: Trajectory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t_k, L_k, ‖∇L_k‖²) at every iterate of a full-batch gradient-descent run: the logged
    evaluations, then the last record if it lies beyond them (the final iterate θ_K)."""
    ev = traj.evaluations
    if ev is None:
        raise ValueError("this trajectory logged no gradient evaluations: run it with "
                         "gradient_flow(problem, GradientDescent(step)) on full batches")
    t, loss, g = ev["t"], ev["loss"], ev["grad_sq"]
    rt = traj.t
    if not within(rt[-1], t[-1]):
        t = np.append(t, rt[-1])
        loss = np.append(loss, traj["loss"][-1])
        g = np.append(g, traj["grad_sq"][-1])
    return t, loss, g


def gd_certificate(
    traj: Trajectory,
    phi: Desingularizer,
    mu: float | None = None,
    *,
    rtol: float = 1e-9,
    atol: float = 0.0,
    mu_source: str | None = None,
    extra_assumptions: tuple[Assumption, ...] = (),
) -> Certificate:
    """The discrete certificate on every iterate of a gradient-descent trajectory (PATH)."""
    step = traj.meta.get("step")
    if not (isinstance(step, int | float) and step > 0):
        raise ValueError("a gradient-descent certificate needs the step η in the trajectory's "
                         "meta (runs of gradient_flow(problem, GradientDescent(η)) carry it)")
    t, loss, g = iterates(traj)
    n_steps = loss.size - 1
    cur, nxt, g_cur = loss[:-1], loss[1:], g[:-1]
    above = np.isfinite(cur) & (cur > phi.floor)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = (cur - nxt) / (step * g_cur)
    ratios = np.asarray(phi.kl_ratio(loss, g), dtype=np.float64).reshape(loss.shape)
    ratios[np.isfinite(loss) & (loss > phi.floor) & (g <= 0)] = 0.0
    step_ratios = ratios[:-1]
    source = mu_source or ("observed" if mu is None else "user")
    assumptions = list(extra_assumptions)
    where = f"{loss.size} iterates ({n_steps} steps of η = {step:g})"

    considered = np.flatnonzero(above)
    mu_star, t_star = (math.nan, math.nan)
    if considered.size:
        j = considered[int(np.argmin(np.nan_to_num(step_ratios[considered], nan=-np.inf)))]
        mu_star, t_star = float(step_ratios[j]), float(t[j])
    a_min, t_amin = (math.nan, math.nan)
    if considered.size:
        j = considered[int(np.argmin(np.nan_to_num(alpha[considered], nan=-np.inf)))]
        a_min, t_amin = float(alpha[j]), float(t[j])

    failures: list[tuple[int, Reason, str]] = []  # (iterate index, reason, what)
    if not phi.concave:
        failures.append((0, Reason.NOT_CONCAVE, f"φ = {phi.name} is not concave"))
    nonfinite = np.flatnonzero(_bad_points(loss, g, ratios, phi))
    if nonfinite.size:
        failures.append((int(nonfinite[0]), Reason.NON_FINITE,
                         "non-finite loss, gradient norm or KL ratio"))
    if not (math.isfinite(loss[0]) and loss[0] > phi.floor):
        return _unavailable(phi, math.nan, source, traj, t, loss, ratios, mu_star, t_star,
                            rtol, atol, assumptions, Reason.NOTHING_TO_CERTIFY, step, a_min,
                            t_amin, f"the first loss {loss[0]:.6g} is not above φ's floor "
                                    f"{phi.floor:g}")
    if mu is None:
        mu = mu_star
        if not (math.isfinite(mu) and mu > 0):
            assumptions.append(Assumption(f"KL with φ = {phi.name}", False,
                                          f"μ* = {mu_star:.6g} at t = {t_star:.6g}: no positive "
                                          "constant"))
            reason = failures[0][1] if failures else Reason.NO_POSITIVE_CONSTANT
            return _unavailable(phi, mu, source, traj, t, loss, ratios, mu_star, t_star, rtol,
                                atol, assumptions, reason, step, a_min, t_amin,
                                "no positive KL constant on these iterates")
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}", True,
            f"μ* = min_k φ'(L_k)‖∇L_k‖² = {mu_star:.6g} at t = {t_star:.6g} over {where}"))
    else:
        below = np.flatnonzero(above & ~(step_ratios >= mu * (1 - _MU_RTOL)))
        if below.size:
            k = int(below[0])
            failures.append((k, Reason.KL_BELOW_MU,
                             f"φ'(L)‖∇L‖² = {step_ratios[k]:.6g} < μ = {mu:.6g}"))
        assumptions.append(Assumption(
            f"KL with φ = {phi.name}, μ = {mu:.6g}", below.size == 0,
            f"held at every iterate ({where})" if below.size == 0 else
            f"below μ at {below.size} iterates; min {mu_star:.6g} at t = {t_star:.6g}"))
    no_decrease = np.flatnonzero(above & ~(alpha > 0))
    level = rounding_level(traj.meta, cur)
    if no_decrease.size:
        k = int(no_decrease[0])
        change = abs(cur[k] - nxt[k])
        if level is not None and change <= level[k]:
            failures.append((k, Reason.LOSS_ROUNDING,
                             f"α = {alpha[k]:.3g} ≤ 0: L went from {cur[k]:.6g} to "
                             f"{nxt[k]:.6g}, a change of {change:.3g} within the loss's "
                             f"{traj.meta.get('dtype', 'float32')} rounding error (≈ "
                             f"{level[k]:.3g}): the recorded loss cannot resolve this step"))
        else:
            failures.append((k, Reason.NO_SUFFICIENT_DECREASE,
                             f"α = {alpha[k]:.3g} ≤ 0: L went from {cur[k]:.6g} to "
                             f"{nxt[k]:.6g}"))
    assumptions.append(Assumption(
        "sufficient decrease α_k > 0 at every step", no_decrease.size == 0,
        f"α_min = {a_min:.6g} at t = {t_amin:.6g}" + (
            "" if no_decrease.size == 0 else f"; α ≤ 0 at {no_decrease.size} steps, first at "
                                             f"t = {t[no_decrease[0]]:.6g}")))
    # The bound is certified up to the iterate after the first bad step, not beyond.
    last = n_steps if no_decrease.size == 0 else int(no_decrease[0])
    contrib = np.where(above, alpha, 0.0)[:last] * step
    with np.errstate(invalid="ignore"):
        s = np.concatenate([[0.0], np.cumsum(np.maximum(contrib, 0.0))])
    bound = np.full(loss.shape, np.nan)
    start = start_loss(traj.meta, float(loss[0]))
    if start > loss[0]:
        assumptions.append(Assumption(
            "the bound starts from L(θ₀) in float64", True,
            f"L(θ₀) = {start:.10g} in float64, {loss[0]:.10g} as recorded (relative "
            f"{(start - loss[0]) / start:.2g} lower): B₀ = the larger"))
    bound[:last + 1] = phi.bound(start, mu, s)
    excess = loss - (bound * (1 + rtol) + atol)
    max_violation = float(np.nanmax(excess))
    over = np.flatnonzero(excess > 0)
    if over.size:
        k = int(over[0])
        failures.append((k, Reason.BOUND_BELOW_LOSS,
                         f"loss {loss[k]:.6g} > bound {bound[k]:.6g}"))
    assumptions.append(Assumption(
        "bound ≥ loss at every iterate", over.size == 0,
        f"max(L − bound·(1+{rtol:g}) − {atol:g}) = {max_violation:.3g} over {last + 1} "
        "iterates"))
    ok = not failures and all(a.holds for a in assumptions)
    first = min(failures, key=lambda f: f[0]) if failures else None
    reason = None if ok else (first[1] if first else Reason.KL_BELOW_MU)  # type: ignore[assignment]
    violation = None if first is None else (float(t[first[0]]), first[2])
    return _result(phi, float(mu), source,
                   CertificateStatus.HOLDS if ok else CertificateStatus.VIOLATED, traj, t, loss,
                   bound, ratios, mu_star, t_star, max_violation, rtol, atol, assumptions,
                   reason, violation, step, a_min, t_amin,
                   f"exact gradient-descent certificate: checked at every one of {where}")


def _result(phi, mu, source, status, traj, t, loss, bound, ratios, mu_star, t_star,
            max_violation, rtol, atol, assumptions, reason, violation, step, a_min, t_amin,
            note) -> Certificate:
    return Certificate(
        desingularizer=phi, mu=mu, mu_source=source, status=status, scope=Scope.PATH,
        convention=traj.meta.get("convention", "mean"), t=t, loss=loss, bound=bound,
        kl_ratio=ratios, mu_star=mu_star, t_at_mu_star=t_star,
        max_bound_violation=max_violation, rtol=rtol, atol=atol,
        assumptions=tuple(assumptions), reason=reason, first_violation=violation,
        n_records=len(traj), n_grad_evals=int(loss.size), discrete=True, step=float(step),
        alpha_min=a_min, t_at_alpha_min=t_amin, notes=(note,), record_t=traj.t)


def _unavailable(phi, mu, source, traj, t, loss, ratios, mu_star, t_star, rtol, atol,
                 assumptions, reason, step, a_min, t_amin, why) -> Certificate:
    return Certificate.unavailable(
        phi, reason, why, t=t, loss=loss, kl_ratio=ratios, mu_source=source,
        convention=traj.meta.get("convention", "mean"), rtol=rtol, atol=atol,
        assumptions=tuple(assumptions), mu=mu, mu_star=mu_star, t_at_mu_star=t_star,
        scope=Scope.PATH, n_records=len(traj), n_grad_evals=int(loss.size), discrete=True,
        step=float(step), alpha_min=a_min, t_at_alpha_min=t_amin, record_t=traj.t)
