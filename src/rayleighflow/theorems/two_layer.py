"""Two-layer networks F(w, b, a)(x) = m^{-1/2} Σ_{i≤m} a_i σ(w_i·x + b_i) (THEORY.md R1, R3).

The bias b_i is the w_i·x of the slides with a constant feature appended to x. The m^{-1/2}
(NTK) scaling keeps the tangent kernel of order one as the width m grows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..activations import ACTIVATIONS, activation_spec

__all__ = ["TwoLayer"]


class TwoLayer(nn.Module):
    """m hidden units, k outputs; P = m(d + 1) + mk parameters (no output bias).

    Initialization from an explicit generator: w, b ~ N(0, 1/d) and N(0, 1), a ~ N(0, 1).
    """

    def __init__(self, dim: int, width: int, outputs: int = 1, *, activation: str = "tanh",
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        activation_spec(activation)  # a one-line ValueError naming the registry's activations
        g = generator
        self.width, self.activation = width, activation
        self.hidden = nn.Linear(dim, width, dtype=dtype)
        self.out = nn.Linear(width, outputs, bias=False, dtype=dtype)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, dim, generator=g, dtype=dtype)
                                     / math.sqrt(dim))
            self.hidden.bias.copy_(torch.randn(width, generator=g, dtype=dtype))
            self.out.weight.copy_(torch.randn(outputs, width, generator=g, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        sigma = ACTIVATIONS[self.activation].function
        return self.out(sigma(self.hidden(x))) / math.sqrt(self.width)
