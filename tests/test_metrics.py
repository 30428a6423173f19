"""Metric values checked against small tables worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lcprobe.analysis import metrics
from lcprobe.analysis.metrics import (
    METRICS,
    aggregate,
    best_layer,
    bootstrap_ci,
    discordant_counts,
    item_metrics,
    mcnemar_exact,
)


def test_three_choices_two_layers():
    # choice 0 is true. Layer 0: scores -1, -2, -4 -> choice 0 wins.
    # Layer 1: scores -3, -1, -2 -> false choice 1 wins.
    scores = np.array([[-1.0, -3.0], [-2.0, -1.0], [-4.0, -2.0]])
    m = item_metrics(scores, [0])
    assert list(m) == list(METRICS)
    # no lengths given: the normalised accuracies are undefined, not omitted
    assert np.all(np.isnan(m["acc_per_token"])) and np.all(np.isnan(m["acc_per_byte"]))
    np.testing.assert_array_equal(m["acc"], [1.0, 0.0])
    np.testing.assert_array_equal(m["mc1"], [1.0, 0.0])
    np.testing.assert_array_equal(m["mc3"], [1.0, 0.0])
    e = math.exp
    mc2_l0 = e(-1) / (e(-1) + e(-2) + e(-4))
    mc2_l1 = e(-3) / (e(-3) + e(-1) + e(-2))
    np.testing.assert_allclose(m["mc2"], [mc2_l0, mc2_l1], rtol=1e-12)
    for v in m.values():
        assert v.shape == (2,)


def test_mc3_fractions_and_mc1_vs_acc():
    # three true choices (0 best, 1, 2) and one false (3).
    scores = np.array(
        [
            [-1.0, -4.0],
            [-2.0, -1.0],
            [-5.0, -2.0],
            [-3.0, -3.0],  # the only false answer
        ]
    )
    m = item_metrics(scores, [0, 1, 2])
    # layer 0: -1 and -2 beat -3, -5 does not; layer 1: -1 and -2 beat -3, -4 does not
    np.testing.assert_allclose(m["mc3"], [2 / 3, 2 / 3])
    # best true answer: -1 > -3 (win) then -4 < -3 (loss)
    np.testing.assert_array_equal(m["mc1"], [1.0, 0.0])
    # argmax is a true choice at both layers (0, then 1)
    np.testing.assert_array_equal(m["acc"], [1.0, 1.0])
    e = math.exp
    l0 = (e(-1) + e(-2) + e(-5)) / (e(-1) + e(-2) + e(-5) + e(-3))
    l1 = (e(-4) + e(-1) + e(-2)) / (e(-4) + e(-1) + e(-2) + e(-3))
    np.testing.assert_allclose(m["mc2"], [l0, l1], rtol=1e-12)


def test_ties():
    scores = np.array([[-1.0], [-1.0]])
    first_true = item_metrics(scores, [0])
    # argmax takes the first maximal choice; mc1/mc3 need a strict win
    assert first_true["acc"][0] == 1.0
    assert first_true["mc1"][0] == 0.0
    assert first_true["mc3"][0] == 0.0
    assert first_true["mc2"][0] == pytest.approx(0.5)
    second_true = item_metrics(scores, [1])
    assert second_true["acc"][0] == 0.0
    assert second_true["mc1"][0] == 0.0
    assert second_true["mc2"][0] == pytest.approx(0.5)


def test_mc2_is_stable_for_very_negative_scores():
    scores = np.array([[-1000.0, -1001.0], [-1001.0, -1000.0]])
    m = item_metrics(scores, [0])
    # exp(-1000) underflows to 0 in float64, so a naive ratio would be 0/0
    with np.errstate(all="ignore"):
        naive = np.exp(scores[0]) / np.exp(scores).sum(axis=0)
    assert np.all(np.isnan(naive))
    s = 1 / (1 + math.exp(-1))  # e^0 / (e^0 + e^-1)
    np.testing.assert_allclose(m["mc2"], [s, 1 - s], rtol=1e-12)

    far = item_metrics(np.array([[-1000.0], [-10000.0]]), [0])
    assert far["mc2"][0] == 1.0
    far = item_metrics(np.array([[-10000.0], [-1000.0]]), [0])
    assert far["mc2"][0] == 0.0


def test_length_normalisation_changes_the_winner():
    scores = np.array([[-6.0], [-4.0]])  # raw: choice 1 (false) wins
    m = item_metrics(scores, [0], n_tokens=[3, 1], n_bytes=[4, 8])
    assert list(m) == list(METRICS)
    assert m["acc"][0] == 0.0
    # per token: -6/3 = -2 vs -4/1 = -4 -> choice 0 (true) wins
    assert m["acc_per_token"][0] == 1.0
    # per byte: -6/4 = -1.5 vs -4/8 = -0.5 -> choice 1 (false) wins
    assert m["acc_per_byte"][0] == 0.0


def test_length_normalisation_is_per_layer():
    scores = np.array([[-6.0, -1.0], [-4.0, -3.0]])
    m = item_metrics(scores, [0], n_tokens=[3, 1])
    np.testing.assert_array_equal(m["acc"], [0.0, 1.0])
    # layer 1: -1/3 vs -3 -> choice 0 either way
    np.testing.assert_array_equal(m["acc_per_token"], [1.0, 1.0])
    assert np.all(np.isnan(m["acc_per_byte"]))


def test_no_false_choices_is_trivially_solved():
    m = item_metrics(np.array([[-3.0, -1.0], [-2.0, -5.0]]), [1, 0])
    for k in ("acc", "mc1", "mc2", "mc3"):
        np.testing.assert_array_equal(m[k], [1.0, 1.0])


def test_one_dimensional_scores_are_one_layer():
    m = item_metrics(np.array([-1.0, -2.0]), [0])
    assert m["acc"].shape == (1,)
    assert m["acc"][0] == 1.0


@pytest.mark.parametrize(
    "correct, kwargs, match",
    [
        ([], {}, "no true answer"),
        ([3], {}, "out of range"),
        ([-1], {}, "out of range"),
        ([0, 0], {}, "duplicate"),
        ([0], {"n_tokens": [1, 2]}, "n_tokens must have shape"),
        ([0], {"n_bytes": [1, 0, 2]}, "n_bytes must be positive"),
    ],
)
def test_item_metrics_rejects_bad_input(correct, kwargs, match):
    scores = np.zeros((3, 2))
    with pytest.raises(ValueError, match=match):
        item_metrics(scores, correct, **kwargs)


def test_item_metrics_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        item_metrics(np.array([[np.nan], [-1.0]]), [0])


def test_aggregate_means_over_items():
    a = item_metrics(np.array([[-1.0, -3.0], [-2.0, -1.0], [-4.0, -2.0]]), [0])
    b = item_metrics(np.array([[-1.0, -1.0], [-1.0, -2.0]]), [1])
    agg = aggregate([a, b])
    # acc: item a = [1, 0], item b = [0 (tie, first wins), 0]
    np.testing.assert_allclose(agg["acc"], [0.5, 0.0])
    np.testing.assert_allclose(agg["mc1"], [0.5, 0.0])
    np.testing.assert_allclose(agg["mc2"], (a["mc2"] + b["mc2"]) / 2)
    assert np.all(np.isnan(agg["acc_per_byte"]))
    c = item_metrics(np.array([[-6.0], [-4.0]]), [0], n_tokens=[3, 1], n_bytes=[4, 8])
    d = item_metrics(np.array([[-1.0], [-4.0]]), [0], n_tokens=[1, 1], n_bytes=[1, 1])
    agg = aggregate([c, d])
    assert agg["acc"][0] == 0.5 and agg["acc_per_token"][0] == 1.0 and agg["acc_per_byte"][0] == 0.5


def test_aggregate_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="no items"):
        aggregate([])
    a = item_metrics(np.array([[-1.0], [-2.0]]), [0])
    b = {k: v for k, v in a.items() if k != "mc3"}
    with pytest.raises(ValueError, match="metrics"):
        aggregate([a, b])
    c = item_metrics(np.array([[-1.0, 0.0], [-2.0, 0.0]]), [0])
    with pytest.raises(ValueError, match="layer counts"):
        aggregate([a, c])


def test_best_layer_takes_the_shallowest_maximum():
    assert best_layer(np.array([0.2, 0.5, 0.5, 0.1])) == 1
    assert best_layer(np.array([0.9])) == 0
    assert best_layer(np.array([np.nan, 0.3, 0.1])) == 1
    with pytest.raises(ValueError):
        best_layer(np.array([np.nan, np.nan]))
    with pytest.raises(ValueError):
        best_layer(np.array([]))


def test_mcnemar_exact_hand_values():
    # b=1, c=6: n=7, P(X<=1) = (C(7,0)+C(7,1))/2^7 = 8/128; two-sided doubles it
    assert mcnemar_exact(1, 6) == pytest.approx(0.125, abs=1e-12)
    assert mcnemar_exact(6, 1) == pytest.approx(0.125, abs=1e-12)
    # b=0, c=5: 2 * 1/32
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625, abs=1e-12)
    # b=2, c=10: 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096, abs=1e-12)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_discordant_counts():
    a = np.array([1, 1, 0, 0, 1])
    b = np.array([1, 0, 1, 0, 0])
    assert discordant_counts(a, b) == (2, 1)
    with pytest.raises(ValueError):
        discordant_counts(a, b[:3])


def test_bootstrap_ci_basic_properties():
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.integers(0, 2, 400), np.full(400, 0.25)]).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=3)
    assert lo.shape == hi.shape == (2,)
    mean = x.mean(axis=0)
    assert np.all(lo <= mean) and np.all(mean <= hi)
    # constant column: every resample has the same mean
    assert lo[1] == pytest.approx(0.25) and hi[1] == pytest.approx(0.25)
    # normal approximation half width for a 0/1 mean of 400 items ~ 1.96*sqrt(p(1-p)/400)
    p = mean[0]
    half = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert (hi[0] - lo[0]) / 2 == pytest.approx(half, rel=0.15)
    # deterministic for a seed
    lo2, hi2 = bootstrap_ci(x, n_boot=2000, seed=3)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)


def test_bootstrap_ci_blocks_match_one_pass(monkeypatch):
    x = np.random.default_rng(2).normal(size=(50, 3))
    whole = bootstrap_ci(x, n_boot=300, seed=5)
    monkeypatch.setattr(metrics, "_BOOT_CELLS", 50 * 7)  # 7 resamples per block
    blocked = bootstrap_ci(x, n_boot=300, seed=5)
    # multinomial draws in blocks consume the generator in the same order
    np.testing.assert_allclose(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1])


def test_bootstrap_ci_edge_cases():
    lo, hi = bootstrap_ci(np.array([0.7]), n_boot=10)
    assert lo.shape == (1,) and lo[0] == pytest.approx(0.7) and hi[0] == pytest.approx(0.7)
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((5, 2)), alpha=1.5)
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((5, 2)), n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([[np.nan], [1.0]]))
