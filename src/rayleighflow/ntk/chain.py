"""The structured path's short route for the commonest model: an ``nn.Sequential`` of
``nn.Linear`` layers and elementwise activations, ending in a Linear.

There δ needs no autograd: for the last layer δ_ic = e_c; before it, with D_l = σ'(z_l) the
activation's derivative at layer l's output,

    δ_{L-1, ic} = D_{L-1, i} ∘ W_L[c],   δ_{l, ic} = D_{l, i} ∘ (W_{l+1}ᵀ δ_{l+1, ic}),

one (b·k × d_{l+1}) · (d_{l+1} × d_l) GEMM per layer, written sample-major as the kernel terms
want it. This skips the vmapped backward's broadcasts and layout copies, a visible share of a
small kernel (benchmarks/ntk.py). D_l is the activation's own autograd derivative (one
elementwise backward), so any elementwise activation module of the list below is exact.

The route is taken only when the model is exactly such a chain (exact classes, no hooks, no
per-instance ``forward``, every Linear structured with its parameters requested) and its output
on a few samples equals the model's own: anything else takes the general path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._types import Params
from ..problem import Model

__all__ = ["Chain", "chain_of"]

ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.LeakyReLU,
               nn.ELU, nn.Mish, nn.Identity)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
           "_global_backward_pre_hooks")


@dataclass(frozen=True)
class Chain:
    """Linear layers (weight, bias names) and, after each, its activation modules."""

    linears: tuple[tuple[str, str | None], ...]
    acts: tuple[tuple[nn.Module, ...], ...]

    def run(self, params: Params, x: Tensor) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
        """(inputs of each Linear, D_l = σ'(z_l) after each Linear or None, the output)."""
        ins: list[Tensor] = []
        ders: list[Tensor | None] = []
        h = x
        for (w, b), acts in zip(self.linears, self.acts, strict=True):
            ins.append(h)
            h = F.linear(h, params[w], None if b is None else params[b])
            der = None
            for act in acts:
                if type(act) is nn.Identity:
                    continue
                y, d = _with_derivative(act, h)
                der = d if der is None else der * d
                h = y
            ders.append(der)
        return ins, ders, h

    def deltas(self, params: Params, ders: list[Tensor | None], b: int, k: int) -> list[Tensor]:
        """δ per Linear, (b, k, 1, d_out), the last one the identity."""
        last = params[self.linears[-1][0]]
        eye = torch.eye(k, dtype=last.dtype, device=last.device)
        out = [eye.expand(b, k, k).reshape(b, k, 1, k)]
        for i in range(len(self.linears) - 2, -1, -1):
            w_next, der = params[self.linears[i + 1][0]], ders[i]
            if i == len(self.linears) - 2:  # δ_L = e_c: W_Lᵀ e_c is row c of W_L, every sample
                rows = w_next.unsqueeze(0)
                d = rows * der.unsqueeze(1) if der is not None else \
                    rows.expand(b, k, w_next.shape[1]).contiguous()
            else:  # W_{l+1}ᵀ δ_{l+1}, masked in place: a fresh GEMM output, no second buffer
                d = (out[0].reshape(b * k, -1) @ w_next).view(b, k, w_next.shape[1])
                if der is not None:
                    d.mul_(der.unsqueeze(1))
            out.insert(0, d.unsqueeze(2))
        return out


def _with_derivative(act: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """(σ(z), σ'(z)): ReLU and tanh in closed form (the formulas of their autograd
    backward), any other elementwise module by its own autograd derivative."""
    if type(act) is nn.ReLU:
        return torch.relu(z), (z > 0).to(z.dtype)
    if type(act) is nn.Tanh:
        y = torch.tanh(z)
        return y, 1 - y * y
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        y = act(zz)
        (d,) = torch.autograd.grad(y, zz, torch.ones_like(y))
    return y.detach(), d


def chain_of(model: Model, params: Params, paths: list[str]) -> Chain | None:
    """The chain, when ``model`` is exactly one whose Linears are the structured ``paths``."""
    m = model.module
    if type(m) is not nn.Sequential or len(m) < 1:
        return None
    mm = nn.modules.module
    if any(getattr(mm, name, None) for name in _GLOBAL):
        return None
    for sub in m.modules():
        if any(getattr(sub, name, None) for name in _HOOKS) or "forward" in vars(sub):
            return None
    linears: list[tuple[str, str | None]] = []
    acts: list[list[nn.Module]] = []
    for name, child in m.named_children():
        if type(child) is nn.Linear:
            w, b = f"{name}.weight", f"{name}.bias" if child.bias is not None else None
            if w not in params or (b is not None and b not in params):
                return None
            linears.append((w, b))
            acts.append([])
        elif type(child) in ELEMENTWISE and linears:
            acts[-1].append(child)
        else:
            return None
    if acts[-1] or [w.rsplit(".", 1)[0] for w, _ in linears] != paths:
        return None
    return Chain(tuple(linears), tuple(tuple(a) for a in acts))


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


def chain_matches(chain: Chain, model: Model, params: Params, x: Tensor) -> bool:
    """The chain's output on ``x`` equals the model's own (to a few roundings); once per
    module, structure, dtype and device."""
    m = model.module
    assert m is not None
    key = (tuple((n, type(c), id(c)) for n, c in m.named_modules()), x.dtype, x.device)
    if key in _VERIFIED.get(m, set()):
        return True
    with torch.no_grad():
        want = model(params, x)
        got = chain.run(params, x)[2]
    if want.shape != got.shape or want.dtype != got.dtype:
        return False
    eps = torch.finfo(want.dtype).eps
    ok = bool(torch.allclose(got, want, rtol=64 * eps, atol=64 * eps * float(want.abs().max())))
    if ok:
        _VERIFIED.setdefault(m, set()).add(key)
    return ok
