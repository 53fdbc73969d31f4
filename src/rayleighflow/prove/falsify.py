"""Sampled falsification of a proof's constants (not a proof: float64 measurements).

For θ drawn in B(θ₀, r) — uniform directions at radii spread over (0, r], and directions
concentrated on one hidden unit (where the Jacobian's Lipschitz bound is nearly attained) — and
for given points (e.g. along an actual run), measure

* ‖J_θ − J₀‖₂ / ‖θ − θ₀‖   against Lip_J,
* ‖f_θ − f₀‖_D / ‖θ − θ₀‖  against Lip_F(r),
* R(K_θ; ∇ℓ(f_θ))          against ρ, where the proof claims it (L(θ) ≤ L₀; everywhere in B for
  the definite route),

and report the worst case of each. Given a deliberately wrong constant (Lip_J/100) the same
sampler must find a counterexample: that is what makes the check able to fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.func import jacrev

from .._io import finite_or_none
from ..data import Dataset
from ..problem import Problem
from ..seeding import generator as seeded_generator

__all__ = ["Falsification", "ProofFalsification", "falsify", "falsify_proof", "ModelProbe"]


class ModelProbe:
    """J_θ (rows weighted by √ω_j), f_θ and the loss of a problem at any flat θ."""

    def __init__(self, problem: Problem, data: Dataset | None = None) -> None:
        self.problem = problem
        self.data = problem.data if data is None else data
        self.names = list(problem.params)
        self.shapes = [problem.params[n].shape for n in self.names]
        self.theta0 = self.flat(problem.params)
        w = problem.omega(self.data).to(self.theta0.dtype)  # type: ignore[arg-type]
        self.sqrt_w = w.sqrt()
        f0 = self.f(self.theta0)
        self.y = problem.targets(self.data, f0)  # type: ignore[arg-type]
        self.j0 = self.jac(self.theta0)
        self.f0 = f0

    def flat(self, params) -> torch.Tensor:
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).clone()

    def unflat(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            k = math.prod(s)
            out[n] = theta[i:i + k].reshape(s)
            i += k
        return out

    def f(self, theta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.problem.model(self.unflat(theta), self.data.x)  # type: ignore[union-attr]

    def jac(self, theta: torch.Tensor) -> torch.Tensor:
        def fn(t):
            return self.problem.model(self.unflat(t), self.data.x)
        j = jacrev(fn)(theta)                       # (n, k, P)
        return (j * self.sqrt_w[:, None, None]).reshape(-1, theta.numel())

    def norm_d(self, u: torch.Tensor) -> float:
        return float(((u * self.sqrt_w[:, None]) ** 2).sum().sqrt())

    def loss(self, theta: torch.Tensor) -> float:
        f = self.f(theta)
        return float(self.problem.loss.value(f, self.y, self.sqrt_w ** 2))

    def rayleigh(self, theta: torch.Tensor) -> tuple[float, float]:
        """(R(K_θ; ∇ℓ), L(θ)) with the problem's loss."""
        f = self.f(theta)
        g = self.problem.loss.functional_grad(f, self.y)
        gt = (g * self.sqrt_w[:, None]).reshape(-1)
        jg = self.jac(theta).T @ gt
        loss = float(self.problem.loss.value(f, self.y, self.sqrt_w ** 2))
        return float(jg @ jg / (gt @ gt)), loss


@dataclass
class Falsification:
    samples: int
    max_lip_j_ratio: float
    max_lip_f_ratio: float
    min_rayleigh: float           # over the points where the proof claims R ≥ ρ
    rayleigh_points: int
    counterexamples: list[str] = field(default_factory=list)

    @property
    def falsified(self) -> bool:
        return bool(self.counterexamples)


def _directions(probe: ModelProbe, radius: float, n: int, g: torch.Generator):
    P = probe.theta0.numel()
    dtype = probe.theta0.dtype
    # which coordinates belong to one hidden unit (TwoLayer naming), for concentrated steps
    units = None
    sizes = dict(zip(probe.names, [math.prod(s) for s in probe.shapes], strict=True))
    if "hidden.weight" in sizes:
        m, d = probe.shapes[probe.names.index("hidden.weight")]
        offs, i = {}, 0
        for nme in probe.names:
            offs[nme] = i
            i += sizes[nme]
        units = []
        for u in range(m):
            idx = list(range(offs["hidden.weight"] + u * d, offs["hidden.weight"] + (u + 1) * d))
            if "hidden.bias" in offs:
                idx.append(offs["hidden.bias"] + u)
            if "out.weight" in offs:
                k = probe.shapes[probe.names.index("out.weight")][0]
                idx += [offs["out.weight"] + c * m + u for c in range(k)]
            units.append(torch.tensor(idx))
    rows = probe.j0                                   # (nk, P): its row space is where f moves
    top_unit = None
    if units is not None and "out.weight" in sizes:
        a = probe.problem.params["out.weight"].detach().reshape(-1, m)
        top_unit = int(a.norm(dim=0).argmax())
    x = probe.data.x.to(dtype)  # type: ignore[union-attr]
    for s in range(n):
        v = torch.randn(P, generator=g, dtype=dtype)
        if s % 8 == 7 and top_unit is not None:
            # near the worst case of the Lip_J bound: the unit with the largest output weight,
            # its input weights along one sample's x̃, a small step (the slope, not the chord)
            j = int(torch.randint(x.shape[0], (1,), generator=g))
            v = torch.zeros(P, dtype=dtype)
            w0 = offs["hidden.weight"] + top_unit * d
            v[w0:w0 + d] = x[j]
            if "hidden.bias" in offs:
                v[offs["hidden.bias"] + top_unit] = 1.0
            v = v / v.norm()
            yield v * radius * 10 ** float(-3 * torch.rand(1, generator=g, dtype=dtype))
            continue
        if s % 4 == 2:
            v = rows.T @ torch.randn(rows.shape[0], generator=g, dtype=dtype)
        elif units is not None and s % 2 == 1:
            mask = torch.zeros(P, dtype=dtype)
            mask[units[int(torch.randint(len(units), (1,), generator=g))]] = 1
            v = v * mask
        v = v / v.norm()
        rad = radius * float(torch.rand(1, generator=g, dtype=dtype)) ** 0.5
        yield v * max(rad, radius * 1e-3)


def falsify(problem: Problem, *, radius: float, lip_j: float, lip_f: float, rho: float,
            loss0: float, rho_everywhere: bool = False, samples: int = 64,
            points: Iterable[torch.Tensor] = (), generator: torch.Generator | None = None,
            data: Dataset | None = None, rtol: float = 1e-9) -> Falsification:
    """Search for θ in B(θ₀, radius) (plus ``points``, flat parameter vectors) that beat the
    constants; ``rtol`` absorbs the float64 error of the measurements themselves."""
    g = generator if generator is not None else seeded_generator(0)
    probe = ModelProbe(problem, data)
    steps = list(_directions(probe, radius, samples, g))
    thetas = [probe.theta0 + s for s in steps] + [p.to(probe.theta0.dtype) for p in points]
    out = Falsification(0, 0.0, 0.0, math.inf, 0)
    for theta in thetas:
        d = float((theta - probe.theta0).norm())
        if d == 0 or d > radius * (1 + 1e-12):
            continue
        out.samples += 1
        dj = torch.linalg.matrix_norm(probe.jac(theta) - probe.j0, ord=2)
        rj = float(dj) / d
        rf = probe.norm_d(probe.f(theta) - probe.f0) / d
        out.max_lip_j_ratio = max(out.max_lip_j_ratio, rj)
        out.max_lip_f_ratio = max(out.max_lip_f_ratio, rf)
        if rj > lip_j * (1 + rtol):
            out.counterexamples.append(f"‖J_θ − J₀‖/‖θ − θ₀‖ = {rj:.6g} > Lip_J = {lip_j:.6g} "
                                       f"at ‖θ − θ₀‖ = {d:.4g}")
        if rf > lip_f * (1 + rtol):
            out.counterexamples.append(f"‖f_θ − f₀‖_D/‖θ − θ₀‖ = {rf:.6g} > Lip_F = {lip_f:.6g}"
                                       f" at ‖θ − θ₀‖ = {d:.4g}")
        r_val, loss = probe.rayleigh(theta)
        if rho_everywhere or loss <= loss0:
            out.rayleigh_points += 1
            out.min_rayleigh = min(out.min_rayleigh, r_val)
            if r_val < rho * (1 - rtol):
                out.counterexamples.append(f"R(K_θ; ∇ℓ) = {r_val:.6g} < ρ = {rho:.6g} at "
                                           f"‖θ − θ₀‖ = {d:.4g}, L = {loss:.4g}")
    return out


@dataclass
class ProofFalsification:
    """:func:`falsify` over a proof's phases (first, middle, last): each phase claims
    R ≥ ρ_k on B(θ₀, r_k) ∩ {L ≤ L_top,k} (everywhere in its ball for the definite route)."""

    phases_checked: int
    samples: int
    max_lip_j_ratio: float
    lip_j: float
    max_lip_f_margin: float        # max over points of (measured ratio)/(that phase's Lip_F)
    min_rayleigh_margin: float     # min over points of R/ρ_k (≥ 1 passes)
    rayleigh_points: int
    counterexamples: list[str]

    @property
    def falsified(self) -> bool:
        return bool(self.counterexamples)

    def to_dict(self) -> dict:
        return {**self.__dict__, "min_rayleigh_margin": finite_or_none(self.min_rayleigh_margin)}


def falsify_proof(problem: Problem, proof, *, samples: int = 24,
                  points: Iterable[torch.Tensor] = (), generator: torch.Generator | None = None,
                  lip_j_factor: float = 1.0, rho_factor: float = 1.0,
                  data: Dataset | None = None) -> ProofFalsification:
    """Sample every constant a proof relies on; ``lip_j_factor`` / ``rho_factor`` ≠ 1 make a
    deliberately wrong constant (the check must then fail)."""
    c = proof.constants
    phases = proof.phases
    picks = sorted({0, len(phases) // 2, len(phases) - 1})
    points = list(points)
    g = generator if generator is not None else seeded_generator(0)
    out = ProofFalsification(len(picks), 0, 0.0, c.lip_j * lip_j_factor, 0.0, math.inf, 0, [])
    per = max(1, samples // len(picks))
    for k in picks:
        ph = phases[k]
        top = c.loss0 if k == 0 else ph.loss_top
        f = falsify(problem, radius=ph.r, lip_j=c.lip_j * lip_j_factor, lip_f=ph.lip_f,
                    rho=ph.rho * rho_factor, loss0=top, rho_everywhere=ph.route == "definite",
                    samples=per, points=points, generator=g, data=data)
        out.samples += f.samples
        out.max_lip_j_ratio = max(out.max_lip_j_ratio, f.max_lip_j_ratio)
        out.max_lip_f_margin = max(out.max_lip_f_margin, f.max_lip_f_ratio / ph.lip_f)
        if f.rayleigh_points:
            out.min_rayleigh_margin = min(out.min_rayleigh_margin,
                                          f.min_rayleigh / (ph.rho * rho_factor))
        out.rayleigh_points += f.rayleigh_points
        out.counterexamples += [f"phase {k + 1}: {x}" for x in f.counterexamples]
    return out
