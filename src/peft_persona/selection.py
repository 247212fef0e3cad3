"""Per-output-row selection of the weights a mask keeps, and what re-derives a mask exactly from a layer's weight.

Selection keeps, in every row, the ``k = in_features - ceil(in_features * sparsity)`` largest scores (``sparsity`` read
as the decimal number it is written as, so 2560 features at sparsity 0.9 keep exactly 256); ties are broken by a
secondary score where one is given, then by the lower column index. The rule is exact and deterministic: scores are
mapped to ``int32`` keys (their IEEE bits, which order non-negative floats exactly), a per-row cut is found by
histograms of the key bits (a radix select: each pass counts every row's keys in about ``cols / 8`` buckets and keeps
the bucket holding the ``k``-th largest), and the few rows with ties at the cut keep their lowest columns. A secondary
score costs one more such selection over the rows with ties. No Python loop runs over rows, and nothing is sorted.
On the CPU, where numba is installed (the ``fast`` extra), :mod:`peft_persona.fast_select` selects each row in one
fused pass instead, with the same result.

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

from . import fast_select
from .checks import check_sparsity

CHUNK_ELEMENTS = 1 << 20  # entries per block of rows in select_by_channels (4 MiB of float32 scores)


SIGN_FLIP = 0x7FFFFFFF  # flips the exponent and mantissa bits of a negative float's int32 view
POSITIVE_INFINITY = 0x7F800000  # int32 views above it are positive NaNs (negative NaNs have negative views)
CANONICAL_NAN = 0x7FC00000  # the one NaN every NaN score is keyed as
NARROW = (1 << 31) - 2  # rows whose keys span at most this are cut by histograms (differences fit in int32)


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

    ``-0.0`` is mapped to ``+0.0``; every NaN (either sign, any payload: which one an operation on NaNs returns
    depends on the order of its operands, so it differs between implementations) is mapped to one positive NaN,
    which ranks above every number. A non-negative score's key is its bit pattern, unchanged.
    """
    keys = (scores.float() + 0.0).view(torch.int32)
    if not keys.numel():
        return keys
    low, high = torch.aminmax(keys)
    if int(high) > POSITIVE_INFINITY or int(low) < 0:  # a positive NaN, or negative views (numbers or NaNs)
        keys = keys.masked_fill(torch.isnan(scores), CANONICAL_NAN)
        keys ^= (keys >> 31) & SIGN_FLIP
    return keys


def select_top_per_row(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``bool`` mask keeping the ``k`` largest keys of each row; equal keys go to the lower column index."""
    rows, cols = keys.shape
    if k >= cols:
        return torch.ones_like(keys, dtype=torch.bool)
    if k <= 0 or rows == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if fast_select.applies(keys):
        return fast_select.top_per_row(keys, k)
    cut, kept = _cut(keys, k)
    keep = _at_least(keys, cut, kept is not None)
    surplus = (keep.sum(1) if kept is None else kept) - k
    tied_rows = (surplus > 0).nonzero().squeeze(1)
    if tied_rows.numel():  # the cut is the k-th largest key there: drop the highest-index ties at it
        at_cut = keys[tied_rows] == cut[tied_rows]
        from_right = at_cut.flip(1).cumsum(1, dtype=torch.int32).flip(1)
        keep[tied_rows] &= ~(at_cut & (from_right <= surplus[tied_rows, None]))
    return keep


def _cut(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's cut ``(rows, 1)`` for ``0 < k < cols``: at least ``k`` keys are ``>=`` it, and either exactly ``k``
    are or it is the ``k``-th largest key; and how many keys are ``>=`` it (``(rows,)``), where known.

    Radix select: a pass counts each row's keys in ``2**bits`` buckets (with one slot for the keys below and one for
    those above) and narrows the row to the bucket holding its ``k``-th largest key. A row is resolved when that
    bucket starts right above ``cols - k`` keys, when it is one key wide, or (first pass) when its ``k``-th largest key
    is its smallest. Rows spanning more than ``NARROW`` take ``torch.kthvalue`` (count unknown).
    """
    rows, cols = keys.shape
    keys = keys.contiguous()  # (a transposed weight's scores are not): the passes view the keys as one row
    low, high = keys.amin(1, keepdim=True).long(), keys.amax(1, keepdim=True).long()
    if int((high - low).max()) > NARROW:
        return torch.kthvalue(keys, cols - k + 1, dim=1, keepdim=True).values, None
    bits = min(max(cols.bit_length() - 3, 4), 11)
    shift = (torch.frexp((high - low).double())[1].long() - bits).clamp_min(0)  # frexp exponent: the bit length
    cut, under = _histogram(keys, (low >> shift) << shift, shift, bits, cols - k, clamp=False)
    done = (shift == 0) | (under == cols - k)
    if bool((~done & (cut <= low)).any()):  # the bucket of the row's smallest key
        smallest = _smallest_is_kth(keys, k, low)
        cut, under, done = torch.where(smallest, low, cut), under.masked_fill(smallest, 0), done | smallest
    cut, under = _refine(keys, k, cut, under, done, shift, bits)
    return cut.to(torch.int32), cols - under.squeeze(1)


def _refine(
    keys: torch.Tensor,
    k: int,
    cut: torch.Tensor,
    under: torch.Tensor,
    done: torch.Tensor,
    shift: torch.Tensor,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The passes after the first: over all rows while most are unresolved (keeping the resolved rows' results),
    then over the unresolved rows only."""
    cols = keys.shape[1]
    while True:
        left = (~done).squeeze(1).nonzero().squeeze(1)
        if 2 * left.numel() <= keys.shape[0]:
            break
        shift = (shift - bits).clamp_min(0)
        start, below = _histogram(keys, cut, shift, bits, cols - k, clamp=True)
        cut, under = torch.where(done, cut, start), torch.where(done, under, below)
        done = done | (shift == 0) | (below == cols - k)
    if left.numel():
        cut[left], under[left] = _refine(keys[left], k, cut[left], under[left], done[left], shift[left], bits)
    return cut, under


def _histogram(
    keys: torch.Tensor, start: torch.Tensor, shift: torch.Tensor, bits: int, below: int, clamp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``keys`` ``(rows, cols)``: count each row's keys in buckets of width ``2**shift`` from ``start``
    (``clamp``: the keys below and above ``2**bits`` buckets in one slot each; else they all fall in the buckets);
    return the start of the bucket holding the key with ``below`` keys under it, and how many keys are under it."""
    rows = keys.shape[0]
    slots = (1 << bits) + 2
    index = keys >> shift.to(torch.int32)
    index -= (start >> shift).to(torch.int32)  # the bucket number: within the row's span, so no overflow
    if clamp:
        index.clamp_(-1, slots - 2)
    index += torch.arange(1, rows * slots, slots, dtype=torch.int32, device=keys.device).unsqueeze(1)
    cumulative = torch.bincount(index.view(-1), minlength=rows * slots).view(rows, slots).cumsum(1)
    slot = torch.searchsorted(cumulative, torch.full_like(start, below), right=True)
    return start + ((slot - 1) << shift), cumulative.gather(1, slot - 1)


def _smallest_is_kth(keys: torch.Tensor, k: int, low: torch.Tensor) -> torch.Tensor:
    """Whether each row's ``k``-th largest key is its smallest ``low`` (fewer than ``k`` keys above it), as zero
    scores often make it: one pass instead of a histogram pass per ``bits`` of key."""
    smallest = torch.sub(keys, (low + 1).to(torch.int32))
    smallest >>= 31  # -1 where the key is the row's smallest
    return (keys.shape[1] + smallest.sum(1, keepdim=True, dtype=torch.int32)) < k


def _at_least(keys: torch.Tensor, cut: torch.Tensor, narrow: bool) -> torch.Tensor:
    """``keys >= cut`` (by arithmetic where ``narrow``: no key difference overflows, and it is quicker)."""
    if not narrow:
        return keys >= cut
    above = torch.sub(keys, cut)
    above >>= 31
    above += 1  # 1 where keys >= cut, else 0
    return above.to(torch.bool)


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The paper code's selection: ``torch.topk`` per row, ties resolved however torch returns them."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores.float(), k, dim=1).indices, True)
    return mask


def select_lexicographic(primary: torch.Tensor, secondary: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` best of each row by ``primary``, ties by ``secondary``, then by the lower column index.

    One selection on ``primary`` finds each row's cut; rows with more than ``k`` keys at or above it (ties at their
    ``k``-th largest key) keep the entries above it and, among those tied at it, the best by ``secondary`` (and
    column): a second selection, on those rows only.
    """
    rows, cols = primary.shape
    if k >= cols or k <= 0 or rows == 0:
        return select_top_per_row(order_keys(primary), k)
    if fast_select.applies(primary, secondary):
        return fast_select.top_per_row(order_keys(primary), k, order_keys(secondary.expand_as(primary)))
    first = order_keys(primary)
    cut, kept = _cut(first, k)
    narrow = kept is not None
    if not narrow:
        kept = (first >= cut).sum(1)
    if bool(torch.isnan(secondary.amin())):  # a NaN tie-break key may equal the extremes: every row takes the rule
        cut, kept = torch.kthvalue(first, cols - k + 1, dim=1, keepdim=True).values, torch.zeros_like(kept)
    tied_rows = (kept != k).nonzero().squeeze(1)  # kept > k: ties at the k-th largest key; 0: unknown
    if tied_rows.numel() == rows:
        return select_top_per_row(_tie_break_keys(first, cut, order_keys(secondary), narrow, kept), k)
    keep = _at_least(first, cut, narrow)
    if tied_rows.numel():
        second = order_keys(secondary[tied_rows])
        keep[tied_rows] = select_top_per_row(
            _tie_break_keys(first[tied_rows], cut[tied_rows], second, narrow, kept[tied_rows]), k
        )
    return keep


def _tie_break_keys(
    first: torch.Tensor, threshold: torch.Tensor, second: torch.Tensor, narrow: bool, kept: torch.Tensor
) -> torch.Tensor:
    """``second`` (changed in place) where ``first`` equals the row's ``threshold``, below all of them where ``first``
    is lower and above all where it is higher: one below and one above the row's ``second`` keys (so that the span
    stays narrow), or the ``int32`` extremes where those overflow. ``narrow``: ``first - threshold`` cannot overflow;
    ``kept``: how many ``first`` keys are at or above the threshold (all of them: none is lower)."""
    info = torch.iinfo(torch.int32)
    below, above = second.amin(1, keepdim=True).long() - 1, second.amax(1, keepdim=True).long() + 1
    if int(below.min()) < info.min or int(above.max()) > info.max:
        below, above = torch.full_like(below, info.min), torch.full_like(above, info.max)
    below, above = below.to(torch.int32), above.to(torch.int32)
    if not narrow:
        return torch.where(first > threshold, above, torch.where(first < threshold, below, second))
    sides = [(above, torch.sub(threshold, first))]
    if bool((kept < first.shape[1]).any()):
        sides.append((below, torch.sub(first, threshold)))
    for bound, outside in sides:
        outside >>= 31  # -1 where first is above (then below) the threshold
        blend = second ^ bound
        blend &= outside
        second ^= blend  # bound where outside, else unchanged
    return second


def channel_scores(weight: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * c_j`` in ``float32``, for ``weight`` ``(out, in)`` and ``channel`` ``(in,)``."""
    return weight.detach().abs().float() * channel.to(weight.device, torch.float32)


def select_by_channels(
    weight: torch.Tensor, k: int, channel: torch.Tensor, tiebreak: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``k`` best of each row by ``|W| * channel``, ties by ``|W| * tiebreak``, then by lower column.

    Rows are independent: the numba kernels select each row in cache; eager PyTorch selects a large weight in blocks
    of rows of about ``CHUNK_ELEMENTS`` entries, so that its score and key temporaries stay a few times one block.
    """
    if 0 < k < weight.shape[1] and fast_select.applies(weight):
        return fast_select.top_by_channels(weight, k, channel, tiebreak)
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
