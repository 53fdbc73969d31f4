"""Gradient flow against the closed-form flow of linear least squares, and its stop rules."""

import math

import numpy as np
import pytest
import torch

import rayleighflow as rf
from rayleighflow.data import Dataset, UniformBox, smooth_target
from rayleighflow.flow import FlowStatus, gradient_flow
from rayleighflow.problem import Model, Problem
from rayleighflow.trajectory import Trajectory


def _least_squares(n=20, d=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    w0 = torch.randn(d, k, generator=g, dtype=torch.float64)
    pb = Problem(Model(lambda p, x: x @ p["W"], {"W": w0}), Dataset.from_arrays(x, y), "square")
    # Ẇ = −(1/n) Xᵀ(XW − Y): with A = XᵀX/n = V diag(λ) Vᵀ, W_t = W* + V e^{−λt} Vᵀ (W_0 − W*).
    a, b = x.T @ x / n, x.T @ y / n
    lam, v = torch.linalg.eigh(a)
    w_star = torch.linalg.solve(a, b)

    def exact(t):
        w = w_star + v @ torch.diag(torch.exp(-lam * t)) @ v.T @ (w0 - w_star)
        return w, float(0.5 * ((x @ w - y) ** 2).sum(-1).mean())

    return pb, exact


@pytest.mark.oldest
def test_adaptive_flow_matches_closed_form():
    pb, exact = _least_squares()
    res = gradient_flow(pb, integrator=rf.Dopri5(rtol=1e-11, atol=1e-13), t_max=30.0)
    assert res.status is FlowStatus.T_MAX
    t, loss = res.trajectory.t, res.trajectory["loss"]
    ref = np.array([exact(s)[1] for s in t])
    assert np.max(np.abs(loss - ref) / ref) < 1e-8
    w_ref, _ = exact(30.0)
    assert torch.allclose(res.params["W"], w_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.oldest
def test_euler_converges_at_order_one():
    pb, exact = _least_squares()
    t_end = 2.0
    w_ref, _ = exact(t_end)
    steps = np.array([0.1, 0.05, 0.025, 0.0125, 0.00625])
    errs = []
    for h in steps:
        res = gradient_flow(pb, integrator=rf.GradientDescent(float(h)), t_max=t_end,
                            records=rf.Times([t_end]))
        assert res.t_final == pytest.approx(t_end)
        errs.append(float(torch.linalg.norm(res.params["W"] - w_ref)))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert 0.9 < slope < 1.1, slope


def test_euler_records_on_step_grid_and_is_gradient_descent():
    pb, _ = _least_squares()
    res = gradient_flow(pb, integrator=rf.GradientDescent(0.1), t_max=1.0,
                        records=rf.Times([0.25, 0.5, 1.0]))
    assert np.allclose(res.trajectory.t, [0.0, 0.3, 0.5, 1.0])
    w = pb.params["W"].clone()
    x, y = pb.data.x, pb.data.y
    for _ in range(10):
        w = w - 0.1 * x.T @ (x @ w - y) / x.shape[0]
    assert torch.allclose(res.params["W"], w, rtol=1e-12)


def test_stops_at_loss_target_and_step_budget():
    pb, _ = _least_squares(n=3, d=4, k=1)  # interpolating: the loss goes to zero
    res = gradient_flow(pb, t_max=1e4, stops=[rf.LossBelow(1e-3)])
    assert res.status is FlowStatus.LOSS_TARGET
    assert res.trajectory["loss"][-1] <= 1e-3 < res.trajectory["loss"][-2]
    res = gradient_flow(pb, t_max=1e4, stops=[rf.MaxEvals(50)])
    assert res.status is FlowStatus.STEP_BUDGET and res.n_grad_evals == 50


def test_stops_at_non_finite_loss_and_keeps_records():
    # GD with a step far above 2/λ_max diverges to overflow.
    pb, _ = _least_squares()
    res = gradient_flow(pb, integrator=rf.GradientDescent(1e3), t_max=1e6,
                        records=rf.Times(np.arange(1, 1000) * 1e3))
    assert res.status is FlowStatus.NON_FINITE
    assert len(res.trajectory) >= 2
    assert np.all(np.isfinite(res.trajectory["loss"]))


def test_trajectory_streams_and_survives_truncation(tmp_path):
    pb, _ = _least_squares()
    path = tmp_path / "traj.jsonl"
    res = gradient_flow(pb, t_max=5.0, path=path, records=rf.LogSpaced(10))
    loaded = Trajectory.load(path)
    assert loaded.status == "t_max" and len(loaded) == len(res.trajectory)
    assert np.array_equal(loaded["loss"], res.trajectory["loss"])
    # A writer killed mid-line leaves a partial last line: everything before it loads.
    text = path.read_text().splitlines()
    path.write_text("\n".join(text[:-1]) + '\n{"type": "row", "t": 1')
    assert len(Trajectory.load(path)) == len(res.trajectory)


def test_resume_continues_the_same_file(tmp_path):
    pb, exact = _least_squares()
    path = tmp_path / "traj.jsonl"
    first = gradient_flow(pb, integrator=rf.Dopri5(rtol=1e-11, atol=1e-13), t_max=2.0, path=path,
                          records=rf.LogSpaced(5))
    second = gradient_flow(pb, integrator=rf.Dopri5(rtol=1e-11, atol=1e-13), t_max=6.0, path=path,
                           records=rf.Times([3.0, 6.0]),
                           start=rf.Start(first.params, t=2.0, append=True))
    traj = Trajectory.load(path)
    assert traj.t[-1] == 6.0 and len(traj) == len(first.trajectory) + 2
    assert second.trajectory["loss"][-1] == pytest.approx(exact(6.0)[1], rel=1e-8)


def test_sampler_fresh_batches_and_fixed_eval_sample():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 1)).double()
    pb = Problem(Model(net), UniformBox(2, 1.0, smooth_target), "square")
    gen = torch.Generator().manual_seed(1)
    res = gradient_flow(pb, integrator=rf.StochasticGD(0.05, 64), t_max=2.0, generator=gen,
                        records=rf.LogSpaced(5), eval_data=512)
    loss = res.trajectory["loss"]
    assert loss[-1] < loss[0] and np.all(np.isfinite(loss))
    res2 = gradient_flow(pb, t_max=2.0, records=rf.LogSpaced(5), eval_data=256)
    assert res2.status is FlowStatus.T_MAX


def test_bad_flow_arguments():
    pb, _ = _least_squares()
    with pytest.raises(TypeError, match="integrator must be an Integrator"):
        gradient_flow(pb, "rk4", t_max=1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):   # the flat keywords are gone
        gradient_flow(pb, t_max=1.0, method="euler", step=0.1)
    with pytest.raises(ValueError, match="t_max"):
        gradient_flow(pb, t_max=-1.0)
    short = gradient_flow(pb, t_max=1e-3, records=rf.LogSpaced(2))
    assert math.isfinite(short.trajectory["loss"][-1])


def test_euler_resume_off_grid_keeps_step_length():
    pb, _ = _least_squares()
    res = gradient_flow(pb, integrator=rf.GradientDescent(0.1), t_max=0.56,
                        records=rf.Times([0.36, 0.46, 0.56]), start=rf.Start(t=0.26))
    assert np.allclose(res.trajectory.t, [0.26, 0.36, 0.46, 0.56])
    # 3 steps, plus the gradient at the final iterate (its record reuses every evaluation)
    assert res.n_grad_evals == 4 and res.trajectory.evaluations["t"].size == 4


@pytest.mark.parametrize("generic", [False, True])
def test_checkpoint_and_start_resume_gradient_descent_without_a_duplicate_iterate(tmp_path,
                                                                                   generic):
    x = torch.linspace(-1, 1, 4, dtype=torch.float64).unsqueeze(1)
    model = (Model(lambda p, x: x @ p["w"], {"w": torch.zeros(1, 1, dtype=torch.float64)},
                   allow_nondeterministic=True) if generic   # the lean path refuses it
             else Model(torch.nn.Linear(1, 1).double()))
    pb = Problem(model, Dataset.from_arrays(x, 2 * x), "square")
    path, ckpt = tmp_path / "t.jsonl", tmp_path / "theta.pt"
    gd = rf.GradientDescent(0.5)
    gradient_flow(pb, gd, t_max=2.0, records=rf.Every(2), path=path,
                  observers=[rf.Checkpoint(ckpt)])
    start = rf.Start.load(ckpt)
    assert (start.t, start.evals, start.append) == (2.0, 5, True)
    gradient_flow(pb, gd, t_max=4.0, records=rf.Every(2), path=path, start=start)
    whole = gradient_flow(pb, gd, t_max=4.0, records=rf.Every(2)).trajectory
    resumed = Trajectory.load(path)
    np.testing.assert_array_equal(resumed.t, whole.t)
    for key in ("t", "loss", "grad_sq"):   # every iterate logged once, as in one run
        np.testing.assert_array_equal(resumed.evaluations[key], whole.evaluations[key])
