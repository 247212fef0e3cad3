"""Optional fused CPU kernels (numba) for the per-row selection of :mod:`peft_persona.selection`: the same masks.

A row is selected while it sits in cache. Its keys are built (for ``|W| * c`` scores straight from the weight, with
the bits :func:`selection.order_keys` gives), counted once in 256 buckets spanning the row's own range, and every key
above the bucket holding the ``k``-th largest is kept; the keys inside that bucket are gathered (ascending columns,
found 64 digits at a time by one vector compare written as LLVM IR) and refined by 256-bucket passes over them alone
until the cut is one key wide; where the ``k``-th largest key is the row's smallest (contrastive scores are zero on
half the channels), one pass cuts there. Among keys equal at the cut the lower columns win; with a secondary key, the
tied entries are first narrowed by it (its keys built for them alone; an insertion pass where only a few are kept or
dropped, starting from the previous row's floor where enough keys reach it, else the same bucket passes). Blocks of
rows run on a thread pool, one per torch thread.

Installed with the ``fast`` extra (``pip install "peft-persona[fast]"``). Without numba, with
``PEFT_PERSONA_KERNELS=0`` in the environment, inside :func:`eager`, or for tensors off the CPU, selection runs in
eager PyTorch. The first call in a fresh environment compiles the kernels (seconds; cached beside the module).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

try:  # optional: the `fast` extra
    import numba
except ImportError:  # then enabled() is False (tests: fast_select.numba set to None)
    numba = None

BUCKET_BITS = 8
ENV_SWITCH = "PEFT_PERSONA_KERNELS"
FEW = 32  # tie sets keeping or dropping at most this many are settled by insertion, not histograms
MIN_ROWS_PER_THREAD = 64  # fewer rows per thread than this run on the calling thread


def enabled() -> bool:
    """Whether the kernels run: numba is importable and ``PEFT_PERSONA_KERNELS`` is not ``0``."""
    return numba is not None and os.environ.get(ENV_SWITCH, "1") != "0"


@contextmanager
def eager() -> Iterator[None]:
    """Within this block the kernels are off (selection here, :mod:`peft_persona.fast_mask` too) and eager
    PyTorch runs even where numba is installed (sets ``PEFT_PERSONA_KERNELS=0``, then restores it)."""
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`enabled` and every tensor is on the CPU (the kernels read host memory)."""
    return enabled() and all(t.device.type == "cpu" for t in tensors)


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.cpython.unsafe.numbers import trailing_zeros
    from numba.extending import intrinsic

    _jit = numba.njit(cache=True, nogil=True, boundscheck=False)

    @intrinsic
    def _equal_bits(typingctx, digits, start, value):
        """A ``uint64`` whose bit ``i`` is ``digits[start + i] == value``: 64 bytes, one vector compare."""
        if digits.dtype != numba.types.uint8 or digits.layout != "C":
            return None

        def codegen(context, builder, signature, args):
            array, first, wanted = args
            data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=array).data
            lanes = ir.VectorType(ir.IntType(8), 64)
            chunk = builder.load(builder.bitcast(builder.gep(data, [first]), lanes.as_pointer()), align=1)
            splat = builder.insert_element(ir.Constant(lanes, ir.Undefined), wanted, ir.IntType(32)(0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
            return builder.bitcast(builder.icmp_unsigned("==", chunk, splat), ir.IntType(64))

        return numba.types.uint64(digits, start, value), codegen

    @_jit
    def _ordered(bits):
        """``selection.order_keys`` of a ``float32``'s ``int32`` bits (every NaN the one canonical NaN), shifted to
        ``[0, 2**32)`` as a ``uint32``."""
        if (bits & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000):
            bits = np.int32(0x7FC00000)
        return np.uint32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))) ^ np.uint32(0x80000000)

    @_jit
    def _bit_length(value):
        """How many bits a non-negative ``int64`` needs."""
        length = 0
        while value:
            value >>= 1
            length += 1
        return length

    @_jit
    def _span(keys, n):
        """The smallest and largest of ``keys[:n]``."""
        low, high = keys[0], keys[0]
        for j in range(n):
            low = min(low, keys[j])
            high = max(high, keys[j])
        return low, high

    @_jit
    def _bucket_of(counts, total, need):
        """The bucket (of ``2**BUCKET_BITS``) holding the ``need``-th largest of ``total`` counted keys, and how many
        lie above it: scanned from the nearer end, sixteen buckets at a time until the one holding it."""
        buckets = 1 << BUCKET_BITS
        if 2 * need <= total:
            group, above = buckets - 16, 0
            while True:
                size = 0
                for b in range(group, group + 16):
                    size += counts[b]
                if above + size >= need:
                    break
                above += size
                group -= 16
            bucket = group + 15
            while above + counts[bucket] < need:
                above += counts[bucket]
                bucket -= 1
            return bucket, above
        group, below = 0, 0
        while True:
            size = 0
            for b in range(group, group + 16):
                size += counts[b]
            if total - below - size < need:
                break
            below += size
            group += 16
        bucket = group
        while total - below - counts[bucket] >= need:
            below += counts[bucket]
            bucket += 1
        return bucket, total - below - counts[bucket]

    @_jit
    def _histogram(digits, counts, keys, low, lowest):
        """``counts[:2**BUCKET_BITS]``: how many ``digits`` take each value. The ``lowest`` keys equal to ``low`` (all
        in bucket 0; contrastive scores are zero on about half the channels) are tallied apart, in eight slots by
        position so that runs of them do not wait on one counter, and added to bucket 0 at the end."""
        buckets = 1 << BUCKET_BITS
        counts[: buckets + 8] = 0
        for j in range(digits.shape[0]):
            counts[buckets + (j & 7) if keys[j] == low else np.int64(digits[j])] += 1
        counts[0] += lowest

    @_jit
    def _gather_bucket(keys, n, digits, top, cand_keys, cand_pos):
        """Gather the keys of the first ``n`` whose digit is ``top`` and their positions; returns how many. Found 64
        digits at a time (``digits`` has room past ``n``; bits past ``n`` are cleared)."""
        m = 0
        for base in range(0, n, 64):
            found = _equal_bits(digits, base, top)
            if n - base < 64:
                found &= (np.uint64(1) << np.uint64(n - base)) - np.uint64(1)
            while found:
                j = base + trailing_zeros(found)
                cand_keys[m] = keys[j]
                cand_pos[m] = j
                m += 1
                found &= found - np.uint64(1)
        return m

    @_jit
    def _cut(keys, k, keep, digits, counts, cand_keys, cand_pos):
        """Mark in ``keep`` the positions above the ``k``-th largest of ``keys`` (``uint32``: order keys plus 2**31,
        ``0 < k <= len``) and gather those equal to it, ascending, in ``cand_pos``: returns how many were gathered
        and how many of them to keep."""
        n = keys.shape[0]
        low, high = _span(keys, n)
        shift = max(_bit_length(high - low) - BUCKET_BITS, 0)
        lowest = 0
        for j in range(n):
            digits[j] = np.uint8((keys[j] - low) >> np.uint32(shift))
            lowest += keys[j] == low
        if n - lowest < k:  # the k-th largest is the row's smallest (as zero scores often make it)
            m = 0
            for j in range(n):
                keep[j] = keys[j] != low
            for j in range(n):
                if keys[j] == low:
                    cand_pos[m] = j
                    m += 1
            return m, k - (n - lowest)
        _histogram(digits[:n], counts, keys, low, lowest)
        bucket, above = _bucket_of(counts, n, k)
        top = np.uint8(bucket)
        for j in range(n):
            keep[j] = digits[j] > top
        m = _gather_bucket(keys, n, digits, top, cand_keys, cand_pos)
        need = k - above
        while shift > 0 and need < m:  # refine inside the bucket: its keys' own span, 2**BUCKET_BITS buckets
            low, high = _span(cand_keys, m)
            if low == high:
                break
            shift = max(_bit_length(high - low) - BUCKET_BITS, 0)
            counts[: 1 << BUCKET_BITS] = 0
            for i in range(m):
                counts[(cand_keys[i] - low) >> shift] += 1
            bucket, above = _bucket_of(counts, m, need)
            start = low + (bucket << shift)
            end = start + (1 << shift)
            kept = 0
            for i in range(m):
                if cand_keys[i] >= end:
                    keep[cand_pos[i]] = True
                elif cand_keys[i] >= start:
                    cand_keys[kept] = cand_keys[i]
                    cand_pos[kept] = cand_pos[i]
                    kept += 1
            m, need = kept, need - above
        return m, need

    @_jit
    def _keep_first(keep, positions, need):
        """Set ``keep`` at the first ``need`` of ``positions``."""
        for i in range(need):
            keep[positions[i]] = True

    @_jit
    def _mark_few(keys, m, count, positions, keep, worst, buffer_keys, buffer_pos, hint, reaching):
        """Set ``keep[positions[i]]`` for the ``count`` (at most ``FEW``) best of the ``m`` positions by
        ``keys[i]`` (largest, ties to the lower ``i``), or with ``worst`` clear it for the ``count`` worst
        (smallest, ties to the higher ``i``): one pass keeping the best so far in a sorted buffer. ``hint``
        (``[threshold, margin]`` per direction) carries a floor from the row before: where at least ``count`` keys
        reach it, only those (gathered in ``reaching``) are passed over."""
        base = 2 if worst else 0
        reached = 0
        if hint[base + 1] > 0:
            bound = 0xFFFFFFFF - hint[base] if worst else hint[base]
            for step in range(m):
                i = m - 1 - step if worst else step
                reaching[reached] = i
                reached += (keys[i] <= bound) if worst else (keys[i] >= bound)
        hinted = reached >= count
        total = reached if hinted else m
        size = 0
        floor = np.int64(-1)
        for step in range(total):
            i = reaching[step] if hinted else (m - 1 - step if worst else step)
            key = 0xFFFFFFFF - np.int64(keys[i]) if worst else np.int64(keys[i])
            if key <= floor:
                continue
            p = size if size < count else count - 1
            while p > 0 and buffer_keys[p - 1] < key:
                buffer_keys[p] = buffer_keys[p - 1]
                buffer_pos[p] = buffer_pos[p - 1]
                p -= 1
            buffer_keys[p] = key
            buffer_pos[p] = i
            size = min(size + 1, count)
            if size == count:
                floor = buffer_keys[count - 1]
        for t in range(size):
            keep[positions[buffer_pos[t]]] = not worst
        if hint[base + 1] == 0:
            hint[base + 1] = 1 << 16
        elif reached < count:
            hint[base + 1] = min(hint[base + 1] * 2, np.int64(1) << 32)
        elif reached > 2 * count + 8:
            hint[base + 1] = max(hint[base + 1] * 3 // 4, 1)
        hint[base] = max(buffer_keys[count - 1] - hint[base + 1], 0)

    @_jit
    def _finish(keep, m, need, tie_keys, two, scratch):
        """Keep ``need`` of the ``m`` tied positions in ``scratch[3]``: the lowest, or (``two``) the best by
        ``tie_keys[:m]`` (one key per tied entry, in the order of ``scratch[3]``), then the lowest."""
        digits, counts, cand_keys, cand_pos, tied, chosen, buffer_keys, buffer_pos, hint = scratch
        if not two or need == m:
            _keep_first(keep, cand_pos, need)
        elif need <= FEW:  # the few best
            _mark_few(tie_keys, m, need, cand_pos, keep, False, buffer_keys, buffer_pos, hint, tied)
        elif m - need <= FEW:  # all but the few worst
            for i in range(m):
                keep[cand_pos[i]] = True
            _mark_few(tie_keys, m, m - need, cand_pos, keep, True, buffer_keys, buffer_pos, hint, tied)
        else:
            for i in range(m):
                tied[i] = cand_pos[i]
            chosen[:m] = False
            _, need2 = _cut(tie_keys[:m], need, chosen[:m], digits, counts, cand_keys, cand_pos)
            _keep_first(chosen, cand_pos, need2)
            for i in range(m):
                if chosen[i]:
                    keep[tied[i]] = True

    @_jit
    def _scratch(cols):
        """The arrays one thread's rows are selected in: digits, tallies (and eight slots for the smallest keys),
        gathered keys and positions, tied positions (or the entries reaching the carried floor), tie choices, the
        insertion buffer (keys, positions), and the floor carried from row to row (``_mark_few``'s ``hint``)."""
        return (
            np.empty(cols + 63, np.uint8),  # room for the last 64-digit compare of _gather_bucket
            np.empty((1 << BUCKET_BITS) + 8, np.int32),
            np.empty(cols, np.uint32),
            np.empty(cols, np.int64),
            np.empty(cols, np.int64),
            np.empty(cols, np.bool_),
            np.empty(FEW, np.int64),
            np.empty(FEW, np.int64),
            np.zeros(4, np.int64),
        )

    @_jit
    def _select_keys(primary, secondary, two, k, keep):
        """``keep`` for ``int32`` keys ``primary`` (ties by ``secondary`` where ``two``), ``0 < k < cols``."""
        rows, cols = primary.shape
        scratch = _scratch(cols)
        keys = np.empty(cols, np.uint32)
        for r in range(rows):
            for j in range(cols):
                keys[j] = np.uint32(primary[r, j]) ^ np.uint32(0x80000000)
            m, need = _cut(keys, k, keep[r], scratch[0], scratch[1], scratch[2], scratch[3])
            if two and need < m:
                for i in range(m):
                    keys[i] = np.uint32(secondary[r, scratch[3][i]]) ^ np.uint32(0x80000000)
            _finish(keep[r], m, need, keys, two, scratch)

    @_jit
    def _select_channels(weight, channel, tiebreak, two, k, keep):
        """``keep`` for the scores ``|weight| * channel`` (ties by ``|weight| * tiebreak`` where ``two``)."""
        rows, cols = weight.shape
        zero = np.float32(0.0)
        scratch = _scratch(cols)
        keys = np.empty(cols, np.uint32)
        score = np.empty(cols, np.float32)
        bits = score.view(np.int32)
        for r in range(rows):
            for j in range(cols):
                score[j] = abs(weight[r, j]) * channel[j] + zero
            for j in range(cols):
                keys[j] = _ordered(bits[j])
            m, need = _cut(keys, k, keep[r], scratch[0], scratch[1], scratch[2], scratch[3])
            if two and need < m:
                positions = scratch[3]
                for i in range(m):
                    j = positions[i]
                    score[i] = abs(weight[r, j]) * tiebreak[j] + zero
                for i in range(m):
                    keys[i] = _ordered(bits[i])
            _finish(keep[r], m, need, keys, two, scratch)


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _run(kernel, rows_args: tuple[np.ndarray, ...], shared: tuple, keep: np.ndarray) -> None:
    """Run ``kernel(*row_block_args, *shared, keep_block)`` over blocks of rows, one per torch thread (the kernels
    release the GIL)."""
    rows = keep.shape[0]
    threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    if threads == 1:
        kernel(*rows_args, *shared, keep)
        return
    key = (os.getpid(), threads)  # a forked child starts its own pool: the parent's threads are not in it
    pool = _pools.get(key) or _pools.setdefault(key, ThreadPoolExecutor(threads, "peft-persona-select"))
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [
        pool.submit(kernel, *(a[start:end] for a in rows_args), *shared, keep[start:end])
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for future in futures:
        future.result()


def top_per_row(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """``bool`` mask of the ``k`` largest ``int32`` keys per row (``0 < k < cols``), ties by ``secondary`` keys,
    then by the lower column: what :func:`selection.select_top_per_row` and ``select_lexicographic`` return."""
    keep = torch.empty(primary.shape, dtype=torch.bool)
    first = primary.contiguous().numpy()
    second = first if secondary is None else secondary.contiguous().numpy()
    _run(_select_keys, (first, second), (secondary is not None, k), keep.numpy())
    return keep


def top_by_channels(
    weight: torch.Tensor, k: int, channel: torch.Tensor, tiebreak: torch.Tensor | None = None
) -> torch.Tensor:
    """``bool`` mask of the ``k`` best of each row by ``|W| * channel`` in ``float32`` (``0 < k < cols``), ties by
    ``|W| * tiebreak``, then by the lower column: what :func:`selection.select_by_channels` returns."""
    keep = torch.empty(weight.shape, dtype=torch.bool)
    w = weight.detach().float().contiguous().numpy()
    c = channel.detach().float().contiguous().numpy()
    t = c if tiebreak is None else tiebreak.detach().float().contiguous().numpy()
    _run(_select_channels, (w,), (c, t, tiebreak is not None, k), keep.numpy())
    return keep
