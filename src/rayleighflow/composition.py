"""Composed and spectral certificates (THEORY.md §4, T1): a functional KL fact (φ, c) times a
lower bound on the Rayleigh quotient R(K; ∇ℓ) gives the parametric KL constant μ = c·R_low;
with R_low = min λ_min(K_θt), the definite-NTK proposition. Both are checked like a stated μ by
:func:`rayleighflow.certify`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ._checks import _min_at, _ratios
from .certificate import Assumption, Certificate, CertificateStatus, Reason, Scope
from .certify import _MU_RTOL, _checked_points, _unavailable, certify
from .desingularizers import get_desingularizer
from .losses import FunctionalKL
from .problem import Problem
from .trajectory import Trajectory

__all__ = ["compose", "spectral"]


def compose(
    traj: Trajectory,
    functional_kl: FunctionalKL,
    rayleigh_lower: float | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    refine: Problem | None = None,
) -> Certificate:
    """THEORY.md §4: functional KL (φ, c) × R(K; ∇ℓ) ≥ R_low ⇒ parametric KL, μ = c·R_low.

    Both assumptions are checked at every record that carries them (φ'(ℓ)‖∇ℓ‖² ≥ c and
    R ≥ R_low); a check with no record to look at fails (UNAVAILABLE), it never passes empty.
    The resulting μ is then checked like a stated μ, at every gradient evaluation too.

    R(K; ∇ℓ) = ‖∇L‖²/‖∇ℓ‖²_D is read off the records and evaluations (``grad_sq`` and
    ``fgrad_sq``, in the run's convention); ``rayleigh_lower`` defaults to its observed minimum.
    ``refine=problem``: the refinement check of :func:`certify` (the same R_low and μ on the
    flow re-integrated at rtol/100).

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> problem = rf.Problem(rf.Model(net), data, "square")
        >>> run = rf.gradient_flow(problem, rf.GradientDescent(0.1), t_max=2.0)
        >>> fkl = problem.loss.functional_kl(data.weights, problem.convention)
        >>> fkl.desingularizer, fkl.c                # square loss: ‖∇ℓ‖² = 2ℓ
        ('log', 2.0)
        >>> cert = rf.compose(run.trajectory, fkl)
        >>> cert.mu_source, cert.status.value
        ('composed', 'holds')
        >>> ev = run.trajectory.evaluations           # every gradient-descent iterate
        >>> bool(cert.mu == fkl.c * (ev["grad_sq"] / ev["fgrad_sq"]).min())  # μ = c·min R
        True
    """
    if isinstance(functional_kl, str):
        raise TypeError("compose needs a FunctionalKL (e.g. "
                        "problem.loss.functional_kl(data.weights, problem.convention)), not "
                        f"the name {functional_kl!r}")
    phi = get_desingularizer(functional_kl.desingularizer)
    ck = _checked_points(traj, traj.evaluations)
    t, loss, fgrad = ck["t"], ck["loss"], ck["fgrad_sq"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ray = np.where(fgrad > 0, ck["grad_sq"] / fgrad, np.nan)
    have_ray = np.isfinite(ray)
    r_min, t_rmin = _min_at(np.where(have_ray, ray, np.nan), t)
    if rayleigh_lower is None:
        rayleigh_lower, src = r_min, "observed min"
    else:
        if not (math.isfinite(rayleigh_lower) and rayleigh_lower > 0):
            raise ValueError(f"rayleigh_lower must be a finite number > 0 (got {rayleigh_lower})")
        src = "given"
    use = np.isfinite(loss) & (loss > phi.floor) & np.isfinite(fgrad)
    fkl = _ratios(phi, loss[use], fgrad[use])
    fkl_ok = bool(use.any() and np.all(fkl >= functional_kl.c * (1 - 1e-9)))
    ray_ok = bool(have_ray.any() and np.all(ray[have_ray] >= rayleigh_lower * (1 - _MU_RTOL)))
    assumptions = (
        Assumption(f"functional KL: φ'(ℓ)‖∇ℓ‖² ≥ c = {functional_kl.c:.6g}", fkl_ok,
                   f"{functional_kl.reason}; " + (
                       f"min over {int(use.sum())} checked points {np.min(fkl):.6g}"
                       if use.any() else "no checked point with a positive loss and a finite "
                                         "‖∇ℓ‖²: nothing checked")),
        Assumption(f"Rayleigh bound R(K; ∇ℓ) ≥ {rayleigh_lower:.6g} ({src})", ray_ok,
                   f"observed min R = {r_min:.6g} at t = {t_rmin:.6g} over "
                   f"{int(have_ray.sum())} checked points" if have_ray.any()
                   else "no checked point with a finite R(K; ∇ℓ): nothing checked"),
    )
    mu = functional_kl.c * rayleigh_lower
    if not (use.any() and have_ray.any()):
        return _unavailable(traj, phi, "composed", Reason.NO_CHECKED_POINT, assumptions,
                            "no record carries the quantities the composition needs", rtol, atol)
    if not fkl_ok or not ray_ok:
        reason = Reason.FUNCTIONAL_KL_FAILED if not fkl_ok else Reason.RAYLEIGH_BELOW_BOUND
        cert = certify(traj, phi, mu if mu > 0 else None, rtol=rtol, atol=atol,
                       extra_assumptions=assumptions, mu_source="composed")
        return replace(cert, status=CertificateStatus.VIOLATED, reason=reason,
                       scope=Scope.RECORDS)
    if not (math.isfinite(mu) and mu > 0):
        return _unavailable(traj, phi, "composed", Reason.NO_POSITIVE_CONSTANT, assumptions,
                            f"c·R_low = {mu:.6g}: no positive constant", rtol, atol)
    cert = certify(traj, phi, mu, rtol=rtol, atol=atol, extra_assumptions=assumptions,
                   mu_source="composed")
    if refine is None:
        return cert
    from .refine import refine as refined

    return refined(cert, traj, refine, lambda fine, scale: compose(
        fine, functional_kl, rayleigh_lower * scale, rtol=rtol, atol=atol))


def spectral(
    traj: Trajectory,
    functional_kl: FunctionalKL,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> Certificate:
    """T1 / the definite-NTK proposition: R(K; ∇ℓ) ≥ λ_min(K_θt), so if λ_min > 0 along the
    flow, μ = c · min_t λ_min.

    Needs the spectrum columns at records (``lambda_min``, ``rank_threshold``,
    ``spectrum_samples``; experiments.common.spectrum_diagnostic). UNAVAILABLE when a spectrum
    was computed on a subset of the evaluation data (a subset never certifies the full kernel)
    or when λ_min is zero — structurally (rank ≤ P < nk) or numerically (≤ τ) — at a record.

    Example:
        >>> import numpy as np
        >>> import torch
        >>> import rayleighflow as rf
        >>> fkl = rf.SquareLoss().functional_kl(torch.full((4,), 0.25), rf.Convention.MEAN)
        >>> traj = rf.Trajectory(meta={"eval_size": 4})
        >>> for t in np.linspace(0.0, 2.0, 5):  # λ_min = 0.5 > τ on all 4 samples, L = e^(−2t)
        ...     L = np.exp(-2 * t)
        ...     traj.append({"t": t, "loss": L, "grad_sq": 2 * L, "fgrad_sq": 2 * L,
        ...                  "lambda_min": 0.5, "rank_threshold": 1e-12, "spectrum_samples": 4})
        >>> cert = rf.spectral(traj, fkl)
        >>> cert.mu_source, cert.mu, cert.status.value      # μ = c·min λ_min = 2 · 0.5
        ('spectral', 1.0, 'holds')
    """
    lam, thr = traj.get("lambda_min"), traj.get("rank_threshold")
    phi = get_desingularizer(functional_kl.desingularizer)
    if lam is None or thr is None or not np.isfinite(lam).any():
        raise ValueError("a spectral certificate needs λ_min at records: record the NTK "
                         "spectrum (e.g. experiments.common.spectrum_diagnostic)")
    have = np.isfinite(lam)
    samples = traj.get("spectrum_samples")
    n_eval = traj.meta.get("eval_size")
    if samples is None or n_eval is None or np.any(samples[have] != n_eval):
        got = "unknown" if samples is None else f"{int(np.nanmin(samples[have]))}"
        a = Assumption("spectrum on the full evaluation data", False,
                       f"spectra on {got} samples, evaluation data {n_eval}")
        return _unavailable(traj, phi, "spectral", Reason.SUBSET_SPECTRUM, (a,),
                            f"spectrum computed on a subset ({got} of {n_eval} samples)",
                            rtol, atol)
    lam_min = float(np.min(lam[have]))
    zero = ~(lam[have] > thr[have])  # an unknown (NaN) threshold proves nothing: count as zero
    definite = Assumption(
        "definite NTK: λ_min(K_θt) > τ at every spectrum record", not bool(zero.any()),
        f"min λ_min = {max(lam_min, 0.0):.6g} over {int(have.sum())} spectra on all {n_eval} "
        f"samples; {int(zero.sum())} at or below the threshold τ")
    if zero.any():
        return _unavailable(traj, phi, "spectral", Reason.KERNEL_NOT_DEFINITE, (definite,),
                            "λ_min(K) is zero at some record", rtol, atol)
    cert = compose(traj, functional_kl, lam_min, rtol=rtol, atol=atol)
    return replace(cert, mu_source="spectral", assumptions=(definite, *cert.assumptions))
