"""Generic algorithms: Jacobian contraction and kernel-vector products (internal engines).

Jacobian contraction: per-sample Jacobians J_i = ∂f(x_i)/∂θ by ``vmap(jacrev)`` over one chunk
of samples, restricted to one chunk of parameters at a time, then
K(x_i, x_j) = Σ_p J_i[:, p] J_j[:, p]ᵀ, contracted parameter group by parameter group. The
whole J is never held unless it fits the memory budget. A model whose forward branches on its
inputs' values (``vmap`` refuses data-dependent control flow: Hugging Face's attention-mask
shortcuts) gets its per-sample Jacobians one sample at a time instead, the same arithmetic.

Kernel-vector products: K(x1, x2) = J(x1) (J(x2)ᵀ E) with E the basis of the x2 chunk's
outputs: one VJP per basis vector (vmapped), then one JVP over the x1 chunk per vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._types import Params
from ..problem import Model
from ._batch import Inputs
from ._common import KernelKind
from ._terms import GradTerm, Term, contract_all, grad_pair_cost


def jvp_any(f, primals: tuple, tangents: tuple, state: dict) -> Tensor:
    """J t by forward-mode AD. Fused attention kernels lack forward AD on some devices: then
    retry under the exact "math" attention backend, and as a last resort use the double-VJP
    identity J t = ∂/∂v ⟨J* v, t⟩. The working route is remembered in ``state``."""
    route = state.get("route", "forward")
    if route == "forward":
        try:
            return jvp(f, primals, tangents)[1]
        except (NotImplementedError, RuntimeError) as err:
            if "forward AD" not in str(err):
                raise
            route = state["route"] = "math-attention"
    if route == "math-attention":
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return jvp(f, primals, tangents)[1]
        except (NotImplementedError, RuntimeError) as err:
            if "forward AD" not in str(err):
                raise
            route = state["route"] = "double-vjp"
    out, pull = vjp(f, *primals)  # type: ignore[misc]
    _, pull2 = vjp(pull, torch.zeros_like(out))  # type: ignore[misc]
    return pull2(tangents)[0]


def _single(model: Model, params: Params, names: Sequence[str]):
    fixed = {k: v for k, v in params.items() if k not in names}

    def f(sub: Params, x: Tensor | dict[str, Tensor]) -> Tensor:
        one = x.unsqueeze(0) if isinstance(x, Tensor) else \
            {k: v.unsqueeze(0) for k, v in x.items()}
        return model({**fixed, **sub}, one)[0]

    return f


def data_dependent(err: BaseException) -> bool:
    """vmap's refusal of ``.item()`` or of control flow on a batched tensor's values."""
    return isinstance(err, RuntimeError) and "data-dependent control flow" in str(err)


def chunk_names(params: Params, names: Sequence[str], max_width: int) -> list[list[str]]:
    """Split parameter names into consecutive chunks of at most ``max_width`` scalars each."""
    chunks: list[list[str]] = [[]]
    width = 0
    for name in names:
        n = params[name].numel()
        if chunks[-1] and width + n > max_width:
            chunks.append([])
            width = 0
        chunks[-1].append(name)
        width += n
    return [c for c in chunks if c]


class JacobianEngine:
    """GradTerms from per-sample Jacobians, one term per (group, parameter chunk).

    Without ``max_width`` one pass computes every group's Jacobian; with it, parameters are
    split into chunks of at most ``max_width`` scalars and each pass holds one chunk only.
    """

    def __init__(self, model: Model, params: Params, groups: dict[str, list[str]], k: int,
                 act_bytes: int, max_width: int | None = None) -> None:
        self.model, self.params, self.k = model, params, k
        width = max_width or sum(params[n].numel() for g in groups.values() for n in g)
        chunks = [(g, c) for g, names in groups.items()
                  for c in chunk_names(params, names, max(width, 1))]
        self.passes = [chunks] if max_width is None else [[c] for c in chunks]
        self.n_passes = len(self.passes)
        self.width = sum(params[n].numel() for _, c in chunks for n in c)
        item = next(iter(params.values())).element_size()
        per_pass = max(sum(params[n].numel() for _, c in p for n in c) for p in self.passes)
        self.feat_bytes = k * per_pass * item
        self.feat_bytes_all = k * self.width * item
        max_chunk = max(sum(params[n].numel() for n in c) for _, c in chunks)
        # vmap(jacrev): k cotangents through the graph of one sample, plus this chunk's J.
        self.work_bytes = k * (3 * act_bytes + 2 * max_chunk * item)
        self.loop = False  # per-sample Jacobians one by one (the forward defeats vmap)

    def features(self, x: Inputs, index: int | None = None) -> list[Term]:
        """Terms of pass ``index`` (default: every pass) for the inputs x."""
        chunks = [c for p in self.passes for c in p] if index is None else self.passes[index]
        terms: list[Term] = []
        for group, names in chunks:
            f = _single(self.model, self.params, names)
            sub = {n: self.params[n] for n in names}
            jac = self._jacobians(f, sub, x)
            b = x.shape[0]
            flat = [jac[n].reshape(b, self.k, -1) for n in names]
            g = flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)
            terms.append(GradTerm(group, g))
        return terms

    def _jacobians(self, f, sub: Params, x: Inputs) -> dict[str, Tensor]:
        xs = x if isinstance(x, Tensor) else x.as_dict()
        if not self.loop:
            try:
                return vmap(jacrev(f), in_dims=(None, 0))(sub, xs)
            except RuntimeError as err:
                if not data_dependent(err):
                    raise
                self.loop = True  # remembered: later chunks skip the failing vmap
        rows = [jacrev(f)(sub, x[i] if isinstance(x, Tensor) else x.sample(i))
                for i in range(x.shape[0])]
        return {n: torch.stack([r[n] for r in rows]) for n in sub}

    def contract(self, f1: list[Term], f2: list[Term], kind: KernelKind,
                 acc: dict[str, Tensor]) -> None:
        contract_all(f1, f2, kind, acc)

    def pair_cost(self, kind: KernelKind) -> float:
        return grad_pair_cost(self.width, self.k, kind)

    def pair_temp(self, kind: KernelKind) -> float:
        return 0.0


class KVPFeatures:
    """A chunk's inputs; its Jacobian (as VJPs of the output basis) is formed on first use."""

    def __init__(self, x: Inputs) -> None:
        self.x = x
        self.vjps: dict[str, Tensor] | None = None


class KVPEngine:
    """Kernel tiles by kernel-vector products (VJP of the basis, then JVP), per group."""

    def __init__(self, model: Model, params: Params, groups: dict[str, list[str]], k: int,
                 act_bytes: int) -> None:
        self.model, self.params, self.groups, self.k = model, params, groups, k
        item = next(iter(params.values())).element_size()
        self.width = sum(params[n].numel() for g in groups.values() for n in g)
        self.feat_bytes = k * self.width * item
        self.work_bytes = 3 * k * act_bytes
        self.act_bytes = act_bytes
        self.ad_state: dict[str, bool] = {}

    n_passes = 1

    def features(self, x: Inputs, index: int | None = None) -> list[KVPFeatures]:
        return [KVPFeatures(x)]

    def _vjps(self, feat: KVPFeatures) -> dict[str, Tensor]:
        if feat.vjps is None:
            names = [n for g in self.groups.values() for n in g]
            fixed = {k: v for k, v in self.params.items() if k not in names}
            sub = {n: self.params[n] for n in names}
            out, pull = vjp(lambda p: self.model({**fixed, **p}, feat.x), sub)  # type: ignore[misc]
            b, k = out.shape
            basis = torch.eye(b * k, dtype=out.dtype, device=out.device).view(b * k, b, k)
            feat.vjps = vmap(pull)(basis)[0]
        return feat.vjps

    def contract(self, c1: list[KVPFeatures], c2: list[KVPFeatures], kind: KernelKind,
                 acc: dict[str, Tensor]) -> None:
        (f1,), (f2,) = c1, c2
        tangents = self._vjps(f2)  # name -> (b2 k, *shape)
        b1, b2, k = f1.x.shape[0], f2.x.shape[0], self.k
        for group, names in self.groups.items():
            fixed = {n: v for n, v in self.params.items() if n not in names}
            sub = {n: self.params[n] for n in names}

            def push(t: Params, fixed=fixed, sub=sub) -> Tensor:
                return jvp_any(lambda p: self.model({**fixed, **p}, f1.x), (sub,), (t,),
                               self.ad_state)

            tan = {n: tangents[n] for n in names}
            try:
                cols = vmap(push)(tan)  # (b2 k, b1, k)
            except (NotImplementedError, RuntimeError) as err:
                # vmap hides the first failure from jvp_any's own retry: try the next route
                if "forward AD" not in str(err) or self.ad_state.get("route") == "double-vjp":
                    raise
                nxt = "math-attention" if "route" not in self.ad_state else "double-vjp"
                self.ad_state["route"] = nxt  # type: ignore[assignment]
                cols = vmap(push)(tan)
            full = cols.view(b2, k, b1, k).permute(2, 3, 0, 1)  # (b1, k, b2, k)
            out = acc[group]
            if kind is KernelKind.FULL:
                out.add_(full.reshape(b1 * k, b2 * k))
            else:
                diag = full.diagonal(dim1=1, dim2=3)
                out.add_(diag.sum(-1) if kind is KernelKind.TRACE else diag.permute(2, 0, 1))

    def pair_cost(self, kind: KernelKind) -> float:
        return 0.0

    def pair_temp(self, kind: KernelKind) -> float:
        # b2 k JVPs through a b1 batch: activations and tangents per pair.
        item = next(iter(self.params.values())).element_size()
        return self.k * (3 * self.act_bytes / item + self.k)
