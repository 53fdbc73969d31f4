"""Kernel terms and their pairwise contractions (internal).

Every algorithm reduces a chunk of samples to a list of *terms*; the kernel tile between two
chunks is the sum over aligned terms of a contraction. Two kinds of term:

* ``GradTerm``: per-sample, per-output gradients G (b, k, F) of some parameters; contributes
  K_ij,cc' += G_ic · G_jc'. Jacobian contraction produces these.
* ``OuterTerm``: a Linear/Conv layer's inputs a (b, T, d_in) and back-propagated output
  gradients δ (b, k, T, d_out) over T positions; the weight contributes
  Σ_{t,s} (a_it · a_js)(δ_ict · δ_jc's) and the bias Σ_{t,s} δ_ict · δ_jc's. For T = 1 this is
  (a_i·a_j)(δ_ic·δ_jc'): no per-parameter Jacobian is formed.

Tile layouts on the compute device: full (b1·k, b2·k) sample-major, trace (b1, b2),
diagonal (k, b1, b2).

A diagonal tile of a symmetric kernel (the same features on both sides) is contracted by
block rows of samples, each against itself and the blocks after it (about half the
multiply-adds of the whole Gram), and its lower triangle is then the mirror of the upper
one: exactly symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ._batch import Inputs
from ._common import KernelKind


@dataclass
class GradTerm:
    group: str
    g: Tensor  # (b, k, F)


@dataclass
class OuterTerm:
    group_w: str | None  # group of the weight (None: weight not in the requested parameters)
    group_b: str | None  # group of the bias (None: no bias or not requested)
    a: Tensor  # (b, T, d_in)
    d: Tensor  # (b, k, T, d_out)
    eye: bool = False  # T = 1 and δ_ic = e_c exactly (a layer that is the output): δ·δ' = I


Term = GradTerm | OuterTerm


class Engine(Protocol):
    """What the tiler needs from an algorithm: per-chunk features and their contraction."""

    n_passes: int  # passes over all tiles (parameter chunks of a chunked Jacobian)
    feat_bytes: int  # feature bytes per sample (one pass)
    work_bytes: int  # transient bytes per sample while computing features

    def features(self, x: Inputs, index: int | None = None) -> list: ...

    def contract(self, f1: list, f2: list, kind: KernelKind, acc: dict[str, Tensor]) -> None: ...

    def pair_cost(self, kind: KernelKind) -> float: ...

    def pair_temp(self, kind: KernelKind) -> float: ...


def tile_shape(kind: KernelKind, b1: int, b2: int, k: int) -> tuple[int, ...]:
    if kind is KernelKind.FULL:
        return (b1 * k, b2 * k)
    if kind is KernelKind.TRACE:
        return (b1, b2)
    return (k, b1, b2)


def contract_all(f1: list[Term], f2: list[Term], kind: KernelKind,
                 acc: dict[str, Tensor]) -> None:
    """acc[group] += Σ over aligned terms of two chunks' features.

    When f1 is f2 (a diagonal tile of a symmetric kernel) acc must hold a symmetric tile (or
    zeros) on entry: only its upper block triangle is computed, then mirrored.
    """
    if f1 is f2 and f1:
        b, k = _batch(f1[0])
        blocks = _sym_blocks(b, k, kind)
        if blocks is not None:
            _contract_symmetric(f1, kind, acc, blocks, b, k)
            return
    for t1, t2 in zip(f1, f2, strict=True):
        contract(t1, t2, kind, acc)


_SYM_ROWS = 160  # rows of a block row in the symmetric contraction (GEMMs stay efficient)


def _batch(t: Term) -> tuple[int, int]:
    return (t.g.shape[0], t.g.shape[1]) if isinstance(t, GradTerm) else \
        (t.d.shape[0], t.d.shape[1])


def _sym_blocks(b: int, k: int, kind: KernelKind) -> list[tuple[int, int]] | None:
    """Sample ranges of the block rows of a symmetric tile, or None (too small to gain)."""
    per = k if kind is KernelKind.FULL else 1
    nb = min(8, (b * per) // _SYM_ROWS)
    if nb < 2:
        return None
    step = -(-b // nb)
    return [(s, min(s + step, b)) for s in range(0, b, step)]


def _sub(t: Tensor, kind: KernelKind, k: int, r: tuple[int, int], c: tuple[int, int]
         ) -> Tensor:
    """The (rows r, columns c) sample block of a tile, as a view."""
    if kind is KernelKind.FULL:
        return t[r[0] * k:r[1] * k, c[0] * k:c[1] * k]
    if kind is KernelKind.TRACE:
        return t[r[0]:r[1], c[0]:c[1]]
    return t[:, r[0]:r[1], c[0]:c[1]]


def _rows(t: Term, s: int, e: int) -> Term:
    if isinstance(t, GradTerm):
        return GradTerm(t.group, t.g[s:e])
    return OuterTerm(t.group_w, t.group_b, t.a[s:e], t.d[s:e], t.eye)


def _contract_symmetric(f: list[Term], kind: KernelKind, acc: dict[str, Tensor],
                        blocks: list[tuple[int, int]], b: int, k: int) -> None:
    for s, e in blocks:
        sub = {g: _sub(t, kind, k, (s, e), (s, b)) for g, t in acc.items()}
        for t in f:
            contract(_rows(t, s, e), _rows(t, s, b), kind, sub)
    touched: set[str | None] = set()
    for t in f:
        touched |= {t.group} if isinstance(t, GradTerm) else {t.group_w, t.group_b}
    for g in touched - {None}:
        out = acc[g]  # type: ignore[index]
        for s, e in blocks:
            d = _sub(out, kind, k, (s, e), (s, e))
            d.copy_(d.triu() + d.triu(1).transpose(-1, -2))  # exactly symmetric inside
            if e < b:
                _sub(out, kind, k, (e, b), (s, e)).copy_(
                    _sub(out, kind, k, (s, e), (e, b)).transpose(-1, -2))


def contract(t1: Term, t2: Term, kind: KernelKind, acc: dict[str, Tensor]) -> None:
    """acc[group] += contribution of the aligned terms t1 (rows) and t2 (columns)."""
    if isinstance(t1, GradTerm):
        _gram(t1.g, t2.g, kind, acc[t1.group])  # type: ignore[union-attr]
        return
    assert isinstance(t2, OuterTerm)
    if t1.a.shape[1] == 1 and t2.a.shape[1] == 1:
        _outer_single(t1, t2, kind, acc)
    else:
        _outer_positions(t1, t2, kind, acc)


def _gram(g1: Tensor, g2: Tensor, kind: KernelKind, out: Tensor) -> None:
    b1, k, f = g1.shape
    b2 = g2.shape[0]
    if kind is KernelKind.FULL:
        out.addmm_(g1.reshape(b1 * k, f), g2.reshape(b2 * k, f).T)
    elif kind is KernelKind.TRACE:
        out.addmm_(g1.reshape(b1, k * f), g2.reshape(b2, k * f).T)
    else:
        out.baddbmm_(g1.transpose(0, 1), g2.permute(1, 2, 0))


def _outer_single(t1: OuterTerm, t2: OuterTerm, kind: KernelKind, acc: dict[str, Tensor]) -> None:
    if t1.eye and t2.eye:
        _outer_eye(t1, t2, kind, acc)
        return
    b1, k, _, m = t1.d.shape
    b2 = t2.d.shape[0]
    d1, d2 = t1.d.reshape(b1, k, m), t2.d.reshape(b2, k, m)
    if kind is KernelKind.FULL:
        dd = d1.reshape(b1 * k, m) @ d2.reshape(b2 * k, m).T
        view: tuple[int, ...] = (b1, k, b2, k)
        a_shape: tuple[int, ...] = (b1, 1, b2, 1)
    elif kind is KernelKind.TRACE:
        dd = d1.reshape(b1, k * m) @ d2.reshape(b2, k * m).T
        view, a_shape = (b1, b2), (b1, b2)
    else:
        dd = torch.bmm(d1.transpose(0, 1), d2.permute(1, 2, 0))
        view, a_shape = (k, b1, b2), (1, b1, b2)
    if t1.group_w is not None:
        aa = t1.a[:, 0] @ t2.a[:, 0].T
        if t1.group_b == t1.group_w:
            aa += 1.0
        acc[t1.group_w].view(view).addcmul_(aa.view(a_shape), dd.view(view))
    if t1.group_b is not None and t1.group_b != t1.group_w:
        acc[t1.group_b].add_(dd.view(acc[t1.group_b].shape))


def _outer_eye(t1: OuterTerm, t2: OuterTerm, kind: KernelKind, acc: dict[str, Tensor]) -> None:
    # δ_ic · δ_jc' = [c = c']: the (a_i·a_j + 1) I_k blocks without a Gram of δ
    k = t1.d.shape[1]
    per = float(k) if kind is KernelKind.TRACE else 1.0

    def put(out: Tensor, val: Tensor | float) -> None:
        if kind is KernelKind.FULL:
            b1, b2 = out.shape[0] // k, out.shape[1] // k
            diag = out.view(b1, k, b2, k).diagonal(dim1=1, dim2=3)  # (b1, b2, k)
            diag.add_(val.unsqueeze(-1) if isinstance(val, Tensor) else val)
        elif isinstance(val, Tensor):
            out.add_(val if per == 1.0 else val * per)
        else:
            out.add_(val * per)

    if t1.group_w is not None:
        aa = t1.a[:, 0] @ t2.a[:, 0].T
        if t1.group_b == t1.group_w:
            aa += 1.0
        put(acc[t1.group_w], aa)
    if t1.group_b is not None and t1.group_b != t1.group_w:
        put(acc[t1.group_b], 1.0)


def _outer_positions(t1: OuterTerm, t2: OuterTerm, kind: KernelKind,
                     acc: dict[str, Tensor]) -> None:
    # Σ_{t,s}: weight via the (b1 T) × (b2 T) Gram of inputs; the bias term only needs Σ_t δ.
    b1, k, tt1, m = t1.d.shape
    b2, _, tt2, _ = t2.d.shape
    if t1.group_w is not None:
        d_in = t1.a.shape[-1]
        aa = (t1.a.reshape(b1 * tt1, d_in) @ t2.a.reshape(b2 * tt2, d_in).T).view(b1, tt1, b2, tt2)
        dd = (t1.d.reshape(b1 * k * tt1, m) @ t2.d.reshape(b2 * k * tt2, m).T)
        full = torch.einsum("itjs,ictjds->icjd", aa, dd.view(b1, k, tt1, b2, k, tt2))
        _add_full(full, kind, acc[t1.group_w])
    if t1.group_b is not None:
        s1, s2 = t1.d.sum(2), t2.d.sum(2)
        _gram(s1, s2, kind, acc[t1.group_b])


def _add_full(full: Tensor, kind: KernelKind, out: Tensor) -> None:
    """Add a (b1, k, b2, k) block tensor to an accumulator of the requested kind."""
    b1, k, b2, _ = full.shape
    if kind is KernelKind.FULL:
        out.add_(full.reshape(b1 * k, b2 * k))
        return
    diag = full.diagonal(dim1=1, dim2=3)  # (b1, b2, k)
    if kind is KernelKind.TRACE:
        out.add_(diag.sum(-1))
    else:
        out.add_(diag.permute(2, 0, 1))


# ----------------------------------------------------------------------------------------------
# cost model (multiply-adds per sample pair, and temporary elements per sample pair)


def outer_pair_cost(positions: int, d_in: int, d_out: int, k: int, kind: KernelKind) -> float:
    kk = k * k if (kind is KernelKind.FULL or positions > 1) else k
    t2 = positions * positions
    return t2 * d_in + kk * t2 * d_out + (kk * t2 if positions > 1 else kk)


def outer_pair_temp(positions: int, k: int, kind: KernelKind) -> float:
    kk = k * k if (kind is KernelKind.FULL or positions > 1) else k
    t2 = positions * positions
    return t2 * (kk + 1) + kk


def grad_pair_cost(width: int, k: int, kind: KernelKind) -> float:
    return (k * k if kind is KernelKind.FULL else k) * width
