"""The two-layer experiment (THEORY.md R3; issues 7 and 19): plateau detection, Clopper–Pearson
intervals, decisions that follow from their evidence, and notes that follow the numbers."""


import numpy as np
import pytest

from rayleighflow.experiments.plateau import (
    clopper_pearson,
    detect_plateau,
    success_interval,
)
from rayleighflow.experiments.registry import run_experiment
from rayleighflow.experiments.two_layer_read import BELOW, FAILED, UNDECIDED
from rayleighflow.ntk.spectrum import STRUCTURAL_ZERO

# -- plateau detector ---------------------------------------------------------------------------


def test_plateau_detected_on_a_converged_curve():
    t = np.concatenate([[0.0], np.geomspace(1, 1024, 11)])
    loss = 0.02 + 0.5 * np.exp(-t / 20)  # at its level long before t_end / 2 = 512
    r = detect_plateau(t, loss, 0.01)
    assert r.plateaued and r.t_from == pytest.approx(512) and r.t_to == 1024
    assert r.rel_change < 1e-6 and r.level == pytest.approx(0.02)


def test_still_falling_curve_is_not_a_plateau():
    t = np.concatenate([[0.0], np.geomspace(1, 1024, 11)])
    loss = 1.0 / (1.0 + t)  # halves over every doubling: no plateau, whatever t_max
    r = detect_plateau(t, loss, 0.05)
    assert not r.plateaued
    assert r.rel_change == pytest.approx((1 / 513 - 1 / 1025) / (1 / 1025))


def test_plateau_tolerance_is_the_threshold():
    t = np.array([0.0, 1.0, 2.0])
    loss = np.array([1.0, 1.03, 1.0])  # rises then falls back: |change| over [1, 2] is 3%
    assert detect_plateau(t, loss, 0.031).plateaued
    assert not detect_plateau(t, loss, 0.029).plateaued


def test_plateau_needs_a_doubling_and_a_finite_level():
    assert not detect_plateau(np.array([0.0]), np.array([1.0]), 0.1).plateaued
    assert not detect_plateau(np.array([0.0, 1.0]), np.array([1.0, np.nan]), 0.1).plateaued
    with pytest.raises(ValueError):
        detect_plateau(np.array([0.0, 1.0]), np.array([1.0, 1.0]), 0.0)


# -- Clopper–Pearson -----------------------------------------------------------------------------


@pytest.mark.parametrize("k, n, lo, hi", [
    # reference values (R: binom.test(k, n)$conf.int)
    (0, 16, 0.0, 0.2059),
    (16, 16, 0.7941, 1.0),
    (8, 16, 0.2465, 0.7535),
    (3, 10, 0.0667, 0.6525),
    (1, 4, 0.0063, 0.8059),
])
def test_clopper_pearson_known_values(k, n, lo, hi):
    got = clopper_pearson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_clopper_pearson_closed_forms():
    # k = 0: upper end 1 − (α/2)^(1/n); k = n: lower end (α/2)^(1/n)
    for n in (1, 4, 16, 50):
        assert clopper_pearson(0, n)[1] == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-10)
        assert clopper_pearson(n, n)[0] == pytest.approx(0.025 ** (1 / n), rel=1e-10)
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)


def test_undecided_seeds_widen_the_interval():
    assert success_interval(3, 0, 8) == clopper_pearson(3, 8)
    lo, hi = success_interval(3, 2, 8)
    assert lo == clopper_pearson(3, 8)[0] and hi == clopper_pearson(5, 8)[1]


# -- the quick run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(two_layer_quick):
    return two_layer_quick


@pytest.fixture(scope="module")
def quick(quick_run):
    return quick_run[1]


def _fmt(x):
    return "—" if x is None else f"{x:.3g}"


def _check_decisions(s):
    """Every decision follows from the evidence recorded with it."""
    eps, rule = s["eps"], s["decision_rule"]
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        runs = s["runs"][str(m)]
        assert w["below"] + w["failed"] + w["undecided"] == w["seeds"] == len(runs)
        for r in runs:
            if r["decision"] == BELOW:   # a loss checked below ε by the margin
                assert r["rule"] == "checked loss" and r["flow_status"] == "loss_target"
                assert r["loss_final"] <= eps * (1 - rule["margin"])
            elif r["decision"] == FAILED and r["rule"] == "strict minimum":
                ev = r["evidence"]
                assert ev["strict_minimum"] and ev["positive_definite"]
                assert ev["lower_bound"] >= eps and ev["lambda_min"] > 0
                assert ev["lower_bound"] <= r["loss_final"]
                assert ev["newton_step"] <= rule["newton_rtol"] * max(1.0, ev["theta_norm"])
            elif r["decision"] == FAILED:
                assert r["rule"] == "plateau at t_max" and r["flow_status"] == "t_max"
                assert r["plateau"]["plateaued"] and r["plateau"]["level"] >= eps
            assert r["eta"] == r["loss_final"]
        k = w["below"]
        assert tuple(w["success_ci95"]) == pytest.approx(
            success_interval(k, w["undecided"], w["seeds"]))
        decided = [r["eta"] for r in runs if r["decision"] != UNDECIDED]
        assert w["eta_median"] == (pytest.approx(float(np.median(decided))) if decided else None)


def _check_notes_match(s):
    """Each width's note states exactly the summary's numbers and statuses."""
    notes = s["notes"]
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        note = next(n for n in notes if n.startswith(f"m = {m} (P = {w['P']},"))
        assert (f"{w['below']} of {w['seeds']} seeds decided η < ε = {s['eps']:g}, "
                f"{w['failed']} decided η ≥ ε, {w['undecided']} undecided") in note
        lo, hi = w["success_ci95"]
        assert f"1 − δ in [{lo:.2f}, {hi:.2f}] (Clopper–Pearson 95%" in note
        for rule, n in w["decided_by"].items():
            assert f"{rule} ({n})" in note
        if w["failed"]:
            assert f"median {_fmt(w['eta_failed_median'])}" in note
        for counts in w["certificate_counts"].values():
            for status, n in counts.items():
                assert f"{n} {status}" in note
        below_rank = w["P"] < s["nk"]
        assert w["P_vs_nk"] == ("P < nk" if below_rank else "P ≥ nk")
        if w["lambda_min_label"] == STRUCTURAL_ZERO:
            assert below_rank and "structural" in note and "not a measurement" in note
        else:
            assert "structural" not in note and f"min λ_min(K) = {_fmt(w['lambda_min'])}" in note
    joined = " ".join(notes)
    first = s["smallest_width_at_level"]
    if first is None:
        assert f"At no width does the 95% lower end of 1 − δ reach {s['level']:g}" in joined
    else:
        assert f"m = {first} (lower end {s['per_width'][str(first)]['success_ci95'][0]:.3f}" \
            in joined
        lows = [s["per_width"][str(m)]["success_ci95"][0] for m in s["widths"]]
        assert lows[s["widths"].index(first)] >= s["level"]
        assert all(lo < s["level"] for lo in lows[:s["widths"].index(first)])
    chk = s["integrator_check"]
    assert f"is {_fmt(chk['max_rel_diff'])} (margin {chk['margin']:g})" in joined
    assert chk["max_rel_diff"] == max(c["rel_diff"] for c in chk["per_width"].values())


def test_quick_run_decides_every_seed_and_shows_the_crossing(quick):
    s = quick
    assert s["status"] == "complete" and s["seeds"] >= 6
    _check_decisions(s)
    assert sum(s["undecided"]) == 0
    small, large = s["widths"][0], s["widths"][-1]
    assert s["per_width"][str(small)]["failed"] > s["seeds"] / 2   # η ≥ ε for most seeds
    assert s["per_width"][str(large)]["below"] == s["seeds"]       # η < ε for all
    assert any("η(m) crosses ε" in n for n in s["notes"])
    pop = s["population"]   # the rule is the population up to its stated error
    assert pop["measure"] == "quadrature" and pop["quadrature_error_max"] < 1e-6
    for m in s["widths"]:   # ... which the independent Monte Carlo sample agrees with
        w = s["per_width"][str(m)]
        assert w["mc_z_max_abs"] < 5 and w["could_flip"] == 0
    assert s["integrator_check"]["max_rel_diff"] <= s["integrator_check"]["margin"]
    assert "PATH" in s["notes"][-1] and "implicit LSODA" in s["notes"][-1]
    assert s["max_bound_violation"] is not None and s["max_bound_violation"] <= 0
    for c in s["certificates"]:
        assert c["scope"] in ("path", "records")
        if c["desingularizer"].startswith("plateau"):
            assert c["mu_source"] == "observed"


def test_quick_run_notes_match_the_numbers(quick):
    _check_notes_match(quick)


def test_quick_run_figure_arrays(quick_run):
    out, s = quick_run
    with np.load(out / "arrays.npz") as z:
        failed, below = z["failed_eta"], z["below_eta"]
        assert failed.size == sum(s["failed"]) and below.size == sum(s["below"])
        assert bool(np.all(failed >= s["eps"])) and bool(np.all(below < s["eps"]))
        np.testing.assert_allclose(z["success"], s["success_fraction"])


def test_a_monte_carlo_training_sample_reports_its_gap_and_a_failed_check_withdraws(tmp_path):
    # one small run for two rules: the held-out gap of a Monte Carlo training sample, and an
    # integrator check above its (absurdly tight) margin withdrawing the below-ε decisions
    s = run_experiment("two-layer", tmp_path / "mc", quick=True, overrides={
        "widths": [8], "seeds": 2, "measure": "sample", "n_train": 96, "n_mc": 1024,
        "margin": 1e-15})
    assert s["status"] == "complete" and s["population"]["measure"] == "sample"
    w = s["per_width"]["8"]
    gaps = [abs(r["mc_loss"] - r["loss_final"]) for r in s["runs"]["8"]]
    assert w["mc_gap_max_abs"] == pytest.approx(max(gaps))
    joined = " ".join(s["notes"])
    assert "fixed Monte Carlo sample of n = 96" in joined and "held-out" in joined
    _check_decisions(s)
    chk = s["integrator_check"]
    assert chk["max_rel_diff"] > 1e-15 and chk["withdrawn_widths"] == [8]
    assert w["below"] == 0 and w["undecided"] == 2 and w["could_flip"] == 0
    assert all(r["rule"] == "integrator check above margin" for r in s["runs"]["8"])
    assert "the below-ε decisions are withdrawn" in joined
    assert "for no seed does it (± 2 standard errors) lie on the other side of ε" in joined


def test_the_verdict_flip_rule_of_a_monte_carlo_training_sample():
    from rayleighflow.experiments.two_layer_read import _could_flip

    row = {"quadrature_error": None, "loss_final": 0.009, "mc_se": 0.0005}
    assert _could_flip({**row, "decision": BELOW, "mc_loss": 0.0092}, 0.01)    # + 2 SE ≥ ε
    assert not _could_flip({**row, "decision": BELOW, "mc_loss": 0.0085}, 0.01)
    assert _could_flip({**row, "decision": FAILED, "mc_loss": 0.0105}, 0.01)   # − 2 SE < ε
    assert not _could_flip({**row, "decision": FAILED, "mc_loss": 0.012}, 0.01)
    assert not _could_flip({**row, "decision": UNDECIDED, "mc_loss": 0.01}, 0.01)
    quad = {"quadrature_error": 1e-9, "mc_loss": 0.5, "mc_se": 1.0, "decision": BELOW}
    assert not _could_flip({**quad, "loss_final": 0.00999}, 0.01)             # the rule decides
    assert _could_flip({**quad, "loss_final": 0.01 - 1e-10}, 0.01)
