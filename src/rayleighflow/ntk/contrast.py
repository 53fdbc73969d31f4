"""The paper's contrast in one call: λ_min(K) = 0 once nk > P, while R(K; ∇ℓ) stays positive.

rank K_θ ≤ P, so the smallest eigenvalue of the tangent kernel vanishes as soon as the data
carry more output coordinates (nk) than the model has parameters (P): no "definite NTK"
argument applies. The Rayleigh quotient along the loss gradient,

    R(K; ∇ℓ) = ⟨∇ℓ, K ∇ℓ⟩_D / ‖∇ℓ‖²_D = ‖J* ∇ℓ‖² / ‖∇ℓ‖²_D = ‖∇L‖² / ‖∇ℓ‖²_D,

only needs one direction, and can stay bounded below (THEORY.md §1, §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn

from .._types import Convention, Params
from ..data import Dataset
from ..losses import Loss, get_loss
from ..problem import Model, Problem
from ._common import as_model, resolve_params
from .operator import NTKOperator
from .spectrum import SpectrumRoute, ntk_spectrum

__all__ = ["ContrastReport", "contrast_report"]


@final
@dataclass(frozen=True)
class ContrastReport:
    """P, nk, rank, spectrum ends and R(K; ∇ℓ) side by side, in the named convention.

    ``rank`` and ``lambda_min_nonzero`` are None when the route (Lanczos) cannot give them;
    ``threshold`` is the absolute level under which an eigenvalue counted as zero
    (= rtol · λ_max). λ_min ≤ rayleigh ≤ λ_max always holds.

    Example:
        >>> import torch
        >>> import rayleighflow as rf
        >>> from rayleighflow.ntk import contrast_report
        >>> _ = torch.manual_seed(0)
        >>> data = rf.Dataset.from_arrays(torch.randn(5, 2), torch.randn(5, 1))
        >>> rep = contrast_report(torch.nn.Linear(2, 1).double(), data, loss="square")
        >>> rep.n_params, rep.nk, rep.rank, rep.lambda_min      # P = 3 < nk = 5
        (3, 5, 3, 0.0)
        >>> rep.lambda_min <= rep.rayleigh <= rep.lambda_max      # yet R(K; ∇ℓ) > 0
        True
    """

    n_params: int
    nk: int
    rank: int | None
    lambda_max: float
    lambda_min: float | None
    lambda_min_nonzero: float | None
    rayleigh: float
    convention: Convention
    threshold: float | None
    rtol: float | None
    method: str
    at: str = "θ₀ (the model's parameters when the Problem was built)"

    @property
    def rank_deficient(self) -> bool:
        """True when nk > P: λ_min(K) = 0 is forced by rank K ≤ P."""
        return self.nk > self.n_params

    def __str__(self) -> str:
        def f(v) -> str:
            return "n/a" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

        rows = [
            ("P (parameters)", f(self.n_params)),
            ("nk (data × outputs)", f(self.nk)),
            (f"rank (λ ≤ {f(self.threshold)} is zero)", f(self.rank)),
            ("λ_max(K)", f(self.lambda_max)),
            ("λ_min(K)", f(self.lambda_min)),
            ("smallest nonzero λ", f(self.lambda_min_nonzero)),
            ("R(K; ∇ℓ)", f(self.rayleigh)),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"tangent kernel, {self.convention.value} convention, {self.method} route, "
                 f"at {self.at}"]
        lines += [f"  {a:<{width}}  {b}" for a, b in rows]
        return "\n".join(lines)


def contrast_report(
    problem_or_model: Problem | Model | nn.Module, data: Dataset | None = None, *,
    loss: Loss | str | None = None, params: Params | Any | None = None,
    convention: Convention | str | None = None, route: SpectrumRoute | str = "auto",
    rtol: float | None = None, max_memory: int | str | None = None,
) -> ContrastReport:
    """Spectrum and rank of K_θ next to R(K_θ; ∇ℓ) for a model, data and loss.

    Give a :class:`Problem` (its loss, convention and finite data are used unless overridden)
    or a model with ``data`` and ``loss``. ``params`` are the parameters to report at: a dict
    or a :class:`~rayleighflow.flow.FlowResult` (its final θ); the default is the model's
    initial θ₀, which training never changes (``contrast_report(problem, params=result)``
    reports after a flow). The quotient is computed with one VJP through the
    kernel operator, the spectrum by :func:`ntk_spectrum` (route AUTO: dual when P < nk).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import contrast_report
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> import rayleighflow as rf
        >>> data = rf.Dataset.from_arrays(x, torch.randn(5, 2))
        >>> rep = contrast_report(net, data, loss="square")
        >>> rep.n_params, rep.nk, rep.rank, rep.method
        (50, 10, 10, 'dense')
        >>> m = rf.measure(rf.Problem(rf.Model(net), data, "square"))
        >>> abs(rep.rayleigh - m.rayleigh) <= 1e-10 * m.rayleigh  # one VJP vs one backward
        True
        >>> print(rep)                                           # doctest: +ELLIPSIS
        tangent kernel, mean convention, dense route, at θ₀ ...
          P (parameters)                  50
          nk (data × outputs)             10
        ...
    """
    if isinstance(problem_or_model, Problem):
        pb = problem_or_model
        model, loss = pb.model, loss if loss is not None else pb.loss
        convention = convention if convention is not None else pb.convention
        if data is None:
            if not isinstance(pb.data, Dataset):
                raise ValueError("this problem's data is a sampler: pass a finite Dataset")
            data = pb.data
    else:
        model = as_model(problem_or_model)
        if data is None or loss is None:
            raise ValueError("contrast_report(model, data, loss=...) needs data and a loss")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a rayleighflow Dataset, got {type(data).__name__}")
    loss = get_loss(loss)
    conv = Convention.parse(convention if convention is not None else "mean")
    at = ContrastReport.at if params is None else "the given parameters"
    if params is not None and not isinstance(params, dict) and hasattr(params, "params") \
            and hasattr(params, "t_final"):
        at = f"θ_t of the flow result, t = {float(params.t_final):.6g}"
        params = params.params
    params = resolve_params(model, params)
    spec = ntk_spectrum(model, data.x, params=params, weights=data.weights, convention=conv,
                        route=route, rtol=rtol, max_memory=max_memory)
    op = NTKOperator(model, data.x, params=params, weights=data.weights, convention=conv,
                     max_memory=max_memory)
    assert isinstance(op.x, Tensor)  # a Dataset holds a tensor of inputs
    g = _functional_grad(model, params, op.x, data.y, loss)
    rayleigh = op.rayleigh(g) if bool(g.any()) else float("nan")
    return ContrastReport(spec.n_params or op.n_params, spec.size, spec.rank, spec.lambda_max,
                          spec.lambda_min, spec.lambda_min_nonzero, rayleigh, conv,
                          spec.threshold, spec.rtol, spec.method, at)


def _functional_grad(model: Model, params: Params, x: Tensor, y: Tensor, loss: Loss) -> Tensor:
    with torch.no_grad():
        f = model(params, x)
    return loss.functional_grad(f, loss.check_targets(f, y.to(f.device)))
