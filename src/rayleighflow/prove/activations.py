"""Smooth activations with proven sup|σ′| and sup|σ″|, and σ, σ′ evaluated on balls.

Each constant comes with the argument that bounds it (printed into the proof):

* tanh: σ′ = 1 − tanh² ∈ (0, 1], so sup|σ′| = 1 (at 0); σ″ = −2t(1 − t²) with t = tanh z ∈
  (−1, 1), maximal in modulus at t² = 1/3: sup|σ″| = 4/(3√3).
* softplus log(1 + eᶻ): σ′ = sigmoid ∈ (0, 1); σ″ = s(1 − s) ≤ 1/4.
* sigmoid: σ′ = s(1 − s) ≤ 1/4; σ″ = s(1 − s)(1 − 2s), with s = (1 + v)/2 this is
  −v(1 − v²)/4, maximal in modulus at v² = 1/3: sup|σ″| = 1/(6√3).
* GELU z·Φ(z) (the exact erf form, torch's default): σ′ = Φ + zφ, σ″ = φ(z)(2 − z²),
  σ‴ = φ(z)·z(z² − 4). σ′ → 0, 1 at ∓∞ and is critical at z² = 2: sup|σ′| = Φ(√2) + √2φ(√2)
  (the value at −√2 is Φ(−√2) − √2φ(√2) ∈ (−1, 0)); σ″ is critical at 0, ±2 and → 0:
  sup|σ″| = max(2φ(0), 2φ(2)) = 2φ(0) = √(2/π).

ReLU has no bounded σ″ (σ′ jumps at 0): it is refused, with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._arb import arb

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


@dataclass(frozen=True)
class Activation:
    name: str
    d1: arb          # sup|σ′| (exact, as a ball)
    d2: arb          # sup|σ″|
    how_d1: str
    how_d2: str
    value: Callable[[arb], arb]
    deriv: Callable[[arb], arb]


def _phi(z: arb) -> arb:
    return (-(z * z) / 2).exp() / (2 * arb.pi()).sqrt()


def _Phi(z: arb) -> arb:
    return (1 + (z / arb(2).sqrt()).erf()) / 2


def _sigmoid(z: arb) -> arb:
    return 1 / (1 + (-z).exp())


def _tanh_d1(z: arb) -> arb:
    t = z.tanh()
    return 1 - t * t


_S2 = arb(2).sqrt()

ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(
        "tanh", arb(1), 4 / (3 * arb(3).sqrt()),
        "σ′ = 1 − tanh² ∈ (0, 1], equal to 1 at 0",
        "σ″ = −2t(1 − t²), t = tanh z ∈ (−1, 1); |·| is maximal at t² = 1/3: 4/(3√3)",
        lambda z: z.tanh(), _tanh_d1),
    "softplus": Activation(
        "softplus", arb(1), arb(1) / 4,
        "σ′ = sigmoid ∈ (0, 1)", "σ″ = s(1 − s) ≤ 1/4 with s = sigmoid(z)",
        lambda z: z.exp().log1p() if z < 0 else z + (-z).exp().log1p(), _sigmoid),
    "sigmoid": Activation(
        "sigmoid", arb(1) / 4, 1 / (6 * arb(3).sqrt()),
        "σ′ = s(1 − s) ≤ 1/4", "σ″ = s(1 − s)(1 − 2s) = −v(1 − v²)/4 with s = (1 + v)/2; "
        "|·| is maximal at v² = 1/3: 1/(6√3)",
        _sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "gelu": Activation(
        "gelu", _Phi(_S2) + _S2 * _phi(_S2), 2 * _phi(arb(0)),
        "σ′ = Φ + zφ → 0, 1 at ∓∞, critical at z² = 2; sup|σ′| = Φ(√2) + √2φ(√2)",
        "σ″ = φ(z)(2 − z²), critical at 0 and ±2, → 0 at ±∞: sup|σ″| = 2φ(0) = √(2/π)",
        lambda z: z * _Phi(z), lambda z: _Phi(z) + z * _phi(z)),
}


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no proven sup|σ″|"
                         + (" (ReLU: σ′ jumps at 0, so the Jacobian is not Lipschitz)"
                            if name == "relu" else "")
                         + f"; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
