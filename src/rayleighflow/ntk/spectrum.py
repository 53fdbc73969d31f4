"""Spectrum, numerical rank and extreme eigenpairs of the tangent kernel, in float64.

Three routes to the eigenvalues of K (the operator on L²(D), equivalently its symmetric form
M = Ω^{1/2} G Ω^{1/2}, nk × nk):

* ``DENSE``: materialize K and ``eigh`` in float64: everything, (nk)³ time, (nk)² memory.
* ``DUAL``: when P < nk, the nonzero eigenvalues of M = (Ω^{1/2} J)(Ω^{1/2} J)ᵀ are those of
  Φ = Jᵀ Ω J = Σ_i ω_i J_iᵀ J_i (P × P); the other nk − P are exactly zero (rank K ≤ P).
* ``LANCZOS``: extreme eigenvalues from the operator (``eigsh``; LOBPCG on request), for
  kernels that do not fit; no rank.

Rank: λ ≤ threshold = rtol · λ_max counts as zero, with the default
rtol = max(nk, P) · eps(dtype the kernel was computed in) (THEORY.md §7); the threshold used is
always reported. A float32 (or lower) model's kernel is computed in float64 by default
(``accumulate_float64``): the parameters are cast, so the eigenvalues are those of the model's
exact kernel at its stored weights, and the threshold uses float64's eps; a warning says when
the float32 threshold would have decided otherwise.

λ_min is reported as a number ≥ 0 with a label (CERTIFICATES.md §6): "structural zero" (rank ≤
P < nk: no computation needed), "numerical zero" (≤ the threshold τ) or "value".
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import final

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh, lobpcg
from torch import Tensor, nn

from .._types import Convention, Params
from ..data import Dataset
from ..problem import Model
from ._batch import as_batch
from ._common import (
    KernelTooLargeError,
    as_model,
    fmt_bytes,
    param_dtype,
    prepare_x,
    resolve_params,
    scaling,
    working_budget,
)
from .jacobian import JacobianEngine
from .kernel import empirical_ntk
from .operator import KernelOperator, NTKOperator
from .plan import cached_probe

__all__ = ["Spectrum", "SpectrumRoute", "dual_gram", "extreme_eigenpairs", "kernel_spectrum",
           "ntk_spectrum", "STRUCTURAL_ZERO", "NUMERICAL_ZERO", "VALUE"]

STRUCTURAL_ZERO = "structural zero (rank ≤ P < nk)"
NUMERICAL_ZERO = "numerical zero (≤ τ)"
VALUE = "value"


class SpectrumRoute(StrEnum):
    """AUTO: DUAL when P < nk and P × P fits, else DENSE when nk × nk fits, else LANCZOS.

    DENSE: eigenvalues of the nk × nk kernel; DUAL: of Φ = JᵀΩJ (P × P, the same nonzero
    eigenvalues, the other nk − P are structural zeros); LANCZOS: the extreme ones only, from
    kernel-vector products.

    Example:
        >>> import torch
        >>> from rayleighflow.ntk import ntk_spectrum
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> lin = torch.nn.Linear(2, 1).double()               # P = 3 < nk = 5
        >>> ntk_spectrum(lin, x).method, ntk_spectrum(lin, x, route="dense").method
        ('dual', 'dense')
    """

    AUTO = "auto"
    DENSE = "dense"
    DUAL = "dual"
    LANCZOS = "lanczos"


@final
@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of K (ascending, float64) and what follows from them.

    ``eigenvalues`` holds all nk eigenvalues for DENSE and DUAL (the structural zeros of the
    dual route included), only the computed extreme ones for LANCZOS. ``rank`` and
    ``lambda_min_nonzero`` are None when unknown (LANCZOS). ``lambda_min`` is ≥ 0, with
    ``lambda_min_label`` saying what it is: 0.0 exactly when nk > P (structural), max(λ, 0)
    otherwise. ``samples`` is the number of data points, ``computed_dtype`` the dtype of the
    kernel's arithmetic, ``dtype_note`` non-empty when the float32 threshold would have given
    another answer.

    Example:
        >>> import torch
        >>> from rayleighflow.ntk import ntk_spectrum
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> s = ntk_spectrum(torch.nn.Linear(2, 1).double(), x)  # P = 3 < nk = 5
        >>> s.rank, s.n_params, s.size, s.lambda_min, s.lambda_min_label
        (3, 3, 5, 0.0, 'structural zero (rank ≤ P < nk)')
        >>> bool(s.lambda_max == s.eigenvalues[-1] and s.lambda_min_nonzero > s.threshold)
        True
    """

    eigenvalues: np.ndarray
    size: int
    n_params: int | None
    rank: int | None
    threshold: float | None
    rtol: float | None
    lambda_max: float
    lambda_min: float | None
    lambda_min_nonzero: float | None
    method: str
    eigenvectors: np.ndarray | None = None
    lambda_min_label: str = VALUE
    samples: int | None = None
    convention: str | None = None
    computed_dtype: str | None = None
    dtype_note: str = ""

    @property
    def definite(self) -> bool:
        """λ_min above the threshold τ (known only when λ_min is)."""
        return self.lambda_min_label == VALUE and self.lambda_min is not None


def _default_rtol(size: int, n_params: int | None, dtype: torch.dtype) -> float:
    return max(size, n_params or 0) * torch.finfo(dtype).eps


def kernel_spectrum(
    matrix: Tensor | np.ndarray, *, rtol: float | None = None, n_params: int | None = None,
    computed_in: torch.dtype | None = None, eigenvectors: bool = False,
) -> Spectrum:
    """Full float64 eigendecomposition of a symmetric kernel matrix (nk × nk, or blocks).

    ``computed_in`` is the dtype the kernel was computed in (default: the matrix's), used for
    the default rtol = max(nk, P)·eps. An eigenvalue counts as zero when it is at most the
    threshold τ = rtol·λ_max.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import empirical_ntk, kernel_matrix, kernel_spectrum
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> M = kernel_matrix(empirical_ntk(net, x))
        >>> s = kernel_spectrum(M)
        >>> s.size, s.rank, bool(abs(s.threshold - s.rtol * s.lambda_max) <= 1e-30)
        (10, 10, True)
        >>> bool(torch.allclose(torch.as_tensor(s.eigenvalues), torch.linalg.eigvalsh(M)))
        True
    """
    m = torch.as_tensor(matrix)
    if m.dim() == 4:
        n1, n2, k, _ = m.shape
        m = m.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square kernel matrix, got shape {tuple(m.shape)}")
    dtype = computed_in or (m.dtype if m.is_floating_point() else torch.float64)
    a = m.detach().to("cpu", torch.float64)
    a = 0.5 * (a + a.T)
    if eigenvectors:
        vals, vecs = torch.linalg.eigh(a)
        vecs_np = vecs.numpy()
    else:
        vals, vecs_np = torch.linalg.eigvalsh(a), None
    return _summarize(vals.numpy(), a.shape[0], n_params, rtol, dtype, "dense", vecs_np)


def _summarize(vals: np.ndarray, size: int, n_params: int | None, rtol: float | None,
               dtype: torch.dtype, method: str, vecs=None, structural_zeros: int = 0) -> Spectrum:
    rtol = _default_rtol(size, n_params, dtype) if rtol is None else float(rtol)
    lam_max = float(vals[-1])
    threshold = rtol * max(lam_max, 0.0)
    nonzero = vals[vals > threshold]
    rank = int(nonzero.size)
    if structural_zeros:
        vals = np.concatenate([np.zeros(structural_zeros), vals])
    structural = bool(structural_zeros) or (n_params is not None and n_params < size)
    lam_min, label = _label(float(vals[0]), threshold, structural)
    return Spectrum(vals, size, n_params, rank, threshold, rtol, lam_max, lam_min,
                    float(nonzero[0]) if rank else None, method, vecs, label,
                    computed_dtype=str(dtype).removeprefix("torch."))


def _label(raw: float, threshold: float | None, structural: bool) -> tuple[float, str]:
    if structural:
        return 0.0, STRUCTURAL_ZERO
    if threshold is None or not raw > threshold:
        return max(raw, 0.0), NUMERICAL_ZERO
    return raw, VALUE


def _as_float64(model: Model) -> Model:
    """A shallow copy of ``model`` whose floating buffers are float64 (parameters are passed)."""
    out = copy.copy(model)
    out.buffers = {k: (v.double() if v.is_floating_point() else v)
                   for k, v in (getattr(model, "buffers", None) or {}).items()}
    return out


def _dtype_check(spec: Spectrum, nk: int, p: int, low: torch.dtype) -> Spectrum:
    """Warn (and note) when the threshold of the model's own dtype would change the answer."""
    if spec.rtol is None or spec.lambda_min_label == STRUCTURAL_ZERO:
        return spec
    thr_low = _default_rtol(nk, p, low) * max(spec.lambda_max, 0.0)
    vals = spec.eigenvalues
    rank_low = int(np.sum(vals > thr_low)) if spec.rank is not None else None
    raw_min = float(vals[0]) if vals.size else None
    flips = (rank_low is not None and rank_low != spec.rank) or (
        raw_min is not None and (raw_min > spec.threshold) != (raw_min > thr_low))  # type: ignore[operator]
    if not flips:
        return spec
    note = (f"the dtype decides the answer: with {str(low).removeprefix('torch.')}'s threshold "
            f"{thr_low:.3g} the rank would be {rank_low} and λ_min "
            f"{'> τ' if raw_min is not None and raw_min > thr_low else '≤ τ'}; computed in "
            f"float64 (threshold {spec.threshold:.3g}) it is rank {spec.rank}")
    warnings.warn(note, stacklevel=3)
    return replace(spec, dtype_note=note)


def dual_gram(
    model: Model | nn.Module, x: Tensor | Mapping[str, Tensor] | Dataset, *,
    params: Params | None = None, weights: Tensor | None = None,
    convention: Convention | str = "mean", max_memory: int | str | None = None,
) -> Tensor:
    """Φ = Jᵀ Ω J = Σ_i ω_i J_iᵀ J_i (P × P, float64): same nonzero eigenvalues as K.

    Ω holds the convention's effective weights (w_i for "mean", n·w_i for "sum").

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import dual_gram, empirical_ntk, kernel_matrix
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> G = dual_gram(net, x)                              # P × P = 50 × 50
        >>> top = torch.linalg.eigvalsh(G)[-10:]                 # rank ≤ nk = 10
        >>> bool(torch.allclose(top, torch.linalg.eigvalsh(kernel_matrix(empirical_ntk(net, x)))))
        True
    """
    model = as_model(model)
    params = resolve_params(model, params)
    x, w = prepare_x(x, params, "x")
    conv = Convention.parse(convention)
    n = x.shape[0]
    like = next(v for v in params.values() if v.is_floating_point())
    root = scaling(n, weights if weights is not None else w, conv, like)
    names = list(params)
    p = sum(params[nm].numel() for nm in names)
    budget = working_budget(max_memory, like.device)
    if 8 * p * p > budget:
        raise KernelTooLargeError(f"Φ = JᵀΩJ needs {fmt_bytes(8 * p * p)} (P = {p}) but "
                                  f"max_memory allows {fmt_bytes(budget)}: raise max_memory")
    probe = cached_probe(model, params, x)[0]
    k, act = probe.k, probe.act
    eng = JacobianEngine(model, params, {"all": names}, k, act)
    room = budget - 8 * p * p
    per = 2 * eng.feat_bytes + eng.work_bytes + 8 * k * p
    b = max(1, min(n, int(room // max(per, 1))))
    phi = torch.zeros(p, p, dtype=torch.float64, device=like.device)
    for s in range(0, n, b):
        (term,) = eng.features(x[s:s + b])
        g = term.g.double()  # type: ignore[union-attr]  # (b, k, P)
        if root is not None:
            g = g * root[s:s + b].double()[:, None, None]
        g = g.reshape(-1, p)
        phi.addmm_(g.T, g)
    return phi


def extreme_eigenpairs(
    operator: KernelOperator | LinearOperator, n_eig: int = 1, *, which: str = "largest",
    method: str = "lanczos", tol: float = 1e-8, maxiter: int | None = None, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Extreme eigenpairs of the kernel operator (symmetric form), ascending.

    ``method="lanczos"`` uses ARPACK's ``eigsh`` (implicitly restarted Lanczos);
    ``"lobpcg"`` uses SciPy's LOBPCG with a seeded random start block (better for clusters of
    small eigenvalues). No kernel is formed: each iteration costs one VJP and one JVP.
    Also takes a SciPy ``LinearOperator`` (e.g. :func:`kernel_file_operator`). Returns
    (eigenvalues, eigenvectors), the eigenvectors as columns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import (NTKOperator, empirical_ntk,
        ...                               extreme_eigenpairs, kernel_matrix)
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> lam, vec = extreme_eigenpairs(NTKOperator(net, x), 2)      # the two largest
        >>> dense = torch.linalg.eigvalsh(kernel_matrix(empirical_ntk(net, x)))[-2:]
        >>> bool(torch.allclose(torch.as_tensor(lam), dense)), vec.shape
        (True, (10, 2))
    """
    if isinstance(operator, KernelOperator):
        if not (operator.is_symmetric and operator.is_psd):
            raise ValueError(f"extreme_eigenpairs needs a symmetric positive semi-definite "
                             f"operator; {type(operator).__name__} is tagged is_symmetric="
                             f"{operator.is_symmetric}, is_psd={operator.is_psd}")
        op = operator.as_linear_operator()
    elif isinstance(operator, LinearOperator):
        op = operator
    else:
        raise TypeError(f"operator must be an NTKOperator, a ShardedNTKOperator or a SciPy "
                        f"LinearOperator, got {type(operator).__name__}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    size = op.shape[0]
    rng = np.random.default_rng(seed)
    if method == "lanczos":
        v0 = rng.standard_normal(size)
        vals, vecs = eigsh(op, k=n_eig, which="LA" if which == "largest" else "SA", tol=tol,
                           v0=v0, maxiter=maxiter)
    elif method == "lobpcg":
        x0 = rng.standard_normal((size, max(n_eig, 2)))
        vals, vecs = lobpcg(op, x0, largest=which == "largest", tol=tol,
                            maxiter=maxiter or 200)
        order = np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
        vals, vecs = (vals[-n_eig:], vecs[:, -n_eig:]) if which == "largest" else \
            (vals[:n_eig], vecs[:, :n_eig])
    else:
        raise ValueError(f"method must be 'lanczos' or 'lobpcg', got {method!r}")
    order = np.argsort(vals)
    return np.asarray(vals)[order], np.asarray(vecs)[:, order]


def ntk_spectrum(
    model: Model | nn.Module, x: Tensor | Mapping[str, Tensor] | Dataset, *,
    params: Params | None = None, weights: Tensor | None = None,
    convention: Convention | str = "mean", route: SpectrumRoute | str = "auto",
    rtol: float | None = None, max_memory: int | str | None = None, eigenvectors: bool = False,
    accumulate_float64: bool = True,
) -> Spectrum:
    """Eigenvalues, numerical rank, λ_max, λ_min (≥ 0, labelled) and smallest nonzero
    eigenvalue of K_θ, with the sample count, convention and dtype it was computed with.

    K is the operator on L²(D) ("mean", default) or the Euclidean Gram ("sum"); see
    :func:`empirical_ntk`. A model in a dtype below float64 is evaluated in float64 unless
    ``accumulate_float64=False``. ``x`` is a tensor (n, ...), a mapping of named inputs
    sharing dimension 0 (passed as ``module(**x)``, as for :func:`empirical_ntk`) or a
    Dataset.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import ntk_spectrum
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> s = ntk_spectrum(net, x)           # P = 50 ≥ nk = 10: the dense route
        >>> s.method, s.size, s.rank, s.lambda_min_label
        ('dense', 10, 10, 'value')
        >>> bool(s.lambda_min == s.eigenvalues[0] > s.threshold)
        True
    """
    model = as_model(model)
    params = resolve_params(model, params)
    own = param_dtype(params)
    if accumulate_float64 and own != torch.float64 and own.is_floating_point:
        params = {k: (v.double() if v.is_floating_point() else v) for k, v in params.items()}
        model = _as_float64(model)
        if isinstance(x, Dataset):
            x = x.to(dtype=torch.float64)
        elif isinstance(x, Tensor):
            x = x.double() if x.is_floating_point() else x
        elif isinstance(x, Mapping):
            x = as_batch(x, "x").to(dtype=torch.float64)
        weights = None if weights is None else weights.double()
    spec = _ntk_spectrum(model, x, params, weights, convention, route, rtol, max_memory,
                         eigenvectors)
    if spec.computed_dtype == "float64" and own != torch.float64:
        spec = _dtype_check(spec, spec.size, spec.n_params or 0, own)
    return spec


def _ntk_spectrum(model, x, params, weights, convention, route, rtol, max_memory,
                  eigenvectors) -> Spectrum:
    xt, w = prepare_x(x, params, "x")
    w = weights if weights is not None else w
    conv = Convention.parse(convention)
    dtype = param_dtype(params)
    meta = {"samples": int(xt.shape[0]), "convention": conv.value}
    with torch.no_grad():
        k = int(model(params, xt[:1]).shape[1])
    nk, p = xt.shape[0] * k, sum(v.numel() for v in params.values())
    budget = working_budget(max_memory, xt.device)
    route = SpectrumRoute(route)
    if route is SpectrumRoute.AUTO:
        if p < nk and 8 * 3 * p * p <= budget:
            route = SpectrumRoute.DUAL
        elif 8 * 4 * nk * nk <= budget:
            route = SpectrumRoute.DENSE
        else:
            route = SpectrumRoute.LANCZOS
    if route is SpectrumRoute.DENSE:
        kern = empirical_ntk(model, xt, params=params, convention=conv, weights1=w,
                             max_memory=max_memory)
        s = kernel_spectrum(kern, rtol=rtol, n_params=p, computed_in=dtype,
                            eigenvectors=eigenvectors)
        return replace(s, **meta)  # type: ignore[arg-type]
    if route is SpectrumRoute.DUAL:
        if p >= nk:
            raise ValueError(f"the dual route needs P < nk (P = {p}, nk = {nk}): use 'dense'")
        phi = dual_gram(model, xt, params=params, weights=w, convention=conv,
                        max_memory=max_memory)
        vals = torch.linalg.eigvalsh(phi.cpu()).numpy()
        return replace(_summarize(vals, nk, p, rtol, dtype, "dual", structural_zeros=nk - p),
                       **meta)  # type: ignore[arg-type]
    op = NTKOperator(model, xt, params=params, weights=w, convention=conv,
                     max_memory=max_memory)
    top, vec = extreme_eigenpairs(op, 1, which="largest")
    if nk > p:
        low, lam_min = np.array([0.0]), 0.0
    else:
        low, _ = extreme_eigenpairs(op, 1, which="smallest", method="lobpcg")
        lam_min = float(low[0])
    r = _default_rtol(nk, p, dtype) if rtol is None else float(rtol)
    thr = r * float(top[-1])
    lam_min, label = _label(lam_min, thr, nk > p)
    return Spectrum(np.concatenate([low, top]), nk, p, None, thr, r, float(top[-1]), lam_min,
                    None, "lanczos", vec if eigenvectors else None, label,
                    computed_dtype=str(dtype).removeprefix("torch."), **meta)  # type: ignore[arg-type]
