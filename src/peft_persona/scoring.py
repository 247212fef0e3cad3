"""Weight scores: the per-weight criteria of each method, as non-negative ``float32`` tensors shaped like the weight,
``(out_features, in_features)``. :mod:`peft_persona.selection` turns them into masks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .activation_stats import LayerStats
from .selection import kept_per_row, order_keys, select_lexicographic, select_top_per_row

__all__ = [
    "contrastive_scores",
    "contrastive_z",
    "kept_per_row",
    "magnitude_scores",
    "obs_hessian_inverse_diagonal",
    "obs_scores",
    "order_keys",
    "phi",
    "random_scores",
    "select_lexicographic",
    "select_top_per_row",
    "select_topk_reference",
    "wanda_scores",
]

CONTRASTIVE_EPS = 1e-6


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The paper code's selection: ``torch.topk`` per row, ties resolved however torch returns them."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores.float(), k, dim=1).indices, True)
    return mask


def wanda_scores(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * n_j``."""
    return weight.detach().abs().float() * feature_norm.to(weight.device, torch.float32)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij|`` (a control: persona-independent)."""
    return weight.detach().abs().float()


def contrastive_z(positive: LayerStats, negative: LayerStats, eps: float = CONTRASTIVE_EPS) -> torch.Tensor:
    """``z_j = (mu+_j - mu-_j) / sqrt(v+_j + v-_j + eps)`` over per-sequence RMS statistics (float64)."""
    return (positive.seq_mean - negative.seq_mean) / (positive.seq_var + negative.seq_var + eps).sqrt()


def phi(z: torch.Tensor, kind: Literal["relu", "softplus"] = "relu", tau: float = 1.0) -> torch.Tensor:
    """Channel weighting of contrastive scores: ``relu(z)`` or ``softplus(z / tau)``."""
    if kind == "relu":
        return z.clamp_min(0)
    if kind == "softplus":
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        return F.softplus(z / tau)
    raise ValueError(f"phi must be 'relu' or 'softplus', got {kind!r}")


def contrastive_scores(weight: torch.Tensor, channel_weight: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * phi(z_j)``."""
    return weight.detach().abs().float() * channel_weight.to(weight.device, torch.float32)


def obs_hessian_inverse_diagonal(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``diag(H^-1)`` for ``H = 2 X^T X`` dampened by ``damp`` times its mean diagonal (float64 Cholesky)."""
    hessian = 2 * gram.double()
    hessian.diagonal().add_(damp * hessian.diagonal().mean().clamp_min(1e-12))
    return torch.cholesky_inverse(torch.linalg.cholesky(hessian)).diagonal()


def obs_scores(weight: torch.Tensor, hessian_inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``S_ij = W_ij^2 / [H^-1]_jj`` (SparseGPT's criterion, without weight updates)."""
    return weight.detach().float().square() / hessian_inverse_diagonal.to(weight.device, torch.float32)


def random_scores(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores: a seeded random mask with exactly ``k`` kept per row (a control)."""
    return torch.rand(shape, generator=generator)
