"""The planning probe: one forward pass on up to three samples, traced.

Everything the planner needs comes from a single forward of the model on the probe batch
(``x[:3]``), run under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch
function the forward calls:

* the output width k and the bytes of intermediate outputs per sample (leaf-module hooks);
* for each candidate layer (exact ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` forward,
  untied parameters, see :func:`~rayleighflow.ntk.structured.find_layers`): its positions,
  d_in and d_out from the shapes its forward hook sees, and three checks —

  1. its forward is called with the batch in dimension 0 (and a batched convolution input);
  2. its weight and bias are used by no torch function outside its own forward (catches
     ``F.linear(x, layer.weight)`` in a parent's forward and ``nn.MultiheadAttention``'s
     ``out_proj``, whose forward is never called): the mode records which candidate's forward
     is running when a parameter tensor is used;
  3. samples of the batch do not interact downstream of it. The mode follows *rows*: tensors
     whose dimension 0 is the sample and whose row i depends on sample i only. The input is
     rows; a known row-wise function (elementwise, ``linear``, convolutions, pooling,
     normalization over non-batch dimensions, reshapes that keep dimension 0, reductions and
     softmax over other dimensions, ...) of rows and constants is rows. When the output is
     rows, no sample can influence another's output and check 3 holds for every layer with
     no further work. Any other function applied to rows (``einsum``, a transpose of
     dimension 0, ``.item()``, a full reduction, ...) ends the proof, and check 3 falls back to
     autograd: zero probes added to the layers' outputs in the same forward, then one
     backward of a cotangent on sample 0 alone, which must leave the other samples' probes
     at zero.

So the probe costs one forward pass on at most three samples, plus one backward of those three
samples only for models outside the traced row-wise vocabulary. :data:`PROBE_COUNTS` counts
both (for tests and benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._types import Params
from ..problem import Model
from ..seeding import generator as seeded_generator
from ._batch import Inputs, rows_of, sample_numel
from .structured import Layer

PROBE_COUNTS = {"forwards": 0, "backwards": 0}
"""Forward and backward passes run by probes in this process (never reset by the library)."""


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured (independent of the parameter values)."""

    k: int
    act: int  # bytes of intermediate outputs per sample
    layers: tuple[tuple[str, int, int, int], ...]  # verified: (path, positions, d_in, d_out)
    rejected: tuple[str, ...]
    forwards: int
    backwards: int


# ----------------------------------------------------------------------------------------------
# the row-wise vocabulary

_META = frozenset({
    "size", "dim", "ndim", "ndimension", "shape", "dtype", "device", "is_floating_point",
    "is_complex", "numel", "nelement", "stride", "is_contiguous", "requires_grad", "layout",
    "element_size", "__len__", "is_cuda", "is_meta", "is_leaf", "grad_fn", "get_device",
    "storage_offset", "is_sparse", "names", "_version", "is_quantized", "is_mkldnn",
    "is_nested", "itemsize", "nbytes",
})
_CONST = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
})
_ELEMENTWISE = frozenset({
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "rsub", "neg",
    "negative", "relu", "relu6", "tanh", "sigmoid", "gelu", "silu", "elu", "selu", "celu",
    "leaky_relu", "softplus", "softsign", "mish", "hardtanh", "hardswish", "hardsigmoid",
    "logsigmoid", "tanhshrink", "softshrink", "hardshrink", "threshold", "exp", "exp2",
    "expm1", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "sinh", "cosh", "asin",
    "acos", "atan", "atan2", "abs", "absolute", "pow", "float_power", "sqrt", "rsqrt",
    "square", "reciprocal", "sign", "sgn", "clamp", "clip", "clamp_min", "clamp_max", "where",
    "maximum", "minimum", "fmax", "fmin", "erf", "erfc", "erfinv", "floor", "ceil", "round",
    "trunc", "frac", "fmod", "remainder", "lerp", "addcmul", "addcdiv", "masked_fill", "gt",
    "lt", "ge", "le", "eq", "ne", "greater", "less", "logical_and", "logical_or",
    "logical_not", "logical_xor", "isnan", "isinf", "isfinite", "nan_to_num", "prelu", "rrelu",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
    "dropout3d", "to", "type", "float", "double", "half", "bfloat16", "detach", "clone",
    "contiguous", "requires_grad_", "data", "type_as", "real", "xlogy", "hypot", "logaddexp",
    "sinc", "digamma", "lgamma", "sigmoid_", "tanh_", "relu_", "add_", "sub_", "mul_", "div_",
    "clamp_", "neg_", "exp_", "pow_", "masked_fill_", "leaky_relu_", "elu_", "hardtanh_",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
    "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__",
    "__rfloordiv__", "__mod__", "__neg__", "__pos__", "__pow__", "__rpow__", "__ipow__",
    "__abs__", "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "__and__",
    "__or__", "__xor__", "__invert__", "__rand__", "__ror__",
})
# the first argument is rows; every other tensor argument must be a constant
_FIRST = {  # name → least number of dimensions of the rows argument
    "linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5, "conv_transpose1d": 3,
    "conv_transpose2d": 4, "conv_transpose3d": 5, "group_norm": 2, "instance_norm": 3,
    "local_response_norm": 3, "embedding": 1, "max_pool1d": 3, "max_pool2d": 4,
    "max_pool3d": 5, "max_pool1d_with_indices": 3, "max_pool2d_with_indices": 4,
    "max_pool3d_with_indices": 5, "avg_pool1d": 3, "avg_pool2d": 4, "avg_pool3d": 5,
    "adaptive_avg_pool1d": 3, "adaptive_avg_pool2d": 4, "adaptive_avg_pool3d": 5,
    "adaptive_max_pool1d": 3, "adaptive_max_pool2d": 4, "adaptive_max_pool3d": 5,
    "adaptive_max_pool1d_with_indices": 3, "adaptive_max_pool2d_with_indices": 4,
    "adaptive_max_pool3d_with_indices": 5, "lp_pool1d": 3, "lp_pool2d": 4,
    "pixel_shuffle": 4, "pixel_unshuffle": 4, "interpolate": 3, "upsample": 3,
    "channel_shuffle": 3,
}
# reshapes that keep dimension 0 when both ends have it (row-major order keeps rows together)
_RESHAPE = frozenset({
    "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
    "unsqueeze", "squeeze_", "unsqueeze_", "ravel",
})
# name → (position of the dimension argument after the tensor, default); dim 0 is refused
_DIMS = {
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "normalize": (2, 1),
    "cumsum": (1, None), "cumprod": (1, None), "logcumsumexp": (1, None), "glu": (1, -1),
    "sum": (1, None), "mean": (1, None), "nansum": (1, None), "nanmean": (1, None),
    "amax": (1, None), "amin": (1, None), "prod": (1, None), "logsumexp": (1, None),
    "var": (1, None), "std": (1, None), "argmax": (1, None), "argmin": (1, None),
    "any": (1, None), "all": (1, None), "count_nonzero": (1, None), "median": (1, None),
    "norm": (2, None), "max": (1, None), "min": (1, None), "flip": (1, None),
    "roll": (2, None), "split": (2, 0), "chunk": (2, 0), "tensor_split": (2, 0),
    "narrow": (1, None), "select": (1, None), "unbind": (1, 0), "cat": (1, 0),
    "concat": (1, 0), "concatenate": (1, 0), "stack": (1, 0), "transpose": (1, None),
    "swapaxes": (1, None), "swapdims": (1, None), "movedim": (1, None),
    "moveaxis": (1, None), "sort": (1, -1), "topk": (2, -1), "cummax": (1, None),
    "cummin": (1, None), "diff": (2, -1),
}
_DIM_KW = ("dim", "dims", "axis", "source", "destination", "dim0", "dim1")
_INPLACE_DUNDER = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__",
                             "__iand__", "__ior__", "__ixor__", "__ifloordiv__", "__imod__"})
_MATMUL = frozenset({"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"})


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):  # a property: Tensor.T.__get__ and the like
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _dims_of(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _index_keeps_rows(idx, ndim: int) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items):
        return False  # advanced (tensor or list) indexing can move or mix dimension 0
    if not items:
        return True
    first = items[0]
    if isinstance(first, slice):
        return first == slice(None)
    if first is Ellipsis:
        used = sum(1 for i in items[1:] if i is not None and i is not Ellipsis)
        return used < ndim
    return False


class _RowTracer(TorchFunctionMode):
    """Rows through the forward (see the module docstring) and candidate parameter uses."""

    def __init__(self, b: int, inputs: list[Tensor], owner: dict[int, int]) -> None:
        super().__init__()
        self.b = b
        self.rows: dict[int, Tensor] = {id(x): x for x in inputs}  # strong refs: ids valid
        self.broken: str | None = None  # the first function that ended the row proof
        self.owner = owner  # id(parameter tensor) → candidate index
        self.active: list[int] = []  # candidates whose forward is running, innermost last
        self.outside: set[int] = set()
        self.paused = 0

    def is_rows(self, t) -> bool:
        return isinstance(t, Tensor) and id(t) in self.rows

    def mark(self, t: Tensor) -> None:
        self.rows[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = _name(func)
        if name in _META:
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        for t in tensors:
            i = self.owner.get(id(t))
            if i is not None and (not self.active or self.active[-1] != i):
                self.outside.add(i)
        if self.broken is None and any(self.is_rows(t) for t in tensors):
            verdict = self._rowwise(func, name, args, kwargs, out)
            if verdict == "rows":
                for t in tree_leaves(out):
                    if isinstance(t, Tensor):
                        self.mark(t)
            elif verdict != "const":
                self.broken = name or repr(func)
        return out

    def _rowwise(self, func, name: str, args, kwargs, out) -> str:  # noqa: C901, PLR0911
        if name in _CONST:
            return "const"
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not outs or any(o.dim() == 0 or o.shape[0] != self.b for o in outs):
            return ""
        a0 = args[0] if args else None
        rows = [t for t in tree_leaves((args, kwargs)) if self.is_rows(t)]
        nd = outs[0].dim()
        inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDER
        if inplace and not self.is_rows(a0):
            return ""  # a constant overwritten with rows: its other views would escape
        if name in _ELEMENTWISE or (name in ("max", "min") and len(args) > 1
                                      and isinstance(args[1], Tensor)):
            return "rows" if all(t.dim() == nd for t in rows) else ""
        if func is F.unfold:
            return "rows" if self.is_rows(a0) and len(rows) == 1 and a0.dim() == 4 else ""  # type: ignore[union-attr]
        if name in _FIRST:
            ok = self.is_rows(a0) and len(rows) == 1 and a0.dim() >= _FIRST[name]  # type: ignore[union-attr]
            return "rows" if ok else ""
        if not self.is_rows(a0) and name not in ("cat", "concat", "concatenate", "stack",
                                                 "__rmatmul__", "matmul", "mm", "bmm",
                                                 "scaled_dot_product_attention"):
            return ""
        if name in _MATMUL:
            a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
            ra, rb = self.is_rows(a), self.is_rows(b)
            if ra and rb:
                return "rows" if a.dim() >= 3 and a.dim() == b.dim() else ""
            if ra:
                return "rows" if a.dim() >= 2 and b.dim() <= a.dim() else ""
            return "rows" if b.dim() >= 3 and a.dim() <= b.dim() else ""
        if name == "scaled_dot_product_attention":
            return "rows" if all(t.dim() >= 3 and t.dim() == nd for t in rows) else ""
        if name == "layer_norm":
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            count = len(shape) if isinstance(shape, list | tuple) else 1
            return "rows" if len(rows) == 1 and a0.dim() > count else ""  # type: ignore[union-attr]
        if name == "batch_norm":
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            return "rows" if len(rows) == 1 and not training and a0.dim() >= 2 else ""  # type: ignore[union-attr]
        if name == "pad":
            pad = args[1] if len(args) > 1 else kwargs.get("pad", ())
            return "rows" if len(rows) == 1 and len(pad) <= 2 * (a0.dim() - 1) else ""  # type: ignore[union-attr]
        if name in _RESHAPE:
            return "rows" if len(rows) == 1 and a0.shape[0] == self.b else ""  # type: ignore[union-attr]
        if name in ("expand", "expand_as", "broadcast_to"):
            return "rows" if len(rows) == 1 and a0.dim() == nd else ""  # type: ignore[union-attr]
        if name == "repeat":
            sizes = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            return "rows" if len(rows) == 1 and len(sizes) == a0.dim() and sizes[0] == 1 else ""  # type: ignore[union-attr]
        if name == "__getitem__":
            return "rows" if len(rows) == 1 and _index_keeps_rows(args[1], a0.dim()) else ""  # type: ignore[union-attr]
        if name == "permute":
            dims = args[1:] if len(args) > 1 and isinstance(args[1], int) else \
                (args[1] if len(args) > 1 else kwargs.get("dims"))
            return "rows" if len(rows) == 1 and dims and dims[0] % a0.dim() == 0 else ""  # type: ignore[union-attr]
        if name in ("mT", "mH"):
            return "rows" if a0.dim() >= 3 else ""  # type: ignore[union-attr]
        if name in _DIMS:
            return self._dim_op(name, args, kwargs, rows, nd)
        return ""

    def _dim_op(self, name: str, args, kwargs, rows, nd: int) -> str:
        pos, default = _DIMS[name]
        lists = name in ("cat", "concat", "concatenate", "stack")
        a0 = args[0]
        ref = nd if name == "stack" else (a0[0].dim() if lists else a0.dim())
        if not lists and len(rows) != 1:
            return ""
        if lists and not all(t.dim() == ref for t in rows):
            return ""
        if name in ("transpose", "swapaxes", "swapdims", "movedim", "moveaxis"):
            chosen = [d for v in (*args[1:3], *(kwargs.get(k) for k in _DIM_KW))
                      for d in (_dims_of(v) or [])]
        else:
            value = args[pos] if len(args) > pos else next(
                (kwargs[k] for k in _DIM_KW if k in kwargs), default)
            if name in ("max", "min") and value is None:
                return ""  # the whole tensor: one value
            chosen = _dims_of(value)  # type: ignore[assignment]
        if not chosen or ref == 0:
            return ""
        return "" if any(d % ref == 0 for d in chosen) else "rows"


def _expected_dims(m: nn.Module) -> int | None:
    if isinstance(m, nn.Conv1d):
        return 3
    if isinstance(m, nn.Conv2d):
        return 4
    return None


def run_probe(model: Model, params: Params, layers: list[Layer], x: Inputs,
              generator: torch.Generator | None = None) -> tuple[ProbeResult, list[Layer]]:
    """One traced forward on ``x`` (the probe batch; every entry of named inputs is rows);
    see the module docstring.

    Returns the result and the verified layers (``layers`` with positions and widths set).
    """
    b = x.shape[0]
    leaves = {n: v.detach() for n, v in params.items()}
    mods = [] if model.module is None else \
        [m for m in model.module.modules() if not list(m.children())]
    count = [0]
    owner: dict[int, int] = {}
    for i, ly in enumerate(layers):
        for n in (ly.weight, ly.bias):
            if n is not None:
                owner[id(leaves[n])] = i
    tracer = _RowTracer(b, rows_of(x), owner)
    shapes: list[list[tuple[int, int, int]]] = [[] for _ in layers]
    probes: list[list[Tensor]] = [[] for _ in layers]
    bad: set[int] = set()

    def counter(_m, _a, o) -> None:
        if isinstance(o, Tensor):
            count[0] += o.numel()

    def pre(i: int):
        def hook(_m, _args) -> None:
            tracer.active.append(i)
        return hook

    def post(i: int):
        def hook(mod: nn.Module, args: tuple, out) -> Tensor | None:
            tracer.active.pop()
            tracer.paused += 1
            try:
                a = args[0] if args else None
                want = _expected_dims(mod)
                if not isinstance(a, Tensor) or not isinstance(out, Tensor) or a.dim() < 2 \
                        or a.shape[0] != b or out.shape[0] != b \
                        or (want is not None and a.dim() != want):
                    bad.add(i)
                    return None
                if isinstance(mod, nn.Linear):
                    shapes[i].append((math.prod(a.shape[1:-1]), a.shape[-1], out.shape[-1]))
                else:
                    din = mod.in_channels // mod.groups * math.prod(mod.kernel_size)  # type: ignore[arg-type, operator]
                    shapes[i].append((math.prod(out.shape[2:]), din, out.shape[1]))
                p = torch.zeros_like(out, requires_grad=True)
                probes[i].append(p)
                new = out + p
                if tracer.is_rows(out):
                    tracer.mark(new)
                return new
            finally:
                tracer.paused -= 1
        return hook

    handles = [m.register_forward_hook(counter) for m in mods]
    for i, ly in enumerate(layers):
        handles.append(ly.module.register_forward_pre_hook(pre(i)))
        handles.append(ly.module.register_forward_hook(post(i)))
    try:
        with torch.enable_grad(), tracer:
            PROBE_COUNTS["forwards"] += 1
            out = model(leaves, x)
    finally:
        for h in handles:
            h.remove()
    if not torch.is_floating_point(out):
        raise ValueError("the model's output is not floating point: no tangent kernel")
    k = int(out.shape[1])
    item = out.element_size()
    per_sample = sample_numel(x)
    act = (max(1, count[0] // b) + per_sample) * item if mods else \
        16 * item * (per_sample + 16)
    rejected: list[str] = []
    ok: list[int] = []
    for i, ly in enumerate(layers):
        if i in bad or not probes[i]:
            rejected.append(f"{ly.path} (its forward was not called with the batch in "
                            "dimension 0)")
        elif i in tracer.outside:
            rejected.append(f"{ly.path} (its parameters are also used outside its forward)")
        else:
            ok.append(i)
    backwards = 0
    rows_proved = tracer.broken is None and tracer.is_rows(out)
    tracer.rows.clear()
    if ok and b > 1 and not rows_proved:
        backwards = 1
        mixed = _mixing(out, [probes[i] for i in ok], generator)
        for i, leak in zip(list(ok), mixed, strict=True):
            if leak:
                ok.remove(i)
                rejected.append(f"{layers[i].path} (samples of a batch interact through it)")
    verified = []
    for i in ok:
        ly = layers[i]
        ly.positions = sum(t for t, _, _ in shapes[i])
        ly.d_in, ly.d_out = shapes[i][0][1], shapes[i][0][2]
        verified.append(ly)
    PROBE_COUNTS["backwards"] += backwards
    result = ProbeResult(k, int(act), tuple((ly.path, ly.positions, ly.d_in, ly.d_out)
                                            for ly in verified), tuple(rejected), 1, backwards)
    return result, verified


def _mixing(out: Tensor, probes: list[list[Tensor]], generator) -> list[bool]:
    """Per layer: does a cotangent on sample 0 alone reach other samples' probes?"""
    gen = generator or seeded_generator(1234)
    v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    v0 = torch.zeros_like(v)
    v0[0] = v[0]
    flat = [p for ps in probes for p in ps]
    grads = torch.autograd.grad((out * v0).sum(), flat, allow_unused=True)
    rows, pos = [], 0
    for ps in probes:
        gs = [g for g in grads[pos:pos + len(ps)] if g is not None]
        pos += len(ps)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        leak = sum((g[1:].abs().sum() for g in gs), zero)
        size = sum((g[:1].abs().sum() for g in gs), zero)
        rows.append(torch.stack([leak, size]))
    table = torch.stack(rows).double().cpu().tolist() if rows else []  # one device sync
    tol = 1e-9 if out.dtype == torch.float64 else 1e-4
    return [leak > tol * size and leak > 0 for leak, size in table]
