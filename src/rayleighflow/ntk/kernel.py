"""Materialized empirical NTK: entry points and memory-bounded tiled assembly.

K(x_i, x_j) = J_i J_jᵀ (k × k), J_i = ∂f_θ(x_i)/∂θ, returned as blocks (n1, n2, k, k).
"""

from __future__ import annotations

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
from ._terms import Engine, tile_shape
from .plan import NTKMethod, NTKPlan, build_plan, cached_output_width

__all__ = ["NTKMethod", "NTKPlan", "empirical_ntk", "group_ntk", "plan_ntk"]


def _assemble(req: KernelRequest, engine: Engine, plan: NTKPlan, groups: Sequence[str]) -> dict:
    b, out_dev = plan.block_size, torch.device(plan.out_device)
    storage = tile_shape(req.kind, req.n1, req.n2, req.k)
    res = {g: torch.zeros(storage, dtype=req.dtype, device=out_dev) for g in groups}
    sym = req.x2 is None
    x2 = req.x1 if sym else req.x2
    c1 = [(s, min(s + b, req.n1)) for s in range(0, req.n1, b)]
    c2 = c1 if sym else [(s, min(s + b, req.n2)) for s in range(0, req.n2, b)]
    direct = plan.n_tiles == 1 and out_dev == req.device and engine.n_passes == 1
    for p in range(engine.n_passes):
        _pass(req, engine, p, plan, res, c1, c2, x2, direct)
    return res


def _pass(req: KernelRequest, engine: Engine, p: int, plan: NTKPlan, res: dict, c1, c2, x2,
          direct: bool) -> None:
    """One pass over all tiles (one parameter chunk for a chunked Jacobian contraction)."""
    k, kind, dev, dtype, sym = req.k, req.kind, req.device, req.dtype, req.x2 is None
    groups = list(res)
    feats1 = [engine.features(req.x1[s:e], p) for s, e in c1] if plan.cache_features else None
    feats2 = feats1 if sym else (
        [engine.features(x2[s:e], p) for s, e in c2] if plan.cache_features else None)
    for i, (s1, e1) in enumerate(c1):
        f1 = feats1[i] if feats1 is not None else engine.features(req.x1[s1:e1], p)
        for j in range(i if sym else 0, len(c2)):
            s2, e2 = c2[j]
            if feats2 is not None:
                f2 = feats2[j]
            else:
                f2 = f1 if (sym and i == j) else engine.features(x2[s2:e2], p)
            shape = tile_shape(kind, e1 - s1, e2 - s2, k)
            acc = res if direct else {g: torch.zeros(shape, dtype=dtype, device=dev)
                                      for g in groups}
            engine.contract(f1, f2, kind, acc)
            for g in groups:
                _scale(acc[g], req, (s1, e1), (s2, e2))
                if not direct:
                    _write(res[g], acc[g], kind, k, (s1, e1), (s2, e2), mirror=sym and i != j)


def _scale(t: Tensor, req: KernelRequest, r1: tuple[int, int], r2: tuple[int, int]) -> None:
    s1 = None if req.s1 is None else req.s1[r1[0]:r1[1]]
    s2 = req.s1 if req.x2 is None else req.s2
    s2 = None if s2 is None else s2[r2[0]:r2[1]]
    b1, b2 = r1[1] - r1[0], r2[1] - r2[0]
    if req.kind is KernelKind.FULL:
        v = t.view(b1, req.k, b2, req.k)
        shapes = ((b1, 1, 1, 1), (1, 1, b2, 1))
    elif req.kind is KernelKind.TRACE:
        v, shapes = t, ((b1, 1), (1, b2))
    else:
        v, shapes = t, ((1, b1, 1), (1, 1, b2))
    for s, shp in ((s1, shapes[0]), (s2, shapes[1])):
        if s is not None:
            v.mul_(s.view(shp))


def _write(res: Tensor, acc: Tensor, kind: KernelKind, k: int, r1, r2, mirror: bool) -> None:
    """Add a finished tile (and its mirror) into the result, possibly on another device."""
    acc = acc.to(res.device, non_blocking=False)
    if kind is KernelKind.FULL:
        (a0, a1), (b0, b1) = (r1[0] * k, r1[1] * k), (r2[0] * k, r2[1] * k)
        res[a0:a1, b0:b1].add_(acc)
        if mirror:
            res[b0:b1, a0:a1].add_(acc.T)
    elif kind is KernelKind.TRACE:
        res[r1[0]:r1[1], r2[0]:r2[1]].add_(acc)
        if mirror:
            res[r2[0]:r2[1], r1[0]:r1[1]].add_(acc.T)
    else:
        res[:, r1[0]:r1[1], r2[0]:r2[1]].add_(acc)
        if mirror:
            res[:, r2[0]:r2[1], r1[0]:r1[1]].add_(acc.transpose(1, 2))


def _finish(t: Tensor, req: KernelRequest) -> Tensor:
    if req.kind is KernelKind.FULL:
        return t.view(req.n1, req.k, req.n2, req.k).permute(0, 2, 1, 3)
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
    k = cached_output_width(model, params, x1)
    like = next(v for v in params.values() if v.is_floating_point())
    s1 = scaling(x1.shape[0], w1, conv, like)
    s2 = None if x2 is None else scaling(x2.shape[0], w2, conv, like)
    return KernelRequest(model, params, x1, x2, s1, s2, KernelKind.parse(kind), k)


def _groups_of(req: KernelRequest, groups) -> dict[str, list[str]]:
    if groups is None:
        groups = req.model.groups
    out = {g: [n for n in names if n in req.params] for g, names in groups.items()}
    missing = set(req.params) - {n for v in out.values() for n in v}
    if missing:
        raise ValueError(f"parameters {sorted(missing)} belong to no group")
    return {g: v for g, v in out.items() if v}




def empirical_ntk(
    model: Model | nn.Module, x1: Tensor | Dataset, x2: Tensor | Dataset | None = None, *,
    params: Params | None = None, kind: KernelKind | str = "full",
    convention: Convention | str = "mean", weights1: Tensor | None = None,
    weights2: Tensor | None = None, method: NTKMethod | str = "auto",
    max_memory: int | str | None = None, block_size: int | None = None, out_device=None,
    allow_tf32: bool = False,
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
        x1, x2: inputs (n1, ...) and optionally (n2, ...) (or Datasets, whose weights are used).
        params: parameters θ (default ``model.params``).
        kind: ``"full"`` (exact, default), ``"trace"`` or ``"diagonal"`` (approximations).
        convention: ``"mean"`` (L²(D), default) or ``"sum"`` (Euclidean), see below.
        weights1, weights2: data weights w (positive, summing to 1; default uniform).
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

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> K = empirical_ntk(net, torch.randn(5, 3, dtype=torch.float64))
        >>> K.shape, kernel_matrix(K).shape
        (torch.Size([5, 5, 2, 2]), torch.Size([10, 10]))
    """
    req = _request(model, x1, x2, params, kind, convention, weights1, weights2)
    groups = {"all": list(req.params)}
    with torch.enable_grad(), float32_policy(req.device, allow_tf32):
        plan, engine = build_plan(req, groups, NTKMethod.parse(method), max_memory, block_size,
                              out_device)
        return _finish(_assemble(req, engine, plan, ["all"])["all"], req)


def group_ntk(
    model: Model | nn.Module, x1: Tensor | Dataset, x2: Tensor | Dataset | None = None, *,
    groups: Mapping[str, Sequence[str]] | None = None, params: Params | None = None,
    kind: KernelKind | str = "full", convention: Convention | str = "mean",
    weights1: Tensor | None = None, weights2: Tensor | None = None,
    method: NTKMethod | str = "auto", max_memory: int | str | None = None,
    block_size: int | None = None, out_device=None, allow_tf32: bool = False,
) -> dict[str, Tensor]:
    """Per-group kernels K_b = J_b J_bᵀ (THEORY.md T2), with K = Σ_b K_b exactly.

    ``groups`` maps a group name to parameter names (default ``model.groups``: one group per
    module). Same shapes, conventions and other arguments as :func:`empirical_ntk`; one
    pass computes every group.

    Example::

        >>> Ks = group_ntk(net, x)                       # doctest: +SKIP
        >>> sum(Ks.values())  # equals empirical_ntk(net, x)  # doctest: +SKIP
    """
    req = _request(model, x1, x2, params, kind, convention, weights1, weights2)
    gmap = _groups_of(req, groups)
    with torch.enable_grad(), float32_policy(req.device, allow_tf32):
        plan, engine = build_plan(req, gmap, NTKMethod.parse(method), max_memory, block_size,
                              out_device)
        res = _assemble(req, engine, plan, list(gmap))
    return {g: _finish(t, req) for g, t in res.items()}


def plan_ntk(
    model: Model | nn.Module, x1: Tensor | Dataset, x2: Tensor | Dataset | None = None, *,
    params: Params | None = None, kind: KernelKind | str = "full",
    method: NTKMethod | str = "auto", max_memory: int | str | None = None,
    block_size: int | None = None, out_device=None,
) -> NTKPlan:
    """The :class:`NTKPlan` that :func:`empirical_ntk` would follow (method, tiles, memory)."""
    req = _request(model, x1, x2, params, kind, "sum", None, None)
    return build_plan(req, {"all": list(req.params)}, NTKMethod.parse(method), max_memory,
                  block_size, out_device)[0]
