"""Issue 17: a battery of random and degenerate proofs, each `holds` checked against an
independent accurate flow.

The flow is written here, not taken from the library: θ̇ = −∇L(θ) with L evaluated by torch's
own forward of the module (torch.func.functional_call, float64) and the loss written out
below, integrated by scipy's DOP853 at rtol 1e-12. Along it, at dense times up to the proof's
horizon, the loss must stay under the proven bound and θ inside the proven ball (a relative
slack of 1e-7 for the reference flow's own error). The full battery (300 problems) is marked
slow; the default suite runs a fixed sample of it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch import nn
from torch.func import functional_call

import rayleighflow as rf
from rayleighflow.prove import prove_details
from rayleighflow.theorems.two_layer import TwoLayer

ACTS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
SLACK = 1e-7
N_CASES = 300


def _case(i: int):
    """Problem i of the battery: (module, x, y, loss name), all float64."""
    rng = np.random.default_rng(10_000 + i)
    g = torch.Generator().manual_seed(10_000 + i)
    kind = i % 6
    n = int(rng.integers(1, 10))
    d = int(rng.integers(1, 4))
    act = list(ACTS)[i % 4]
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    loss = "square"
    k = 1
    if kind == 0:
        net = TwoLayer(d, int(rng.choice([2, 8, 64, 512])), activation=act, generator=g)
    elif kind == 1:
        m = int(rng.choice([4, 32, 256]))
        net = nn.Sequential(nn.Linear(d, m), ACTS[act](), nn.Linear(m, 1, bias=bool(i % 2)))
        net = net.double()
        with torch.no_grad():
            net[2].weight.mul_(float(rng.choice([0.1, 1.0, 3.0])))
    elif kind == 2:
        net = nn.Linear(d, 1, bias=bool(i % 3)).double()
        n = int(rng.integers(1, 12))
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == 3:
        k = 3
        net = TwoLayer(d, int(rng.choice([16, 128])), outputs=k, activation=act, generator=g)
        loss = "cross-entropy"
    elif kind == 4:
        k = 3
        net = nn.Linear(d + 4, k).double()
        x = torch.randn(n, d + 4, generator=g, dtype=torch.float64)
        loss = "cross-entropy"
    else:   # degenerate: repeated inputs, zero inputs, a frozen layer, scales far from 1
        net = TwoLayer(d, int(rng.choice([4, 64])), activation=act, generator=g)
        variant = (i // 6) % 4
        if variant == 0:
            x = x[:1].repeat(n, 1)
        elif variant == 1:
            x = torch.zeros(n, d, dtype=torch.float64)
        elif variant == 2:
            net.out.weight.requires_grad_(False)
        else:
            x = x * float(rng.choice([1e-3, 30.0]))
    if loss == "square":
        with torch.no_grad():
            f0 = net(x).reshape(n, -1)
        noise = float(rng.choice([0.0, 1e-3, 0.05, 0.5]))
        y = f0 + noise * torch.randn(f0.shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, k, (n,), generator=g)
    return net, x, y, loss


def _reference_flow(net: nn.Module, x, y, loss: str, trained: list[str], t_eval: np.ndarray):
    """(L, ‖θ − θ₀‖) at t_eval along θ̇ = −∇L, by DOP853 at rtol 1e-12."""
    named = dict(net.named_parameters())
    shapes = [named[k].shape for k in trained]
    sizes = [named[k].numel() for k in trained]
    theta0 = torch.cat([named[k].detach().reshape(-1) for k in trained])
    n = x.shape[0]

    def L(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        params = {k: p.reshape(s) for k, p, s in zip(trained, parts, shapes, strict=True)}
        f = functional_call(net, params, (x,)).reshape(n, -1)
        if loss == "square":
            return 0.5 * ((f - y) ** 2).sum(-1).mean()
        return (torch.logsumexp(f, -1) - f.gather(1, y[:, None]).squeeze(1)).mean()

    def rhs(_t, th):
        theta = torch.tensor(th, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(L(theta), theta)
        return -grad.numpy()

    sol = solve_ivp(rhs, (0.0, float(t_eval[-1])), theta0.numpy(), method="DOP853",
                    t_eval=t_eval, rtol=1e-12, atol=1e-14)
    assert sol.success, sol.message
    losses = np.array([float(L(torch.tensor(th))) for th in sol.y.T])
    dist = np.linalg.norm(sol.y.T - theta0.numpy(), axis=1)
    return losses, dist


def _check(i: int) -> str:
    """'holds' (and checked), or the status of the proof."""
    net, x, y, loss = _case(i)
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), loss)
    trained = list(problem.params)
    proof = prove_details(problem)
    cert = proof.certificate
    if not cert.holds:
        assert cert.reason is not None and proof.statement.startswith("no proof")
        return cert.status.value
    horizon = proof.time if math.isfinite(proof.time) else 50.0
    t_end = min(horizon, 200.0)
    t_eval = np.unique(np.concatenate([np.linspace(0.0, t_end, 41),
                                       np.geomspace(min(1e-3, t_end), t_end, 20)]))
    losses, dist = _reference_flow(net, x, y, loss, trained, t_eval)
    bound = proof.bound(t_eval)
    over = losses - bound * (1 + SLACK) - 1e-14
    assert np.all(over <= 0), (i, "loss above the proven bound", float(over.max()),
                               proof.statement)
    assert losses[0] <= proof.constants.loss0 * (1 + 1e-12)
    if proof.kind != "linear-plateau":   # a global proof claims no ball
        # θ_t ∈ B(θ₀, r) until L reaches the target (forever for a zero target)
        reached = np.flatnonzero(losses <= proof.target)
        until = reached[0] if proof.target > 0 and reached.size else losses.size
        assert np.all(dist[:until] <= proof.radius * (1 + SLACK) + 1e-14), (
            i, "left the proven ball", float(dist[:until].max()), proof.radius)
    return "holds"


SAMPLE = list(range(0, N_CASES, 25))


@pytest.mark.parametrize("i", SAMPLE)
def test_battery_sample(i):
    _check(i)


@pytest.mark.slow
def test_battery_every_holds_is_obeyed_by_an_accurate_flow():
    outcomes = [_check(i) for i in range(N_CASES)]
    counts = {s: outcomes.count(s) for s in set(outcomes)}
    print(f"battery of {N_CASES}: {counts}")
    assert counts.get("holds", 0) >= N_CASES // 3, counts
