"""The one certificate type: what was checked, where, and what it supports (CERTIFICATES.md).

A :class:`Certificate` states "on this run, with this desingularizer φ and constant μ, the loss
satisfies L ≤ B" and carries the evidence: a status, a reason when it does not hold, how many
records and gradient evaluations were checked, and a **scope**:

* ``RECORDS``: the KL ratio and L ≤ B were checked at the recorded points only;
* ``PATH``: at every iterate of gradient descent (the exact discrete certificate), or at every
  gradient evaluation of an adaptive solver plus the delayed check L(t_a) ≤ B(t_{a+1});
* ``PROVEN``: an a-priori argument valid for the exact flow (not issued by this module).

A time to reach a target is *certified* only from a HOLDS certificate and only inside the
checked horizon (:meth:`Certificate.time_to`); beyond it, :meth:`Certificate.forecast_time_to`
extrapolates "if the ratio stays ≥ μ", and is named a forecast wherever it is printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, final

import numpy as np

from ._io import finite_or_none as _num
from ._time import TIME_RTOL
from .desingularizers import Desingularizer

__all__ = ["Scope", "CertificateStatus", "Reason", "Assumption", "DelayedCheck",
           "Certificate"]


class Scope(StrEnum):
    """Where a certificate was checked (CERTIFICATES.md §1).

    ``RECORDS``: the KL ratio φ′(L)‖∇L‖² ≥ μ and L ≤ B at the recorded points only; ``PATH``:
    at every gradient-descent iterate, or at every solver evaluation plus the delayed check
    L(t_a) ≤ B(t_{a+1}); ``PROVEN``: an a-priori argument for the exact flow (:func:`prove`).

    Example:
        >>> import rayleighflow as rf
        >>> [scope.value for scope in rf.Scope]
        ['records', 'path', 'proven']
        >>> rf.Scope("path") is rf.Scope.PATH
        True
    """

    RECORDS = "records"  # held at the recorded points
    PATH = "path"        # held along the computed path (every iterate / every evaluation)
    PROVEN = "proven"    # a-priori, for the exact flow


class CertificateStatus(StrEnum):
    """What a certificate concluded: ``HOLDS`` (every assumption checked at every checked point
    and L ≤ B·(1 + rtol) + atol there), ``VIOLATED`` (a check failed: ``reason`` and
    ``first_violation`` say which and where) or ``UNAVAILABLE`` (it cannot be formed: ``reason``).

    Example:
        >>> import rayleighflow as rf
        >>> rf.CertificateStatus("holds") is rf.CertificateStatus.HOLDS
        True
        >>> rf.CertificateStatus.VIOLATED == "violated"    # a str enum: equal to its value
        True
    """

    HOLDS = "holds"              # every assumption checked at every checked point, bound holds
    VIOLATED = "violated"        # a check failed: see ``reason`` and ``first_violation``
    UNAVAILABLE = "unavailable"  # the certificate cannot be formed here: see ``reason``


class Reason(Enum):
    """Why a certificate is VIOLATED or UNAVAILABLE: ``cause`` and ``remedy`` in words.

    Each member carries a stable ``code`` (the JSON form's ``reason.code``).

    Example:
        >>> import rayleighflow as rf
        >>> reason = rf.Reason.KERNEL_NOT_DEFINITE
        >>> reason.code
        'kernel_not_definite'
        >>> "only along ∇ℓ" in reason.remedy     # the composed certificate needs no λ_min > 0
        True
    """

    def __init__(self, code: str, cause: str, remedy: str) -> None:
        self.code, self.cause, self.remedy = code, cause, remedy

    KL_BELOW_MU = (
        "kl_below_mu", "the KL ratio φ′(L)‖∇L‖² fell below μ at a checked point",
        "state a smaller μ, or omit it to use the observed μ*; for a composed or spectral μ, "
        "R(K; ∇ℓ) dipped below its recorded lower bound between records")
    BOUND_BELOW_LOSS = (
        "bound_below_loss", "the loss exceeds the bound at a checked point",
        "the KL ratio dipped between checked points: check it at every gradient evaluation "
        "(flows run by rayleighflow log them) or record more often")
    NO_SUFFICIENT_DECREASE = (
        "no_sufficient_decrease", "no sufficient decrease (step too large): a gradient-descent "
        "step did not lower the loss",
        "lower the step η: α_k ≥ 1 − βη/2 when L is β-smooth on the step")
    LOSS_ROUNDING = (
        "loss_rounding", "no resolved decrease: a gradient-descent step changed the recorded loss "
        "by less than the loss's rounding error (the dtype cannot resolve the step)",
        "compute the loss in float64 (model.double() and float64 data), or centre large "
        "targets; the step size is not the cause")
    NOT_RESOLVED = (
        "not_resolved", "not resolved: re-integrated at a tighter tolerance, the flow gives "
        "another verdict, constant or loss, so the solution at this rtol does not resolve it",
        "integrate at the refined tolerance or below (Dopri5(rtol=…)), or use gradient descent,"
        " whose certificate is exact for its iterates")
    NON_FINITE = (
        "non_finite", "a non-finite loss, gradient norm or KL ratio at a checked point",
        "an infinite or NaN ratio is never a pass: fix the overflow in the model or data")
    NO_POSITIVE_CONSTANT = (
        "no_positive_constant", "no positive KL constant: the ratio is 0 at a checked point "
        "(a zero gradient at a positive loss)",
        "the run met a stationary point above the floor; try another desingularizer (a "
        "plateau level) or another initialization")
    NOTHING_TO_CERTIFY = (
        "nothing_to_certify", "the first loss is not above the desingularizer's floor",
        "start from a positive loss (above the plateau level for a plateau desingularizer)")
    NO_CHECKED_POINT = (
        "no_checked_point", "no checked point carries the quantities this certificate needs",
        "record them (fgrad_sq and rayleigh come with every flow record)")
    FUNCTIONAL_KL_FAILED = (
        "functional_kl_failed", "the functional KL inequality φ′(ℓ)‖∇ℓ‖² ≥ c failed at a record",
        "the loss's constant c does not hold for these weights: report it as a bug")
    RAYLEIGH_BELOW_BOUND = (
        "rayleigh_below_bound", "R(K; ∇ℓ) fell below the stated lower bound at a record",
        "state a smaller Rayleigh lower bound, or omit it to use the observed minimum")
    SUBSET_SPECTRUM = (
        "subset_spectrum", "spectrum computed on a subset of the evaluation data",
        "interlacing gives only λ_min(K) ≤ (|S|/n)·λ_min(K_S): compute the spectrum on every "
        "evaluation point (no max_samples)")
    KERNEL_NOT_DEFINITE = (
        "kernel_not_definite", "λ_min(K) is zero (structural: rank ≤ P < nk; or numerical: "
        "≤ the threshold τ) at a record",
        "use the composed Rayleigh certificate: it needs R(K; ∇ℓ) > 0 only along ∇ℓ")
    NOT_CONCAVE = (
        "not_concave", "φ′ is not non-increasing, so the discrete gradient-descent certificate "
        "does not apply", "use a concave desingularizer (all built-in ones are)")
    PROOF_RHO_NONPOSITIVE = (
        "proof_rho_nonpositive", "no proof: the lower bound on R(K_θ; ∇ℓ) over the parameter "
        "ball is not positive (the perturbation terms exceed the value at θ₀)",
        "a smaller radius, a wider network (the Jacobian's Lipschitz constant falls like "
        "m^(-1/2)), or a certificate observed along a run (rf.certify)")
    PROOF_PATH_TOO_LONG = (
        "proof_path_too_long", "no proof: the flow's path-length bound √(2L₀/ρ) (to the "
        "target) is not below the ball's radius, so the flow might leave the ball",
        "a higher target, a wider network, or a certificate observed along a run (rf.certify)")
    PROOF_UNSUPPORTED = (
        "proof_unsupported", "no proof: the model, loss or data is outside what rf.prove covers, "
        "or the module does not compute the function its structure describes",
        "rf.prove covers two-layer networks (TwoLayer, or Sequential(Linear, activation, "
        "Linear) with tanh, softplus, sigmoid or exact GELU) and linear models, by exact type and "
        "without hooks, with square loss or softmax cross-entropy on a finite dataset; the "
        "reason says what to change; otherwise use rf.certify on a run")


@final
@dataclass(frozen=True)
class Assumption:
    """One checked assumption of a certificate: its ``name``, whether it ``holds`` and the
    numbers behind that verdict (``detail``), e.g. "μ* = min φ′(L)‖∇L‖² = … at t = …".

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> traj = rf.Trajectory()
        >>> for t in np.linspace(0.0, 2.0, 5):  # L = e^(−2t), ‖∇L‖² = 2L: PL with μ = 2
        ...     traj.append({"t": t, "loss": np.exp(-2 * t), "grad_sq": 2 * np.exp(-2 * t)})
        >>> cert = rf.certify(traj, "log")
        >>> [(a.name, a.holds) for a in cert.assumptions]
        [('KL with φ = log', True), ('bound ≥ recorded loss', True)]
    """

    name: str
    holds: bool
    detail: str


@final
@dataclass(frozen=True)
class DelayedCheck:
    """L(t_a) ≤ B(t_{a+1}) on consecutive records (CERTIFICATES.md §2).

    For an exact flow (L non-increasing, B decreasing) it carries the bound over each whole
    interval. ``min_slack`` is min_a (B(t_{a+1})·(1 + rtol) + atol − L(t_a)) / L(t_a).
    """

    passed: bool
    intervals: int
    min_slack: float
    first_failure: tuple[float, float] | None = None  # (t_a, t_{a+1})
    failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "intervals": self.intervals, "failures": self.failures,
                "min_relative_slack": _num(self.min_slack),
                "first_failure": list(self.first_failure) if self.first_failure else None}


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, int | float | np.floating) or \
            not (math.isfinite(target) and target > 0):
        raise ValueError(f"the target loss must be a finite number > 0 (got {target!r})")


@final
@dataclass(frozen=True)
class Certificate:
    """A KL certificate and its evidence; ``to_dict`` gives the JSON form.

    It states L(θ_t) ≤ B(t) = φ⁻¹(φ(L₀) − μ(t − t₀)) for a flow, checked with the KL ratio
    φ′(L)‖∇L‖² ≥ μ, and L_K ≤ φ⁻¹(φ(L₀) − μ Σ_k α_k η) for gradient descent (``discrete``,
    α_k the observed sufficient decrease). Losses and gradient norms are in the run's
    convention (``convention``: "mean" = L²(D), "sum" = Euclidean).

    ``t``, ``loss``, ``bound``, ``kl_ratio`` are at the checked points the bound was compared
    at: records (continuous certificates) or every iterate (gradient descent). ``mu_star`` is
    the smallest KL ratio over every checked point, evaluations included.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(8, 2), torch.randn(8, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                           torch.nn.Linear(16, 1)).double()
        >>> problem = rf.Problem(rf.Model(net), data, "square")
        >>> run = rf.gradient_flow(problem, rf.GradientDescent(0.1), t_max=2.0)
        >>> cert = rf.certify(run.trajectory, "log")  # the exact discrete certificate, μ = μ*
        >>> cert.status.value, cert.scope.value, cert.discrete
        ('holds', 'path', True)
        >>> bool((cert.loss <= cert.bound * (1 + cert.rtol)).all())
        True
        >>> cert.time_to(cert.bound_final) == cert.horizon    # certified inside the horizon
        True
        >>> cert.forecast_time_to(1e-3) > cert.horizon        # beyond it: a forecast
        True
    """

    desingularizer: Desingularizer
    mu: float
    mu_source: str
    status: CertificateStatus
    scope: Scope
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
    reason: Reason | None = None
    first_violation: tuple[float, str] | None = None
    n_records: int = 0
    n_grad_evals: int = 0
    delayed_check: DelayedCheck | None = None
    discrete: bool = False
    step: float | None = None
    alpha_min: float | None = None
    t_at_alpha_min: float | None = None
    notes: tuple[str, ...] = field(default=())
    record_t: np.ndarray | None = None  # the run's record times (``t`` when None)

    @classmethod
    def unavailable(cls, desingularizer: Desingularizer, reason: Reason, why: str, *,
                    t: np.ndarray, loss: np.ndarray, kl_ratio: np.ndarray, mu_source: str,
                    convention: str, rtol: float, atol: float,
                    assumptions: tuple[Assumption, ...] = (), mu: float = math.nan,
                    mu_star: float = math.nan, t_at_mu_star: float = math.nan,
                    scope: Scope = Scope.RECORDS, **evidence: Any) -> Certificate:
        """The certificate that cannot be formed: no bound (NaN), ``reason`` and ``why`` (the
        sentence built from the numbers, first note); ``evidence``: the other fields
        (n_records, discrete, step, …).

        Example:
            >>> import numpy as np
            >>> import rayleighflow as rf
            >>> c = rf.Certificate.unavailable(rf.Log(), rf.Reason.NO_CHECKED_POINT,
            ...     "one record only", t=np.array([0.0]), loss=np.array([1.0]),
            ...     kl_ratio=np.array([np.nan]), mu_source="observed", convention="mean",
            ...     rtol=1e-6, atol=0.0)
            >>> c.status.value, c.reason.code, c.notes[0], bool(np.isnan(c.bound).all())
            ('unavailable', 'no_checked_point', 'one record only', True)
        """
        return cls(desingularizer, mu, mu_source, CertificateStatus.UNAVAILABLE, scope,
                   convention, t, loss, np.full(np.shape(loss), np.nan), kl_ratio, mu_star,
                   t_at_mu_star, math.nan, rtol, atol, tuple(assumptions), reason,
                   notes=(why, *evidence.pop("notes", ())), **evidence)

    @property
    def bound_at_records(self) -> np.ndarray:
        """The bound at the run's record times (for figures drawn over the records)."""
        return self.bound_at(self.t if self.record_t is None else self.record_t)

    @property
    def holds(self) -> bool:
        return self.status is CertificateStatus.HOLDS

    @property
    def loss_initial(self) -> float:
        return float(self.loss[0]) if self.loss.size else math.nan

    @property
    def bound_final(self) -> float:
        """The bound at the last checked point (NaN when the certificate gives none)."""
        finite = self.bound[np.isfinite(self.bound)] if self.bound.size else self.bound
        return float(finite[-1]) if finite.size else math.nan

    @property
    def horizon(self) -> float:
        """The last checked time: nothing is certified beyond it."""
        return float(self.t[-1]) if self.t.size else math.nan

    def bound_at(self, times: np.ndarray) -> np.ndarray:
        """The bound at given times inside the checked range (NaN outside it, and NaN for an
        UNAVAILABLE certificate). Gradient descent: the bound at the iterate at or before."""
        times = np.asarray(times, dtype=np.float64)
        out = np.full(times.shape, np.nan)
        if self.status is CertificateStatus.UNAVAILABLE or not self.t.size:
            return out
        inside = (times >= self.t[0]) & (times <= self.horizon * (1 + TIME_RTOL))
        if self.discrete:
            idx = np.searchsorted(self.t, times[inside] * (1 + TIME_RTOL), side="right") - 1
            out[inside] = self.bound[np.clip(idx, 0, self.t.size - 1)]
        else:
            out[inside] = self.desingularizer.bound(self.loss_initial, self.mu,
                                                    times[inside] - self.t[0])
        return out

    def time_to(self, target: float) -> float | None:
        """Certified time at which the bound reaches ``target``, or None.

        Only a HOLDS certificate certifies, and only inside [t₀, horizon]: beyond the last
        checked point nothing was checked (see :meth:`forecast_time_to`).
        """
        _check_target(target)
        if not self.holds or not self.t.size:
            return None
        if self.discrete:
            hit = np.flatnonzero(self.bound <= target)
            return float(self.t[hit[0]]) if hit.size else None
        if target >= self.loss_initial:
            return float(self.t[0])
        t_hit = float(self.t[0]) + self.desingularizer.time_to_reach(
            self.loss_initial, self.mu, target)
        return t_hit if t_hit <= self.horizon else None

    def forecast_time_to(self, target: float) -> float | None:
        """Forecast, not certified: when the bound would reach ``target`` if the KL ratio stays
        ≥ μ beyond the horizon (and, for gradient descent, the sufficient decrease stays
        ≥ α_min). None unless the certificate holds."""
        _check_target(target)
        if not self.holds or not (self.mu > 0) or not self.t.size:
            return None
        b_end = self.bound_final
        if not b_end > target:
            return self.time_to(target)
        rate = self.mu * (self.alpha_min if self.discrete and self.alpha_min else 1.0)
        return self.horizon + self.desingularizer.time_to_reach(b_end, rate, target)

    def _step_index(self, t: float | None) -> int | None:
        """k with t = t₀ + kη for a gradient-descent certificate."""
        if not self.discrete or t is None or not self.step or not math.isfinite(t):
            return None
        return int(round((t - float(self.t[0])) / self.step))

    def describe(self) -> str:
        """One line built from the numbers: status, scope, μ and what was checked."""
        if self.scope is Scope.PROVEN:
            checked = "an a-priori argument for the exact flow from θ₀ (no run checked)"
        else:
            checked = (f"checked at {self.n_records} records"
                       + (f", {self.n_grad_evals} gradient evaluations"
                          if self.n_grad_evals else ""))
        head = (f"{self.status.value} (scope {self.scope.value}): φ = {self.desingularizer.name}"
                f", μ = {self.mu:.4g} ({self.mu_source}), {checked}")
        if self.discrete and self.alpha_min is not None and math.isfinite(self.alpha_min):
            head += (f"; α_min = {self.alpha_min:.3g} at step "
                     f"{self._step_index(self.t_at_alpha_min)}")
        if self.reason is not None:
            head += f"; {self.reason.cause}"
        if self.first_violation is not None:
            head += f" (first at t = {self.first_violation[0]:.4g}: {self.first_violation[1]})"
        return head

    def to_pandas(self) -> Any:
        """A pandas DataFrame of the checked points: t, loss, bound, KL ratio (needs pandas);
        a set of certificates: :func:`rayleighflow.certificates_frame`."""
        from .tables import certificate_frame

        return certificate_frame(self)

    def _repr_html_(self) -> str:
        from .tables import certificate_html

        return certificate_html(self)

    def to_dict(self, target: float | None = None) -> dict[str, Any]:
        """JSON form. ``target`` adds the certified and the forecast time to reach it."""
        d: dict[str, Any] = {
            "desingularizer": self.desingularizer.name, "mu": _num(self.mu),
            "mu_source": self.mu_source, "status": self.status.value,
            "scope": self.scope.value, "convention": self.convention,
            "reason": None if self.reason is None else {
                "code": self.reason.code, "cause": self.reason.cause,
                "remedy": self.reason.remedy},
            "mu_star": _num(self.mu_star), "t_at_mu_star": _num(self.t_at_mu_star),
            "loss_initial": _num(self.loss_initial), "bound_final": _num(self.bound_final),
            "horizon": _num(self.horizon), "n_records": self.n_records,
            "n_grad_evals_checked": self.n_grad_evals,
            "max_bound_violation": _num(self.max_bound_violation),
            "slack": {"rtol": self.rtol, "atol": self.atol},
            "first_violation": list(self.first_violation) if self.first_violation else None,
            "delayed_check": None if self.delayed_check is None else self.delayed_check.to_dict(),
            "discrete": self.discrete, "step": self.step,
            "alpha_min": _num(self.alpha_min), "t_at_alpha_min": _num(self.t_at_alpha_min),
            "step_index_at_alpha_min": self._step_index(self.t_at_alpha_min),
            "assumptions": [a.__dict__ for a in self.assumptions],
            "what_was_checked": self.describe(),
            "notes": list(self.notes),
        }
        if target is not None:
            d["target"] = target
            d["certified_time_to"] = _num(self.time_to(target))
            d["forecast_time_to"] = _num(self.forecast_time_to(target))
        return d


