"""The forward of a mixed-persona batch (``adapter_names=``): each row under its own adapter.

:class:`MixedBatchForward` is a mixin of :class:`~.layer.MaskedLinear`; :mod:`.mixed` passes the names to it. Three
paths, the first that applies:

* every group of at most :data:`FUSED_MIXED_MAX_TOKENS` tokens (a decoding step) and the ``fast`` extra's kernel
  runs (:func:`~peft_persona.fast_mixed.supports`): one pass over the original weight for the whole batch
  (:func:`~peft_persona.fast_mixed.mixed_linear`), reading each adapter's packed mask beside it;
* with ``cache_mixed``, a group of at most :data:`SPARSE_MIXED_MAX_TOKENS` tokens of an adapter other than the one in
  effect: the weight in effect's output for every row plus a sparse difference for that group's rows;
* else one matmul per distinct adapter on its own rows (its ``W_eff``, kept with ``cache_mixed``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import fast_mixed
from ..adapter_files import BASE_ADAPTER

# up to this many tokens of one adapter, a mixed batch adds a sparse difference to the weight in effect's output
# instead of a dense matmul with its own W_eff (on 100M shapes, CPU: 4x faster at 2 tokens, even at 32, 1.4x slower
# at 128), so that decoding after a short prompt never builds the dense W_eff
SPARSE_MIXED_MAX_TOKENS = 32
# up to this many tokens in every group, a mixed batch runs fast_mixed's one pass over the original weight (on 100M
# shapes, CPU: 2 tokens per group 0.57 ms against 1.17 for a dense product per group, 4 tokens 0.93 against 1.25,
# 8 tokens 1.5 against 0.95: its cost grows with the tokens, a dense product's with the groups)
FUSED_MIXED_MAX_TOKENS = 4


class MixedBatchForward:
    """Mixin of :class:`~.layer.MaskedLinear`: the forward of a mixed-persona batch and the weights it reads. It uses
    the layer's masks, strengths and base layer and the engine's (:class:`~.engine.WeightEngine`) original and
    effective weights; what it keeps with ``cache_mixed`` lives in the engine's ``_mixed_cache``, which the engine
    clears when the weight or a mask changes under it."""

    def mixed_weight(self, adapters: Sequence[str]) -> torch.Tensor:
        """:meth:`effective_weight` for a mixed batch; kept for the next call with ``cache_mixed``."""
        if not self.cache_mixed:
            return self.effective_weight(adapters)
        self.notice_writes()
        key = tuple((self.persona_strength[n], *self._mask_key(n)) for n in adapters)
        cached = self._mixed_cache.get(tuple(adapters))
        if cached is None or cached[0] != key:  # a changed mask or strength replaces the entry
            cached = self._mixed_cache[tuple(adapters)] = (key, self.effective_weight(adapters))
        return cached[1]

    def mixed_source(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What :func:`~peft_persona.fast_mixed.mixed_linear` reads as the original weight: the ``keep_original``
        copy or the base weight while it holds no change (``held`` and ``stash`` ``None``); with ``cache_mixed``, a
        copy of the original kept for the next call (one per layer, whatever the adapters: the fastest read); else,
        with no copy, the base weight holding ``W_eff`` with ``held`` (the packed mask of the entries it keeps: the
        masks in effect ANDed) and ``stash`` (the original values of the others, in row-major order, as the engine
        keeps them), which the kernel expands row by row."""
        self.notice_writes()
        if self.persona_original is not None:
            return self.persona_original, None, None
        if self.persona_dropped_index is None:
            return self.get_base_weight().detach(), None, None
        plan = self._plan(self._in_effect)
        if not plan:  # a stash with nothing in effect is not a state the engine leaves: read a copy
            return self.original_weight(), None, None
        if self.cache_mixed:
            if ("original", None) not in self._mixed_cache:
                self._mixed_cache[("original", None)] = (None, self.original_weight())
            return self._mixed_cache[("original", None)][1], None, None
        return self.get_base_weight().detach(), self.kept_by(plan), self.persona_dropped

    def mixed_difference(self, adapters: Sequence[str]) -> torch.Tensor | None:
        """With ``cache_mixed``, a float32/64 weight and no grad: ``W_eff(adapters)`` minus the ``W_eff`` the weight
        holds, as a cached sparse CSR ``(out, in)`` matrix with ``int32`` indices; ``None`` where that is not under
        half the dense bytes (or those conditions fail), and the dense :meth:`mixed_weight` serves."""
        weight = self.base_layer.weight
        if not self.cache_mixed or torch.is_grad_enabled() or weight.dtype not in (torch.float32, torch.float64):
            return None
        self.notice_writes()
        current = [n for n, *_ in self._in_effect]
        key = (self._in_effect, tuple((self.persona_strength[n], *self._mask_key(n)) for n in adapters))
        cached = self._mixed_cache.get(("difference", tuple(adapters)))
        if cached is None or cached[0] != key:
            difference = self.effective_weight(adapters) - self.effective_weight(current)
            if self.fan_in_fan_out:
                difference = difference.T
            sparse = None
            if 2 * int(torch.count_nonzero(difference)) < difference.numel():
                with warnings.catch_warnings():  # torch's "in beta state" notice, once per process
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    csr = difference.to_sparse_csr()
                    sparse = torch.sparse_csr_tensor(
                        csr.crow_indices().int(),
                        csr.col_indices().int(),
                        csr.values(),
                        csr.shape,
                        check_invariants=False,
                    )
            cached = self._mixed_cache[("difference", tuple(adapters))] = (key, sparse)
        return cached[1]

    def _mixed_plan(
        self,
        adapter_names: tuple[str, ...],
        tokens_per_row: int,
        groups: dict[str, tuple[list[str], Any]],
        masks: list[torch.Tensor | None],
    ) -> fast_mixed.MixedPlan:
        """The batch's :class:`~peft_persona.fast_mixed.MixedPlan`; with ``cache_mixed`` the last one is kept (a
        decoding loop repeats it) until the names, a mask or a strength change."""
        strengths = [self.persona_strength[wanted[0]] if wanted else 0.0 for wanted, _ in groups.values()]
        key = (adapter_names, tokens_per_row, tuple(self._mask_key(w[0]) for w, _ in groups.values() if w), *strengths)
        cached = self._mixed_cache.get(("plan", None))
        if cached is not None and cached[0] == key:
            return cached[1]
        tokens = _token_groups(adapter_names, tokens_per_row)
        plan = fast_mixed.plan_groups(self._shape(), [tokens[n] for n in groups], masks, strengths)
        if self.cache_mixed:
            self._mixed_cache[("plan", None)] = (key, plan)
        return plan

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Every row under its own adapter (see :mod:`.mixed`): one fused pass over the original weight for groups of
        at most :data:`.FUSED_MIXED_MAX_TOKENS` tokens where :mod:`~peft_persona.fast_mixed` runs; else one matmul
        per distinct adapter on its own rows, and with ``cache_mixed`` a sparse difference to the weight in effect's
        output for small groups."""
        base = self.get_base_layer()
        current = [n for n, *_ in self._in_effect]
        groups = {}  # each group's acting adapter (none for ``__base__`` or at strength 0) and rows
        for name, rows in _row_groups(tuple(adapter_names)).items():
            acts = name != BASE_ADAPTER and name in self.persona_mask_bits and self.persona_strength[name] > 0
            groups[name] = ([name] if acts else [], rows)
        tokens_per_row = x[0].numel() // x.shape[-1] if len(x) and x.shape[-1] else 0
        fused = self._fused_mixed_forward(x, tuple(adapter_names), groups, tokens_per_row)
        if fused is not None:
            return fused
        differences = {}
        for name, (wanted, rows) in groups.items():
            if wanted != current and _rows_count(rows) * tokens_per_row <= SPARSE_MIXED_MAX_TOKENS:
                difference = self.mixed_difference(wanted)
                if difference is not None:
                    differences[name] = difference
        result = base(x) if differences else None  # every row under the weight in effect, corrected below
        for name, (wanted, rows) in groups.items():
            if differences and wanted == current:
                continue  # already in ``result``
            if isinstance(rows, list):
                rows = torch.tensor(rows, device=x.device)
            if name in differences:
                inputs = x[rows].reshape(-1, x.shape[-1]).T.contiguous()  # (in, tokens): CSR @ dense, contiguous
                correction = (differences[name] @ inputs).T.reshape(-1, *result.shape[1:]).to(result.dtype)
                if isinstance(rows, slice):
                    result[rows] += correction
                else:
                    result.index_add_(0, rows, correction)
                continue
            if wanted == current:
                out = base(x[rows].contiguous())  # a strided slice is a view; GPT-2's Conv1D views its input
            else:
                weight = self.mixed_weight(wanted)
                out = F.linear(x[rows], weight.T if self.fan_in_fan_out else weight, base.bias)
            if result is None:
                result = out.new_empty((len(adapter_names), *out.shape[1:]))
            result[rows] = out
        return result

    def _fused_mixed_forward(
        self,
        x: torch.Tensor,
        adapter_names: tuple[str, ...],
        groups: dict[str, tuple[list[str], Any]],
        tokens_per_row: int,
    ) -> torch.Tensor | None:
        """The mixed batch through :func:`~peft_persona.fast_mixed.mixed_linear` (one read of the original weight and
        of each adapter's packed mask), or ``None`` where it does not run: a group above
        :data:`.FUSED_MIXED_MAX_TOKENS` tokens, no adapter acting, a transposed (``fan_in_fan_out``) weight, under
        ``torch.compile``, or where :func:`~peft_persona.fast_mixed.supports` fails."""
        if (
            self.fan_in_fan_out
            or not tokens_per_row
            or torch.compiler.is_compiling()
            or not any(wanted for wanted, _ in groups.values())
            or any(_rows_count(rows) * tokens_per_row > FUSED_MIXED_MAX_TOKENS for _, rows in groups.values())
        ):
            return None
        masks = [self.persona_mask_bits[wanted[0]] if wanted else None for wanted, _ in groups.values()]
        if not fast_mixed.supports(self.get_base_weight(), x, *[m for m in masks if m is not None]):
            return None
        plan = self._mixed_plan(adapter_names, tokens_per_row, groups, masks)
        weight, held, stash = self.mixed_source()
        out = fast_mixed.mixed_linear(weight, x.reshape(-1, x.shape[-1]), plan, held, stash)
        bias = self.get_base_layer().bias
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], out.shape[-1])


@functools.lru_cache(maxsize=64)
def _row_groups(adapter_names: tuple[str, ...]) -> dict[str, slice | list[int]]:
    """The rows of each adapter in a mixed batch: a ``slice`` where they are evenly spaced (a view, no gather)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return {name: _as_slice(rows) for name, rows in groups.items()}


@functools.lru_cache(maxsize=64)
def _token_groups(adapter_names: tuple[str, ...], tokens_per_row: int) -> dict[str, torch.Tensor]:
    """The flat token indices (``int64``) of each adapter's rows, ``tokens_per_row`` tokens per row."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).extend(range(row * tokens_per_row, (row + 1) * tokens_per_row))
    return {name: torch.tensor(tokens, dtype=torch.int64) for name, tokens in groups.items()}


def _as_slice(rows: list[int]) -> slice | list[int]:
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and rows == list(range(rows[0], rows[-1] + 1, step)):
        return slice(rows[0], rows[-1] + 1, step)
    return rows


def _rows_count(rows: slice | list[int]) -> int:
    return len(range(rows.start, rows.stop, rows.step)) if isinstance(rows, slice) else len(rows)
