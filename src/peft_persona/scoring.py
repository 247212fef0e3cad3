"""Weight scores and the per-output-row selection that turns them into masks.

All scores are non-negative ``float32`` tensors shaped like the weight, ``(out_features, in_features)``. Selection
keeps, in every row, the ``k = floor(in_features * (1 - sparsity))`` largest scores; ties are broken by a secondary
score where one is given, then by the lower column index. The rule is exact and deterministic: scores are mapped to
integer keys whose order is the lexicographic order, a per-row ``kthvalue`` finds the threshold key, and the few rows
with ties at the threshold keep their lowest columns. No Python loop runs over rows.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .calibrate import LayerStats

CONTRASTIVE_EPS = 1e-6


def kept_per_row(in_features: int, sparsity: float) -> int:
    """``floor(in_features * (1 - sparsity))``, the number of weights each output row keeps."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return int(in_features * (1.0 - sparsity))


def _nonneg_f32(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.float()
    if bool(torch.isnan(scores).any()) or bool((scores < 0).any()):
        raise ValueError("scores must be non-negative and not NaN")
    return scores + 0.0  # turns -0.0 into +0.0, so that the bit pattern order is the value order


def order_keys(primary: torch.Tensor, secondary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer keys ordered like ``primary`` (then ``secondary``): the IEEE bits of non-negative float32 values."""
    key = _nonneg_f32(primary).view(torch.int32)
    if secondary is None:
        return key
    return (key.to(torch.int64) << 32) | _nonneg_f32(secondary).view(torch.int32).to(torch.int64)


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
