"""Per-output-row selection of the weights a mask keeps, and what re-derives a mask exactly from a layer's weight.

Selection keeps, in every row, the ``k = in_features - ceil(in_features * sparsity)`` largest scores (``sparsity`` read
as the decimal number it is written as, so 2560 features at sparsity 0.9 keep exactly 256); ties are broken by a
secondary score where one is given, then by the lower column index. The rule is exact and deterministic: scores are
mapped to ``int32`` keys (their IEEE bits, which order non-negative floats exactly), a per-row ``kthvalue`` finds the
threshold key, and the few rows with ties at the threshold keep their lowest columns. A secondary score costs one
more such selection over the tied entries. No Python loop runs over rows, and nothing is sorted.

The methods that score ``|W_ij| * c_j`` for a per-input-channel vector ``c`` (Wanda, contrastive, magnitude) are
fully described by that vector, read as ``float32``: :func:`select_by_channels` re-derives their masks bit-exactly
from the weight, which is what the ``stats`` adapter format stores (see :class:`ChannelSelection`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .checks import check_sparsity

CHUNK_ELEMENTS = 1 << 22  # entries per block of rows in select_by_channels (16 MiB of float32 scores)


SIGN_FLIP = 0x7FFFFFFF  # flips the exponent and mantissa bits of a negative float's int32 view


def kept_per_row(in_features: int, sparsity: float) -> int:
    """The number of weights each output row keeps: ``in_features - ceil(in_features * sparsity)``.

    Computed exactly, with ``sparsity`` taken as the shortest decimal that round-trips to it (``repr``), so float
    rounding never drops a weight: ``kept_per_row(2560, 0.9) == 256``, where ``int(2560 * (1 - 0.9))`` gives 255.
    """
    pruned = Fraction(repr(check_sparsity(sparsity))) * in_features
    return in_features - math.ceil(pruned)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """``int32`` keys ordered like the ``float32`` ``scores``: their IEEE bit patterns, with the magnitude bits of
    negative scores flipped so that they order below every non-negative score and among themselves.

    ``-0.0`` is mapped to ``+0.0``; a (positive) NaN ranks above every number. A non-negative score's key is its bit
    pattern, unchanged.
    """
    keys = (scores.float() + 0.0).view(torch.int32)
    return torch.where(keys < 0, keys ^ SIGN_FLIP, keys)


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
    second = torch.where(tied, order_keys(secondary), torch.full_like(first, torch.iinfo(torch.int32).min))
    second = second.masked_fill_(above, torch.iinfo(torch.int32).max)  # above entries: kept; never tied with others
    return select_top_per_row(second, k)


def channel_scores(weight: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * c_j`` in ``float32``, for ``weight`` ``(out, in)`` and ``channel`` ``(in,)``."""
    return weight.detach().abs().float() * channel.to(weight.device, torch.float32)


def select_by_channels(
    weight: torch.Tensor, k: int, channel: torch.Tensor, tiebreak: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``k`` best of each row by ``|W| * channel``, ties by ``|W| * tiebreak``, then by lower column.

    Rows are independent, so a large weight is selected in blocks of rows of about ``CHUNK_ELEMENTS`` entries: the
    result is the same, and the score and key temporaries stay a few times one block instead of the whole matrix.
    """
    rows = max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))
    if weight.shape[0] <= rows:
        return _select_rows(weight, k, channel, tiebreak)
    return torch.cat(
        [_select_rows(weight[i : i + rows], k, channel, tiebreak) for i in range(0, weight.shape[0], rows)]
    )


def _select_rows(weight: torch.Tensor, k: int, channel: torch.Tensor, tiebreak: torch.Tensor | None) -> torch.Tensor:
    primary = channel_scores(weight, channel)
    if tiebreak is None:
        return select_top_per_row(order_keys(primary), k)
    return select_lexicographic(primary, channel_scores(weight, tiebreak), k)


def mask_digest(packed: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a packed mask's bytes (row-major ``uint8``), as a ``uint8`` tensor of 32 values on the CPU."""
    data = packed.detach().contiguous().cpu().numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


@dataclass
class ChannelSelection:
    """Everything that re-derives one layer's mask: the fraction removed per row, the ``float32`` channel vector
    and optional tie-break vector (``(in_features,)``), and the SHA-256 digest of the packed mask they select."""

    sparsity: float
    channel: torch.Tensor
    tiebreak: torch.Tensor | None
    digest: torch.Tensor

    def select(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``bool`` mask these statistics select on ``weight`` ``(out, in)``."""
        return select_by_channels(weight, kept_per_row(weight.shape[1], self.sparsity), self.channel, self.tiebreak)
