"""The in-place weight engine: the base weight holds ``W_eff`` of the adapters in effect, with an exact restore.

``W_eff = W * (M + (1 - s) * (1 - M))`` for an adapter with mask ``M`` and strength ``s``: strength 1 removes the
dropped weights (``W * M``), strength 0 is the base layer. Several adapters in effect multiply their factors.

How the forward gets ``W_eff`` at base speed: the engine writes it *into the base weight, in place*, and keeps the
original values of the entries it changed (the "dropped" entries) for an exact restore. The forward is then the base
layer's own ``F.linear``: no ``W * M`` per call and no dense cache. The adapters in effect are the merged ones if any
are merged (they alone act then, as with PEFT's LoRA), else the active ones while adapters are enabled; a change of
that set rewrites only the entries whose value changes. Merging the active adapters is therefore free, and an unmerge
followed by a merge of another adapter touches only the entries where the two masks differ. ``disable_adapter()``,
``unload()`` and ``delete_adapter`` restore the original weight bit-exactly.

What a reader of the model's state sees is what LoRA shows: the original weight, or the merged one. The active
adapters that are not merged leave the weight (an index restore, :meth:`WeightEngine.disarm`) before the layer's
``state_dict`` is read or loaded and on ``unload``/``merge_and_unload``; the next forward writes them back. Tensors
made inside ``torch.inference_mode()`` (a ``copy.deepcopy`` there) are replaced by normal ones, the weight keeping its
identity, before the engine writes to them outside it.

The layer computes ``W_eff`` apart instead, leaving the weight alone, where writing into it would be wrong: when the
weight needs gradients, when accelerate offloads it, for a mixed-persona batch (``adapter_names=``), and when the
layer's ``in_place`` switch is off. Both switches are per layer (and so per model), set when the layer is created
and changed with :meth:`WeightEngine.set_weight_mode` (for a whole model, :func:`~peft_persona.tuner.model
.set_weight_mode`):

* ``in_place`` (default ``True``): write ``W_eff`` into the base weight; ``False`` computes it apart in every forward,
  the smallest memory (no per-weight state but the masks);
* ``keep_original`` (default ``False``): keep a dense copy of the original weight and rewrite the weight from it:
  one more copy of the weight, and nothing per adapter but its mask. With the ``fast`` extra (numba) a switch at full
  strength is then one fused pass (:mod:`~peft_persona.fast_mask`), about one copy of the weight; without it, a copy
  and an index write (with the dropped entries' indices recorded per adapter, :mod:`.records`);
* ``cache_mixed`` (default ``False``): keep what a mixed-persona batch (``adapter_names=``, :mod:`.mixed_forward`)
  builds, so that later mixed calls do not rebuild it: for decoding steps with the ``fast`` extra, a copy of the
  original weight for :mod:`~peft_persona.fast_mixed` (one per layer, whatever the adapters; none where the weight
  holds no change or ``keep_original`` keeps one; without ``cache_mixed`` the kernel reads the weight and the stash
  of original values instead, a little slower) and the batch's plan; without numba, for groups of at most
  :data:`~.mixed_forward.SPARSE_MIXED_MAX_TOKENS` tokens in float32/64 without grad, the *difference* of an adapter's
  ``W_eff`` to the weight in effect as a sparse CSR matrix (8 bytes per entry where the two differ; used only where
  that is under half the dense bytes); for larger groups, an adapter's dense ``W_eff`` (one copy of the weight per
  adapter used there).

Switching records and writes by others: :mod:`.records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import fast_mask
from ..bits import byte_table, unpack_mask, unpack_to
from .records import SwitchRecords, version

DEFAULT_WEIGHT_MODE: dict[str, bool] = {"in_place": True, "keep_original": False, "cache_mixed": False}


class WeightEngine(SwitchRecords):
    """Mixin of :class:`~peft_persona.tuner.layer.PersonaMaskLayer` that keeps the base weight equal to ``W_eff``.

    It reads the layer's ``persona_mask_bits``, ``persona_strength``, ``merged_adapters``, ``active_adapters``,
    ``in_features``, ``fan_in_fan_out`` and base layer, and owns the buffers ``persona_dropped`` /
    ``persona_dropped_index`` (the original values of the changed entries and their flat indices) and
    ``persona_original`` (the dense original copy, only with ``keep_original``), and two caches: each adapter's
    dropped indices, and what mixed batches keep with ``cache_mixed`` (``_mixed_cache``, filled by
    :class:`~.mixed_forward.MixedBatchForward`; cleared here when the weight or a mask changes).
    """

    in_place: bool
    keep_original: bool
    cache_mixed: bool

    def init_engine(self, in_place: bool = True, keep_original: bool = False, cache_mixed: bool = False) -> None:
        """Register the engine's (non-persistent) buffers and set the layer's switches."""
        self.register_buffer("persona_dropped_index", None, persistent=False)
        self.register_buffer("persona_original", None, persistent=False)
        self.register_buffer("persona_dropped", None, persistent=False)
        self._in_effect: tuple = ()  # what the base weight holds, as :meth:`effect` gives it
        self.init_records()
        # with cache_mixed: adapters -> (masks key, W_eff); ("difference", adapters) -> (key, sparse difference)
        self._mixed_cache: dict[tuple, tuple] = {}
        self.in_place, self.keep_original, self.cache_mixed = bool(in_place), bool(keep_original), bool(cache_mixed)

    def set_weight_mode(
        self, in_place: bool | None = None, keep_original: bool | None = None, cache_mixed: bool | None = None
    ) -> None:
        """Change the layer's switches (``None`` keeps one); the weight follows at once, exactly."""
        if in_place is not None:
            self.in_place = bool(in_place)
        if keep_original is not None:
            if keep_original and not self.keep_original:
                self._dropped_cache.clear()  # switches start from the copy: the records are rebuilt only if needed
            self.keep_original = bool(keep_original)
        if cache_mixed is not None:
            self.cache_mixed = bool(cache_mixed)
            self._mixed_cache.clear()
        self.sync()

    def weight_mode(self) -> dict[str, bool]:
        """The layer's switches, as keyword arguments for a new layer or :meth:`set_weight_mode`."""
        return {"in_place": self.in_place, "keep_original": self.keep_original, "cache_mixed": self.cache_mixed}

    # ------------------------------------------------------------------------------------------ what to hold
    def effect(self, armed: bool = True) -> tuple:
        """What the weight should hold: ``(adapter, strength, mask version, mask id)`` for each adapter in effect.

        The merged adapters, if any are merged (they alone act then, as with PEFT's LoRA); else, when ``armed``, the
        active adapters while adapters are enabled and written in place; else nothing. Unarmed, the weight holds what
        a reader of the model's state must see: the original weight, or the merged one.
        """
        if self.merged_adapters:
            names = list(self.merged_adapters)
        elif armed and not self._disable_adapters and self._writes_in_place():
            names = list(self.active_adapters)
        else:
            names = []
        bits = self.persona_mask_bits
        return tuple(
            (n, self.persona_strength[n], version(bits[n]), id(bits[n]))
            for n in names
            if n in bits and self.persona_strength[n] > 0
        )

    def sync_weight(self) -> None:
        """Bring the base weight to :meth:`effect`, rewriting only the entries whose value changes."""
        self._own_tensors()
        target = self.effect()
        if target != self._in_effect:
            self._transition(target)
        bits = self.persona_mask_bits
        self._synced = (self._writes_in_place(), [(bits[n], version(bits[n])) for n, *_ in target])

    def disarm(self) -> None:
        """Bring the weight to the unarmed :meth:`effect` (the original, or the merged adapters); the next forward
        writes the active adapters back. Runs before the layer's state is read or loaded."""
        target = self.effect(armed=False)
        if target != self._in_effect:
            self._own_tensors()
            self._transition(target)
            self._synced = None

    def _maybe_stale(self) -> bool:
        """A cheap per-call check (a few microseconds) that the last sync still holds: same grad mode, and no mask of
        the adapters in effect written since. Every public operation syncs by itself. (Writes inside
        ``torch.inference_mode()`` to tensors made there are not seen: such tensors keep no version counter.)"""
        synced = getattr(self, "_synced", None)
        if synced is None or synced[0] != self._writes_in_place():
            return True
        return any(version(tensor) != seen for tensor, seen in synced[1])

    def _own_tensors(self) -> None:
        """Replace inference tensors (made inside ``torch.inference_mode()``, e.g. by a ``copy.deepcopy`` there) by
        normal ones, which can be written outside it: the weight keeps its identity (``swap_tensors``). Inside
        ``inference_mode`` nothing needs replacing."""
        if torch.is_inference_mode_enabled():
            return
        weight = self.base_layer.weight
        if weight.is_inference():
            fresh = weight.detach().clone()
            if isinstance(weight, nn.Parameter):
                fresh = nn.Parameter(fresh, requires_grad=weight.requires_grad)
            torch.utils.swap_tensors(weight, fresh)
        for name, bits in list(self.persona_mask_bits.items()):
            if bits.is_inference():
                self.persona_mask_bits[name] = bits.clone()

    def _writes_in_place(self) -> bool:
        base = self.base_layer
        weight = base.weight
        return (
            self.in_place
            and not (weight.requires_grad and torch.is_grad_enabled())
            and weight.is_contiguous()
            and weight.device.type != "meta"
            and "_hf_hook" not in base.__dict__  # accelerate offload swaps the weight in and out around each call
        )

    def _plan(self, effect: Sequence[tuple]) -> list[tuple[str, float]]:
        """``(adapter, strength)`` of the adapters in ``effect`` that change the weight."""
        return [(n, s) for n, s, *_ in effect if s > 0 and not self._keeps_everything(n)]

    # ------------------------------------------------------------------------------------------ writing it
    def factors(self, name: str, strength: float, dtype: torch.dtype) -> torch.Tensor:
        """Dense per-weight factor of one adapter in the weight's layout: 1 where kept, ``1 - strength`` elsewhere."""
        off = torch.tensor(1.0 - strength, dtype=dtype) if strength < 1.0 else torch.tensor(0, dtype=dtype)
        table = byte_table(off, torch.tensor(1, dtype=dtype), dtype)
        factors = unpack_to(self.persona_mask_bits[name], self.in_features, table)
        return factors.T if self.fan_in_fan_out else factors

    def _scaled(self, values: torch.Tensor, index: torch.Tensor, plan: list[tuple[str, float]]) -> torch.Tensor:
        """``values`` (original weights at ``index``) times each adapter's factor where it drops them."""
        if all(s == 1.0 for _, s in plan):
            return torch.zeros_like(values)
        for name, strength in plan:
            values = values * self.factors(name, strength, values.dtype).reshape(-1)[index]
        return values

    @torch.no_grad()
    def _transition(self, target: tuple) -> None:
        """Make the weight hold ``target``: restore the entries changed before, then change those ``target`` drops.

        Only dropped entries are written, by index; the original values of the entries changed are kept, in the
        weight's dtype, with their flat indices, for an exact restore.
        """
        self.notice_writes()
        weight = self.get_base_weight()
        if weight.device.type == "meta" or any(self.persona_mask_bits[n].device.type == "meta" for n, *_ in target):
            self._in_effect = ()  # nothing written; applied once the weights are real
            return
        if self.keep_original or self.persona_original is not None:
            self._transition_from_copy(weight, target)
            return
        flat = weight.view(-1)
        if self.persona_dropped_index is not None:
            flat.index_copy_(0, self.persona_dropped_index, self.persona_dropped)
            self._set_stash(None, None)
        plan = self._plan(target)
        if plan:
            index, stash = self._dropped_record(plan, flat)
            if all(s == 1.0 for _, s in plan):
                flat.index_fill_(0, index, 0)
            else:
                flat.index_copy_(0, index, self._scaled(stash, index, plan))
            self._set_stash(stash, index)
        self._in_effect = target

    def _set_stash(self, values: torch.Tensor | None, index: torch.Tensor | None) -> None:
        """Set ``persona_dropped`` and ``persona_dropped_index`` (registered buffers) without ``Module.__setattr__``'s
        checks, which cost a tenth of a switch over a model's layers."""
        self._buffers["persona_dropped"], self._buffers["persona_dropped_index"] = values, index

    def _transition_from_copy(self, weight: torch.Tensor, target: tuple) -> None:
        """:meth:`_transition` with ``keep_original``: rewrite the weight from the dense original copy."""
        if self.persona_original is None:
            self.persona_original = self.original_weight()
            self._set_stash(None, None)
        plan = self._plan(target)
        kept = self._kept_bits(plan, weight)
        if not plan:
            weight.copy_(self.persona_original)
        elif kept is not None:  # full strength, the fused kernel: one pass, no record of dropped entries
            fast_mask.copy_masked(self.persona_original, kept, weight)
        elif len(plan) == 1 and plan[0][1] == 1.0:  # one adapter at full strength: copy, then zero by index
            weight.copy_(self.persona_original)
            weight.view(-1).index_fill_(0, self._dropped_index(plan), 0)
        else:
            torch.mul(self.persona_original, self.factors(*plan[0], weight.dtype), out=weight)
            for name, strength in plan[1:]:
                weight.mul_(self.factors(name, strength, weight.dtype))
        if not self.keep_original and not plan:
            self.persona_original = None
        self._in_effect = target

    def _kept_bits(self, plan: list[tuple[str, float]], weight: torch.Tensor) -> torch.Tensor | None:
        """The packed mask ``plan`` keeps (its masks ANDed) where :mod:`~peft_persona.fast_mask` can write
        ``original * mask`` into ``weight``: every adapter at strength 1, the weight in ``(out, in)`` layout."""
        if not plan or any(s != 1.0 for _, s in plan) or self.fan_in_fan_out:
            return None
        if not fast_mask.supports(weight, self.persona_mask_bits[plan[0][0]]):
            return None
        return self.kept_by(plan)

    def release_weight(self, keep_effect: bool) -> None:
        """Leave the weight holding the merged adapters (``keep_effect``) or the original, and forget how to restore
        it: the active adapters that are not merged leave the weight."""
        self._own_tensors()
        self._transition(self.effect(armed=False) if keep_effect else ())
        self._in_effect = ()
        self.persona_dropped = self.persona_dropped_index = self.persona_original = None
        self._dropped_cache.clear()
        self._mixed_cache.clear()

    # ------------------------------------------------------------------------------------------ reading it
    def original_weight(self) -> torch.Tensor:
        """A copy of the base weight as loaded, without any adapter (in the weight's own layout)."""
        self.notice_writes()
        if self.persona_original is not None:
            return self.persona_original.clone()
        weight = self.get_base_weight().detach().clone()
        if self.persona_dropped_index is not None:
            weight.view(-1).index_copy_(0, self.persona_dropped_index, self.persona_dropped)
        return weight

    def effective_weight(self, adapters: Sequence[str]) -> torch.Tensor:
        """``W_eff`` for ``adapters`` (``[]`` for the base weight), computed apart from the base weight."""
        weight = self.original_weight()
        for name, strength in self._plan([(n, self.persona_strength[n]) for n in adapters]):
            weight.mul_(self.factors(name, strength, weight.dtype))
        return weight

    def functional_weight(self) -> torch.Tensor:
        """``W_eff`` of the active adapters as a differentiable function of the (unmodified) base weight."""
        weight = self.base_layer.weight  # the parameter itself, not ``get_base_weight()``'s detached data
        active = [(n, self.persona_strength[n]) for n in self.active_adapters if n in self.persona_mask_bits]
        for name, strength in self._plan(active):
            weight = weight * self.factors(name, strength, weight.dtype)
        return weight

    def product_weight(self) -> torch.Tensor:
        """``W * M`` (or ``W`` scaled by ``1 - s`` off the mask) for the adapters in effect, computed apart as plain
        products: NaN where a dropped ``W`` is inf, which zeroing in place cannot represent."""
        expected = self.original_weight()
        for name, strength in self._plan(self._in_effect):
            if strength == 1.0:
                mask = unpack_mask(self.persona_mask_bits[name], self.in_features)
                expected = expected * (mask.T if self.fan_in_fan_out else mask)
            else:
                expected = expected * self.factors(name, strength, expected.dtype)
        return expected


def disarm_before_state_dict(layer: Any, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre hook: the state read holds the original weight (or the merged one), as with LoRA."""
    layer.disarm()


def disarm_before_load(layer: Any, *args: Any) -> None:
    """``load_state_dict`` pre hook: weights are loaded over the original, not over the active adapters' product
    (what was derived from the old weights is dropped by :meth:`~.records.SwitchRecords.notice_writes`)."""
    layer.disarm()


def sync_after_load(layer: Any, incompatible_keys: Any) -> None:
    """``load_state_dict`` post hook: loaded masks reach the weight at once."""
    layer.sync()
