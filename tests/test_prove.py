"""Issue 10: proof-grade certificates (scope PROVEN).

Every test here can fail: the bounds are compared with exact (mpmath) values, with sampled
measurements (and a deliberately wrong constant must be caught by the same sampler), and with
the flow actually run afterwards at every record and every solver evaluation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.certificate import CertificateStatus, Reason, Scope
from rayleighflow.prove import proof_constants, prove_details
from rayleighflow.prove._arb import arb, down, gram_bounds, sym_eig_bounds, up
from rayleighflow.prove.activations import ACTIVATIONS
from rayleighflow.prove.falsify import falsify, falsify_proof
from rayleighflow.prove.reference import reference_constants
from rayleighflow.prove.runcheck import BallTracker, check_run, proven_bound
from rayleighflow.theorems.two_layer import TwoLayer


def _dntk_data():
    """The definite-NTK experiment's data (n = 20, dim 5, teacher width 2, seed 0)."""
    from rayleighflow.experiments.definite_ntk import EXPERIMENT, _data

    class Ctx:
        params = EXPERIMENT.defaults
        dtype, device, seed = torch.float64, "cpu", 0

        def generator(self, i=0):
            return torch.Generator().manual_seed(i)

    return _data(Ctx.params, Ctx()), Ctx().generator(3)


def _dntk_problem(width: int, activation: str = "tanh"):
    data, g = _dntk_data()
    net = TwoLayer(5, width, activation=activation, generator=g)
    return rf.Problem(rf.Model(net), data, "square")


@pytest.fixture(scope="module")
def wide():
    problem = _dntk_problem(512)
    return problem, prove_details(problem)


@pytest.fixture(scope="module")
def narrow():
    problem = _dntk_problem(2)
    return problem, prove_details(problem)


# -- outward rounding ----------------------------------------------------------------------

def test_up_down_round_outward():
    third = arb(1) / 3
    assert up(third) > 1 / 3 > down(third) or (up(third) >= 1 / 3 and down(third) <= 1 / 3)
    assert arb(up(third)) >= third and arb(down(third)) <= third
    assert up(arb(2).sqrt()) ** 2 >= 2 and down(arb(2).sqrt()) ** 2 <= 2


def test_gram_bounds_bracket_singular_values():
    rng = np.random.default_rng(0)
    for shape in ((6, 40), (30, 9)):
        a = rng.standard_normal(shape) * 0.3
        b = gram_bounds(a, np.zeros_like(a))
        s = np.linalg.svd(a, compute_uv=False)
        assert b["norm_up"] >= s[0] and b["norm_up"] <= s[0] * (1 + 1e-10)
        if shape[0] <= shape[1]:
            assert b["smin_lo"] <= s[-1] and b["smin_lo"] >= s[-1] * (1 - 1e-8)
        else:
            assert b["smin_lo"] == 0.0
    # an entrywise error of the inputs widens the bounds by at least ‖err‖_F
    a = rng.standard_normal((5, 20))
    err = np.full(a.shape, 1e-6)
    b0, b1 = gram_bounds(a, np.zeros_like(a)), gram_bounds(a, err)
    assert b1["norm_up"] - b0["norm_up"] >= 1e-6 * 10 * (1 - 1e-9)


def test_eigenvalue_bounds_need_a_positive_definite_proof():
    m = np.diag([1.0, 2.0, 3.0])
    lo, hi = sym_eig_bounds(m)
    assert lo <= 1.0 <= 1.0 + 1e-9 and hi >= 3.0 and lo > 1 - 1e-9 and hi < 3 + 1e-9
    singular = np.array([[1.0, 1.0], [1.0, 1.0]])
    lo, _ = sym_eig_bounds(singular)
    assert lo <= 0.0


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_constants_bound_a_dense_grid_tightly(name):
    act = ACTIVATIONS[name]
    z = np.linspace(-40, 40, 400001)   # sup σ′ of softplus is a limit at +∞
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    fn = {"tanh": torch.tanh, "softplus": nn.functional.softplus, "sigmoid": torch.sigmoid,
          "gelu": nn.functional.gelu}[name]
    (d1,) = torch.autograd.grad(fn(zt).sum(), zt, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), zt)
    m1, m2 = float(d1.detach().abs().max()), float(d2.detach().abs().max())
    assert up(act.d1) >= m1 * (1 - 1e-12) and up(act.d1) <= m1 * (1 + 1e-5)
    assert up(act.d2) >= m2 * (1 - 1e-12) and up(act.d2) <= m2 * (1 + 1e-5)


def test_mpmath_reference_rederives_every_constant():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randn(6, 1, generator=g, dtype=torch.float64)
    net = TwoLayer(3, 8, generator=torch.Generator().manual_seed(2))
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square")
    c = proof_constants(problem)
    ref = reference_constants(problem, dps=40)["mp"]
    import mpmath as mp

    def ok_upper(impl, exact):   # never tighter than the exact value, and not vacuous
        assert mp.mpf(impl) >= exact and mp.mpf(impl) <= exact * (1 + mp.mpf(1e-9)) + 1e-300

    def ok_lower(impl, exact):
        assert mp.mpf(impl) <= exact and mp.mpf(impl) >= exact * (1 - mp.mpf(1e-6))

    ok_upper(c.norm_j0, ref["norm_j0"])
    ok_lower(c.smin_j0, ref["smin_j0"])
    ok_lower(c.a0, ref["a0"])
    ok_upper(c.s0, ref["s0"])
    ok_lower(c.s0_lo, ref["s0"])
    ok_upper(c.lip_j, ref["lip_j"])
    extra = {n: v for n, v, _ in c.extra}
    ok_upper(extra["sup|σ′|"], ref["sup_d1"])
    ok_upper(extra["sup|σ″|"], ref["sup_d2"])


# -- the definite-NTK experiment's networks -------------------------------------------------

def test_wide_case_gets_a_proven_certificate(wide):
    problem, proof = wide
    cert = proof.certificate
    assert cert.status is CertificateStatus.HOLDS and cert.scope is Scope.PROVEN
    c = proof.constants
    assert 0 < proof.target < c.loss0_lo and proof.rho > 0 and proof.time > 0
    assert proof.path_bound < proof.radius
    # the statement is built from the numbers it states
    # (upper bounds rounded up, so that the printed statement stays true)
    from rayleighflow.prove._print import fmt_up
    assert f"≤ {fmt_up(proof.target)} by t = {fmt_up(proof.time)}" in proof.statement
    # the certificate's single rate 2·min ρ is valid but weaker: its time is ≥ the proven T
    assert cert.time_to(proof.target) is None or cert.time_to(proof.target) >= proof.time
    assert proof.seconds < 30
    json.dumps(proof.to_dict(), default=str)
    names = " ".join(a.name for a in cert.assumptions)
    for key in ("‖J₀‖", "σ_min(J₀)", "Lip_J", "Lip_F", "ρ =", "phase 1/", "sup|σ″|"):
        assert key in names


def test_wide_case_zero_loss_is_refused_with_numbers(wide):
    problem, _ = wide
    zero = prove_details(problem, target=0.0)
    assert zero.certificate.status is CertificateStatus.UNAVAILABLE
    assert zero.certificate.reason is Reason.PROOF_PATH_TOO_LONG
    c = zero.constants
    assert f"{c.smin_j0 ** 2:.4g}" in zero.statement and "4·Lip_J·s" in zero.statement


def test_wide_flow_obeys_the_proof_at_every_record_and_evaluation(wide):
    problem, proof = wide
    tracker = BallTracker(problem)
    flow_problem = rf.Problem(tracker.model(), problem.data, "square")
    res = rf.gradient_flow(flow_problem, t_max=10.0, records=rf.LogSpaced(15))
    traj = res.trajectory
    ev = traj.evaluations
    assert ev is not None and ev["t"].size > 20
    check = check_run(proof, traj, tracker, rtol=1e-6)
    assert check.passed and check.stages_ok, (check.failures, check.stage_failures)
    assert check.eval_above_bound == 0 and check.points_outside_ball == 0
    assert check.n_points >= ev["t"].size
    assert check.max_distance <= proof.radius
    # beyond T the loss is below the proven target
    late = traj["t"] >= proof.time
    assert late.any() and np.all(traj["loss"][late] <= proof.target)
    b = proven_bound(proof, ev["t"])
    assert np.all(ev["loss"] <= b * (1 + 1e-6))


def test_narrow_case_never_gets_convergence_to_zero(narrow):
    problem, proof = narrow
    assert proof.constants.P < proof.constants.nk and proof.constants.smin_j0 == 0.0
    if proof.certificate.holds:
        assert proof.target > 0
    for seed in range(3):
        data, _ = _dntk_data()
        net = TwoLayer(5, 2, generator=torch.Generator().manual_seed(100 + seed))
        p = rf.Problem(rf.Model(net), data, "square")
        zero = prove_details(p, target=0.0)
        assert not zero.certificate.holds
        assert f"P = {zero.constants.P} < nk = {zero.constants.nk}" in zero.statement


def test_narrow_target_is_above_the_plateau(narrow):
    problem, proof = narrow
    assert proof.certificate.holds
    res = rf.gradient_flow(problem, t_max=200.0, records=rf.LogSpaced(10))
    assert float(res.trajectory["loss"][-1]) < proof.target


def _zero_case(width: int, scale: float):
    """Three inputs in one dimension, targets a small step from f₀: the kernel is definite."""
    x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
    net = TwoLayer(1, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x) + scale * torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64)
    return rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square")


def test_two_layer_convergence_to_zero_is_proven_and_the_run_obeys():
    problem = _zero_case(4096, 0.1)
    proof = prove_details(problem, target=0.0)
    assert proof.certificate.holds and proof.target == 0.0
    last = proof.phases[-1]
    assert last.route == "definite" and last.t_end == math.inf and last.path_end < last.r
    assert "convergence to zero loss" in proof.statement
    tracker = BallTracker(problem)
    res = rf.gradient_flow(rf.Problem(tracker.model(), problem.data, "square"), t_max=300.0,
                           records=rf.LogSpaced(12))
    check = check_run(proof, res.trajectory, tracker)
    assert check.passed, check.failures
    assert max(tracker.dist) <= proof.radius         # forever: every evaluation, any loss
    f = falsify_proof(problem, proof, samples=9, generator=torch.Generator().manual_seed(1))
    assert not f.falsified, f.counterexamples
    assert falsify_proof(problem, proof, samples=9, lip_j_factor=0.01).falsified


@pytest.mark.slow
def test_chained_balls_prove_zero_where_one_ball_cannot():
    problem = _zero_case(16384, 0.3)
    c = proof_constants(problem)
    assert c.smin_j0 ** 2 < 4 * c.lip_j * c.s0          # one definite ball from θ₀ is impossible
    proof = prove_details(problem, target=0.0)
    assert proof.certificate.holds and len(proof.phases) > 1
    assert proof.phases[-1].route == "definite" and proof.phases[-1].t_end == math.inf
    assert not prove_details(problem, target=0.0, chain=False).certificate.holds


# -- falsification with teeth --------------------------------------------------------------

def test_sampler_never_beats_the_proof_and_catches_a_wrong_constant(wide):
    problem, proof = wide
    c = proof.constants
    g = torch.Generator().manual_seed(5)
    honest = falsify_proof(problem, proof, samples=12, generator=g)
    assert honest.samples >= 12 and honest.rayleigh_points > 0 and honest.phases_checked >= 2
    assert not honest.falsified, honest.counterexamples
    assert honest.max_lip_j_ratio <= c.lip_j and honest.max_lip_f_margin <= 1
    assert honest.min_rayleigh_margin >= 1
    # teeth: the same sampler with Lip_J/100 must find a counterexample
    wrong = falsify_proof(problem, proof, samples=12, lip_j_factor=0.01,
                          generator=torch.Generator().manual_seed(5))
    assert wrong.falsified and "Lip_J" in wrong.counterexamples[0]


def test_sampler_catches_wrong_lip_f_and_rho(narrow):
    problem, proof = narrow
    c, ph = proof.constants, proof.phases[0]
    kw = dict(radius=ph.r, loss0=c.loss0, samples=16, generator=torch.Generator().manual_seed(6))
    assert falsify(problem, lip_j=c.lip_j / 100, lip_f=ph.lip_f, rho=ph.rho, **kw).falsified
    assert falsify(problem, lip_j=c.lip_j, lip_f=ph.lip_f / 100, rho=ph.rho, **kw).falsified
    assert falsify(problem, lip_j=c.lip_j, lip_f=ph.lip_f, rho=ph.rho * 100, **kw).falsified
    assert not falsify(problem, lip_j=c.lip_j, lip_f=ph.lip_f, rho=ph.rho, **kw).falsified


def test_chained_proof_beats_one_ball_and_every_phase_is_consistent(wide):
    problem, proof = wide
    one = prove_details(problem, chain=False)
    assert one.certificate.holds and len(one.phases) == 1
    assert len(proof.phases) > 1 and proof.target < one.target
    prev = None
    for ph in proof.phases:
        assert ph.path_end < ph.r and ph.rho > 0 and ph.t_end > ph.t_start
        if prev is not None:   # phases join: level, path and time carry over
            assert ph.s_top == prev.s_bottom and ph.path_start == prev.path_end
            assert ph.t_start == prev.t_end
        prev = ph
    # the piecewise bound lies below the single-rate one it certifies
    t = np.linspace(0, proof.time, 50)
    assert np.all(proof.bound(t) <= proof.constants.loss0 * np.exp(-2 * proof.rho * t) + 1e-15)


# -- unavailable, with the reason in numbers ------------------------------------------------

def test_large_radius_has_no_positive_rho(wide):
    problem, _ = wide
    p = prove_details(problem, radius=50.0)
    assert p.certificate.status is CertificateStatus.UNAVAILABLE
    assert p.certificate.reason is Reason.PROOF_RHO_NONPOSITIVE
    assert "perturbation term" in p.statement and f"{p.constants.a0:.4g}" in p.statement
    assert p.certificate.to_dict()["status"] == "unavailable"


def test_unsupported_models_and_losses_are_refused():
    data, g = _dntk_data()
    relu = TwoLayer(5, 8, activation="relu", generator=g)
    p = prove_details(rf.Problem(rf.Model(relu), data, "square"))
    assert p.certificate.reason is Reason.PROOF_UNSUPPORTED and "ReLU" in p.statement
    deep = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                         nn.Linear(4, 1)).double()
    p = prove_details(rf.Problem(rf.Model(deep), data, "square"))
    assert p.certificate.reason is Reason.PROOF_UNSUPPORTED and "deeper" in p.statement
    x = torch.randn(8, 3, dtype=torch.float64)
    logistic = rf.Problem(rf.Model(nn.Linear(3, 1).double()),
                          rf.Dataset.from_arrays(x, torch.arange(8) % 2), "logistic")
    p = prove_details(logistic)
    assert p.certificate.reason is Reason.PROOF_UNSUPPORTED and "logistic" in p.statement
    with pytest.raises(ValueError, match="target"):
        prove_details(logistic, target=-1.0)


# -- softmax cross-entropy: the functional KL constant and the CE desingularizer -------------

def test_cross_entropy_proves_a_target_never_zero_and_the_run_obeys():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 3, (12,), generator=g)
    net = TwoLayer(2, 64, outputs=3, generator=torch.Generator().manual_seed(1))
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "cross-entropy")
    proof = prove_details(problem)
    cert = proof.certificate
    assert cert.holds and cert.scope is Scope.PROVEN and cert.desingularizer.name == "cross-entropy"
    assert 0 < proof.target < proof.constants.loss0_lo
    assert cert.mu == pytest.approx(proof.rho * 0.125, rel=1e-9)     # c = κ·k/(k−1) = 1/8
    assert cert.time_to(proof.target) == pytest.approx(proof.time, rel=1e-6)
    zero = prove_details(problem, target=0.0)
    assert not zero.certificate.holds and "only targets are provable" in zero.statement
    tracker = BallTracker(problem)
    res = rf.gradient_flow(rf.Problem(tracker.model(), problem.data, "cross-entropy"),
                           t_max=3 * proof.time, records=rf.LogSpaced(15))
    check = check_run(proof, res.trajectory, tracker)
    assert check.passed and check.stages_ok, (check.failures, check.stage_failures)
    f = falsify_proof(problem, proof, samples=12, generator=torch.Generator().manual_seed(2))
    assert not f.falsified and f.rayleigh_points > 0, f.counterexamples
    assert falsify_proof(problem, proof, samples=12, rho_factor=100).falsified


# -- linear models: Lip_J = 0 exactly --------------------------------------------------------

def test_linear_overparameterized_converges_to_zero_and_the_run_obeys():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    y = torch.randn(4, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    lin = nn.Linear(10, 1).double()
    problem = rf.Problem(rf.Model(lin), rf.Dataset.from_arrays(x, y), "square")
    proof = prove_details(problem, target=0.0)
    assert proof.certificate.holds and proof.target == 0.0 and proof.constants.lip_j == 0.0
    jt = torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], 1) / 2   # √(1/n) rows
    lam_min = float(torch.linalg.eigvalsh(jt @ jt.T)[0])
    assert proof.rho <= lam_min and proof.rho >= lam_min * (1 - 1e-8)   # exact up to rounding
    tracker = BallTracker(problem)
    res = rf.gradient_flow(rf.Problem(tracker.model(), problem.data, "square"), t_max=30.0,
                           records=rf.LogSpaced(10))
    check = check_run(proof, res.trajectory, tracker)
    assert check.passed, check.failures
    assert math.isclose(check.radius, proof.radius)


def test_linear_least_squares_is_proven_globally_with_the_exact_minimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) \
        + 0.3 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    problem = rf.Problem(rf.Model(nn.Linear(3, 1).double()), rf.Dataset.from_arrays(x, y),
                         "square")
    xt = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1).numpy()
    sol = np.linalg.lstsq(xt, y.numpy(), rcond=None)[0]
    lstar = 0.5 * float(np.mean((xt @ sol - y.numpy()) ** 2))
    proof = prove_details(problem)
    cert = proof.certificate
    assert cert.holds and cert.desingularizer.name.startswith("plateau")
    assert proof.eta >= lstar and proof.eta <= lstar * (1 + 1e-9)      # exact up to rounding
    sig2 = float(np.linalg.eigvalsh(xt.T @ xt / 40)[0])
    assert cert.mu <= 2 * sig2 and cert.mu >= 2 * sig2 * (1 - 1e-8)
    below = prove_details(problem, target=0.5 * lstar)
    assert not below.certificate.holds and "provably never reaches it" in below.statement
    assert prove_details(problem, target=2 * lstar).certificate.holds
    tracker = BallTracker(problem)
    res = rf.gradient_flow(rf.Problem(tracker.model(), problem.data, "square"), t_max=30.0,
                           records=rf.LogSpaced(15))
    check = check_run(proof, res.trajectory, tracker)
    assert check.passed, check.failures


def test_two_layer_variants_prove_and_obey_the_sampler():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.5
    data = rf.Dataset.from_arrays(x, y)
    for act in ("softplus", "gelu"):
        net = TwoLayer(3, 64, outputs=2, activation=act, generator=torch.Generator()
                       .manual_seed(5))
        net.out.weight.requires_grad_(False)             # output layer fixed
        problem = rf.Problem(rf.Model(net), data, "square")
        proof = prove_details(problem)
        assert proof.certificate.holds, proof.statement
        f = falsify_proof(problem, proof, samples=9)
        assert not f.falsified, f.counterexamples


def test_cli_prove(tmp_path, capsys):
    from rayleighflow.cli import main

    cfg = tmp_path / "mlp.toml"
    cfg.write_text('name = "tiny"\nseed = 0\n[model]\nkind = "mlp"\nwidths = [32]\n'
                   'activation = "tanh"\n[data]\nkind = "teacher-student"\nn_samples = 6\n'
                   'dim = 2\n[loss]\nname = "square"\n')
    out_json = tmp_path / "proof.json"
    rc = main(["prove", str(cfg), "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0 and text.startswith("proven:") and "Lip_J" in text
    assert json.loads(out_json.read_text())["status"] == "holds"
    rc = main(["prove", str(cfg), "--target", "0"])
    text = capsys.readouterr().out
    assert rc == 3 and text.startswith("no proof")


# -- soundness sweep: random small instances, every proof checked against its run ------------

@pytest.mark.parametrize("seed", range(8))
def test_random_instances_never_contradict_their_proofs(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    act = ("tanh", "softplus", "sigmoid", "gelu")[seed % 4]
    n, d, m = (3, 6)[seed % 2], (1, 2)[(seed // 2) % 2], (16, 256)[(seed // 4) % 2]
    noise = 0.2
    if seed >= 6:   # wide, few points, small residual: convergence to zero is provable
        n, d, m, noise = 3, 1, 4096, 0.05
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    if seed >= 6:
        x = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    net = TwoLayer(d, m, activation=act, generator=g)
    if seed % 3 == 2:
        net.out.weight.requires_grad_(False)
    with torch.no_grad():
        y = net(x) + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square")
    proven = []
    for target in (None, 0.0):
        proof = prove_details(problem, target=target)
        if not proof.certificate.holds:
            assert proof.certificate.reason is not None
            continue
        horizon = proof.time if math.isfinite(proof.time) else 50.0
        tracker = BallTracker(problem)
        res = rf.gradient_flow(rf.Problem(tracker.model(), problem.data, "square"),
                               t_max=min(2 * horizon, 100.0), records=rf.LogSpaced(8))
        check = check_run(proof, res.trajectory, tracker)
        assert check.passed, (act, target, check.failures)   # records: points of the flow
        assert check.record_points >= 2
        f = falsify_proof(problem, proof, samples=6, generator=torch.Generator().manual_seed(seed))
        assert not f.falsified, (act, target, f.counterexamples)
        proven.append(proof.target)
    assert proven, "every instance of the sweep proves at least a target"
    if seed >= 6:
        assert 0.0 in proven, "the wide instances prove convergence to zero"
