"""Extraction recipes: from one layer's weight and statistics to each persona's mask, one pure function per method.

Every method keeps, in each output row of a weight ``W`` ``(out, in)``, the ``k = kept_per_row(in, sparsity)``
weights of highest score (:mod:`peft_persona.selection`):

* ``wanda``: ``|W_ij| * n_j``, ``n_j`` the norm of input channel ``j`` over the persona's tokens;
* ``contrastive``: ``|W_ij| * phi(z_j)``, ``z_j`` the persona's standardised difference from the other persona (or
  from the pooled rest of k > 2), ties broken by the Wanda score;
* ``difference``: ``|W_ij| * (n_j - m_j)``, the persona's Wanda importance minus the other's (``m_j`` their channel
  norm), ties broken by the Wanda score: what the other persona needs most is pruned first;
* ``magnitude``: ``|W_ij|``, and ``random``: uniform scores from one seeded stream (the controls);
* ``obs``: ``W_ij^2 / [H^-1]_jj``, SparseGPT's saliency, from the persona's ``diag(H^-1)``.

With ``structure="channel"`` whole input channels are kept or removed, the same in every row (:func:`whole_channels`).
With ``reference`` the paper code's statistic and ``torch.topk`` tie handling are used instead. The first three are
described by one ``float32`` vector per layer (:func:`channels`), which the ``stats`` adapter format stores.
:func:`layer_masks` is the entry point for one layer; :func:`select_masks` is the one loop over layers that the
whole-model, layer-by-layer and multi-process extractions all run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .activation_stats import LayerStats
from .bits import pack_mask
from .options import ExtractionOptions
from .selection import (
    channel_scores,
    kept_per_row,
    order_keys,
    select_by_channels,
    select_lexicographic,
    select_top_per_row,
    select_topk_reference,
)

CONTRASTIVE_EPS = 1e-6
# What a recipe reads per persona for one layer: activation statistics, OBS's diag(H^-1), or None (controls).
LayerInput = LayerStats | torch.Tensor | None
Channels = tuple[torch.Tensor, torch.Tensor | None]


def contrastive_z(positive: LayerStats, negative: LayerStats, eps: float = CONTRASTIVE_EPS) -> torch.Tensor:
    """``z_j = (mu+_j - mu-_j) / sqrt(v+_j + v-_j + eps)`` over per-sequence RMS statistics (float64)."""
    return (positive.seq_mean - negative.seq_mean) / (positive.seq_var + negative.seq_var + eps).sqrt()


def phi(z: torch.Tensor, kind: Literal["relu", "softplus", "sigmoid"] = "relu", tau: float = 1.0) -> torch.Tensor:
    """Channel weighting of contrastive scores: ``relu(z)``, ``softplus(z / tau)`` or ``sigmoid(z / tau)``.

    ``relu`` gives every channel with ``z <= 0`` the score 0, so below sparsity 0.5 most pruned weights are ranked by
    the Wanda tie-break alone; ``sigmoid`` is positive and strictly increasing, so ``z`` orders every channel.
    """
    if kind == "relu":
        return z.clamp_min(0)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if kind == "softplus":
        return F.softplus(z / tau)
    if kind == "sigmoid":
        return torch.sigmoid(z / tau)
    raise ValueError(f"phi must be 'relu', 'softplus' or 'sigmoid', got {kind!r}")


def obs_hessian_inverse_diagonal(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``diag(H^-1)`` for ``H = 2 X^T X`` dampened by ``damp`` times its mean diagonal (float64 Cholesky)."""
    hessian = 2 * gram.double()
    hessian.diagonal().add_(damp * hessian.diagonal().mean().clamp_min(1e-12))
    return torch.cholesky_inverse(torch.linalg.cholesky(hessian)).diagonal()


def obs_scores(weight: torch.Tensor, hessian_inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``S_ij = W_ij^2 / [H^-1]_jj`` (SparseGPT's criterion, without weight updates)."""
    return weight.detach().float().square() / hessian_inverse_diagonal.to(weight.device, torch.float32)


# ----------------------------------------------------------------------------------- channel vectors
def _wanda_channels(recipe: ExtractionOptions, persona: str, stats: Mapping[str, Any], in_features: int) -> Channels:
    own = stats[persona]
    return (own.reference_norm if recipe.reference else own.feature_norm).float(), None


def _contrastive_channels(
    recipe: ExtractionOptions, persona: str, stats: Mapping[str, Any], in_features: int
) -> Channels:
    own = stats[persona]
    others = [s for name, s in stats.items() if name != persona]
    rest = others[0] if len(others) == 1 else LayerStats.pooled(others)
    channel = phi(contrastive_z(own, rest), recipe.phi, recipe.tau).float()
    return channel, None if recipe.reference else own.feature_norm.float()


def _difference_channels(
    recipe: ExtractionOptions, persona: str, stats: Mapping[str, Any], in_features: int
) -> Channels:
    """``n_self - n_other``: a weight's Wanda importance to this persona minus its importance to the other (or the
    pooled rest), per unit ``|W|``; the most negative scores, the weights the other side needs most, go first."""
    own = stats[persona]
    others = [s for name, s in stats.items() if name != persona]
    rest = others[0] if len(others) == 1 else LayerStats.pooled(others)
    return (own.feature_norm - rest.feature_norm).float(), own.feature_norm.float()


def _magnitude_channels(
    recipe: ExtractionOptions, persona: str, stats: Mapping[str, Any], in_features: int
) -> Channels:
    return torch.ones(in_features, dtype=torch.float32), None


CHANNEL_RECIPES: dict[str, Callable[..., Channels]] = {
    "wanda": _wanda_channels,
    "contrastive": _contrastive_channels,
    "difference": _difference_channels,
    "magnitude": _magnitude_channels,
}


def channels(recipe: ExtractionOptions, persona: str, stats: Mapping[str, LayerInput], in_features: int) -> Channels:
    """The ``float32`` channel vector ``c`` that scores ``|W| * c`` for ``persona``, and its tie-break vector (or
    ``None``); ``stats`` holds every persona's statistics of the layer."""
    if recipe.method not in CHANNEL_RECIPES:
        raise ValueError(f"method {recipe.method!r} does not score from per-channel statistics")
    return CHANNEL_RECIPES[recipe.method](recipe, persona, stats, in_features)


# ----------------------------------------------------------------------------------- one mask
def _channel_mask(recipe: ExtractionOptions, weight: torch.Tensor, k: int, persona: str, stats: Any, _: Any) -> Any:
    channel, tiebreak = channels(recipe, persona, stats, weight.shape[1])
    if recipe.structure == "channel":
        return whole_channels(weight, k, channel, tiebreak)
    if recipe.reference:
        return select_topk_reference(channel_scores(weight, channel), k)
    return select_by_channels(weight, k, channel, tiebreak)


def _random_mask(recipe: ExtractionOptions, weight: torch.Tensor, k: int, persona: str, _: Any, generator: Any) -> Any:
    scores = torch.rand(tuple(weight.shape), generator=generator).to(weight.device)
    if recipe.reference:
        return select_topk_reference(scores, k)
    return select_top_per_row(order_keys(scores), k)


def _obs_mask(recipe: ExtractionOptions, weight: torch.Tensor, k: int, persona: str, stats: Any, _: Any) -> Any:
    return select_top_per_row(order_keys(obs_scores(weight, stats[persona])), k)


def whole_channels(weight: torch.Tensor, k: int, channel: torch.Tensor, tiebreak: torch.Tensor | None) -> torch.Tensor:
    """Keep the same ``k`` input channels in every row: those of highest ``c_j * sum_i |W_ij|`` (ties by the
    tie-break vector, then the lower index); the other channels are removed whole."""
    column = channel_scores(weight, channel).sum(0, keepdim=True)
    if tiebreak is None:
        keep = select_top_per_row(order_keys(column), k)
    else:
        keep = select_lexicographic(column, channel_scores(weight, tiebreak).sum(0, keepdim=True), k)
    return keep.expand(weight.shape[0], -1).clone()


MASK_RECIPES: dict[str, Callable[..., torch.Tensor]] = {
    "wanda": _channel_mask,
    "contrastive": _channel_mask,
    "difference": _channel_mask,
    "magnitude": _channel_mask,
    "random": _random_mask,
    "obs": _obs_mask,
}


def layer_masks(
    recipe: ExtractionOptions,
    weight: torch.Tensor,
    stats: Mapping[str, LayerInput],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The ``bool`` mask of one layer's ``weight`` ``(out, in)`` for every persona of ``stats`` (persona to its
    :data:`LayerInput`), in order; ``random`` draws from ``generator``."""
    k = kept_per_row(weight.shape[1], recipe.sparsity)
    make = MASK_RECIPES[recipe.method]
    return {persona: make(recipe, weight, k, persona, stats, generator) for persona in stats}


def select_masks(
    recipe: ExtractionOptions,
    weights: Iterable[tuple[str, torch.Tensor]],
    stats: Mapping[str, Mapping[str, LayerInput] | None],
    generator: torch.Generator | None = None,
    packed: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Persona to layer to mask (on the CPU; packed ``uint8``, or ``bool`` without ``packed``) for each ``(layer,
    oriented weight)``; ``stats`` maps a persona to its inputs per layer, or to ``None`` (controls)."""
    result: dict[str, dict[str, torch.Tensor]] = {persona: {} for persona in stats}
    for layer, weight in weights:
        inputs = {persona: None if per_layer is None else per_layer[layer] for persona, per_layer in stats.items()}
        for persona, mask in layer_masks(recipe, weight, inputs, generator).items():
            result[persona][layer] = (pack_mask(mask) if packed else mask).cpu()
    return result
