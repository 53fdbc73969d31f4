"""Structured (layerwise) contraction for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

A layer z = W a + b applied at positions t (one position for a plain Linear; the output pixels
of a convolution, a im2col patch a_it each; the leading dims of a sequence) has per-sample,
per-output weight Jacobian ∂f_ic/∂W = Σ_t δ_ict ⊗ a_it with δ_ict = ∂f_ic/∂z_it. Hence

    K_W(x_i, x_j)_cc' = Σ_{t,s} (a_it · a_js)(δ_ict · δ_jc's),   K_b = Σ_{t,s} δ_ict · δ_jc's,

and for one position simply (a_i·a_j)(δ_ic·δ_jc'). The inputs a are caught by a forward hook;
δ by a zero "probe" added to the layer's output and one batched backward over the k output
basis vectors. When positions are many (convolutions), the per-sample gradient
G_ic = Σ_t δ_ict ⊗ a_it is formed instead and Gram'd, whichever the cost model finds cheaper.

Every other parameter (LayerNorm, Embedding, custom layers, and any candidate layer that fails
the checks below) falls back to Jacobian contraction for that parameter only, so any module
works. Which layers pass is decided by the planning probe (:mod:`rayleighflow.ntk.probe`: one
traced forward on up to three samples): the hook fires with the batch in dimension 0; the
layer's parameters are used by no torch function outside its own forward (tying,
``F.linear(x, layer.weight)``, ``nn.MultiheadAttention.out_proj``); and samples of a batch do
not interact downstream of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._types import Params
from ..problem import Model
from ._common import KernelKind
from ._terms import (
    GradTerm,
    OuterTerm,
    Term,
    contract_all,
    grad_pair_cost,
    outer_pair_cost,
    outer_pair_temp,
)

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Layer:
    """A structured layer: where it lives, its parameters, and what the probe measured."""

    path: str
    module: nn.Module
    weight: str
    bias: str | None
    positions: int = 0
    d_in: int = 0
    d_out: int = 0
    use_grad: bool = False  # form per-sample gradients (True) or use the outer products
    groups: tuple[str | None, str | None] = (None, None)


def _base(m: nn.Module) -> type | None:
    for cls in _SUPPORTED:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return cls
    return None


def find_layers(model: Model, params: Params) -> list[Layer]:
    """Candidate layers: exact Linear/Conv forward, untied parameters, all in ``params``."""
    if model.module is None:
        return []
    uses: dict[int, int] = {}
    for _, p in model.module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    layers = []
    for path, m in model.module.named_modules():
        cls = _base(m)
        if cls is None:
            continue
        if cls is not nn.Linear and (m.groups != 1 or m.padding_mode != "zeros"):
            continue
        prefix = f"{path}." if path else ""
        w = prefix + "weight"
        b = prefix + "bias" if m.bias is not None else None
        own = [(w, m.weight)] + ([(b, m.bias)] if b else [])
        if all(n in params and uses.get(id(t), 0) == 1 for n, t in own):
            layers.append(Layer(path, m, w, b))
    return layers


def _patches(m: nn.Module, x: Tensor) -> Tensor:
    """Conv input (b, C, *spatial) → im2col patches (b, T, C·prod(kernel))."""
    conv1d = isinstance(m, nn.Conv1d)
    if conv1d:
        x = x.unsqueeze(2)
    ks = (1, *m.kernel_size) if conv1d else tuple(m.kernel_size)  # type: ignore[arg-type, misc]
    st = (1, *m.stride) if conv1d else tuple(m.stride)  # type: ignore[arg-type, misc]
    dil = (1, *m.dilation) if conv1d else tuple(m.dilation)  # type: ignore[arg-type, misc]
    if isinstance(m.padding, str):
        pads: list[int] = []
        if m.padding == "same":
            for kk, dd in zip(reversed(ks), reversed(dil), strict=True):
                total = dd * (kk - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        pad = (0, 0)
    else:
        pad = (0, *m.padding) if conv1d else tuple(m.padding)  # type: ignore[arg-type, misc]
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (b, C·kh·kw, T)
    return cols.transpose(1, 2)


@dataclass
class _Capture:
    """Forward hooks that record layer inputs and add zero probes to layer outputs."""

    layers: list[Layer]
    batch: int
    probe: bool = True
    inputs: list[list[Tensor]] = field(default_factory=list)
    probes: list[list[Tensor]] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)

    def __enter__(self) -> _Capture:
        self.inputs = [[] for _ in self.layers]
        self.probes = [[] for _ in self.layers]
        self._handles = [ly.module.register_forward_hook(self._hook(i))
                         for i, ly in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, i: int):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            x = args[0] if args else None
            if x is None or x.dim() < 2 or x.shape[0] != self.batch or out.shape[0] != self.batch:
                self.bad.add(i)
                return None
            a = _patches(mod, x) if isinstance(mod, nn.Conv1d | nn.Conv2d) else x
            self.inputs[i].append(a.detach().reshape(self.batch, -1, a.shape[-1]))
            if not self.probe:
                return None
            p = torch.zeros_like(out, requires_grad=True)
            self.probes[i].append(p)
            return out + p
        return hook


def _to_positions(mod: nn.Module, g: Tensor, batched: bool) -> Tensor:
    lead = 2 if batched else 1
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        return g.flatten(lead + 1).transpose(-1, -2)
    return g.reshape(*g.shape[:lead], -1, g.shape[-1])


def _is_eye(d: Tensor) -> bool:
    """δ (b, k, 1, k) is exactly e_c for every sample: the layer's output is the model's."""
    b, k, t, m = d.shape
    if t != 1 or m != k:
        return False
    eye = torch.eye(k, dtype=d.dtype, device=d.device)
    return bool(torch.equal(d.view(b, k, k), eye.expand(b, k, k)))


class StructuredEngine:
    """Features of a chunk: OuterTerms/GradTerms of verified layers + Jacobian fallback terms."""

    def __init__(self, model: Model, params: Params, layers: list[Layer], k: int,
                 fallback) -> None:
        self.model, self.params, self.layers, self.k = model, params, layers, k
        self.fallback = fallback  # a JacobianEngine over the remaining parameters, or None
        self.batched_backward = True  # vmapped backward over the k outputs, until it fails
        item = next(iter(params.values())).element_size()
        feat = 0
        for ly in layers:
            t, din, dout = ly.positions, ly.d_in, ly.d_out
            feat += k * dout * (din + 1) if ly.use_grad else t * din + k * t * dout
        self.feat_bytes = item * feat + (fallback.feat_bytes_all if fallback else 0)
        acts = sum(ly.positions * (ly.d_in + ly.d_out) for ly in layers) * item
        self.work_bytes = (k + 2) * acts + (fallback.work_bytes if fallback else 0)

    n_passes = 1

    def features(self, x: Tensor, index: int | None = None) -> list[Term]:
        terms: list[Term] = []
        if self.layers:
            a_list, d_list = self._capture(x)
            for ly, a, d in zip(self.layers, a_list, d_list, strict=True):
                gw, gb = ly.groups
                if not ly.use_grad:
                    terms.append(OuterTerm(gw, gb, a, d, _is_eye(d)))
                    continue
                b = x.shape[0]
                if gw is not None:
                    g = torch.einsum("bctm,btn->bcmn", d, a).reshape(b, self.k, -1)
                    terms.append(GradTerm(gw, g))
                if gb is not None:
                    terms.append(GradTerm(gb, d.sum(2)))
        if self.fallback is not None:
            terms += self.fallback.features(x)
        return terms

    def _capture(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        b, k = x.shape[0], self.k
        with _Capture(self.layers, b) as cap, torch.enable_grad():
            out = self.model(self.params, x)
        if cap.bad:
            names = [self.layers[i].path for i in sorted(cap.bad)]
            raise RuntimeError(f"structured layers {names} changed behaviour after the probe")
        flat = [p for ps in cap.probes for p in ps]
        basis = torch.eye(k, dtype=out.dtype, device=out.device)
        grads = None
        if self.batched_backward:
            cot = basis.unsqueeze(1).expand(k, b, k)
            try:
                grads = torch.autograd.grad(out, flat, cot, is_grads_batched=True,
                                            allow_unused=True, retain_graph=True)
            except RuntimeError:  # an operator without a batching rule: k plain backwards
                self.batched_backward = False
        if grads is None:
            per_c = [torch.autograd.grad(out, flat, basis[c].expand(b, k), retain_graph=True,
                                         allow_unused=True) for c in range(k)]
            grads = tuple(torch.stack([pc[j] if pc[j] is not None else torch.zeros_like(p)
                                       for pc in per_c]) for j, p in enumerate(flat))
        a_list, d_list, pos = [], [], 0
        for ly, ins, probes in zip(self.layers, cap.inputs, cap.probes, strict=True):
            ds = []
            for p in probes:
                g = grads[pos]
                pos += 1
                g = torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                ds.append(_to_positions(ly.module, g, batched=True))  # (k, b, T, d_out)
            d = ds[0] if len(ds) == 1 else torch.cat(ds, dim=2)
            a = ins[0] if len(ins) == 1 else torch.cat(ins, dim=1)
            a_list.append(a)
            d_list.append(d.permute(1, 0, 2, 3).contiguous())
        return a_list, d_list

    def contract(self, f1: list[Term], f2: list[Term], kind: KernelKind,
                 acc: dict[str, Tensor]) -> None:
        contract_all(f1, f2, kind, acc)

    def pair_cost(self, kind: KernelKind) -> float:
        cost = 0.0
        for ly in self.layers:
            if ly.use_grad:
                cost += grad_pair_cost(ly.d_out * (ly.d_in + 1), self.k, kind)
            else:
                cost += outer_pair_cost(ly.positions, ly.d_in, ly.d_out, self.k, kind)
        return cost + (self.fallback.pair_cost(kind) if self.fallback else 0.0)

    def pair_temp(self, kind: KernelKind) -> float:
        return max((outer_pair_temp(ly.positions, self.k, kind) for ly in self.layers
                    if not ly.use_grad), default=0.0)
