"""The one seeding rule: a run's seed and a stream name give the generator of that stream.

Every random draw of the experiments and of seeded data subsets goes through :func:`stream_seed`,
so equal seeds give equal runs and different streams (model, data, teacher, flow, …) are
independent. A stream is named in one of three ways, each kept because runs already recorded
depend on it:

* ``None``: the seed itself (seeded data subsets, the demo's network, a sampled probe set);
* an ``int`` offset ``j``: ``seed · 1000003 + j`` (the built-in experiments' numbered streams);
* a ``str`` name: 63 bits of SHA-256 of ``"seed:name"`` (TOML experiments' named streams).

Example:
    >>> stream_seed(7), stream_seed(7, 2), stream_seed(0, "model") == stream_seed(0, "model")
    (7, 7000023, True)
    >>> g = generator(7, "data")
    >>> float(torch.rand(1, generator=g)) == float(torch.rand(1, generator=generator(7, "data")))
    True
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["stream_seed", "generator", "numpy_rng", "seed_torch"]

_OFFSET_STRIDE = 1_000_003


def stream_seed(seed: int, stream: str | int | None = None) -> int:
    """The seed of ``stream`` within the run seeded ``seed`` (see the module docstring)."""
    if stream is None:
        return int(seed)
    if isinstance(stream, str):
        digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)
    return int(seed) * _OFFSET_STRIDE + int(stream)


def generator(seed: int, stream: str | int | None = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for ``stream``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def numpy_rng(seed: int, stream: str | int | None = None) -> np.random.Generator:
    """A NumPy generator seeded for ``stream``."""
    return np.random.default_rng(stream_seed(seed, stream))


def seed_torch(seed: int, stream: str | int | None = None) -> None:
    """Seed torch's global generator for ``stream`` (for modules whose constructors draw from it,
    such as ``nn.Linear``)."""
    torch.manual_seed(stream_seed(seed, stream))
