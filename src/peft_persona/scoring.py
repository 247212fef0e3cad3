"""Weight scores and the per-output-row selection that turns them into masks.

All scores are non-negative ``float32`` tensors shaped like the weight, ``(out_features, in_features)``. Selection
keeps, in every row, the ``k = in_features - ceil(in_features * sparsity)`` largest scores (``sparsity`` read as the
decimal number it is written as, so 2560 features at sparsity 0.9 keep exactly 256); ties are broken by a secondary
score where one is given, then by the lower column index. The rule is exact and deterministic: scores are mapped to
``int32`` keys (their IEEE bits, which order non-negative floats exactly), a per-row ``kthvalue`` finds the threshold
key, and the few rows with ties at the threshold keep their lowest columns. A secondary score costs one more such
selection over the tied entries. No Python loop runs over rows, and nothing is sorted.
"""

from __future__ import annotations

import math
from fractions import Fraction

from typing import Literal

import torch
import torch.nn.functional as F

from .calibrate import LayerStats

CONTRASTIVE_EPS = 1e-6


def kept_per_row(in_features: int, sparsity: float) -> int:
    """The number of weights each output row keeps: ``in_features - ceil(in_features * sparsity)``.

    Computed exactly, with ``sparsity`` taken as the shortest decimal that round-trips to it (``repr``), so float
    rounding never drops a weight: ``kept_per_row(2560, 0.9) == 256``, where ``int(2560 * (1 - 0.9))`` gives 255.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    pruned = Fraction(repr(float(sparsity))) * in_features
    return in_features - math.ceil(pruned)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """``int32`` keys ordered like the non-negative ``float32`` ``scores``: their IEEE bit patterns.

    ``-0.0`` is mapped to ``+0.0``; a NaN ranks above every number. Scores must not be negative.
    """
    return (scores.float() + 0.0).view(torch.int32)


def select_top_per_row(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``bool`` mask keeping the ``k`` largest keys of each row; equal keys go to the lower column index."""
    rows, cols = keys.shape
    if k >= cols:
        return torch.ones_like(keys, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    threshold = torch.kthvalue(keys, cols - k + 1, dim=1, keepdim=True).values
    keep = keys >= threshold
    surplus = keep.sum(1) - k
    tied_rows = (surplus > 0).nonzero().squeeze(1)
    if tied_rows.numel():  # drop the highest-index ties at the threshold
        at_threshold = keys[tied_rows] == threshold[tied_rows]
        from_right = at_threshold.flip(1).cumsum(1).flip(1)
        keep[tied_rows] &= ~(at_threshold & (from_right <= surplus[tied_rows, None]))
    return keep


def select_lexicographic(primary: torch.Tensor, secondary: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` best of each row by ``primary``, ties by ``secondary``, then by the lower column index.

    Two ``int32`` selections, no sort: the first finds each row's threshold on ``primary``; entries above it are
    kept; the second picks, among the entries tied at the threshold, the best by ``secondary`` (and column).
    """
    rows, cols = primary.shape
    if k >= cols or k <= 0:
        return select_top_per_row(order_keys(primary), k)
    first = order_keys(primary)
    threshold = torch.kthvalue(first, cols - k + 1, dim=1, keepdim=True).values
    above, tied = first > threshold, first == threshold
    second = torch.where(tied, order_keys(secondary), torch.full_like(first, -1))
    second = second.masked_fill_(above, torch.iinfo(torch.int32).max)  # above entries: kept; never tied with others
    return select_top_per_row(second, k)


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
