"""Plain statistics shared by the metrics and the evaluation harness: CIs, AUC and paired significance tests.

Only numpy; nothing here imports ``evaluate`` or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values (nan or inf)")
    return array


def _bootstrap_p_value(draws: np.ndarray, constant: bool) -> float:
    """Two-sided bootstrap p-value of a zero difference from the resampled differences; 1 for constant data."""
    if constant:
        return 1.0
    return min(1.0, 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))


def check_same_length(a: Sequence, b: Sequence, names: tuple[str, str] = ("predictions", "references")) -> None:
    """Raise ``ValueError`` if ``a`` and ``b`` differ in length or are empty."""
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty: need at least one item")


def wilson_ci(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (``successes`` may be fractional, e.g. half-credit
    ties)."""
    if n <= 0:
        raise ValueError(f"wilson_ci needs n > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_ci: successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], np.ndarray] = lambda x: x.mean(axis=-1),
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (applied along the last axis of resampled rows)."""
    array = _vector(values, "values")
    rng = np.random.default_rng(seed)
    draws = statistic(array[rng.integers(0, array.size, size=(n_resamples, array.size))])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean paired difference ``a - b`` over items, its bootstrap CI, and a two-sided bootstrap p-value.

    The p-value is ``2 * min(P*(d <= 0), P*(d >= 0))`` over resampled mean differences, capped at 1.
    """
    check_same_length(a, b, ("a", "b"))
    diff = _vector(a, "a") - _vector(b, "b")
    rng = np.random.default_rng(seed)
    draws = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    p_value = _bootstrap_p_value(draws, constant=bool(np.all(diff == 0)))
    return {"diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": p_value}


def sign_test(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Exact two-sided paired sign test: items where ``a > b`` against items where ``a < b``; ties are dropped."""
    check_same_length(a, b, ("a", "b"))
    a_arr, b_arr = _vector(a, "a"), _vector(b, "b")
    wins, losses = int(np.sum(a_arr > b_arr)), int(np.sum(a_arr < b_arr))
    n = wins + losses
    if n == 0:
        return {"wins": 0, "losses": 0, "p_value": 1.0}
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"wins": wins, "losses": losses, "p_value": min(1.0, 2 * tail)}


def auc(scores: ArrayLike, labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney; tied scores count half)."""
    check_same_length(scores, labels, ("scores", "labels"))
    s = _vector(scores, "scores")
    y = np.asarray(labels).astype(bool).reshape(-1)
    positives, negatives = s[y], s[~y]
    if positives.size == 0 or negatives.size == 0:
        raise ValueError(f"auc needs both classes; got {positives.size} positive and {negatives.size} negative labels")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (positives.size * negatives.size))


def mean_ci(values: ArrayLike, seed: int = 0, n_resamples: int = 2000) -> dict[str, float]:
    """Mean of ``values`` with its bootstrap 95% CI."""
    array = _vector(values, "values")
    low, high = bootstrap_ci(array, n_resamples=n_resamples, seed=seed)
    return {"mean": float(array.mean()), "ci_low": low, "ci_high": high, "n": int(array.size)}


def group_difference(
    values: ArrayLike, labels: Sequence[int | bool], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """``mean(values | label) - mean(values | not label)`` with a stratified bootstrap CI and two-sided p-value.

    With ``values`` a per-item difference between two conditions, this tests whether the conditions' margins differ.
    """
    check_same_length(values, labels, ("values", "labels"))
    v = _vector(values, "values")
    y = np.asarray(labels).astype(bool).reshape(-1)
    pos, neg = v[y], v[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"group_difference needs both groups; got {pos.size} and {neg.size} items")
    rng = np.random.default_rng(seed)
    draws = pos[rng.integers(0, pos.size, size=(n_resamples, pos.size))].mean(axis=1) - neg[
        rng.integers(0, neg.size, size=(n_resamples, neg.size))
    ].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    diff = float(pos.mean() - neg.mean())
    p_value = _bootstrap_p_value(draws, constant=bool(np.all(v == v[0])))
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_value": p_value, "n": int(v.size)}
