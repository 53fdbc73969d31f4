"""Materialized empirical NTK: entry points and memory-bounded tiled assembly.

K(x_i, x_j) = J_i J_jᵀ (k × k), J_i = ∂f_θ(x_i)/∂θ, returned as blocks (n1, n2, k, k).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._types import Convention, Params
from ..data import Dataset
from ..problem import Model
from ._common import (
    KernelKind,
    KernelRequest,
    as_model,
    check_pair,
    float32_policy,
    prepare_x,
    resolve_params,
    scaling,
)
from ._terms import Engine
from .executor import DistributedExecutor, KernelShard, LocalExecutor, current_executor
from .plan import NTKMethod, NTKPlan, build_plan, cached_probe

__all__ = ["empirical_ntk", "group_ntk", "plan_ntk"]


def _assemble(req: KernelRequest, engine: Engine, plan: NTKPlan, groups: Sequence[str],
              executor=None, out_file=None) -> dict:
    if not isinstance(executor, LocalExecutor | DistributedExecutor):
        raise TypeError(f"executor must be a LocalExecutor or a DistributedExecutor, got "
                        f"{type(executor).__name__}")
    return executor.assemble(req, engine, plan, list(groups), out_file)


def _finish(t, req: KernelRequest):
    if t is None:
        return None
    if isinstance(t, KernelShard):
        return dataclasses.replace(t, blocks=_blocks(t.blocks, req, t.stop - t.start))
    return _blocks(t, req, req.n1)


def _blocks(t: Tensor, req: KernelRequest, n1: int) -> Tensor:
    if req.kind is KernelKind.FULL:
        return t.view(n1, req.k, req.n2, req.k).permute(0, 2, 1, 3)
    if req.kind is KernelKind.DIAGONAL:
        return t.permute(1, 2, 0)
    return t


def _request(model, x1, x2, params, kind, convention, weights1, weights2) -> KernelRequest:
    model = as_model(model)
    params = resolve_params(model, params)
    x1, w1 = prepare_x(x1, params, "x1")
    x2, w2 = (None, None) if x2 is None else prepare_x(x2, params, "x2")
    check_pair(x1, x2)
    conv = Convention.parse(convention)
    w1 = weights1 if weights1 is not None else w1
    w2 = weights2 if weights2 is not None else w2
    if x2 is None and w2 is not None:
        raise ValueError("weights2 given without x2")
    probe = cached_probe(model, params, x1)  # the planning probe, once per structure
    like = next(v for v in params.values() if v.is_floating_point())
    s1 = scaling(x1.shape[0], w1, conv, like)
    s2 = None if x2 is None else scaling(x2.shape[0], w2, conv, like)
    return KernelRequest(model, params, x1, x2, s1, s2, KernelKind.parse(kind), probe[0].k,
                         probe)


def _groups_of(req: KernelRequest, groups) -> dict[str, list[str]]:
    if groups is None:
        groups = req.model.groups
    out = {g: [n for n in names if n in req.params] for g, names in groups.items()}
    missing = set(req.params) - {n for v in out.values() for n in v}
    if missing:
        raise ValueError(f"parameters {sorted(missing)} belong to no group")
    return {g: v for g, v in out.items() if v}




def _share(executor, out_file) -> float:
    """Fraction of the kernel this process holds in memory (for the plan's memory check)."""
    if out_file is not None:
        return 0.0
    if isinstance(executor, DistributedExecutor) and executor.gather == "rows":
        from ..distributed import rank_and_size
        return 1.0 / rank_and_size(executor.group)[1]
    return 1.0


def empirical_ntk(
    model: Model | nn.Module, x1: Tensor | Mapping[str, Tensor] | Dataset,
    x2: Tensor | Mapping[str, Tensor] | Dataset | None = None, *,
    params: Params | None = None, kind: KernelKind | str = "full",
    convention: Convention | str = "mean", weights1: Tensor | None = None,
    weights2: Tensor | None = None, method: NTKMethod | str = "auto",
    max_memory: int | str | None = None, block_size: int | None = None, out_device=None,
    allow_tf32: bool = False, executor: LocalExecutor | DistributedExecutor | None = None,
    out_file: str | os.PathLike | None = None,
) -> Tensor:
    """The empirical tangent kernel K(x_i, x_j) = √(ω_i ω'_j) J_i J_jᵀ, exact by default.

    J_i = ∂f_θ(x_i)/∂θ (k × P). Convention ``"sum"`` with uniform weights gives the Euclidean
    Gram G = J Jᵀ (ω = 1); ``"mean"`` gives √(w_i w_j) J_i J_jᵀ (G/n for uniform weights), so
    that ``kernel_matrix(K)`` (n·k × n·k) has exactly the eigenvalues of the operator
    (K u)_i = Σ_j w_j K(x_i, x_j) u_j on L²(D) (THEORY.md §1). ω are the convention's effective
    weights (``n·w`` for "sum" with non-uniform weights); a cross kernel uses √(ω1_i ω2_j).

    Returns blocks (n1, n2, k, k) for "full" (a view whose storage is the (n1·k, n2·k) matrix,
    see :func:`kernel_matrix`), (n1, n2) for "trace" = tr K(x_i, x_j) and (n1, n2, k) for
    "diagonal". Trace and diagonal are approximations of the exact kernel: they drop the
    cross-output entries (for k = 1 all three agree).

    Args:
        model: a :class:`rayleighflow.problem.Model`, or an ``nn.Module`` (wrapped; refused when
            dropout or batch-norm is in training mode).
        x1: inputs (n1, ...); or a mapping of named inputs whose tensors share the batch
            dimension 0 (Hugging Face style, ``{"input_ids": ids, "attention_mask": mask}``),
            passed to the module as ``module(**x1)``; or a Dataset (whose weights are used).
            Integer entries (token ids, masks) are inputs, never differentiated; floating ones
            are cast to the parameters' dtype. An output object with a ``logits`` tensor (a
            Hugging Face ``ModelOutput``) is read as its logits.
        x2: optional second inputs (n2, ...), mapping or Dataset, for a cross kernel (default
            x1); a mapping needs the names and per-sample shapes of x1's.
        params: parameters θ (default ``model.params``).
        kind: ``"full"`` (exact, default), ``"trace"`` or ``"diagonal"`` (approximations).
        convention: ``"mean"`` (L²(D), default) or ``"sum"`` (Euclidean), see below.
        weights1: data weights w of x1 (positive, summing to 1; default uniform).
        weights2: data weights of x2 (same rules).
        method: an :class:`NTKMethod` (default AUTO, see its cost model).
        max_memory: working memory allowed on the compute device beyond the kernel itself
            (bytes or ``"8GB"``; default: 60% of free GPU memory, or min(8 GiB, half the free
            RAM) on the host). A request that cannot fit raises :class:`KernelTooLargeError`
            before allocating anything large.
        block_size: samples per tile (default: the largest that fits ``max_memory``).
        out_device: where the kernel is assembled (default: the compute device, or the host
            when the kernel would not fit on the GPU).
        allow_tf32: let float32 matmuls/convolutions use TF32 on a GPU (default off: TF32
            keeps 10 mantissa bits and spoils λ_min and rank).
        executor: who runs the tile tasks: :class:`LocalExecutor` (default) or
            :class:`DistributedExecutor` (tiles sharded over torch.distributed ranks; rank 0
            gets the kernel and the others None, or every rank with ``gather="all"``, or a
            :class:`KernelShard` of rows each with ``gather="rows"``).
        out_file: a ``.npy`` path: the kernel is assembled in a memory-mapped file (host)
            instead of memory, and the returned tensor is backed by that file. For kernels
            larger than memory; spectra from it by :func:`kernel_file_operator`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import empirical_ntk, kernel_matrix
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> K = empirical_ntk(net, x)                           # L²(D): G/n for uniform weights
        >>> K.shape, kernel_matrix(K).shape
        (torch.Size([5, 5, 2, 2]), torch.Size([10, 10]))
        >>> bool(torch.allclose(empirical_ntk(net, x, convention="sum"), 5 * K))   # G = n·K
        True

        Named inputs, as a Hugging Face model takes them:

        >>> class Tagger(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)
        ...     def forward(self, input_ids, attention_mask):
        ...         m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        ...         return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))
        >>> batch = {"input_ids": torch.randint(0, 10, (5, 6)),
        ...          "attention_mask": torch.ones(5, 6, dtype=torch.long)}
        >>> empirical_ntk(Tagger().double(), batch).shape
        torch.Size([5, 5, 2, 2])
    """
    req = _request(model, x1, x2, params, kind, convention, weights1, weights2)
    executor = current_executor() if executor is None else executor
    groups = {"all": list(req.params)}
    with torch.enable_grad(), float32_policy(req.device, allow_tf32):
        plan, engine = build_plan(req, groups, NTKMethod.parse(method), max_memory, block_size,
                                  out_device, result_share=_share(executor, out_file))
        res = _assemble(req, engine, plan, ["all"], executor, out_file)
        return _finish(res["all"], req)


def group_ntk(
    model: Model | nn.Module, x1: Tensor | Mapping[str, Tensor] | Dataset,
    x2: Tensor | Mapping[str, Tensor] | Dataset | None = None, *,
    groups: Mapping[str, Sequence[str]] | None = None, params: Params | None = None,
    kind: KernelKind | str = "full", convention: Convention | str = "mean",
    weights1: Tensor | None = None, weights2: Tensor | None = None,
    method: NTKMethod | str = "auto", max_memory: int | str | None = None,
    block_size: int | None = None, out_device=None, allow_tf32: bool = False,
    executor: LocalExecutor | DistributedExecutor | None = None,
) -> dict[str, Tensor]:
    """Per-group kernels K_b = J_b J_bᵀ (THEORY.md T2), with K = Σ_b K_b exactly.

    ``groups`` maps a group name to parameter names (default ``model.groups``: one group per
    module). Same shapes, conventions and other arguments as :func:`empirical_ntk`
    (``executor`` included); one pass computes every group.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import empirical_ntk, group_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> Ks = group_ntk(net, x)                  # one kernel per layer: K = Σ_b K_b
        >>> list(Ks), bool(torch.allclose(sum(Ks.values()), empirical_ntk(net, x)))
        (['0', '2'], True)
    """
    req = _request(model, x1, x2, params, kind, convention, weights1, weights2)
    executor = current_executor() if executor is None else executor
    gmap = _groups_of(req, groups)
    with torch.enable_grad(), float32_policy(req.device, allow_tf32):
        plan, engine = build_plan(req, gmap, NTKMethod.parse(method), max_memory, block_size,
                                  out_device, result_share=_share(executor, None))
        res = _assemble(req, engine, plan, list(gmap), executor)
    return {g: _finish(t, req) for g, t in res.items()}


def plan_ntk(
    model: Model | nn.Module, x1: Tensor | Mapping[str, Tensor] | Dataset,
    x2: Tensor | Mapping[str, Tensor] | Dataset | None = None, *,
    params: Params | None = None, kind: KernelKind | str = "full",
    method: NTKMethod | str = "auto", max_memory: int | str | None = None,
    block_size: int | None = None, out_device=None,
) -> NTKPlan:
    """The :class:`NTKPlan` that :func:`empirical_ntk` would follow (method, tiles, memory).

    Same arguments as :func:`empirical_ntk`; nothing is computed beyond the (cached) probe.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import plan_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> plan = plan_ntk(net, x)
        >>> plan.method.value, plan.structured_layers, plan.n_tiles  # AUTO picked the cheapest
        ('structured', ('0', '2'), 1)
        >>> plan.costs["structured"] == min(plan.costs.values())
        True
    """
    req = _request(model, x1, x2, params, kind, "sum", None, None)
    return build_plan(req, {"all": list(req.params)}, NTKMethod.parse(method), max_memory,
                  block_size, out_device)[0]
