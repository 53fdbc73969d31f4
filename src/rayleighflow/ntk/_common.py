"""Shared plumbing of the NTK engine: argument checks, weights, memory budgets, kinds.

Nothing here is public except what ``rayleighflow.ntk`` re-exports (``KernelKind``,
``KernelTooLargeError``, ``kernel_matrix``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import final

import torch
from torch import Tensor, nn

from .._types import Convention, Params, check_weights, effective_weights, parse_enum
from ..data import Dataset
from ..problem import Model
from ._batch import Batch, Inputs, as_batch


class KernelTooLargeError(ValueError):
    """A kernel (or one of its tiles) cannot fit in the memory it is allowed; nothing allocated.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import KernelTooLargeError, empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> try:
        ...     empirical_ntk(net, x, max_memory=100)          # 100 bytes of working memory
        ... except KernelTooLargeError as err:
        ...     print(str(err).split(":")[-1].strip())
        raise max_memory, lower block_size, or use kind='trace'
    """


class KernelKind(StrEnum):
    """Which part of each k × k block K(x_i, x_j) = J_i J_jᵀ is returned.

    ``FULL`` (default, exact): blocks (n1, n2, k, k).
    ``TRACE``: tr K(x_i, x_j), shape (n1, n2). An approximation of the exact kernel: it keeps
    Σ_c J_ic·J_jc and drops every cross-output entry (for k = 1 it is exact).
    ``DIAGONAL``: the diagonal of each block, shape (n1, n2, k). Also an approximation: the
    off-diagonal entries c ≠ c' are dropped.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import empirical_ntk
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> K = empirical_ntk(net, x)
        >>> trace = empirical_ntk(net, x, kind="trace")
        >>> trace.shape, bool(torch.allclose(trace, K.diagonal(dim1=-2, dim2=-1).sum(-1)))
        (torch.Size([5, 5]), True)
    """

    FULL = "full"
    TRACE = "trace"
    DIAGONAL = "diagonal"

    @classmethod
    def parse(cls, value: str | KernelKind) -> KernelKind:
        return parse_enum(cls, value, "kernel kind")


def kernel_matrix(blocks: Tensor) -> Tensor:
    """Blocks (n1, n2, k, k) → the sample-major matrix (n1·k, n2·k), entry [i·k + c, j·k + c'].

    For blocks returned by :func:`empirical_ntk` this is free (no copy): their storage already
    is the matrix. Trace kernels (n1, n2) are returned unchanged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import empirical_ntk, kernel_matrix
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> K = empirical_ntk(net, x)
        >>> M = kernel_matrix(K)
        >>> M.shape, M.data_ptr() == K.data_ptr(), bool(M[1 * 2 + 0, 3 * 2 + 1] == K[1, 3, 0, 1])
        (torch.Size([10, 10]), True, True)
    """
    if blocks.dim() == 2:
        return blocks
    if blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
        raise ValueError(f"expected blocks (n1, n2, k, k), got shape {tuple(blocks.shape)}")
    n1, n2, k, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)


# ----------------------------------------------------------------------------------------------
# models, params, data


def as_model(model: Model | nn.Module) -> Model:
    """Wrap an ``nn.Module`` (refusing dropout / batch-norm in training mode) or pass a Model."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        named = dict(model.named_parameters())
        if named and all(v.requires_grad for v in named.values()):
            # no copy of the weights (Model() would clone them): kernels only read θ
            return Model(model, {k: v.detach() for k, v in named.items()})
        return Model(model)
    raise TypeError(
        f"expected a rayleighflow Model or an nn.Module, got {type(model).__name__}; wrap a "
        "function f(params, x) as Model(f, params)"
    )


def resolve_params(model: Model, params: Params | None) -> Params:
    params = model.params if params is None else dict(params)
    if not params or sum(p.numel() for p in params.values()) == 0:
        raise ValueError("the model has no parameters: its tangent kernel is identically zero")
    return {k: v.detach() for k, v in params.items()}


def param_dtype(params: Params) -> torch.dtype:
    for p in params.values():
        if p.is_floating_point():
            return p.dtype
    raise ValueError("the parameters hold no floating-point tensor: nothing to differentiate")


def param_device(params: Params) -> torch.device:
    return next(iter(params.values())).device


def prepare_x(x: Tensor | Mapping[str, Tensor] | Dataset, params: Params, name: str
              ) -> tuple[Inputs, Tensor | None]:
    """(inputs on the parameters' device and dtype, weights if x was a Dataset). A mapping of
    named inputs becomes a checked :class:`~rayleighflow.ntk._batch.Batch`."""
    w = None
    if isinstance(x, Dataset):
        x, w = x.x, x.weights  # type: ignore[attr-defined]
    if not isinstance(x, Tensor):
        if isinstance(x, Mapping):
            return as_batch(x, name).to(param_device(params), param_dtype(params)), w
        raise TypeError(f"{name} must be a Tensor, a Mapping of named input tensors or a "
                        f"Dataset, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one sample (shape (n, ...), n >= 1)")
    dev = param_device(params)
    x = x.to(device=dev, dtype=param_dtype(params)) if x.is_floating_point() else x.to(dev)
    return x, w


def check_pair(x1: Inputs, x2: Inputs | None) -> None:
    if x2 is None:
        return
    if isinstance(x1, Batch) or isinstance(x2, Batch):
        _check_named_pair(x1, x2)
        return
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 have different feature shapes {tuple(x1.shape[1:])} and "
            f"{tuple(x2.shape[1:])}: a cross kernel needs inputs of the same kind"
        )


def _check_named_pair(x1: Inputs, x2: Inputs) -> None:
    if not (isinstance(x1, Batch) and isinstance(x2, Batch)):
        raise ValueError("x1 and x2 must both be tensors or both be mappings of named inputs: "
                         "a cross kernel needs inputs of the same kind")
    if list(x1) != list(x2):
        raise ValueError(f"x1 has the inputs {list(x1)} but x2 has {list(x2)}: a cross kernel "
                         "needs the same named inputs (in the same order)")
    for key in x1:
        a, b = x1[key], x2[key]
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            raise ValueError(f"x1[{key!r}] is {tuple(a.shape[1:])} {a.dtype} per sample but "
                             f"x2[{key!r}] is {tuple(b.shape[1:])} {b.dtype}: a cross kernel "
                             "needs inputs of the same kind (pad both to the same length)")


def scaling(
    n: int, weights: Tensor | None, convention: Convention, like: Tensor
) -> Tensor | None:
    """√ω_i for the convention's effective weights (None when all ω_i = 1: no scaling)."""
    if weights is None:
        if convention is Convention.SUM:
            return None
        return torch.full((n,), 1.0 / math.sqrt(n), dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights).to(device=like.device, dtype=torch.float64)
    check_weights(w, n)
    return effective_weights(w, convention).sqrt().to(like.dtype)


# ----------------------------------------------------------------------------------------------
# memory

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
DEFAULT_CPU_CAP = 8 * 2**30


def parse_bytes(value: int | float | str) -> int:
    """``8_000_000``, ``"8MB"``, ``"1.5GiB"`` → bytes."""
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"max_memory must be > 0 bytes, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {value!r}: write e.g. '4GB' or '512MiB'")
    return parse_bytes(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


_HOST_FREE: list[float] = [-1.0, 0.0]  # (monotonic time read, bytes)
_HOST_FREE_TTL_S = 0.5


def available_bytes(device: torch.device) -> int:
    """Free memory of a device now: psutil's available memory on the host (else MemAvailable
    from /proc; read at most every 0.5 s: a small kernel's call should not be spent there),
    cudaMemGetInfo on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    now = time.monotonic()
    if now - _HOST_FREE[0] < _HOST_FREE_TTL_S:
        return int(_HOST_FREE[1])
    _HOST_FREE[:] = [now, float(_host_free())]
    return int(_HOST_FREE[1])


def _host_free() -> int:
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CPU_CAP


def working_budget(max_memory: int | float | str | None, device: torch.device) -> int:
    """Bytes the engine may use for temporaries on ``device`` (the result not counted)."""
    if max_memory is not None:
        return parse_bytes(max_memory)
    free = available_bytes(device)
    if device.type == "cuda":
        return int(0.6 * free)
    return int(min(DEFAULT_CPU_CAP, 0.5 * free))


@final
@dataclass(frozen=True)
class SpectrumEstimate:
    """What a dense spectrum of K (n samples, k outputs, P parameters) costs, before it runs.

    The smaller of the nk × nk kernel and the P × P dual Gram, float64, with the
    eigensolver's copy and workspace (as ``ntk_spectrum``'s route AUTO counts them), and the
    multiply-adds of forming it and of the eigendecomposition.

    Example:
        >>> e = SpectrumEstimate(100_000, 1, 17_000_000)
        >>> e.route, fmt_bytes(e.bytes), e.samples_within(2 * 10**9)
        ('dense', '320 GB', 7905)
    """

    n: int
    k: int
    p: int

    @property
    def route(self) -> str:
        return "dual" if 3 * self.p ** 2 < 4 * (self.n * self.k) ** 2 else "dense"

    @property
    def bytes(self) -> int:
        nk = self.n * self.k
        return 8 * min(3 * self.p ** 2, 4 * nk * nk)

    @property
    def flops(self) -> float:
        nk, p = self.n * self.k, self.p
        m = min(nk, p)
        return float(nk) * float(m) * p + float(m) ** 3

    def samples_within(self, budget: int) -> int:
        """The most samples whose dense kernel fits ``budget`` bytes (0 if none)."""
        return max(0, math.isqrt(max(budget, 0) // 32) // self.k)

    def describe(self) -> str:
        what = (f"the {self.p} × {self.p} dual Gram" if self.route == "dual" else
                f"the {self.n * self.k} × {self.n * self.k} kernel")
        return (f"{what} (n = {self.n}, k = {self.k}, P = {self.p}) needs about "
                f"{fmt_bytes(self.bytes)} and {self.flops:.2g} multiply-adds")


def memory_budget(max_memory: int | float | str | None, device: torch.device) -> tuple[int, str]:
    """(bytes a whole request may use, how that was decided): ``max_memory`` when given,
    else 80% of the device's free memory now."""
    if max_memory is not None:
        return parse_bytes(max_memory), "max_memory"
    free = available_bytes(device)
    return int(0.8 * free), f"80% of the {fmt_bytes(free)} free on {device}"


@final
@dataclass(frozen=True)
class KernelRequest:
    """A kernel request after checks: model, params, inputs, scalings, kind (internal)."""

    model: Model
    params: Params
    x1: Inputs
    x2: Inputs | None
    s1: Tensor | None
    s2: Tensor | None
    kind: KernelKind
    k: int
    probe: tuple | None = field(default=None, compare=False, repr=False)  # cached_probe's

    @property
    def n1(self) -> int:
        return int(self.x1.shape[0])

    @property
    def n2(self) -> int:
        return self.n1 if self.x2 is None else int(self.x2.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return param_dtype(self.params)

    @property
    def device(self) -> torch.device:
        return param_device(self.params)

    def result_shape(self) -> tuple[int, ...]:
        if self.kind is KernelKind.FULL:
            return (self.n1, self.k, self.n2, self.k)
        if self.kind is KernelKind.TRACE:
            return (self.n1, self.n2)
        return (self.n1, self.n2, self.k)


def output_width(model: Model, params: Params, x: Inputs) -> int:
    with torch.no_grad():
        out = model(params, x[:1])
    if not torch.is_floating_point(out):
        raise ValueError("the model's output is not floating point: no tangent kernel")
    return int(out.shape[1])


@contextmanager
def float32_policy(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """On a GPU, keep TF32 off for matmuls and convolutions unless the caller asks for it."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
