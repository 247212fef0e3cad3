"""Bias-aware scoring: an answer bias moves the two halves apart and is not counted as a persona shift."""

from __future__ import annotations

import pytest

from peft_persona.eval.balance import balanced, half_shifts


def values(first_minus_second: list[float], matching: list[int]) -> dict[str, list]:
    margin = [d if m == 0 else -d for d, m in zip(first_minus_second, matching, strict=True)]
    correct = [1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in margin]
    return {"first_minus_second": first_minus_second, "matching": matching, "margin": margin, "correct": correct}


MATCHING = [0, 0, 0, 1, 1, 1, 1, 1]  # three items whose persona answer is "Yes", five whose is "No"


def test_all_yes_scores_half_whatever_the_imbalance():
    all_yes = balanced(values([1.0] * 8, MATCHING))
    assert all_yes["first_matches"] == {"n": 3, "accuracy": 1.0, "margin": 1.0}
    assert all_yes["second_matches"] == {"n": 5, "accuracy": 0.0, "margin": -1.0}
    assert all_yes["balanced_accuracy"] == 0.5 and all_yes["first_choice_share"] == 1.0


def test_a_yes_bias_is_not_a_persona_shift_but_a_shift_of_both_halves_is():
    base = values([0.1, -0.2, 0.3, 0.2, -0.1, 0.4, -0.3, 0.0], MATCHING)
    yes_bias = values([d + 2.0 for d in base["first_minus_second"]], MATCHING)
    shift = half_shifts(yes_bias, base)
    assert shift["first_matches"]["diff"] == pytest.approx(2.0)
    assert shift["second_matches"]["diff"] == pytest.approx(-2.0)
    assert shift["answer_bias_shift"] == pytest.approx(1.0 - 4 / 8)  # base prefers "Yes" on 4 of 8
    assert not shift["moves_both"]
    persona = values(
        [d + (0.5 if m == 0 else -0.5) for d, m in zip(base["first_minus_second"], MATCHING, strict=True)], MATCHING
    )
    moved = half_shifts(persona, base)
    assert moved["moves_both"] and moved["balanced_accuracy_shift"] > 0
    assert moved["first_matches"]["diff"] == pytest.approx(0.5) == moved["second_matches"]["diff"]


def test_a_missing_half_leaves_the_balanced_scores_undefined():
    one_sided = values([1.0, -1.0], [0, 0])
    assert balanced(one_sided)["second_matches"]["accuracy"] is None
    assert balanced(one_sided)["balanced_accuracy"] is None
    assert half_shifts(one_sided, one_sided)["moves_both"] is False


def test_different_items_are_refused():
    with pytest.raises(ValueError, match="same items"):
        half_shifts(values([1.0], [0]), values([1.0], [1]))


def test_balanced_mean_cancels_an_answer_bias_and_brackets_its_estimate():
    from peft_persona.eval.balance import balanced_mean

    bias = [2.0 if m == 0 else -2.0 for m in MATCHING]  # +2 on the three "Yes" items, -2 on the five "No" items
    assert balanced_mean(bias, MATCHING)["mean"] == pytest.approx(0.0)
    shift = [0.3 + 0.1 * i for i in range(8)]
    result = balanced_mean(shift, MATCHING)
    assert result["mean"] == pytest.approx((sum(shift[:3]) / 3 + sum(shift[3:]) / 5) / 2)
    assert result["ci_low"] <= result["mean"] <= result["ci_high"]
    assert balanced_mean([1.0, 3.0], [1, 1])["mean"] == 2.0
