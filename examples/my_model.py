"""A custom model for ``custom_model.toml``: any function returning an ``nn.Module`` works.

rayleighflow calls ``make(**kwargs)`` with the keys of ``[model.kwargs]`` (seeded from the
experiment's ``seed``) and trains the module's parameters through ``torch.func``. LayerNorm is
deterministic (unlike batch-norm in training mode), so certificates apply.

Example:
    >>> import torch
    >>> make(input_dim=13, output_dim=3)(torch.zeros(5, 13)).shape
    torch.Size([5, 3])
"""

from torch import nn


def make(input_dim: int, output_dim: int, width: int = 32) -> nn.Module:
    """Linear → LayerNorm → tanh → Linear."""
    return nn.Sequential(
        nn.Linear(input_dim, width),
        nn.LayerNorm(width),
        nn.Tanh(),
        nn.Linear(width, output_dim),
    )
