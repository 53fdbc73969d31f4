"""Integrator, record and stop objects, and the lean gradient-descent path against plain torch
loops (independent references: autograd on F.cross_entropy / mse, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rayleighflow as rf
from rayleighflow.flow import FlowStatus

D = torch.float64


def _softmax_data(n=40, d=3, k=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=D)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _plain_gd(net, x, y, eta, steps, weights=None):
    """Reference: per step L, ‖∇L‖², ‖∇ℓ‖²_D from autograd on F.cross_entropy."""
    net = __import__("copy").deepcopy(net)
    w = torch.full((x.shape[0],), 1 / x.shape[0], dtype=D) if weights is None else weights
    out = []
    for _ in range(steps + 1):
        f = net(x).detach().requires_grad_(True)
        ce = (w * F.cross_entropy(f, y, reduction="none")).sum()
        (gf,) = torch.autograd.grad(ce, f)
        loss = (w * F.cross_entropy(net(x), y, reduction="none")).sum()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        gsq = float(sum((g * g).sum() for g in grads))
        fsq = float(((gf / w[:, None]) ** 2 * w[:, None]).sum())  # Σ ω_i ‖∇ℓ_i‖²
        out.append((float(loss.detach()), gsq, fsq))
        if len(out) == steps + 1:
            break
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p.sub_(eta * g)
    return np.array(out), net


@pytest.mark.parametrize("weighted", [False, True])
def test_lean_gd_matches_a_plain_torch_loop_at_every_iterate(weighted):
    x, y = _softmax_data()
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    weights = None
    if weighted:
        weights = torch.linspace(1, 3, x.shape[0], dtype=D)
        weights = weights / weights.sum()
    data = rf.Dataset.from_arrays(x, y, weights=weights)
    problem = rf.Problem(rf.Model(net), data, "cross-entropy")
    eta, steps = 0.3, 57
    run = rf.gradient_flow(problem, rf.GradientDescent(eta), t_max=steps * eta,
                           records=rf.Every(10))
    ref, ref_net = _plain_gd(net, x, y, eta, steps, weights)
    ev = run.trajectory.evaluations
    assert len(ev["t"]) == steps + 1 == run.n_grad_evals
    np.testing.assert_allclose(ev["t"], eta * np.arange(steps + 1), rtol=1e-13)
    np.testing.assert_allclose(ev["loss"], ref[:, 0], rtol=1e-12)
    np.testing.assert_allclose(ev["grad_sq"], ref[:, 1], rtol=1e-10)
    np.testing.assert_allclose(ev["fgrad_sq"], ref[:, 2], rtol=1e-10)
    # records every 10 steps (and the last step), rows equal the logged evaluations
    np.testing.assert_allclose(run.trajectory.t, eta * np.array([0, 10, 20, 30, 40, 50, 57]),
                               rtol=1e-13)
    np.testing.assert_allclose(run.trajectory["loss"], ref[[0, 10, 20, 30, 40, 50, 57], 0],
                               rtol=1e-12)
    for name, p in ref_net.named_parameters():
        torch.testing.assert_close(run.params[name], p, rtol=1e-11, atol=1e-13)
    # the user's module is untouched
    torch.testing.assert_close(dict(net.named_parameters())["0.weight"],
                               problem.params["0.weight"])


def test_lean_gd_leaves_log_softmax_for_tiny_cross_entropy():
    # separable data and a huge step: L falls from 5e-3 to ~1e-50, far below the fast path's
    # floor, where log-softmax rounds it to exactly 0 (while ∇ℓ ≠ 0). Reference:
    # the same descent with the exact gradient, each loss evaluated in 150-digit arithmetic.
    mpmath = pytest.importorskip("mpmath")
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=D)
    y = torch.tensor([0, 1, 2, 3])
    w0 = 6.0 * x.clone()  # row c of W is 6·x_c: class c wins on x_c by a margin of 6
    net = nn.Linear(2, 4, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w0)
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "cross-entropy")
    eta, steps = 1e5, 30
    run = rf.gradient_flow(problem, rf.GradientDescent(eta), t_max=steps * eta,
                           records=rf.Every(50))
    ev = run.trajectory.evaluations
    w, exact = w0.clone(), []
    for _ in range(steps + 1):
        f = x @ w.T
        with mpmath.workdps(150):
            ell = [mpmath.log(sum(mpmath.exp(mpmath.mpf(float(v))) for v in row))
                   - mpmath.mpf(float(row[c])) for row, c in zip(f, y.tolist(), strict=True)]
            exact.append(float(sum(ell) / 4))
        p = torch.softmax(f, -1)
        g = p.scatter(-1, y[:, None], -p.scatter(-1, y[:, None], 0.0).sum(-1, keepdim=True))
        w = w - eta * (g.T @ x) / 4
    assert ev["loss"][0] > 1e-3 and 0 < ev["loss"][-1] < 1e-30
    np.testing.assert_allclose(ev["loss"], exact, rtol=1e-12)


def test_lean_gd_square_loss_function_model_and_frozen_parameters():
    x = torch.linspace(-1, 1, 12, dtype=D).unsqueeze(1)
    yv = torch.sin(3 * x)
    net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net[0].bias.requires_grad_(False)  # frozen: held fixed, excluded from θ
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, yv), "square")
    eta, steps = 0.2, 30
    run = rf.gradient_flow(problem, rf.GradientDescent(eta), t_max=steps * eta,
                           records=rf.Every(7))
    ref = __import__("copy").deepcopy(net)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    losses = []
    for _ in range(steps + 1):
        loss = 0.5 * ((ref(x) - yv) ** 2).sum(-1).mean()
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, trainable)
        with torch.no_grad():
            for p, g in zip(trainable, grads, strict=True):
                p.sub_(eta * g)
    np.testing.assert_allclose(run.trajectory.evaluations["loss"], losses, rtol=1e-12)
    assert "0.bias" not in run.params
    # the same flow for f(params, x) as a plain function
    params = {k: v.detach().clone() for k, v in problem.params.items()}
    b0 = net[0].bias.detach()

    def fn(p, inp):
        return torch.tanh(inp @ p["0.weight"].T + b0) @ p["2.weight"].T + p["2.bias"]

    fproblem = rf.Problem(rf.Model(fn, params), rf.Dataset.from_arrays(x, yv), "square")
    frun = rf.gradient_flow(fproblem, rf.GradientDescent(eta), t_max=steps * eta,
                            records=rf.Every(7))
    np.testing.assert_allclose(frun.trajectory.evaluations["loss"], losses, rtol=1e-12)


def test_the_flat_keywords_of_earlier_versions_are_refused():
    x, y = _softmax_data(n=16)
    torch.manual_seed(0)
    problem = rf.Problem(rf.Model(nn.Linear(3, 4).double()), rf.Dataset.from_arrays(x, y),
                         "cross-entropy")
    for old in ({"method": "euler", "step": 0.5}, {"n_records": 8}, {"max_steps": 15}):
        with pytest.raises(TypeError, match="unexpected keyword"):
            rf.gradient_flow(problem, t_max=1.0, **old)
    import inspect
    signature = inspect.signature(rf.gradient_flow)
    assert len(signature.parameters) <= 11
    assert all(p.kind is not p.VAR_KEYWORD for p in signature.parameters.values())


def test_objects_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="step must be"):
        rf.GradientDescent(0.0)
    with pytest.raises(ValueError, match="batch_size"):
        rf.StochasticGD(0.1, batch_size=0)
    with pytest.raises(ValueError, match="atol"):
        rf.Dopri5(atol=-1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        rf.Times([1.0, 1.0])
    x, y = _softmax_data(n=8)
    problem = rf.Problem(rf.Model(nn.Linear(3, 4).double()), rf.Dataset.from_arrays(x, y),
                         "cross-entropy")
    with pytest.raises(ValueError, match="fixed-step integrator"):
        rf.gradient_flow(problem, rf.Dopri5(), t_max=1.0, records=rf.Every(3))
    with pytest.raises(ValueError, match="Stall applies"):
        rf.gradient_flow(problem, rf.GradientDescent(0.1), t_max=1.0, stops=[rf.Stall()])
    with pytest.raises(TypeError, match="integrator must be"):
        rf.gradient_flow(problem, "euler", t_max=1.0)
    with pytest.raises(ValueError, match="applies only to sampler data"):
        rf.gradient_flow(problem, rf.StochasticGD(0.1, 4), t_max=1.0)


def test_stop_rules_and_stochastic_gd():
    x, _ = _softmax_data(n=16)
    y = (x @ torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=D)).argmax(-1)
    problem = rf.Problem(rf.Model(nn.Linear(3, 4).double()), rf.Dataset.from_arrays(x, y),
                         "cross-entropy")
    run = rf.gradient_flow(problem, rf.GradientDescent(1.0), t_max=1e4,
                           records=rf.Every(5), stops=[rf.LossBelow(0.3)])
    assert run.status is FlowStatus.LOSS_TARGET
    assert run.trajectory["loss"][-1] <= 0.3 < run.trajectory["loss"][-2]
    sampler = rf.Gaussian(2, lambda z: z.sum(-1, keepdim=True), dtype=D)
    sproblem = rf.Problem(rf.Model(nn.Linear(2, 1).double()), sampler, "square")
    srun = rf.gradient_flow(sproblem, rf.StochasticGD(0.1, batch_size=8), t_max=5.0,
                            records=rf.Every(10), eval_data=256)
    assert srun.status is FlowStatus.T_MAX and srun.n_grad_evals == 50
    assert srun.trajectory["loss"][-1] < 0.1 * srun.trajectory["loss"][0]
    assert srun.trajectory.meta["batch_size"] == 8


def test_lean_gd_stops_at_a_non_finite_loss_and_keeps_the_finite_log():
    x = torch.tensor([[1.0], [2.0]], dtype=D)
    yv = torch.tensor([[1.0], [-1.0]], dtype=D)
    problem = rf.Problem(rf.Model(nn.Linear(1, 1).double()), rf.Dataset.from_arrays(x, yv),
                         "square")
    run = rf.gradient_flow(problem, rf.GradientDescent(50.0), t_max=50.0 * 2000,
                           records=rf.Every(100))
    assert run.status is FlowStatus.NON_FINITE
    ev = run.trajectory.evaluations
    assert ev is None or np.all(np.isfinite(ev["loss"]))
    assert math.isfinite(float(run.trajectory["loss"][0]))


def test_lean_gd_iterates_equal_the_generic_path_bit_for_bit_on_logistic_loss():
    # binary logistic runs the lean path with the loss's precise forms and the update
    # θ − (η·∇L) in two roundings: the same arithmetic as the generic path, so the same
    # iterates and losses to the last bit
    x, _ = _softmax_data(n=30, d=3)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(2)
    problem = rf.Problem(rf.Model(nn.Linear(3, 1).double()), rf.Dataset.from_arrays(x, y),
                         "logistic")
    lean = rf.gradient_flow(problem, rf.GradientDescent(0.7), t_max=70.0, records=rf.Every(9))
    generic = rf.Problem(rf.Model(problem.model.module, allow_nondeterministic=True),
                         rf.Dataset.from_arrays(x, y), "logistic")  # not lean-eligible
    ref = rf.gradient_flow(generic, rf.GradientDescent(0.7), t_max=70.0, records=rf.Every(9))
    a, b = lean.trajectory.evaluations, ref.trajectory.evaluations
    for key in ("t", "loss"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("grad_sq", "fgrad_sq"):  # a norm vs a sum of squares: the last bits differ
        np.testing.assert_allclose(a[key], b[key], rtol=1e-14)
    for name in ref.params:
        assert torch.equal(lean.params[name], ref.params[name])
