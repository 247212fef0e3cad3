"""Bit-packing of boolean masks: 1 bit per weight, row-major, least significant bit first.

A mask of shape ``(out_features, in_features)`` packs to a ``uint8`` tensor of shape
``(out_features, ceil(in_features / 8))``. Bit ``k`` of byte ``b`` in row ``i`` holds column ``8 * b + k``;
padding bits at the end of a row are zero. This matches ``numpy.packbits(mask, axis=1, bitorder="little")``.
"""

from __future__ import annotations

import torch

_BIT_VALUES = tuple(1 << k for k in range(8))


def packed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the packed ``uint8`` tensor for a boolean mask of ``shape``."""
    rows, cols = shape
    return rows, (cols + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D ``bool`` mask into ``uint8`` bytes, one bit per entry."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a torch.bool mask, got dtype {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"pack_mask expects a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    pad = (-cols) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(rows, pad)], dim=1)
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=mask.device)
    return (mask.view(rows, -1, 8).to(torch.uint8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack ``uint8`` bytes from :func:`pack_mask` into a ``bool`` mask with ``in_features`` columns."""
    return unpack_to(packed, in_features, _BYTE_BITS).view(torch.bool)


def unpack_to(packed: torch.Tensor, in_features: int, table: torch.Tensor) -> torch.Tensor:
    """Unpack into ``table``'s dtype: entry ``(i, j)`` is ``table[bit, 0]``, read with one lookup per byte.

    ``table`` is ``(256, 8)``: row ``b`` holds the 8 values of byte ``b``, least significant bit first (see
    :func:`byte_table`). A table of 0 and 1 gives the mask itself; one of 1 and ``f`` a multiplicative factor.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"unpack_mask expects a 2-D torch.uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(
            f"packed mask has {packed.shape[1]} bytes per row, which does not fit {in_features} input features "
            f"(expected {(in_features + 7) // 8})"
        )
    values = torch.nn.functional.embedding(packed.long(), table.to(packed.device)).view(packed.shape[0], -1)
    return values if values.shape[1] == in_features else values[:, :in_features].contiguous()


def byte_table(off: float | torch.Tensor, on: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``(256, 8)`` table of :func:`unpack_to` mapping a 0 bit to ``off`` and a 1 bit to ``on``."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return torch.where(bits.bool(), torch.as_tensor(on, dtype=dtype), torch.as_tensor(off, dtype=dtype))


_BYTE_BITS = byte_table(0, 1, torch.uint8)


def full_mask_packed(shape: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Packed bytes of an all-``True`` mask (keeps every weight), padding bits zero."""
    return pack_mask(torch.ones(shape, dtype=torch.bool, device=device))


def count_kept(mask: torch.Tensor) -> int:
    """Number of kept weights of a ``bool`` mask, or of a packed ``uint8`` one (its padding bits are zero)."""
    if mask.dtype == torch.bool:
        return int(mask.sum())
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return int(((mask.unsqueeze(-1) >> shifts) & 1).sum())
