"""The metric computations, as plain functions (the ``evaluate`` modules wrap these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..significance import bootstrap_ci, check_same_length, wilson_ci

TIE = -1


def _accuracy_block(correct: np.ndarray) -> dict[str, float]:
    successes = float(correct.sum())
    low, high = wilson_ci(successes, int(correct.size))
    return {"accuracy": successes / correct.size, "ci_low": low, "ci_high": high, "n": int(correct.size)}


def persona_alignment(
    predictions: Sequence[int], references: Sequence[int], personas: Sequence[str] | None = None
) -> dict[str, Any]:
    """Share of items where the chosen option is the persona-matching one, with a Wilson 95% CI.

    ``predictions`` are chosen option ids, ``references`` the matching option ids. A prediction of ``-1`` marks a
    tie (the model scored the options equally) and earns half credit. ``personas`` (one label per item) adds a
    ``per_persona`` breakdown.
    """
    check_same_length(predictions, references)
    pred, ref = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    correct = np.where(pred == TIE, 0.5, (pred == ref).astype(np.float64))
    result: dict[str, Any] = _accuracy_block(correct)
    if personas is not None:
        check_same_length(personas, references, ("personas", "references"))
        labels = np.asarray(personas, dtype=object)
        result["per_persona"] = {str(p): _accuracy_block(correct[labels == p]) for p in dict.fromkeys(personas)}
    return result


def persona_margin(
    matching: Sequence[float],
    not_matching: Sequence[float],
    matching_lengths: Sequence[int] | None = None,
    not_matching_lengths: Sequence[int] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean log-likelihood margin of the matching over the non-matching continuation, with a bootstrap 95% CI.

    ``matching``/``not_matching`` are summed log-likelihoods per item; with token counts given, each is divided by
    its count first, so the margin is per token.
    """
    check_same_length(matching, not_matching, ("matching", "not_matching"))
    m, n = np.asarray(matching, dtype=np.float64), np.asarray(not_matching, dtype=np.float64)
    for values, lengths, name in ((m, matching_lengths, "matching"), (n, not_matching_lengths, "not_matching")):
        if lengths is None:
            continue
        check_same_length(values, lengths, (name, f"{name}_lengths"))
        counts = np.asarray(lengths, dtype=np.float64)
        if np.any(counts <= 0):
            raise ValueError(f"{name}_lengths must be positive token counts, got {counts.min():g}")
        values /= counts
    margins = m - n
    low, high = bootstrap_ci(margins, n_resamples=n_resamples, seed=seed)
    return {"margin": float(margins.mean()), "ci_low": low, "ci_high": high, "n": int(margins.size)}


def _as_bool(mask: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tensor.dtype != torch.bool:
        if not torch.all((tensor == 0) | (tensor == 1)):
            raise ValueError(f"mask {name!r} is not binary: values other than 0/1 found")
        tensor = tensor.bool()
    return tensor


def mask_overlap(masks_a: Mapping[str, Any], masks_b: Mapping[str, Any]) -> dict[str, Any]:
    """Jaccard similarity of the kept weights and the rate of differing entries, overall and per layer.

    ``masks_a``/``masks_b`` map layer names to binary masks of equal shapes (``True`` = weight kept). Two all-pruned
    layers count as identical (Jaccard 1).
    """
    if not masks_a or not masks_b:
        raise ValueError("mask_overlap needs two non-empty dicts of layer name to mask")
    if set(masks_a) != set(masks_b):
        only_a, only_b = sorted(set(masks_a) - set(masks_b)), sorted(set(masks_b) - set(masks_a))
        raise KeyError(
            f"the two adapters mask different layers; only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"
        )
    per_layer, totals, size = {}, np.zeros(5), 0
    for name in masks_a:
        a, b = _as_bool(masks_a[name], name), _as_bool(masks_b[name], name)
        if a.shape != b.shape:
            raise ValueError(f"layer {name!r}: mask shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        counts = np.array(
            [(a & b).sum().item(), (a | b).sum().item(), (a ^ b).sum().item(), a.sum().item(), b.sum().item()]
        )
        per_layer[name] = _overlap_block(counts, a.numel())
        totals += counts
        size += a.numel()
    result = _overlap_block(totals, size)
    result["per_layer"] = per_layer
    return result


def _overlap_block(counts: np.ndarray, size: int) -> dict[str, float]:
    both, either, differ, kept_a, kept_b = (float(c) for c in counts)
    if size == 0:
        raise ValueError("mask_overlap: a mask has no entries")
    return {
        "jaccard": both / either if either else 1.0,
        "difference_rate": differ / size,
        "density_a": kept_a / size,
        "density_b": kept_b / size,
        "size": int(size),
    }
