"""Empirical neural tangent kernels: exact kernels, a kernel operator, spectra and rank.

K(x_i, x_j) = J_i J_jᵀ (k × k blocks), J_i = ∂f_θ(x_i)/∂θ, in the L²(D) ("mean", default) or
Euclidean ("sum") convention (THEORY.md §1).

* :func:`empirical_ntk` / :func:`group_ntk`: materialized kernels, algorithm by
  :class:`NTKMethod` (AUTO: structured layerwise contraction for Linear/Conv layers, Jacobian
  contraction for the rest), memory-bounded tiles; :func:`plan_ntk` shows the plan.
* :class:`NTKOperator`: K u without K (one VJP, one JVP), exportable to SciPy.
* :func:`ntk_spectrum`, :func:`kernel_spectrum`, :func:`extreme_eigenpairs`,
  :func:`dual_gram`: float64 spectra, numerical rank with a stated threshold, Lanczos/LOBPCG.
* Scale-out: :class:`DistributedExecutor` (kernel tiles over torch.distributed ranks),
  :class:`ShardedNTKOperator` (K v with the data split across ranks), ``out_file=`` and
  :func:`kernel_file_operator` (kernels larger than memory, spectra from the file);
  :func:`plan_cache_info` / :func:`clear_plan_cache` (plans are probed once per structure).
* :func:`contrast_report`: P, nk, rank, λ_max, λ_min, smallest nonzero λ and R(K; ∇ℓ).
"""

from ._common import KernelKind, KernelTooLargeError, kernel_matrix
from .contrast import ContrastReport, contrast_report
from .executor import DistributedExecutor, KernelShard, LocalExecutor
from .kernel import empirical_ntk, group_ntk, plan_ntk
from .operator import KernelOperator, NTKOperator
from .outofcore import kernel_file_operator
from .plan import NTKMethod, NTKPlan, clear_plan_cache, plan_cache_info
from .sharded import ShardedNTKOperator
from .spectrum import (
    Spectrum,
    SpectrumRoute,
    dual_gram,
    extreme_eigenpairs,
    kernel_spectrum,
    ntk_spectrum,
)

__all__ = [
    "ContrastReport",
    "DistributedExecutor",
    "KernelOperator",
    "KernelShard",
    "LocalExecutor",
    "ShardedNTKOperator",
    "clear_plan_cache",
    "kernel_file_operator",
    "plan_cache_info",
    "KernelKind",
    "KernelTooLargeError",
    "NTKMethod",
    "NTKOperator",
    "NTKPlan",
    "Spectrum",
    "SpectrumRoute",
    "contrast_report",
    "dual_gram",
    "empirical_ntk",
    "extreme_eigenpairs",
    "group_ntk",
    "kernel_matrix",
    "kernel_spectrum",
    "ntk_spectrum",
    "plan_ntk",
]
