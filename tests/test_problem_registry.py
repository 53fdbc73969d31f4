"""The shared problem registry (tests/cases.py PROBLEMS: models × losses × data × conventions)
run through the Rayleigh quotient, gradient descent, its certificate and the monitor, each
against an independent reference written here: the dense Jacobian J (torch.func.jacrev), the
functional gradients in closed form, and K = J·diag(ω)·Jᵀ built explicitly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import rayleighflow as rf
from cases import PROBLEMS


def _closed_form_grad(loss: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "square":
        return f - y
    if loss == "cross-entropy":
        return torch.softmax(f, -1) - torch.nn.functional.one_hot(y, f.shape[1]).double()
    s = (2.0 * y.double() - 1.0)[:, None]           # logistic, one logit
    return -s * torch.sigmoid(-s * f)


def _closed_form_loss(loss: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "square":
        return 0.5 * ((f - y) ** 2).sum(-1)
    if loss == "cross-entropy":
        return torch.logsumexp(f, -1) - f.gather(1, y[:, None]).squeeze(1)
    s = 2.0 * y.double() - 1.0
    return torch.nn.functional.softplus(-s * f[:, 0])


def _reference(problem: rf.Problem, params: dict[str, torch.Tensor]):
    """(L, ∇L flat, ‖∇ℓ‖²_D, R, ⟨∇ℓ, K∇ℓ⟩_D/‖∇ℓ‖²_D) from the dense Jacobian."""
    model, data = problem.model, problem.data
    names = list(params)

    def f_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [params[k].numel() for k in names])
        p = {k: v.reshape(params[k].shape) for k, v in zip(names, parts, strict=True)}
        if model.module is not None:
            out = functional_call(model.module, (p, model.buffers), (data.x,))
        else:
            out = model._fn(p, data.x)
        return out.reshape(out.shape[0], -1)

    flat = torch.cat([params[k].reshape(-1) for k in names]).detach()
    f = f_of(flat).detach()
    J = jacrev(f_of)(flat).reshape(f.numel(), -1)              # (n·k, P)
    n = data.n
    w = data.weights.double()
    omega = w * (n if problem.convention.value == "sum" else 1)
    y = data.y if problem.loss.name != "square" else data.y.double().reshape(f.shape)
    g = _closed_form_grad(problem.loss.name, f, y)            # (n, k)
    loss = float((omega * _closed_form_loss(problem.loss.name, f, y)).sum())
    grad = J.T @ (omega[:, None] * g).reshape(-1)
    fsq = float((omega * (g * g).sum(-1)).sum())
    # K as an operator on L²(D): (K u)_i = Σ_j J_i J_jᵀ ω_j u_j; ⟨u, Ku⟩_D = ‖Jᵀ(ωu)‖²
    om = omega.repeat_interleave(f.shape[1])
    K = J @ J.T * om[None, :]
    u = g.reshape(-1)
    quad = float((om * u) @ (K @ u))
    return loss, grad, fsq, float(grad @ grad) / fsq, quad / fsq


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_rayleigh_quotient_equals_the_dense_kernel(name):
    problem = PROBLEMS[name].build()
    m = rf.measure(problem)
    loss, grad, fsq, ray, quad = _reference(problem, problem.params)
    assert m.loss == pytest.approx(loss, rel=1e-12)
    assert m.grad_sq == pytest.approx(float(grad @ grad), rel=1e-10)
    assert m.fgrad_sq == pytest.approx(fsq, rel=1e-12)
    assert m.rayleigh == pytest.approx(ray, rel=1e-10)
    assert ray == pytest.approx(quad, rel=1e-10)     # chain rule = the kernel's quadratic form


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gradient_descent_and_its_certificate_match_the_reference(name):
    problem = PROBLEMS[name].build()
    step = 0.05
    run = rf.gradient_flow(problem, rf.GradientDescent(step), t_max=6 * step,
                           records=rf.Every(1))
    theta = {k: v.clone() for k, v in problem.params.items()}
    losses, gsq = [], []
    for _ in range(7):
        loss, grad, _, _, _ = _reference(problem, theta)
        losses.append(loss)
        gsq.append(float(grad @ grad))
        parts = torch.split(grad, [v.numel() for v in theta.values()])
        theta = {k: v - step * d.reshape(v.shape) for (k, v), d in
                 zip(theta.items(), parts, strict=True)}
    np.testing.assert_allclose(run.trajectory["loss"], losses, rtol=1e-11)
    np.testing.assert_allclose(run.trajectory["grad_sq"], gsq, rtol=1e-9)
    cert = rf.certify(run.trajectory, "log")
    # the exact discrete certificate, recomputed: μ* = min ‖∇L_k‖²/L_k over the steps,
    # α_k = (L_k − L_{k+1})/(η‖∇L_k‖²), B_K = L₀·exp(−μ Σ α_k η)
    L, G = np.array(losses), np.array(gsq)
    mu = float(np.min(G[:-1] / L[:-1]))
    alpha = (L[:-1] - L[1:]) / (step * G[:-1])
    if np.all(alpha > 0):
        assert cert.holds and cert.mu == pytest.approx(mu, rel=1e-9)
        bound = L[0] * np.exp(-mu * np.concatenate([[0.0], np.cumsum(alpha * step)]))
        np.testing.assert_allclose(cert.bound, bound, rtol=1e-8)
        assert np.all(L <= bound * (1 + 1e-9))
    else:
        assert not cert.holds


@pytest.mark.parametrize("name", [n for n, p in PROBLEMS.items()
                                  if p.uniform and p.model != "callable"])
def test_monitor_on_a_plain_loop_equals_the_dense_kernel(name):
    case = PROBLEMS[name]
    problem = case.build()
    net = problem.model.module
    data = problem.data
    mon = rf.Monitor(net, case.loss, convention=case.convention, echo=None)
    out = net(data.x)
    out2 = out.reshape(out.shape[0], -1)
    y = data.y if case.loss != "square" else data.y.double().reshape(out2.shape)
    per = _closed_form_loss(case.loss, out2, y)
    lv = per.sum() if case.convention == "sum" else per.mean()
    net.zero_grad()
    lv.backward()
    mon.step(out, data.y, lv)
    mon.close()
    row = mon.rows[0]
    loss, _, fsq, ray, _ = _reference(problem, problem.params)
    assert row["loss"] == pytest.approx(loss, rel=1e-10)
    assert row["fgrad_sq"] == pytest.approx(fsq, rel=1e-10)
    assert math.isfinite(row["rayleigh"]) and row["rayleigh"] == pytest.approx(ray, rel=1e-9)
