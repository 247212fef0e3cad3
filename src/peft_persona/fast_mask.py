"""Optional fused CPU kernel (numba): a weight times a packed mask, written in one pass, bit-exact.

``out[i, j] = source[i, j]`` where bit ``j`` of row ``i`` of the packed mask (:mod:`peft_persona.bits`) is set, else
``+0``: the weight is read as unsigned integers of its width and ANDed with all-ones or zero, so NaN, infinities and
signed zeros are kept as they are where kept (no ``inf * 0 = NaN``). Each byte of the mask expands to eight lane
masks with constant shifts, which the compiler vectorises: on 2 CPU cores it runs at about the speed of one copy of
the weight (docs/benchmarks.md). It runs on the calling thread: a second thread on a pool was slower there (torch's
OpenMP workers keep the other core busy waiting after each operation).

The engine's ``keep_original`` switch uses it (:mod:`peft_persona.tuner.engine`). It is on where
:func:`peft_persona.fast_select.enabled` is (numba installed, ``PEFT_PERSONA_KERNELS`` not ``0``), for contiguous
CPU tensors of 16 or 32 bits; elsewhere the caller keeps its PyTorch path.
"""

from __future__ import annotations

import numpy as np
import torch

from . import fast_select

UNSIGNED_VIEW = {torch.float32: torch.uint32, torch.bfloat16: torch.uint16, torch.float16: torch.uint16}


def supports(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether :func:`copy_masked` runs for ``weight`` and its ``packed`` mask: kernels enabled, both contiguous on
    the CPU, and ``weight`` in ``float32``, ``bfloat16`` or ``float16``."""
    return (
        fast_select.applies(weight, packed)
        and weight.dtype in UNSIGNED_VIEW
        and weight.dim() == 2
        and weight.is_contiguous()
        and packed.is_contiguous()
    )


def copy_masked(source: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``source`` where ``packed`` keeps and ``+0`` elsewhere into ``out`` (same shape and dtype as ``source``,
    both ``(out_features, in_features)``; ``packed`` as :func:`peft_persona.bits.pack_mask` gives it); returns
    ``out``. Call it where :func:`supports` holds."""
    if fast_select.numba is None:
        raise RuntimeError("copy_masked needs numba: pip install 'peft-persona[fast]'")
    if source.dtype not in UNSIGNED_VIEW:
        raise ValueError(f"copy_masked: weight dtype {source.dtype} is not float32, bfloat16 or float16")
    if source.shape != out.shape or source.dtype != out.dtype:
        raise ValueError(
            f"copy_masked: source {tuple(source.shape)} {source.dtype} and out {tuple(out.shape)} {out.dtype} differ"
        )
    if packed.shape != (source.shape[0], (source.shape[1] + 7) // 8) or packed.dtype != torch.uint8:
        raise ValueError(
            f"copy_masked: packed mask {tuple(packed.shape)} {packed.dtype} does not fit a weight of "
            f"shape {tuple(source.shape)}"
        )
    view = UNSIGNED_VIEW[source.dtype]
    kernel = _keep_32 if view == torch.uint32 else _keep_16
    bits = packed.numpy()
    if source.shape[1] % 8 == 0:  # one long row: no per-row tail
        kernel(source.view(view).numpy().reshape(1, -1), bits.reshape(1, -1), out.view(view).numpy().reshape(1, -1))
    else:
        kernel(source.view(view).numpy(), bits, out.view(view).numpy())
    return out


def _jit(function):
    if fast_select.numba is None:
        return function
    return fast_select.numba.njit(cache=True, nogil=True, boundscheck=False)(function)


# The two kernels differ only in their integer type: numba vectorises the byte expansion only with constant shifts of
# the lane type, so each width is written out.
@_jit
def _keep_32(source, bits, out):
    rows, cols = source.shape
    full = cols // 8
    for r in range(rows):
        s, o, p = source[r], out[r], bits[r]
        for b in range(full):
            byte = np.uint32(p[b])
            for k in range(8):
                o[8 * b + k] = s[8 * b + k] & (np.uint32(0) - ((byte >> np.uint32(k)) & np.uint32(1)))
        for j in range(8 * full, cols):
            o[j] = s[j] & (np.uint32(0) - ((np.uint32(p[j >> 3]) >> np.uint32(j & 7)) & np.uint32(1)))


@_jit
def _keep_16(source, bits, out):
    rows, cols = source.shape
    full = cols // 8
    for r in range(rows):
        s, o, p = source[r], out[r], bits[r]
        for b in range(full):
            byte = np.uint16(p[b])
            for k in range(8):
                o[8 * b + k] = s[8 * b + k] & (np.uint16(0) - ((byte >> np.uint16(k)) & np.uint16(1)))
        for j in range(8 * full, cols):
            o[j] = s[j] & (np.uint16(0) - ((np.uint16(p[j >> 3]) >> np.uint16(j & 7)) & np.uint16(1)))
