"""Issue 19: the population as a quadrature rule, the 'limit reached' stop rule, the Hessian's
strict-minimum evidence, and the implicit integrator's record-independent path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.data import MAX_QUADRATURE_POINTS, smooth_target
from rayleighflow.hessian import loss_hessian, strict_minimum

# -- quadrature -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_the_rule_is_exact_for_polynomials_of_degree_up_to_2k_minus_1(k):
    # E over Uniform[−R, R] of x^p is R^p/(p + 1) for even p, 0 for odd p; coordinates independent
    radius = 1.7
    powers = [(p, q) for p in range(2 * k) for q in range(2 * k)]

    def moment(p):
        return 0.0 if p % 2 else radius ** p / (p + 1)

    box = rf.UniformBox(2, radius, lambda x: torch.stack(
        [x[:, 0] ** p * x[:, 1] ** q for p, q in powers], dim=1))
    rule = rf.quadrature(box, k)
    got = (rule.weights[:, None] * rule.y).sum(0).numpy()
    want = np.array([moment(p) * moment(q) for p, q in powers])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    assert rule.n == k ** 2 and float(rule.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    assert bool((rule.x.abs() <= radius).all()) and bool((rule.weights > 0).all())


def test_the_rule_is_not_exact_beyond_its_degree():
    box = rf.UniformBox(1, 1.0, lambda x: x ** 4)
    got = float(rf.quadrature(box, 2).weights @ rf.quadrature(box, 2).y[:, 0])
    assert abs(got - 1 / 5) > 1e-3     # degree 4 > 2k − 1 = 3


def test_the_rule_matches_monte_carlo_on_a_smooth_target():
    box = rf.UniformBox(2, 2.0, smooth_target)
    rule = rf.quadrature(box, 16)
    value = float(rule.weights @ (rule.y[:, 0] ** 2))
    finer = rf.quadrature(box, 32)
    assert value == pytest.approx(float(finer.weights @ (finer.y[:, 0] ** 2)), abs=1e-12)
    sample = box.sample(200_000, torch.Generator().manual_seed(0)).y[:, 0] ** 2
    se = float(sample.std()) / math.sqrt(sample.numel())
    assert abs(float(sample.mean()) - value) < 4 * se


def test_the_rule_refuses_what_it_cannot_build():
    box = rf.UniformBox(4, 1.0, smooth_target)
    with pytest.raises(ValueError, match="nodes > .*Monte Carlo sample"):
        rf.quadrature(box, int(round(MAX_QUADRATURE_POINTS ** 0.25)) + 2)
    with pytest.raises(ValueError, match="integer ≥ 1"):
        rf.quadrature(box, 0)
    with pytest.raises(TypeError, match="UniformBox"):
        rf.quadrature(rf.Gaussian(2, smooth_target), 4)


# -- the Hessian's evidence -----------------------------------------------------------------------


def _least_squares(theta=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    net = nn.Linear(3, 1, bias=False).double()
    if theta is not None:
        with torch.no_grad():
            net.weight.copy_(torch.as_tensor(theta, dtype=torch.float64).reshape(1, 3))
    return rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square"), x, y


def test_hessian_and_evidence_equal_the_quadratic_closed_form():
    problem, x, y = _least_squares([0.3, -0.2, 0.5])
    X, Y = x.numpy(), y.numpy()[:, 0]
    H = X.T @ X / len(X)                      # L = (1/2n)‖Xθ − y‖²
    np.testing.assert_allclose(loss_hessian(problem, problem.params).numpy(), H, rtol=1e-12)
    ev = strict_minimum(problem, problem.params)
    lam = np.linalg.eigvalsh(H)
    assert ev.lambda_min == pytest.approx(lam[0], rel=1e-12)
    assert ev.lambda_max == pytest.approx(lam[-1], rel=1e-12)
    theta = np.array([0.3, -0.2, 0.5])
    grad = H @ theta - X.T @ Y / len(X)
    assert ev.newton_step == pytest.approx(np.linalg.norm(np.linalg.solve(H, grad)), rel=1e-10)
    star = np.linalg.solve(H, X.T @ Y / len(X))
    loss_star = 0.5 * np.mean((X @ star - Y) ** 2)
    # the quadratic model's bound is a true lower bound of the minimum (one-sided, exact form)
    assert ev.lower_bound <= loss_star + 1e-15
    assert ev.positive_definite and not ev.newton_negligible and not ev.at_or_above(0.0)
    at_star = strict_minimum(_least_squares(star)[0], _least_squares(star)[0].params)
    assert at_star.is_strict_minimum and at_star.lower_bound == pytest.approx(loss_star, rel=1e-9)
    assert at_star.at_or_above(loss_star * (1 - 1e-9))
    assert not at_star.at_or_above(loss_star * (1 + 1e-6))


class _Product(nn.Module):
    """f(x) = a·b·x: at a = b = 0 a saddle of L (Hessian eigenvalues ±E[xy])."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.a * self.b * x


def test_a_saddle_is_not_a_strict_minimum():
    x = torch.linspace(0.5, 1.5, 8, dtype=torch.float64).unsqueeze(1)
    problem = rf.Problem(rf.Model(_Product()), rf.Dataset.from_arrays(x, 2 * x), "square")
    ev = strict_minimum(problem, problem.params)
    exy = float((x * 2 * x).mean())
    assert ev.lambda_min == pytest.approx(-exy, rel=1e-12) and ev.grad_norm == 0.0
    assert not ev.positive_definite and not ev.at_or_above(0.0)
    assert ev.lower_bound == -math.inf and "not a strict minimum" in ev.describe()


# -- LimitReached ---------------------------------------------------------------------------------


def test_limit_reached_stops_a_stiff_flow_at_its_minimum():
    problem, x, y = _least_squares()
    run = rf.gradient_flow(problem, rf.Implicit(), t_max=1e8, records=rf.LogSpaced(40),
                           stops=[rf.LimitReached(1e-20)])
    assert run.status is rf.FlowStatus.LIMIT and run.t_final < 1e8
    row = run.trajectory.rows[-1]
    assert row["grad_sq"] <= 1e-20 * row["loss"]
    earlier = run.trajectory.rows[:-1]
    assert all(r["grad_sq"] > 1e-20 * r["loss"] for r in earlier)   # the first record that met it
    assert strict_minimum(problem, run.params).is_strict_minimum


def test_limit_reached_floor_and_bad_arguments():
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(1)
    problem = rf.Problem(rf.Model(nn.Linear(1, 1).double()), rf.Dataset.from_arrays(x, 3 * x),
                         "square")
    run = rf.gradient_flow(problem, rf.GradientDescent(0.5), t_max=100.0, records=rf.Every(1),
                           stops=[rf.LimitReached(grad_rtol=1e-300, loss_floor=1e-6)])
    assert run.status is rf.FlowStatus.LIMIT and "floor" in run.message
    assert run.trajectory["loss"][-1] <= 1e-6 < run.trajectory["loss"][-2]
    with pytest.raises(ValueError, match="grad_rtol"):
        rf.LimitReached(0.0)
    with pytest.raises(ValueError, match="loss_floor"):
        rf.LimitReached(1e-12, loss_floor=-1.0)
    with pytest.raises(TypeError, match="LimitReached"):
        rf.gradient_flow(problem, t_max=1.0, stops=["limit"])


# -- the implicit path does not depend on the records --------------------------------------------


def test_records_are_read_off_one_solver_path():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(24, 2, generator=g, dtype=torch.float64) * 2 - 1
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, torch.sin(2 * x[:, :1])),
                         "square")
    few = rf.gradient_flow(problem, rf.Implicit(), t_max=1e3, records=rf.LogSpaced(4))
    many = rf.gradient_flow(problem, rf.Implicit(), t_max=1e3, records=rf.LogSpaced(40))
    assert few.n_grad_evals == many.n_grad_evals      # records never restart the solver
    for k in few.params:
        assert torch.equal(few.params[k], many.params[k])
    ev = many.trajectory.evaluations
    assert ev is not None and bool(np.all(np.diff(ev["t"]) > 0))   # the log in time order
    # a record between accepted points is the solver's interpolant: close to a direct run there
    t_mid = float(many.trajectory.t[20])
    direct = rf.gradient_flow(problem, rf.Implicit(rtol=1e-11, atol=1e-14), t_max=t_mid,
                              records=rf.Times([t_mid]))
    assert many.trajectory["loss"][20] == pytest.approx(direct.trajectory["loss"][-1], rel=1e-5)


def test_toml_limit_rule(tmp_path):
    from rayleighflow.experiments.schema import StopConfig

    stops = StopConfig(limit_grad_rtol=1e-10).build()
    assert stops == [rf.LimitReached(1e-10)]
