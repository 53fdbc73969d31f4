"""Planning a kernel computation: the AUTO cost model, tile sizes and memory checks."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import final

import torch
from torch import Tensor, nn

from .._types import Params, parse_enum
from ..problem import Model
from ._batch import Inputs
from ._common import (
    KernelKind,
    KernelRequest,
    KernelTooLargeError,
    available_bytes,
    fmt_bytes,
    working_budget,
)
from ._terms import Engine, outer_pair_cost, tile_shape
from .jacobian import JacobianEngine, KVPEngine
from .probe import ProbeResult, run_probe
from .structured import StructuredEngine, find_layers

__all__ = ["NTKMethod", "NTKPlan", "clear_plan_cache", "plan_cache_info"]


class NTKMethod(StrEnum):
    """Algorithm for the materialized kernel. Cost model (multiply-adds; n1, n2 samples,
    k outputs, P parameters, F forward multiply-adds per sample, n_f = n1 + n2 feature passes,
    pairs = n1·n2, halved for a symmetric kernel):

    * ``JACOBIAN``: per-sample Jacobians by vmap(jacrev), contracted parameter chunk by chunk:
      n_f·k·3F + pairs·k²·P. Memory: chunk·k·P_chunk for the Jacobian tiles.
    * ``KVP``: kernel-vector products, a VJP of each output basis vector of an x2 chunk then a
      JVP over an x1 chunk: n2·k·3F + pairs·k·3F. Memory: b2·k·P tangents and b2·k
      forward-mode passes over b1 samples (large; the torch.func tutorial's second recipe).
    * ``STRUCTURED``: layerwise for nn.Linear / nn.Conv1d / nn.Conv2d, Jacobian contraction for
      every other parameter: n_f·(k + 1)·2F + pairs·Σ_layers c_layer, with
      c_layer = T²·d_in + k²·T²·d_out (outer products over T positions) or k²·d_out·d_in
      (per-sample gradients, when positions are many), plus the JACOBIAN cost of the fallback
      parameters. For an MLP: pairs·Σ(d_in + k²·d_out) against pairs·k²·Σ d_in·d_out.
    * ``AUTO``: evaluates these estimates (structured only when some layer passes its checks;
      KVP counted twice for its lower arithmetic efficiency) and takes the cheapest whose tiles
      fit ``max_memory``. Trace and diagonal kinds replace k² by k in the pair costs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import NTKMethod, empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> kernels = [empirical_ntk(net, x, method=m) for m in ("jacobian", "kvp", "structured")]
        >>> all(bool(torch.allclose(K, kernels[0])) for K in kernels)   # every method is exact
        True
        >>> NTKMethod("auto") is NTKMethod.AUTO
        True
    """

    AUTO = "auto"
    JACOBIAN = "jacobian"
    KVP = "kvp"
    STRUCTURED = "structured"

    @classmethod
    def parse(cls, value: str | NTKMethod) -> NTKMethod:
        return parse_enum(cls, value, "NTK method")


@final
@dataclass(frozen=True)
class NTKPlan:
    """What :func:`empirical_ntk` will do: method, tiles, memory, and the cost estimates.

    ``costs`` holds each method's multiply-add estimate (see :class:`NTKMethod`);
    ``probe`` says whether the model was probed for this call or the plan came from the cache;
    ``probe_passes`` = (forwards, backwards) that probe ran on at most three samples: (1, 0), or
    (1, 1) when the model calls functions outside the probe's traced row-wise vocabulary
    (:mod:`rayleighflow.ntk.probe`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import plan_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> plan = plan_ntk(net, x, method="jacobian")
        >>> plan.method.value, plan.result_bytes            # 10 × 10 float64 entries
        ('jacobian', 800)
        >>> plan.costs["jacobian"] > 0                     # its multiply-add estimate
        True
    """

    method: NTKMethod
    block_size: int
    n_tiles: int
    n_passes: int
    cache_features: bool
    result_bytes: int
    working_bytes: int
    budget_bytes: int
    out_device: str
    costs: Mapping[str, float]
    structured_layers: tuple[str, ...]
    fallback_params: tuple[str, ...]
    rejected_layers: tuple[str, ...]
    probe: str = "probed"  # "probed" (this call ran the model probe) or "cached" (reused)
    probe_key: tuple = field(default=(), compare=False, repr=False)
    probe_passes: tuple[int, int] = (1, 0)  # (forwards, backwards) the probe ran, on ≤ 3 samples


# ----------------------------------------------------------------------------------------------
# the probe cache: what the probe measures depends only on the model's structure, the
# parameters' names/shapes/dtype/device and the shape of the probe batch, never on the values.

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ProbeResult]] = \
    weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0}


def _probe_key(module: nn.Module, params: Params, x: Inputs) -> tuple:
    structure = tuple((name, type(m).__module__, type(m).__qualname__, m.training)
                      for name, m in module.named_modules())
    # ties between parameters are structure: the same tensor under two names
    ties = tuple(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    shapes = tuple((n, tuple(v.shape), str(v.dtype), str(v.device)) for n, v in params.items())
    if isinstance(x, Tensor):
        return (structure, ties, shapes, tuple(x.shape), str(x.dtype), str(x.device))
    return (structure, ties, shapes, x.signature())  # named inputs: names, shapes, dtypes


def cached_probe(model: Model, params: Params, x: Inputs) -> tuple[ProbeResult, str, tuple]:
    """(probe result, "probed"/"cached", key): one traced forward on ``x[:3]`` per key (see
    :mod:`rayleighflow.ntk.probe`); a model that is a plain function is probed every time.
    For named inputs the key holds every entry's name, shape, dtype and device."""
    probe = x[: min(x.shape[0], 3)]
    module = model.module
    if module is None:
        return run_probe(model, params, [], probe)[0], "probed", ()
    key = _probe_key(module, params, probe)
    with _LOCK:
        hit = _CACHE.get(module, {}).get(key)
        _STATS["hits" if hit is not None else "misses"] += 1
    if hit is not None:
        return hit, "cached", key
    result, _ = run_probe(model, params, find_layers(model, params), probe)
    with _LOCK:
        _CACHE.setdefault(module, {})[key] = result
    return result, "probed", key


def clear_plan_cache() -> None:
    """Forget every cached probe (e.g. after changing a module's forward in place).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import clear_plan_cache, plan_cache_info, plan_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> _ = plan_ntk(net, x)
        >>> clear_plan_cache()
        >>> plan_cache_info()
        {'hits': 0, 'misses': 0, 'entries': 0}
    """
    with _LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


def plan_cache_info() -> dict[str, int]:
    """Cache statistics: ``hits``, ``misses`` and ``entries`` (probes held, all modules).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import clear_plan_cache, plan_cache_info, plan_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> clear_plan_cache()
        >>> plan_ntk(net, x).probe, plan_ntk(net, x).probe   # probed once, then reused
        ('probed', 'cached')
        >>> plan_cache_info()
        {'hits': 1, 'misses': 1, 'entries': 1}
    """
    with _LOCK:
        return {**_STATS, "entries": sum(len(v) for v in _CACHE.values())}


def _layers_of(model: Model, params: Params, result: ProbeResult) -> list:
    """The probe's verified layers, as fresh Layer records (the planner annotates them)."""
    by_path = {ly.path: ly for ly in find_layers(model, params)}
    layers = []
    for path, t, din, dout in result.layers:
        ly = by_path[path]
        ly.positions, ly.d_in, ly.d_out = t, din, dout
        layers.append(ly)
    return layers


def _solve_block(quad: float, lin: float, cap: float) -> int:
    """Largest b with quad·b² + lin·b ≤ cap."""
    if cap <= 0:
        return 0
    if quad <= 0:
        return int(cap // max(lin, 1.0))
    return int((-lin + math.sqrt(lin * lin + 4 * quad * cap)) / (2 * quad))


def build_plan(req: KernelRequest, groups: dict[str, list[str]], method: NTKMethod,
               max_memory, block_size: int | None, out_device, result_share: float = 1.0
               ) -> tuple[NTKPlan, Engine]:
    """Probe the model, price each method, pick one, and size tiles to the memory budget."""
    model, params, k, kind = req.model, req.params, req.k, req.kind
    device, item = req.device, req.params[next(iter(req.params))].element_size()
    symmetric = req.x2 is None
    n_f = req.n1 + (0 if symmetric else req.n2)
    pairs = req.n1 * req.n2 / (2.0 if symmetric else 1.0)
    group_of = {n: g for g, names in groups.items() for n in names}
    structured = method in (NTKMethod.AUTO, NTKMethod.STRUCTURED)
    result, probed, key = req.probe if req.probe is not None else \
        cached_probe(model, params, req.x1)
    layers = _layers_of(model, params, result) if structured else []
    rejected = list(result.rejected) if structured else []
    act = result.act
    covered = {n for ly in layers for n in (ly.weight, ly.bias) if n}
    lin_macs = sum(ly.positions * ly.d_in * ly.d_out for ly in layers)
    p_req = sum(params[n].numel() for n in group_of)
    fwd = lin_macs + sum(p.numel() for n, p in params.items() if n not in covered)
    for ly in layers:
        ly.groups = (group_of.get(ly.weight), group_of.get(ly.bias) if ly.bias else None)
        outer = pairs * _outer(ly, k, kind)
        grad = pairs * (k * k if kind is KernelKind.FULL else k) * ly.d_out * (ly.d_in + 1) \
            + n_f * k * ly.positions * ly.d_in * ly.d_out
        ly.use_grad = _decide_order(ly, outer, grad)
    rest = {g: [n for n in names if n not in covered] for g, names in groups.items()}
    rest = {g: v for g, v in rest.items() if v}
    costs = {
        NTKMethod.JACOBIAN.value: n_f * k * 3 * fwd + pairs * (k * k if kind is KernelKind.FULL
                                                               else k) * p_req,
        NTKMethod.KVP.value: 2 * (req.n2 * k * 3 * fwd + pairs * k * 3 * fwd),
    }
    if layers:
        fb = JacobianEngine(model, params, rest, k, act) if rest else None
        st = StructuredEngine(model, params, [ly for ly in layers if any(ly.groups)], k, fb)
        costs[NTKMethod.STRUCTURED.value] = n_f * (k + 1) * 2 * fwd + pairs * st.pair_cost(kind) \
            + (n_f * k * 3 * fwd if fb else 0)
    if method is NTKMethod.STRUCTURED and not layers:
        method = NTKMethod.JACOBIAN  # nothing structured: the fallback is the whole model
    budget = working_budget(max_memory, device)

    def engine_for(m: NTKMethod, width: int | None = None):
        if m is NTKMethod.STRUCTURED:
            return st
        if m is NTKMethod.KVP:
            return KVPEngine(model, params, groups, k, act)
        return JacobianEngine(model, params, groups, k, act, max_width=width)

    if method is NTKMethod.AUTO:
        order = sorted(costs, key=costs.get)  # type: ignore[arg-type]
        method = NTKMethod(order[0])
    engine = engine_for(method)
    if method is NTKMethod.JACOBIAN and 2 * engine.feat_bytes + engine.work_bytes > budget // 2:
        # one sample's Jacobian does not fit: contract in passes over parameter chunks
        width = int((budget // 2 - 3 * k * act) // (4 * k * item))
        engine = engine_for(method, max(width, 1))
    result_bytes = math.prod(req.result_shape()) * item * len(groups)
    n_max = max(req.n1, req.n2)
    tile_pp = math.prod(tile_shape(kind, 1, 1, k)) * len(groups) + engine.pair_temp(kind)
    tile_pp *= item
    cap = (2 if device.type == "cuda" else 0.25) * 2**30  # tile temporaries: big enough GEMMs
    cache = engine.feat_bytes * n_f <= budget / 2 and method is not NTKMethod.KVP
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        b = min(block_size, n_max)
    elif cache:
        room = budget - engine.feat_bytes * n_f
        b = _solve_block(tile_pp, engine.work_bytes, min(room, cap))
    else:
        b = _solve_block(tile_pp, 2 * engine.feat_bytes + engine.work_bytes, budget)
    b = min(b, n_max)
    need = tile_pp * b * b + (2 * engine.feat_bytes + engine.work_bytes) * max(b, 1)
    if cache:
        need += engine.feat_bytes * n_f - 2 * engine.feat_bytes * max(b, 1)
    if b < 1 or need > budget:
        need1 = tile_pp + 2 * engine.feat_bytes + engine.work_bytes
        raise KernelTooLargeError(
            f"the {method.value} kernel needs about {fmt_bytes(max(need, need1))} of working "
            f"memory (at least {fmt_bytes(need1)} for one sample pair) but max_memory allows "
            f"{fmt_bytes(budget)}: raise max_memory, lower block_size, or use kind='trace'"
        )
    if result_share == 0.0:  # the kernel goes to a file: only the tiles live in memory
        out_dev = torch.device("cpu")
    else:
        out_dev = _out_device(out_device, device, int(result_bytes * result_share), need)
    n1t, n2t = -(-req.n1 // b), -(-req.n2 // b)
    n_tiles = n1t * (n1t + 1) // 2 if symmetric else n1t * n2t
    plan = NTKPlan(method, b, n_tiles, engine.n_passes, cache, int(result_bytes), int(need),
                   int(budget), str(out_dev), costs,
                   tuple(ly.path for ly in layers) if method is NTKMethod.STRUCTURED else (),
                   tuple(n for g in rest.values() for n in g)
                   if method is NTKMethod.STRUCTURED else (),
                   tuple(rejected), probed, key, (result.forwards, result.backwards))
    return plan, engine


def _decide_order(ly, outer: float, grad: float) -> bool:
    """Per-sample gradients (True) or input/output Grams (False); grouped convolutions have
    only the first."""
    return grad < outer or getattr(ly.module, "groups", 1) != 1


def _outer(ly, k: int, kind: KernelKind) -> float:
    return outer_pair_cost(ly.positions, ly.d_in, ly.d_out, k, kind)


def _out_device(out_device, device: torch.device, result_bytes: int, need: int):
    """Where the kernel is assembled; refuse (before allocating) when it cannot fit there."""
    if out_device is not None:
        dev = torch.device(out_device)
    elif device.type == "cuda" and result_bytes + need > 0.9 * available_bytes(device):
        dev = torch.device("cpu")  # larger than device memory: assemble on the host by tiles
    else:
        dev = device
    extra = need if dev == device else 0
    free = available_bytes(dev)
    if result_bytes + extra > free:
        raise KernelTooLargeError(
            f"the kernel itself needs {fmt_bytes(result_bytes)} on {dev} but only "
            f"{fmt_bytes(free)} is free there (with {fmt_bytes(extra)} kept for work): use "
            "out_file='K.npy' (out of core), kind='trace' (k² times smaller), fewer samples, "
            "or out_device='cpu' on a GPU"
        )
    return dev
