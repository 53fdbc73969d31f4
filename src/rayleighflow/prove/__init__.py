"""Proof-grade certificates (scope PROVEN): a lower bound on R(K_θ; ∇ℓ) over a parameter ball,
in outward-rounded arithmetic, plus the finite length of the flow (issue 10; THEORY.md T3–T5).

``prove(problem, radius=None, target=None)`` returns a :class:`~rayleighflow.Certificate`;
``prove_details`` returns the :class:`Proof` with every constant, the search and the timing.
"""

from ._proof import Constants, Proof, rho_at
from .core import proof_constants, prove, prove_details
from .models import UnsupportedModel

__all__ = ["Constants", "Proof", "UnsupportedModel", "proof_constants", "prove",
           "prove_details", "rho_at"]
