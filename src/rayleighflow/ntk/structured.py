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
from ._batch import Inputs
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
from .chain import chain_matches, chain_of

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
        if cls is not nn.Linear and m.padding_mode != "zeros":
            continue
        prefix = f"{path}." if path else ""
        w = prefix + "weight"
        b = prefix + "bias" if m.bias is not None else None
        own = [(w, m.weight)] + ([(b, m.bias)] if b else [])
        if all(n in params and uses.get(id(t), 0) == 1 for n, t in own):
            layers.append(Layer(path, m, w, b))
    return layers


def _unfold(m: nn.Module, x: Tensor) -> Tensor:
    """Conv input (b, C, *spatial) → im2col columns (b, C·prod(kernel), T), F.unfold's layout."""
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
    return F.unfold(x, ks, dilation=dil, padding=pad, stride=st)


@dataclass
class _Capture:
    """Forward hooks that record layer inputs and add zero probes to layer outputs."""

    layers: list[Layer]
    batch: int
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
            self.inputs[i].append(x.detach())
            p = torch.zeros_like(out, requires_grad=True)
            self.probes[i].append(p)
            return out + p
        return hook


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d | nn.Conv2d)


def _is_eye(d: Tensor) -> bool:
    """δ (b, k, 1, k) is exactly e_c for every sample: the layer's output is the model's."""
    b, k, t, m = d.shape
    if t != 1 or m != k:
        return False
    eye = torch.eye(k, dtype=d.dtype, device=d.device)
    return bool(torch.equal(d.view(b, k, k), eye.expand(b, k, k)))


def _conv_grads(m: nn.Module, cols: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of a convolution's weight (b, j, numel) and bias (b, j, C_out)
    for j outputs, from its im2col columns (b, C_in·kk, T) and δ = g (j, b, C_out, ...).

    G_ic = Σ_t δ_ict ⊗ patch_it: one batched GEMM per sample (and group) contracting the T
    positions, on the layouts unfold and autograd produce (for j > 1, δ is copied once with
    j and b swapped).
    """
    j, b, c_out = g.shape[:3]
    t = cols.shape[-1]
    d = g.reshape(j, b, c_out, t)
    groups = int(m.groups)  # type: ignore[arg-type]
    if groups == 1:
        lhs = d[0] if j == 1 else d.transpose(0, 1).reshape(b, j * c_out, t)
        w = torch.bmm(lhs, cols.transpose(1, 2))
    else:
        cg, dg = c_out // groups, cols.shape[1] // groups
        dd = d.view(j, b, groups, cg, t).permute(1, 2, 0, 3, 4).reshape(b * groups, j * cg, t)
        w = torch.bmm(dd, cols.view(b * groups, dg, t).transpose(1, 2))
        w = w.view(b, groups, j, cg * dg).transpose(1, 2)
    return w.reshape(b, j, -1), d.sum(-1).transpose(0, 1)


def _linear_grads(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of a Linear applied at T positions for j outputs: x (b, ..., d_in),
    δ = g (j, b, ..., d_out) → weight (b, j, d_out·d_in), bias (b, j, d_out)."""
    j, b, m = g.shape[0], g.shape[1], g.shape[-1]
    d = g.reshape(j, b, -1, m)
    a = x.reshape(b, -1, x.shape[-1])
    w = torch.einsum("cbtm,btn->bcmn", d, a)
    return w.reshape(b, j, -1), d.sum(2).transpose(0, 1)


def _outer_inputs(m: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs at their positions, (b, T, d_in)."""
    if _is_conv(m):
        return _unfold(m, x).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _outer_deltas(m: nn.Module, g: Tensor) -> Tensor:
    """δ = g (j, b, d_out, *spatial) or (j, b, ..., d_out) → (b, j, T, d_out)."""
    if _is_conv(m):
        g = g.flatten(3).transpose(-1, -2)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).transpose(0, 1)


class _LayerSums:
    """One layer's features, filled output by output (or all k at once) from its δs."""

    def __init__(self, ly: Layer, xs: list[Tensor], k: int) -> None:
        self.ly, self.k = ly, k
        m = ly.module
        if ly.use_grad:
            self.ins = [_unfold(m, x) for x in xs] if _is_conv(m) else xs
            self.w: Tensor | None = None
            self.b: Tensor | None = None
        else:
            self.a = torch.cat([_outer_inputs(m, x) for x in xs], dim=1)
            self.d = self.a.new_empty((self.a.shape[0], k, self.a.shape[1], ly.d_out))

    def add(self, c: slice, gs: list[Tensor]) -> None:
        """δ for outputs c: one (j, b, *out) tensor per call of the layer's forward."""
        m = self.ly.module
        if not self.ly.use_grad:
            d = torch.cat([_outer_deltas(m, g) for g in gs], dim=2)
            self.d[:, c] = d
            return
        for call, (x, g) in enumerate(zip(self.ins, gs, strict=True)):
            w, b = _conv_grads(m, x, g) if _is_conv(m) else _linear_grads(x, g)
            if self.w is None or self.b is None:
                self.w = w.new_empty((w.shape[0], self.k, w.shape[2]))
                self.b = b.new_empty((b.shape[0], self.k, b.shape[2]))
            if call == 0:
                self.w[:, c], self.b[:, c] = w, b
            else:  # a layer applied several times: its gradient is the sum over calls
                self.w[:, c] += w
                self.b[:, c] += b

    def terms(self) -> list[Term]:
        gw, gb = self.ly.groups
        if not self.ly.use_grad:
            return [OuterTerm(gw, gb, self.a, self.d, _is_eye(self.d))]
        out: list[Term] = []
        if gw is not None:
            out.append(GradTerm(gw, self.w))  # type: ignore[arg-type]
        if gb is not None:
            out.append(GradTerm(gb, self.b))  # type: ignore[arg-type]
        return out


class StructuredEngine:
    """Features of a chunk: OuterTerms/GradTerms of verified layers + Jacobian fallback terms."""

    def __init__(self, model: Model, params: Params, layers: list[Layer], k: int,
                 fallback) -> None:
        self.model, self.params, self.layers, self.k = model, params, layers, k
        self.fallback = fallback  # a JacobianEngine over the remaining parameters, or None
        # one vmapped backward over the k outputs (until an operator lacks a batching rule),
        # except for convolutions, whose backward vmap runs as a loop over the k outputs
        # anyway: there k plain backwards, each δ consumed at once, are faster and smaller
        self.batched_backward = not any(_is_conv(ly.module) for ly in layers)
        self.chain = chain_of(model, params, [ly.path for ly in layers]) \
            if layers and all(not ly.use_grad and ly.positions == 1 for ly in layers) else None
        self._chain_ok: bool | None = None  # checked against the model on the first chunk
        item = next(iter(params.values())).element_size()
        feat = 0
        for ly in layers:
            t, din, dout = ly.positions, ly.d_in, ly.d_out
            feat += k * dout * (din + 1) if ly.use_grad else t * din + k * t * dout
        self.feat_bytes = item * feat + (fallback.feat_bytes_all if fallback else 0)
        acts = sum(ly.positions * (ly.d_in + ly.d_out) for ly in layers) * item
        # the vmapped backward holds k cotangents of every activation; streamed, one at a time
        live = k + 2 if self.batched_backward else 4
        self.work_bytes = live * acts + (fallback.work_bytes if fallback else 0)

    n_passes = 1

    def features(self, x: Inputs, index: int | None = None) -> list[Term]:
        if self.chain is not None and isinstance(x, Tensor) and x.dim() == 2:
            if self._chain_ok is None:
                self._chain_ok = chain_matches(self.chain, self.model, self.params, x[:3])
            if self._chain_ok:
                return self._chain_terms(x)
        terms: list[Term] = []
        if self.layers:
            for sums in self._capture(x):
                terms += sums.terms()
        if self.fallback is not None:
            terms += self.fallback.features(x)
        return terms

    def _chain_terms(self, x: Tensor) -> list[Term]:
        assert self.chain is not None
        ins, ders, _ = self.chain.run(self.params, x)
        ds = self.chain.deltas(self.params, ders, x.shape[0], self.k)
        last = len(self.layers) - 1
        return [OuterTerm(*ly.groups, a.unsqueeze(1), d, i == last)
                for i, (ly, a, d) in enumerate(zip(self.layers, ins, ds, strict=True))]

    def _capture(self, x: Inputs) -> list[_LayerSums]:
        """Per layer, its features from its inputs and δ = ∂f_c/∂(output), for every c."""
        b, k = x.shape[0], self.k
        with _Capture(self.layers, b) as cap, torch.enable_grad():
            out = self.model(self.params, x)
        if cap.bad:
            names = [self.layers[i].path for i in sorted(cap.bad)]
            raise RuntimeError(f"structured layers {names} changed behaviour after the probe")
        sums = [_LayerSums(ly, xs, k) for ly, xs in zip(self.layers, cap.inputs, strict=True)]
        flat = [p for ps in cap.probes for p in ps]
        basis = torch.eye(k, dtype=out.dtype, device=out.device)
        if self.batched_backward:
            cot = basis.unsqueeze(1).expand(k, b, k)
            try:
                grads = torch.autograd.grad(out, flat, cot, is_grads_batched=True,
                                            allow_unused=True, retain_graph=True)
            except RuntimeError:  # an operator without a batching rule: k plain backwards
                self.batched_backward = False
            else:
                self._spread(sums, cap.probes, grads, slice(0, k), k)
                return sums
        for c in range(k):
            grads = torch.autograd.grad(out, flat, basis[c].expand(b, k), allow_unused=True,
                                        retain_graph=c < k - 1)
            self._spread(sums, cap.probes, tuple(None if g is None else g.unsqueeze(0)
                                                 for g in grads), slice(c, c + 1), 1)
        return sums

    @staticmethod
    def _spread(sums: list[_LayerSums], probes: list[list[Tensor]], grads: tuple, c: slice,
                j: int) -> None:
        pos = 0
        for layer, ps in zip(sums, probes, strict=True):
            gs = []
            for p in ps:
                g = grads[pos]
                pos += 1
                gs.append(torch.zeros((j, *p.shape), dtype=p.dtype, device=p.device)
                          if g is None else g)
            layer.add(c, gs)

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
