"""Optional fused CPU kernel (numba) for mixed-persona batches: each row under its own mask, one pass over the weight.

``out[t] = x[t] @ (W * F[t]).T`` where ``F[t]`` is the factor of token ``t``'s adapter: 1 where its packed mask
(:mod:`peft_persona.bits`) keeps an entry, ``off = 1 - strength`` where it drops one (``off = 1`` for a token under no
adapter). Each output row of ``W`` is read once from memory for all tokens; every 16 columns, two bytes of the
adapter's mask become a 16-lane vector select between ``W`` and ``off * W`` (one mask register on AVX-512; LLVM
lowers the same IR on other CPUs), and the tokens of that adapter accumulate it with fused multiply-adds. So a decode
step reads the weight and one bit per entry for each adapter in the batch, where a dense product per adapter reads
the weight once per adapter. The factors are exactly :meth:`~peft_persona.tuner.engine.WeightEngine
.effective_weight`'s; the sums run in another order than ``F.linear``'s, so results agree to float32 rounding, not
bit for bit.

:func:`plan_groups` turns the groups (token indices, packed masks, strengths) into a :class:`MixedPlan` once;
:func:`mixed_linear` runs it, on the original weight or on the weight engine's in-place state (``W_eff`` in the weight
and the original values of the entries it changed in a stash, row-major): then each row is first rebuilt in a
scratch row, an expanding load of the stash per 16 columns (``llvm.masked.expandload``), so no copy of the weight is
made. The mask layers use it for the decoding steps of mixed batches (``adapter_names=``,
:mod:`peft_persona.tuner.mixed_forward`) where :func:`supports` holds: kernels enabled
(:func:`peft_persona.fast_select.enabled`), float32 CPU tensors, a contiguous weight and no grad. It runs on the
calling thread: single-threaded it already reads the weight faster than torch's 4-row ``F.linear`` on two threads
(docs/benchmarks.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import fast_select

LANES = 16  # float32 lanes per vector step; two mask bytes each


def supports(weight: torch.Tensor, x: torch.Tensor, *packed: torch.Tensor) -> bool:
    """Whether :func:`mixed_linear` runs for ``weight`` ``(out, in)``, input ``x`` and the ``packed`` masks: kernels
    enabled, all on the CPU, ``weight`` and ``x`` float32, the weight contiguous, and no grad to record."""
    return (
        fast_select.applies(weight, x, *packed)
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    )


class MixedPlan(NamedTuple):
    """A mixed batch's groups as :func:`mixed_linear` reads them; made (and checked) by :func:`plan_groups`, not by
    hand. Reusable across calls with the same groups, masks and strengths (a decoding loop)."""

    shape: tuple[int, int]  # the weight's (out, in)
    tokens: int  # the input rows it reaches (largest token index + 1)
    rows: np.ndarray  # int64 token indices, group after group
    starts: np.ndarray  # int64: group g's tokens are rows[starts[g]:starts[g + 1]]
    slots: np.ndarray  # int64: group g's mask in ``bits``
    offs: np.ndarray  # float32: group g's factor where its mask drops (1 under no mask)
    bits: np.ndarray  # uint8 (masks, out, ceil(in / 8)): the groups' packed masks


def plan_groups(
    shape: tuple[int, int],
    token_groups: list[torch.Tensor],
    packed: list[torch.Tensor | None],
    strengths: list[float],
) -> MixedPlan:
    """The plan for a weight of ``shape`` ``(out, in)``: group ``g`` is the tokens at ``token_groups[g]`` (``int64``
    indices into the input's rows, each token in at most one group) under the packed mask ``packed[g]`` ``(out,
    ceil(in / 8))`` at ``strengths[g]``, or under no mask where ``packed[g]`` is ``None``."""
    if not len(token_groups) == len(packed) == len(strengths):
        raise ValueError("plan_groups: token_groups, packed and strengths differ in length")
    want = (shape[0], (shape[1] + 7) // 8)
    masks = [p for p in packed if p is not None]
    for p in masks:
        if tuple(p.shape) != want or p.dtype != torch.uint8:
            raise ValueError(f"plan_groups: packed mask {tuple(p.shape)} {p.dtype} does not fit {tuple(shape)}")
    if len(masks) == 1 and masks[0].is_contiguous():
        bits = masks[0].unsqueeze(0)  # a view: no copy for one adapter
    else:
        bits = torch.stack(masks) if masks else torch.zeros((1, *want), dtype=torch.uint8)
    slots, offs, slot = [], [], 0
    for p, strength in zip(packed, strengths, strict=True):
        slots.append(slot if p is not None else 0)
        offs.append(1.0 - strength if p is not None else 1.0)
        slot += p is not None
    rows = torch.cat(token_groups).to(torch.int64) if token_groups else torch.zeros(0, dtype=torch.int64)
    if len(rows) and int(rows.min()) < 0:
        raise ValueError(f"plan_groups: negative token index {int(rows.min())}")
    starts = np.zeros(len(token_groups) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(g) for g in token_groups])
    return MixedPlan(
        tuple(shape),
        int(rows.max()) + 1 if len(rows) else 0,
        rows.numpy(),
        starts,
        np.asarray(slots, dtype=np.int64),
        np.asarray(offs, dtype=np.float32),
        bits.numpy(),
    )


def mixed_linear(
    weight: torch.Tensor,
    x: torch.Tensor,
    plan: MixedPlan,
    held: torch.Tensor | None = None,
    stash: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``(tokens, in)`` times ``W * F`` per group of ``plan``, as ``(tokens, out)`` float32 (no bias); a row
    of the output is written only for a token in some group. Call it where :func:`supports` holds.

    ``W`` is ``weight``, or, given ``held`` (a packed mask of ``weight``'s shape) and ``stash`` (float32, 1-D),
    ``weight`` where ``held`` keeps and the values of ``stash`` in row-major order where it drops: the weight engine's
    in-place state (``W_eff`` in the weight, the original values of the entries it changed kept apart), read as the
    original weight without copying it.
    """
    if fast_select.numba is None:
        raise RuntimeError("mixed_linear needs numba: pip install 'peft-persona[fast]'")
    if weight.dtype != torch.float32 or x.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(
            f"mixed_linear: weight {weight.dtype} (contiguous: {weight.is_contiguous()}) and input {x.dtype}; "
            "both must be float32 and the weight contiguous"
        )
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or tuple(weight.shape) != plan.shape:
        raise ValueError(
            f"mixed_linear: input {tuple(x.shape)} and a plan for {plan.shape} do not fit a weight of shape "
            f"{tuple(weight.shape)}"
        )
    if plan.tokens > len(x):
        raise ValueError(f"mixed_linear: the plan reaches token {plan.tokens - 1}; the input has {len(x)} rows")
    packed = (weight.shape[0], (weight.shape[1] + 7) // 8)
    if (held is None) != (stash is None):
        raise ValueError("mixed_linear: held and stash go together")
    if held is None:
        held, stash = torch.zeros((0, packed[1]), dtype=torch.uint8), torch.zeros(0, dtype=torch.float32)
    elif tuple(held.shape) != packed or held.dtype != torch.uint8 or stash.dtype != torch.float32 or stash.dim() != 1:
        raise ValueError(
            f"mixed_linear: held {tuple(held.shape)} {held.dtype} and stash {tuple(stash.shape)} {stash.dtype} do not "
            f"fit a weight of shape {tuple(weight.shape)} (want uint8 {packed} and 1-D float32)"
        )
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    mismatch = _mixed_rows(
        weight.numpy(),
        held.contiguous().numpy(),
        stash.contiguous().numpy(),
        x.contiguous().numpy(),
        plan.rows,
        plan.starts,
        plan.slots,
        plan.offs,
        plan.bits,
        out.numpy(),
    )
    if mismatch:
        raise ValueError(f"mixed_linear: the stash's {len(stash)} values are not the entries that held drops")
    return out


if fast_select.numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _splat(builder, value, vector_type):
        """``value`` in every lane of a ``vector_type``."""
        lane_zero = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
        vector = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.IntType(32)(0))
        return builder.shuffle_vector(vector, vector, lane_zero)

    def _vector_at(builder, pointer, column, vector_type):
        """A pointer to the ``vector_type`` starting at element ``column`` of ``pointer``."""
        return builder.bitcast(builder.gep(pointer, [column]), vector_type.as_pointer())

    def _mask_word(builder, bits, block):
        """Block ``block``'s 16 mask bits (two bytes of a packed row), as an ``i16``."""
        word = ir.IntType(16)
        two_bytes = builder.bitcast(builder.gep(bits, [builder.mul(block, block.type(2))]), word.as_pointer())
        return builder.load(two_bytes, align=1)

    def _horizontal_sum(builder, vectors):
        """The sum of every lane of ``vectors`` (added lane by lane first), as a scalar."""
        total = vectors[0]
        for vector in vectors[1:]:
            total = builder.fadd(total, vector)
        value = builder.extract_element(total, ir.IntType(32)(0))
        for k in range(1, total.type.count):
            value = builder.fadd(value, builder.extract_element(total, ir.IntType(32)(k)))
        return value

    def _restore_blocks(checked: bool):
        """An intrinsic: ``scratch[:16 * blocks] = w`` where the packed row ``held`` keeps, else the next values of
        ``stash`` from ``start`` on (an expanding load per 16 columns); returns the next stash position and 1 if the
        stash ran out. ``checked`` tests every block against the stash's end (nothing is read past it); unchecked,
        the caller has made sure that a whole row fits."""

        def codegen(context, builder, signature, args):
            w, held, stash, start, blocks, scratch = args
            index = blocks.type
            f32 = ir.FloatType()
            vec, keep_type, i16 = ir.VectorType(f32, LANES), ir.VectorType(ir.IntType(1), LANES), ir.IntType(16)
            proxies = {
                i: cgutils.create_struct_proxy(signature.args[i])(context, builder, value=args[i]) for i in (0, 1, 2, 5)
            }
            w_ptr, held_ptr, stash_ptr, scratch_ptr = (proxies[i].data for i in (0, 1, 2, 5))
            size = cgutils.unpack_tuple(builder, proxies[2].shape, 1)[0]
            function = ir.FunctionType(vec, [f32.as_pointer(), keep_type, vec])
            expand = cgutils.get_or_insert_function(builder.module, function, "llvm.masked.expandload.v16f32")
            count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
            position, error = cgutils.alloca_once_value(builder, start), cgutils.alloca_once_value(builder, index(0))
            with cgutils.for_range(builder, blocks) as loop:
                column = builder.mul(loop.index, index(LANES))
                w_vector = builder.load(_vector_at(builder, w_ptr, column, vec), align=4)
                dropped = builder.xor(_mask_word(builder, held_ptr, loop.index), i16(0xFFFF))
                here, taken = builder.load(position), builder.zext(builder.call(count, [dropped]), index)
                if checked:
                    fits = builder.icmp_unsigned("<=", builder.add(here, taken), size)  # never read past the stash
                    dropped, taken = builder.select(fits, dropped, i16(0)), builder.select(fits, taken, index(0))
                    builder.store(builder.or_(builder.load(error), builder.zext(builder.not_(fits), index)), error)
                keep = builder.bitcast(dropped, keep_type)
                restored = builder.call(expand, [builder.gep(stash_ptr, [here]), keep, w_vector])
                builder.store(restored, _vector_at(builder, scratch_ptr, column, vec), align=4)
                builder.store(builder.add(here, taken), position)
            return context.make_tuple(builder, signature.return_type, [builder.load(position), builder.load(error)])

        def typer(typingctx, w, held, stash, start, blocks, scratch):
            arrays = (w, held, stash, scratch)
            if [a.dtype for a in arrays] != [types.float32, types.uint8, types.float32, types.float32]:
                return None
            return types.UniTuple(types.int64, 2)(w, held, stash, start, blocks, scratch), codegen

        return intrinsic(typer)

    _restore_fast, _restore_checked = _restore_blocks(False), _restore_blocks(True)

    def _masked_dots(tokens: int):
        """An intrinsic summing ``x[rows[first + t]] * select(bit, w, off * w)`` over the first ``16 * blocks``
        columns of one weight row ``w`` for ``tokens`` tokens; returns one float32 per token.

        ``4 // tokens`` accumulators per token (at least one) keep enough independent multiply-adds in flight."""
        unroll = max(1, 4 // tokens)
        f32 = ir.FloatType()
        vec = ir.VectorType(f32, LANES)

        def codegen(context, builder, signature, args):
            w, bits, x, rows, first, blocks, off = args
            index = blocks.type

            def data(position, value):
                return cgutils.create_struct_proxy(signature.args[position])(context, builder, value=value)

            def load_vector(pointer, column):
                return builder.load(_vector_at(builder, pointer, column, vec), align=4)

            w_ptr, bits_ptr, rows_ptr, x_proxy = data(0, w).data, data(1, bits).data, data(3, rows).data, data(2, x)
            x_stride = builder.sdiv(cgutils.unpack_tuple(builder, x_proxy.strides, 2)[0], index(4))  # bytes: float32
            x_rows = []
            for t in range(tokens):
                row = builder.load(builder.gep(rows_ptr, [builder.add(first, index(t))]))
                x_rows.append(builder.gep(x_proxy.data, [builder.mul(row, x_stride)]))
            off_vector = _splat(builder, off, vec)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
            zero = ir.Constant(vec, None)
            sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(unroll)] for _ in range(tokens)]

            def step(block, lane):
                column = builder.mul(block, index(LANES))
                w_vector = load_vector(w_ptr, column)
                keep = builder.bitcast(_mask_word(builder, bits_ptr, block), ir.VectorType(ir.IntType(1), LANES))
                factored = builder.select(keep, w_vector, builder.fmul(w_vector, off_vector))
                for t in range(tokens):
                    total = builder.call(fma, [load_vector(x_rows[t], column), factored, builder.load(sums[t][lane])])
                    builder.store(total, sums[t][lane])

            rounds = builder.sdiv(blocks, index(unroll))
            with cgutils.for_range(builder, rounds) as loop:
                for lane in range(unroll):
                    step(builder.add(builder.mul(loop.index, index(unroll)), index(lane)), lane)
            done = builder.mul(rounds, index(unroll))
            with cgutils.for_range(builder, builder.sub(blocks, done)) as loop:
                step(builder.add(done, loop.index), 0)
            results = [_horizontal_sum(builder, [builder.load(s) for s in sums[t]]) for t in range(tokens)]
            return context.make_tuple(builder, signature.return_type, results)

        def typer(typingctx, w, bits, x, rows, first, blocks, off):
            arrays = (w, bits, x, rows)
            if [a.dtype for a in arrays] != [types.float32, types.uint8, types.float32, types.int64] or x.layout != "C":
                return None  # the IR reads contiguous float32 rows, uint8 masks and int64 token indices
            return types.UniTuple(types.float32, tokens)(w, bits, x, rows, first, blocks, off), codegen

        return intrinsic(typer)

    _dots_1, _dots_2, _dots_4 = _masked_dots(1), _masked_dots(2), _masked_dots(4)

    @fast_select.numba.njit(cache=True, nogil=True, boundscheck=False)
    def _tail(w, p, x, row, start, off):
        """The sum over columns ``start..`` (past the last full 16-column block) for one token, scalar."""
        total = np.float32(0)
        for j in range(start, w.shape[0]):
            factor = np.float32(1) if (p[j >> 3] >> (j & 7)) & 1 else off
            total += x[row, j] * (w[j] * factor)
        return total

    @fast_select.numba.njit(cache=True, nogil=True, boundscheck=False)
    def _restore_row(w, held, stash, start, scratch):
        """``scratch`` = row ``w`` with the stash's values from ``start`` where ``held`` drops; (next position, 1 if
        the stash ran out)."""
        in_features = w.shape[0]
        if start + in_features <= stash.shape[0]:  # the whole row fits: no test per block
            position, error = _restore_fast(w, held, stash, start, in_features // LANES, scratch)
        else:
            position, error = _restore_checked(w, held, stash, start, in_features // LANES, scratch)
        for j in range(in_features // LANES * LANES, in_features):
            if (held[j >> 3] >> (j & 7)) & 1:
                scratch[j] = w[j]
            elif position < stash.shape[0]:
                scratch[j] = stash[position]
                position += 1
            else:
                scratch[j] = w[j]
                error = 1
        return position, error

    @fast_select.numba.njit(cache=True, nogil=True, boundscheck=False)
    def _mixed_rows(weight, held, stash, x, rows, starts, slots, offs, bits, out):
        out_features, in_features = weight.shape
        blocks = in_features // LANES
        tail = blocks * LANES
        scratch = np.empty(in_features, dtype=np.float32)
        position, error = 0, 0
        for o in range(out_features):
            w = weight[o]
            if held.shape[0]:  # the weight holds W_eff: its original row, rebuilt once for every group
                position, bad = _restore_row(w, held[o], stash, position, scratch)
                error |= bad
                w = scratch
            for g in range(len(slots)):
                p, off = bits[slots[g], o], offs[g]
                t, end = starts[g], starts[g + 1]
                while t < end:
                    if end - t >= 4:
                        s0, s1, s2, s3 = _dots_4(w, p, x, rows, t, blocks, off)
                        out[rows[t], o], out[rows[t + 1], o] = s0, s1
                        out[rows[t + 2], o], out[rows[t + 3], o] = s2, s3
                        t += 4
                    elif end - t >= 2:
                        s0, s1 = _dots_2(w, p, x, rows, t, blocks, off)
                        out[rows[t], o], out[rows[t + 1], o] = s0, s1
                        t += 2
                    else:
                        (s0,) = _dots_1(w, p, x, rows, t, blocks, off)
                        out[rows[t], o] = s0
                        t += 1
                if tail < in_features:
                    for i in range(starts[g], end):
                        out[rows[i], o] += _tail(w, p, x, rows[i], tail, off)
        return error != 0 or (held.shape[0] > 0 and position != stash.shape[0])

else:
    _mixed_rows = None
