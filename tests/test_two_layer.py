"""The two-layer experiment (THEORY.md R3; issue 7 items 9 and 10): plateau detection,
Clopper–Pearson intervals, and notes that follow the summary's numbers."""

import math

import numpy as np
import pytest

from rayleighflow.experiments.plateau import (
    clopper_pearson,
    detect_plateau,
    success_interval,
)
from rayleighflow.experiments.registry import run_experiment
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
def quick(tmp_path_factory):
    return run_experiment("two-layer", tmp_path_factory.mktemp("tl") / "run", quick=True)


def _fmt(x):
    return "—" if x is None else f"{x:.3g}"


def _check_notes_match(s):
    """Each width's note states exactly the summary's numbers and statuses."""
    notes = s["notes"]
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        note = next(n for n in notes if n.startswith(f"m = {m} (P = {w['P']},"))
        assert f"{w['plateaued']} of {w['seeds']} seeds plateaued" in note
        assert f"{w['successes']} of {w['seeds']} with η < ε = {s['eps']:g}" in note
        lo, hi = w["success_ci95"]
        assert f"[{lo:.2f}, {hi:.2f}] (Clopper–Pearson 95%)" in note
        if w["plateaued"]:
            assert f"median η = {_fmt(w['eta_median'])}" in note
        else:
            assert "median η" not in note
        if w["undecided"]:
            assert f"{w['undecided']} not plateaued by t_max (no η" in note
        for counts in w["certificate_counts"].values():
            for status, n in counts.items():
                assert f"{n} {status}" in note
        below_rank = w["P"] < s["nk"]
        assert w["P_vs_nk"] == ("P < nk" if below_rank else "P ≥ nk")
        if w["lambda_min_label"] == STRUCTURAL_ZERO:
            assert below_rank and "structural" in note and "not a measurement" in note
        else:
            assert "by rank" not in note and "structural" not in note and "rank K ≤ P" not in note
            assert f"min λ_min(K) = {_fmt(w['lambda_min'])}" in note
    pop = s["population"]
    ratio_note = next(n for n in notes if n.startswith("n_train / P_max"))
    assert f"{pop['n_train_over_P_max']:.3g}" in ratio_note
    assert ("stands in for the population flow" in ratio_note) == pop["population_like"]
    slope = s["eta_loglog_slope_descriptive"]
    if slope is None:
        assert any("no log-log slope" in n for n in notes)
    else:
        assert any(f"{slope:.3g} (descriptive" in n for n in notes)


def test_quick_run_summary(quick):
    s = quick
    assert s["status"] == "complete"
    assert "lambda_min_zero_where_underparameterized" not in s
    assert s["seeds"] >= 4
    assert s["population"]["population_like"]  # n_train ≥ 8·P for the largest width
    assert s["population"]["n_train"] >= 8 * s["population"]["P_max"]
    for key in ("widths", "eta", "plateaued", "success_fraction", "success_ci95",
                "eta_loglog_slope_descriptive", "plateau_rule", "per_width", "runs"):
        assert key in s
    assert s["max_bound_violation"] is not None and s["max_bound_violation"] <= 0
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        lo, hi = w["success_ci95"]
        assert 0 <= lo <= w["success_fraction"] <= w["success_fraction_if_undecided_succeed"] <= hi
        assert w["plateaued"] + w["undecided"] == w["seeds"]
        runs = s["runs"][str(m)]
        for r in runs:  # η only where the detector said plateau, on both curves
            assert (r["eta"] is not None) == r["plateaued"]
            if r["plateaued"]:
                assert r["train_plateau"]["rel_change"] <= s["plateau_rule"]["tol"]
                assert r["test_plateau"]["rel_change"] <= s["plateau_rule"]["tol"]
                assert r["gap"] == pytest.approx(r["eta"] - r["eta_train"])
        assert w["eta_median"] == (None if not w["plateaued"] else
                                   pytest.approx(np.median([r["eta"] for r in runs
                                                            if r["eta"] is not None])))
        # every λ_min here is structural: P < nk on the fixed sample
        assert w["lambda_min_label"] == STRUCTURAL_ZERO and w["lambda_min"] == 0.0
    for c in s["certificates"]:  # all from Certificate.to_dict (cert_dicts)
        assert {"scope", "reason", "what_was_checked", "n_grad_evals_checked",
                "label"} <= set(c)
        if c["desingularizer"].startswith("plateau"):
            assert c["mu_source"] == "observed"


def test_quick_run_notes_match_the_numbers(quick):
    _check_notes_match(quick)


def test_widths_above_n_do_not_claim_a_structural_zero(tmp_path):
    # n_train = 12, widths 8 and 16: P = 32, 64 > nk = 12
    s = run_experiment("two-layer", tmp_path / "wide", quick=True, overrides={
        "widths": [8, 16], "seeds": 2, "n_train": 12, "n_test": 64, "t_max": 16.0,
        "n_records": 8})
    assert s["status"] == "complete"
    assert not s["population"]["population_like"]
    for m in s["widths"]:
        w = s["per_width"][str(m)]
        assert w["P"] > s["nk"] and w["lambda_min_label"] != STRUCTURAL_ZERO
        assert w["lambda_min"] is not None and math.isfinite(w["lambda_min"])
    assert s["lambda_min_label"] != STRUCTURAL_ZERO
    _check_notes_match(s)
    joined = " ".join(s["notes"])
    assert "by rank" not in joined and "λ_min(K) = 0 is structural" not in joined
    assert "too small to stand in for the population flow" in joined
