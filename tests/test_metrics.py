"""Persona metrics and statistics against hand-computed values, as plain functions and as evaluate modules."""

from __future__ import annotations

import math

import pytest
import torch

from peft_persona import metrics, significance


def test_wilson_interval_matches_hand_computation():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96*sqrt(0.0025 + 0.96^2/40000)/1.0384
    low, high = significance.wilson_ci(50, 100)
    half = 1.959963984540054 * math.sqrt(0.25 / 100 + 1.959963984540054**2 / 40000) / (1 + 1.959963984540054**2 / 100)
    assert low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)
    assert significance.wilson_ci(0, 10)[0] == 0.0 and significance.wilson_ci(10, 10)[1] == pytest.approx(1.0)
    assert significance.wilson_ci(10, 10)[0] == pytest.approx(10 / (10 + 1.959963984540054**2))  # p = 1: n / (n + z^2)
    with pytest.raises(ValueError, match="n > 0"):
        significance.wilson_ci(0, 0)


def test_auc_counts_ties_half():
    assert significance.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert significance.auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert significance.auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # all ties
    # positives {3, 2}, negatives {1, 2}: 3>1, 3>2, 2>1 and one tie (2, 2) -> 3.5 of 4 pairs
    assert significance.auc([3, 1, 2, 2], [1, 0, 1, 0]) == 0.875
    with pytest.raises(ValueError, match="both classes"):
        significance.auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        significance.auc([0.1, 0.2], [1, 0, 1])


def test_sign_test_and_paired_bootstrap():
    # 8 wins, 2 losses, 1 tie: p = 2 * P(X <= 2 | n=10) = 2 * (1 + 10 + 45) / 1024
    a = [1] * 8 + [0] * 2 + [1]
    b = [0] * 8 + [1] * 2 + [1]
    result = significance.sign_test(a, b)
    assert (result["wins"], result["losses"]) == (8, 2)
    assert result["p_value"] == pytest.approx(2 * 56 / 1024)
    assert significance.sign_test([1, 1], [1, 1])["p_value"] == 1.0
    boot = significance.paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert boot == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    boot = significance.paired_bootstrap([2.0] * 20, [1.0] * 20)
    assert boot["diff"] == 1.0 and boot["p_value"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        significance.paired_bootstrap([], [])


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    values = [0.0, 1.0, 2.0, 3.0, 4.0]
    low, high = significance.bootstrap_ci(values, seed=3)
    assert low < 2.0 < high and (low, high) == significance.bootstrap_ci(values, seed=3)
    assert significance.bootstrap_ci([2.5] * 7) == (2.5, 2.5)
    with pytest.raises(ValueError, match="values is empty"):
        significance.bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        significance.bootstrap_ci([1.0, float("nan")])


def test_persona_alignment_values_ties_and_breakdown():
    result = metrics.persona_alignment([0, 1, 1, 0], [0, 1, 0, 1], personas=["e", "e", "a", "a"])
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(significance.wilson_ci(2, 4))
    assert result["per_persona"]["e"]["accuracy"] == 1.0 and result["per_persona"]["a"]["accuracy"] == 0.0
    assert metrics.persona_alignment([-1, -1, -1], [0, 1, 0])["accuracy"] == 0.5  # all ties: half credit
    with pytest.raises(ValueError, match="predictions and references differ in length: 3 vs 4"):
        metrics.persona_alignment([0, 1, 1], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="empty"):
        metrics.persona_alignment([], [])


def test_persona_margin_per_token_and_ties():
    result = metrics.persona_margin([-2.0, -6.0], [-4.0, -3.0], matching_lengths=[2, 3], not_matching_lengths=[2, 1])
    # per token: (-1 - -2) = 1 and (-2 - -3) = 1
    assert result["margin"] == 1.0 and (result["ci_low"], result["ci_high"]) == (1.0, 1.0)
    tied = metrics.persona_margin([-1.5, -2.0, -3.0], [-1.5, -2.0, -3.0])
    assert (tied["margin"], tied["ci_low"], tied["ci_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="matching and not_matching differ in length: 2 vs 1"):
        metrics.persona_margin([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="positive token counts"):
        metrics.persona_margin([-1.0], [-1.0], matching_lengths=[0])
    with pytest.raises(ValueError, match="empty"):
        metrics.persona_margin([], [])


def test_mask_overlap_overall_and_per_layer():
    a = {"q": torch.tensor([[1, 1], [0, 0]], dtype=torch.bool), "k": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}
    b = {"q": torch.tensor([[1, 0], [1, 0]], dtype=torch.bool), "k": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}
    result = metrics.mask_overlap(a, b)
    assert result["per_layer"]["q"]["jaccard"] == pytest.approx(1 / 3)
    assert result["per_layer"]["q"]["difference_rate"] == 0.5
    assert result["per_layer"]["k"] == {
        "jaccard": 1.0,
        "difference_rate": 0.0,
        "density_a": 0.25,
        "density_b": 0.25,
        "size": 4,
    }
    # overall: intersection 2, union 4, differing 2 of 8
    assert result["jaccard"] == 0.5 and result["difference_rate"] == 0.25 and result["density_a"] == 3 / 8
    empty = {"q": torch.zeros(3, dtype=torch.bool)}
    assert metrics.mask_overlap(empty, empty)["jaccard"] == 1.0  # two all-pruned masks are identical
    with pytest.raises(KeyError, match="only in the first: \\['k'\\]"):
        metrics.mask_overlap(a, {"q": b["q"]})
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mask_overlap({"q": a["q"]}, {"q": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="non-empty"):
        metrics.mask_overlap({}, {})
    with pytest.raises(ValueError, match="not binary"):
        metrics.mask_overlap({"q": [0, 2]}, {"q": [0, 1]})


def test_evaluate_modules_load_offline_and_agree_with_functions():
    evaluate = pytest.importorskip("evaluate")
    alignment = evaluate.load(metrics.path("persona_alignment"))
    assert alignment.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    margin = evaluate.load(metrics.path("persona_margin"))
    assert margin.compute(matching=[-1.0, -2.0], not_matching=[-3.0, -2.0])["margin"] == 1.0
    overlap = evaluate.load(metrics.path("mask_overlap"))
    result = overlap.compute(
        predictions=[[True, True, False, False]], references=[[True, False, True, False]], layer_names=["q"]
    )
    assert result["jaccard"] == pytest.approx(1 / 3) and set(result["per_layer"]) == {"q"}
    with pytest.raises(KeyError, match="no persona metric"):
        metrics.path("accuracy")
