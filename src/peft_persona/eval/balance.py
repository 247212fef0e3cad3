"""Bias-aware scores of two-choice items: a persona is moved only if both halves move.

Two-choice items (``yes_no``, ``ab``, ``paper_ab``) fall into two halves: those whose persona-matching answer is the
first choice (" Yes", "A") and those where it is the second. A model that prefers the first choice more often scores
better on one half and worse on the other; raw accuracy over an unbalanced set reads that answer bias as persona.
Here each half is scored on its own, accuracy is balanced over the halves, and an intervention counts as moving the
persona only if its per-item margin rises in both halves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import significance

HALVES = ("first_matches", "second_matches")


def _half_indices(matching: Sequence[int]) -> dict[str, np.ndarray]:
    matching = np.asarray(matching)
    return {HALVES[0]: np.flatnonzero(matching == 0), HALVES[1]: np.flatnonzero(matching == 1)}


def balanced(values: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Per half: accuracy and mean margin; their balanced accuracy; and the share of first-choice answers.

    ``values`` are a choice format's per-item values (``correct``, ``margin``, ``first_minus_second``, ``matching``).
    A half with no items has ``None`` scores and leaves ``balanced_accuracy`` ``None``.
    """
    correct, margin = np.asarray(values["correct"], float), np.asarray(values["margin"], float)
    result: dict[str, Any] = {}
    for half, index in _half_indices(values["matching"]).items():
        result[half] = {
            "n": int(index.size),
            "accuracy": float(correct[index].mean()) if index.size else None,
            "margin": float(margin[index].mean()) if index.size else None,
        }
    accuracies = [result[h]["accuracy"] for h in HALVES]
    result["balanced_accuracy"] = None if None in accuracies else float(np.mean(accuracies))
    result["first_choice_share"] = float(np.mean(np.asarray(values["first_minus_second"], float) > 0))
    return result


def half_shifts(
    values: Mapping[str, Sequence[Any]], reference: Mapping[str, Sequence[Any]], seed: int = 0
) -> dict[str, Any]:
    """How a condition moves each half against ``reference`` on the same items.

    Per half, the paired mean margin difference with its bootstrap CI; ``answer_bias_shift``, the change in the
    share of first-choice answers; ``balanced_accuracy_shift``; and ``moves_both``: whether the margin rose in both
    halves (point estimates), the condition for counting a change as a persona shift rather than an answer bias.
    """
    if list(values["matching"]) != list(reference["matching"]):
        raise ValueError("half_shifts compares two conditions on the same items; their `matching` lists differ")
    margin, ref_margin = np.asarray(values["margin"], float), np.asarray(reference["margin"], float)
    result: dict[str, Any] = {}
    for half, index in _half_indices(values["matching"]).items():
        result[half] = (
            significance.paired_bootstrap(margin[index], ref_margin[index], seed=seed) if index.size else None
        )
    mine, theirs = balanced(values), balanced(reference)
    result["answer_bias_shift"] = mine["first_choice_share"] - theirs["first_choice_share"]
    both = mine["balanced_accuracy"] is not None and theirs["balanced_accuracy"] is not None
    result["balanced_accuracy_shift"] = mine["balanced_accuracy"] - theirs["balanced_accuracy"] if both else None
    result["moves_both"] = all(result[h] is not None and result[h]["diff"] > 0 for h in HALVES)
    return result


def balanced_mean(values: Sequence[float], matching: Sequence[int], seed: int = 0, n_resamples: int = 2000) -> dict:
    """The mean of the two halves' means of per-item ``values``, with a bootstrap 95% CI resampled within each half.

    With both halves present an answer bias that adds the same amount to one half and takes it from the other
    cancels; with one half only, this is that half's mean.
    """
    values = np.asarray(values, float)
    parts = [values[index] for index in _half_indices(matching).values() if index.size]
    if not parts:
        raise ValueError("balanced_mean needs at least one item")
    rng = np.random.default_rng(seed)
    draws = np.mean([p[rng.integers(0, p.size, size=(n_resamples, p.size))].mean(axis=1) for p in parts], axis=0)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(np.mean([p.mean() for p in parts])), "ci_low": float(low), "ci_high": float(high)}
