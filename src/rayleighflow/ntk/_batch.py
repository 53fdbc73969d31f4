"""Named inputs: a mapping of tensors that share the batch dimension (Hugging Face style).

A model whose forward takes keyword inputs, ``module(input_ids=..., attention_mask=...)``, is
given its inputs as a ``Mapping[str, Tensor]``, every tensor with the samples in dimension 0.
:class:`Batch` is that mapping after the checks: rows are sliced together (``batch[s:e]``),
``batch.shape`` is the batch dimension ``(n,)`` only, and the module is called
``module(**batch)`` (``rayleighflow.problem.Model``). Integer entries (token ids, attention
masks) are inputs, never differentiated; floating entries are cast to the parameters' dtype, as
a tensor input is. Internal: users pass plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, final, overload

import torch
from torch import Tensor

__all__ = ["Batch", "Inputs", "as_batch", "rows_of", "sample_numel"]


@final
class Batch(Mapping[str, Tensor]):
    """Input tensors by name, all with the same leading batch size n (checked by
    :func:`as_batch`). A Mapping of the entries; indexing with a slice takes rows."""

    __slots__ = ("_data", "_n")

    def __init__(self, data: dict[str, Tensor], n: int) -> None:
        self._data, self._n = data, n  # trusted: as_batch checks

    @overload
    def __getitem__(self, key: str) -> Tensor: ...

    @overload
    def __getitem__(self, key: slice) -> Batch: ...

    def __getitem__(self, key: str | slice) -> Tensor | Batch:
        if isinstance(key, slice):
            data = {k: v[key] for k, v in self._data.items()}
            return Batch(data, int(next(iter(data.values())).shape[0]))
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)  # the number of entries (a Mapping's length); n is shape[0]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                          for k, v in self._data.items())
        return f"Batch(n={self._n}, {{{inner}}})"

    @property
    def n(self) -> int:
        return self._n

    @property
    def shape(self) -> torch.Size:
        """The batch dimension only, ``(n,)`` (so that ``x.shape[0]`` reads n)."""
        return torch.Size((self._n,))

    @property
    def device(self) -> torch.device:
        return next(iter(self._data.values())).device

    def as_dict(self) -> dict[str, Tensor]:
        """The entries as a plain dict (a pytree ``torch.func.vmap`` maps over; not a copy)."""
        return self._data

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Batch:
        """Every entry moved to ``device``; floating entries cast to ``dtype``."""
        data = {k: v.to(device=device, dtype=dtype) if dtype is not None
                and v.is_floating_point() else v.to(device) for k, v in self._data.items()}
        return Batch(data, self._n)

    def signature(self) -> tuple:
        """What a planning probe depends on: names, shapes, dtypes and devices."""
        return ("mapping",) + tuple((k, tuple(v.shape), str(v.dtype), str(v.device))
                                    for k, v in self._data.items())

    def sample_numel(self) -> int:
        """Input elements per sample (all entries)."""
        return sum(v[0].numel() for v in self._data.values())

    def sample(self, i: int) -> dict[str, Tensor]:
        """Sample i without its batch dimension (what a function vmapped over samples sees)."""
        return {k: v[i] for k, v in self._data.items()}


Inputs = Tensor | Batch
"""What the NTK engines take: a tensor (n, ...) or a :class:`Batch` of named tensors."""


def as_batch(x: Mapping[Any, Any], name: str) -> Batch:
    """Check a mapping of inputs and wrap it; a ValueError names the entry and the fix."""
    if isinstance(x, Batch):
        return x
    if len(x) == 0:
        raise ValueError(f"{name} is an empty mapping: give the model's inputs by name, e.g. "
                         "{'input_ids': ids, 'attention_mask': mask}, each (n, ...)")
    data: dict[str, Tensor] = {}
    first: tuple[str, int] | None = None
    for key, v in x.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} has the key {key!r} ({type(key).__name__}): the entries "
                             "are passed to the model as keyword arguments, so every key "
                             "must be a str")
        if not isinstance(v, Tensor):
            raise ValueError(f"{name}[{key!r}] is a {type(v).__name__}, not a Tensor: every "
                             "entry of an input mapping must be a tensor with the samples in "
                             "dimension 0 (shape (n, ...)); convert it with torch.as_tensor, "
                             "or set a fixed argument inside the module (a wrapper module "
                             "whose forward passes it)")
        if v.dim() == 0:
            raise ValueError(f"{name}[{key!r}] is a 0-dimensional tensor: every entry of an "
                             "input mapping needs the samples in dimension 0 (shape (n, ...))")
        rows = int(v.shape[0])
        if first is None:
            first = (key, rows)
        elif rows != first[1]:
            raise ValueError(f"{name}[{key!r}] has {rows} rows but {name}[{first[0]!r}] has "
                             f"{first[1]}: every entry of an input mapping needs the same "
                             "number of samples n in dimension 0 (pad or slice them "
                             "together)")
        data[key] = v
    assert first is not None
    if first[1] == 0:
        raise ValueError(f"{name} is empty: give at least one sample (entries of shape "
                         "(n, ...), n >= 1)")
    return Batch(data, first[1])


def sample_numel(x: Inputs) -> int:
    """Input elements per sample of a tensor (n, ...) or a Batch."""
    return x[0].numel() if isinstance(x, Tensor) else x.sample_numel()


def rows_of(x: Inputs) -> list[Tensor]:
    """The tensors whose dimension 0 is the sample: x itself, or every entry of a Batch."""
    return [x] if isinstance(x, Tensor) else list(x.values())
