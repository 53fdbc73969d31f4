"""The tangent kernel as an operator: K u without forming K (one VJP, then one JVP).

On F = L²(D; R^k) with ⟨u, v⟩_ω = Σ_i ω_i u_i·v_i (ω the convention's effective weights),

    (K u)_i = Σ_j ω_j J_i J_jᵀ u_j = (J J* u)_i,     J* u = Σ_j ω_j J_jᵀ u_j.

K is self-adjoint for ⟨·,·⟩_ω but not symmetric as a matrix when the weights differ; its
symmetric matrix form M = Ω^{1/2} G Ω^{1/2} (G = J Jᵀ, Ω = diag(ω) ⊗ I_k) has the same
eigenvalues, and that is what :meth:`NTKOperator.matvec` and the SciPy export apply, so
``scipy.sparse.linalg.eigsh`` works directly; :meth:`NTKOperator.weighted_matvec` applies K
itself. Vectors are flattened sample-major (i·k + c).

:class:`KernelOperator` is the protocol the spectrum routines take, with tags (as in lineax)
that state what ``matvec`` is: ``is_symmetric`` (M = Mᵀ as a matrix on R^{nk}) and ``is_psd``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol, final, runtime_checkable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from .._types import Convention, Params, effective_weights
from ..data import Dataset
from ..problem import Model
from ._batch import Inputs, sample_numel
from ._common import (
    as_model,
    float32_policy,
    output_width,
    param_dtype,
    prepare_x,
    resolve_params,
    working_budget,
)
from .jacobian import jvp_any

__all__ = ["KernelOperator", "NTKOperator"]


@runtime_checkable
class KernelOperator(Protocol):
    """What the spectrum routines need of a kernel operator: its matrix form M (shape
    (nk, nk), vectors sample-major) applied to a vector, and a SciPy export.

    Tags (class attributes, as lineax tags its operators) state what ``matvec`` applies:

    * ``is_symmetric``: M = Mᵀ as a matrix in the Euclidean inner product of R^{nk} (so
      Lanczos/``eigsh`` applies); the L²(D) operator K itself is only self-adjoint for
      ⟨·,·⟩_ω and is not symmetric as a matrix under non-uniform weights;
    * ``is_psd``: vᵀ M v ≥ 0 for every v (a Gram matrix).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import KernelOperator, NTKOperator, ShardedNTKOperator
        >>> net = nn.Linear(3, 2).double()
        >>> op = NTKOperator(net, torch.randn(4, 3, dtype=torch.float64))
        >>> isinstance(op, KernelOperator), op.is_symmetric, op.is_psd
        (True, True, True)
        >>> ShardedNTKOperator.is_symmetric, ShardedNTKOperator.is_psd
        (True, True)
    """

    is_symmetric: ClassVar[bool]
    is_psd: ClassVar[bool]

    @property
    def shape(self) -> tuple[int, int]: ...

    def matvec(self, v: Tensor) -> Tensor: ...

    def as_linear_operator(self) -> LinearOperator: ...


@final
class NTKOperator:
    """K_θ on L²(D; R^k) for inputs x, applied by VJP then JVP over batches of the data.

    :meth:`matvec` applies the symmetric form M = Ω^{1/2} G Ω^{1/2} (tags ``is_symmetric``,
    ``is_psd``: see :class:`KernelOperator`); :meth:`weighted_matvec` applies K = G Ω itself.

    Args:
        model: a Model or an nn.Module. x: inputs (n, ...), a mapping of named inputs sharing
            dimension 0 (``{"input_ids": ids, "attention_mask": mask}``, passed as
            ``module(**x)``), or a Dataset (its weights are used).
        params: θ (default ``model.params``); ``param_names`` restricts to a parameter block
            b, giving K_b = J_b J_b* (THEORY.md T2); K = Σ_b K_b.
        weights: data weights w (default uniform); convention: "mean" (ω = w) or "sum"
            (ω = n·w, i.e. 1 for uniform weights: the Euclidean Gram G).
        batch_size: samples per VJP/JVP batch (default: all that fit ``max_memory``).
        allow_tf32: allow TF32 float32 matmuls on a GPU (default off).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import NTKOperator, empirical_ntk, kernel_matrix
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> op = NTKOperator(net, x)
        >>> M = kernel_matrix(empirical_ntk(net, x))
        >>> v = torch.randn(10, dtype=torch.float64)
        >>> bool(torch.allclose(op.matvec(v), M @ v))          # K v without K
        True
        >>> g = torch.randn(5, 2, dtype=torch.float64)
        >>> R = float(g.reshape(-1) @ M @ g.reshape(-1) / g.square().sum())
        >>> abs(op.rayleigh(g) - R) <= 1e-10 * R               # ⟨g, K g⟩_D / ‖g‖²_D, one VJP
        True
    """

    is_symmetric: ClassVar[bool] = True   # matvec applies M = Ω^{1/2} G Ω^{1/2} = Mᵀ
    is_psd: ClassVar[bool] = True         # M is a Gram matrix

    def __init__(
        self, model: Model | nn.Module, x: Tensor | Mapping[str, Tensor] | Dataset, *,
        params: Params | None = None,
        weights: Tensor | None = None, convention: Convention | str = "mean",
        param_names: Sequence[str] | None = None, batch_size: int | None = None,
        max_memory: int | str | None = None, allow_tf32: bool = False,
    ) -> None:
        self.model = as_model(model)
        self.params = resolve_params(self.model, params)
        self.x, w = prepare_x(x, self.params, "x")
        self.convention = Convention.parse(convention)
        self.n = int(self.x.shape[0])
        self.k = output_width(self.model, self.params, self.x)
        self.dtype = param_dtype(self.params)
        w = weights if weights is not None else w
        if w is None:
            w = torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.shape != (self.n,) or (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be ({self.n},), positive, summing to 1")
        self.omega = effective_weights(w, self.convention).to(self.x.device, self.dtype)
        names = list(self.params) if param_names is None else list(param_names)
        unknown = [n for n in names if n not in self.params]
        if unknown or not names:
            raise ValueError(f"param_names must name parameters of the model; unknown {unknown}")
        self.names = names
        self._fixed = {n: v for n, v in self.params.items() if n not in names}
        self._sub = {n: self.params[n] for n in names}
        if batch_size is None:
            item = self.x.element_size() if isinstance(self.x, Tensor) and \
                self.x.is_floating_point() else 4
            per = max(1, 64 * item * (sample_numel(self.x) + self.k))
            batch_size = max(1, int(working_budget(max_memory, self.x.device) // (4 * per)))
        self.batch_size = min(int(batch_size), self.n)
        self.n_products = 0
        self.allow_tf32 = allow_tf32
        self._ad_state: dict[str, bool] = {}
        self.n_params = sum(self._sub[n].numel() for n in names)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n * self.k, self.n * self.k)

    def _batches(self):
        for s in range(0, self.n, self.batch_size):
            yield s, min(s + self.batch_size, self.n)

    def _f(self, sub: Params, x: Inputs) -> Tensor:
        return self.model({**self._fixed, **sub}, x)

    def pullback(self, u: Tensor) -> Params:
        """J* u = Σ_i ω_i J_iᵀ u_i (one VJP over the data, batched); u is (n, k)."""
        return self._vjp(self.omega[:, None] * self._as_nk(u))

    def _vjp(self, cot_all: Tensor) -> Params:
        """Σ_i J_iᵀ c_i, unweighted, batched over the data."""
        leaves = {n: v.detach().requires_grad_(True) for n, v in self._sub.items()}
        total: dict[str, Tensor] = {}
        for s, e in self._batches():
            with torch.enable_grad(), float32_policy(self.x.device, self.allow_tf32):
                out = self._f(leaves, self.x[s:e])
                grads = torch.autograd.grad(out, list(leaves.values()), cot_all[s:e],
                                            allow_unused=True)
            for n, g in zip(leaves, grads, strict=True):
                if g is None:
                    continue
                if n in total:
                    total[n] += g
                else:
                    total[n] = g  # first batch: no zero-fill, no extra pass over P
        return {n: total[n] if n in total else torch.zeros_like(v)
                for n, v in self._sub.items()}

    def push(self, t: Params) -> Tensor:
        """J t (one JVP over the data, batched), shape (n, k)."""
        out = []
        for s, e in self._batches():
            xb = self.x[s:e]
            with float32_policy(self.x.device, self.allow_tf32):
                out.append(jvp_any(lambda p, xb=xb: self._f(p, xb), (self._sub,), (t,),
                                   self._ad_state))
        return torch.cat(out).reshape(self.n, self.k)

    def weighted_matvec(self, u: Tensor) -> Tensor:
        """K u = G Ω u: (K u)_i = Σ_j ω_j K(x_i, x_j) u_j, the operator on L²(D); u and the
        result (n, k). Self-adjoint for ⟨·,·⟩_ω but not a symmetric matrix when the weights
        differ (the tags describe :meth:`matvec`, not this)."""
        self.n_products += 1
        return self.push(self.pullback(u))

    def matvec(self, v: Tensor) -> Tensor:
        """M v with M = Ω^{1/2} G Ω^{1/2}, the symmetric form of K (same eigenvalues)."""
        shape = v.shape
        root = self.omega.sqrt()[:, None]
        self.n_products += 1
        out = root * self.push(self._vjp(root * self._as_nk(v)))
        return out.reshape(shape)

    def rayleigh(self, u: Tensor) -> float:
        """R(K; u) = ⟨u, K u⟩_ω / ‖u‖²_ω = ‖J* u‖² / ‖u‖²_ω (one VJP)."""
        u = self._as_nk(u)
        num = sum(float((g.double() ** 2).sum()) for g in self.pullback(u).values())
        den = float((self.omega.double() * (u.double() ** 2).sum(-1)).sum())
        if den == 0.0:
            raise ValueError("R(K; u) needs u ≠ 0")
        return num / den

    def as_linear_operator(self) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` applying M (symmetric form)."""
        dev = self.x.device

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), device=dev).to(self.dtype)
            return self.matvec(t).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    def _as_nk(self, u: Tensor) -> Tensor:
        u = torch.as_tensor(u).to(self.x.device, self.dtype)
        if u.numel() != self.n * self.k:
            raise ValueError(f"expected a vector of {self.n}×{self.k} entries, got "
                             f"{tuple(u.shape)}")
        return u.reshape(self.n, self.k)
