"""Which parameters the monitor reads, how they form groups, and model-mode helpers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import final

from torch import Tensor, nn

__all__ = ["ParamLayout", "eval_mode"]


@final
@dataclass(frozen=True)
class ParamLayout:
    """Trainable parameters by name, their groups (one per module by default), and what was left
    out: ``frozen`` lists parameters with ``requires_grad=False`` (excluded: they are not
    trained, so they take no part in the tangent kernel of the training run)."""

    names: tuple[str, ...]
    params: tuple[Tensor, ...]
    groups: dict[str, tuple[int, ...]]      # group -> indices into names
    frozen: tuple[str, ...]
    frozen_numel: int

    @classmethod
    def of(cls, module: nn.Module,
           groups: Mapping[str, Sequence[str]] | None = None) -> ParamLayout:
        names, params, frozen, frozen_numel = [], [], [], 0
        for name, p in module.named_parameters():
            if p.requires_grad:
                names.append(name)
                params.append(p)
            else:
                frozen.append(name)
                frozen_numel += p.numel()
        if not names:
            raise ValueError("the model has no trainable parameter (all have "
                             "requires_grad=False): there is no gradient to monitor")
        index = {n: i for i, n in enumerate(names)}
        if groups is None:
            out: dict[str, list[int]] = {}
            for i, name in enumerate(names):
                out.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(i)
            table = {g: tuple(v) for g, v in out.items()}
        else:
            table, seen = {}, set()
            for g, members in groups.items():
                for m in members:
                    if m not in index:
                        hint = " (it is frozen)" if m in frozen else ""
                        raise ValueError(f"group {g!r} names {m!r}, which is not a trainable "
                                         f"parameter{hint}; trainable: {names}")
                    if m in seen:
                        raise ValueError(f"parameter {m!r} is in two groups: groups must be "
                                         "disjoint")
                    seen.add(m)
                table[g] = tuple(index[m] for m in members)
            missing = [n for n in names if n not in seen]
            if missing:
                raise ValueError(f"parameters {missing} belong to no group: groups must cover "
                                 "every trainable parameter")
        return cls(tuple(names), tuple(params), table, tuple(frozen), frozen_numel)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def group_sums(self, param_sq: Sequence[float]) -> dict[str, float]:
        return {g: float(sum(param_sq[i] for i in idx)) for g, idx in self.groups.items()}


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (no dropout, batch-norm running statistics: a deterministic function
    that updates no buffer), then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
