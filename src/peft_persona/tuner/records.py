"""Switching records of the weight engine, and how it notices writes to the weight by others.

Switching: the layer keeps, for the :data:`RECORDS_KEPT` adapters most recently in effect, a record of the entries
each drops: their flat indices (``int64``, 8 bytes per dropped entry) and their original values (in the weight's
dtype; the active adapter's record is the stash itself, not a copy). A switch between recorded adapters is then two
index writes: restore the old entries, zero the new ones (with ``keep_original``: copy the original, zero the new
entries; with the ``fast`` extra, ``keep_original`` writes ``original * mask`` in one pass and keeps no record). An
adapter without a record finds its entries once (``torch.nonzero`` over its unpacked mask). Whether a mask is all
ones (an adapter that changes nothing) is read once per mask and kept with the mask's key.

Writes by others: the engine writes through ``weight.data``, whose version counter is its own, so a change of the
weight *parameter*'s version counter (or of the parameter, its storage, dtype or device) means someone else wrote
the weight: ``load_state_dict``, an optimizer step, an edit under ``torch.no_grad()``, a ``deepcopy``. Before it
reads or writes the weight, the engine then drops what it derived from the old values (the recorded original values,
the mixed-batch cache and, when no adapter is in effect, the ``keep_original`` copy). A write while an adapter is in
effect lands in ``W_eff``; its dropped entries are restored from the stash as before.
"""

from __future__ import annotations

import torch

from ..bits import full_mask_packed, unpack_mask

RECORDS_KEPT = 2  # switching records kept per layer: a back-and-forth between two personas finds nothing again


class SwitchRecords:
    """Mixin of :class:`~peft_persona.tuner.engine.WeightEngine`: per adapter, the entries its mask drops.

    It reads the layer's ``persona_mask_bits``, ``in_features``, ``out_features``, ``fan_in_fan_out`` and base layer,
    and the engine's ``_in_effect``, ``_mixed_cache`` and ``persona_original``.
    """

    def init_records(self) -> None:
        # adapter -> (mask key, dropped indices, their original values or None)
        self._dropped_cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}
        self._seen_weight: tuple = ()  # :meth:`_weight_key` when the engine last checked for writes by others
        self._keeps_all: dict[str, tuple[tuple, bool]] = {}  # adapter -> (mask key, whether its mask is all ones)

    def _keeps_everything(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s mask is all ones (a freshly injected adapter), read from the packed bits."""
        packed = self.persona_mask_bits[adapter_name]
        if packed.device.type == "meta":
            return False
        key = self._mask_key(adapter_name)
        cached = self._keeps_all.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.in_features % 8 == 0:
            full = bool((packed == 255).all())
        else:
            full = torch.equal(packed, full_mask_packed((self.out_features, self.in_features), device=packed.device))
        self._keeps_all[adapter_name] = (key, full)  # read once per mask: a switch would otherwise read every mask
        return full

    def _dropped_index(self, plan: list[tuple[str, float]]) -> torch.Tensor:
        """Flat indices (into the weight's own layout) of the entries that some adapter of ``plan`` drops; recorded
        per adapter for a single-adapter ``plan`` (a switch), and valid while its mask is not rewritten."""
        return self._dropped_record(plan, None)[0]

    def _dropped_record(
        self, plan: list[tuple[str, float]], flat: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_dropped_index` and, given the weight ``flat`` holding the original values (nothing in effect),
        those values at the index: for a single-adapter ``plan`` read once and kept in its record until someone else
        writes the weight (:meth:`notice_writes`)."""
        if len(plan) > 1:
            index = self._find_dropped(plan)
            return index, None if flat is None else flat.index_select(0, index)
        name = plan[0][0]
        key = self._mask_key(name)
        cached = self._dropped_cache.pop(name, None)
        if cached is None or cached[0] != key:
            cached = (key, self._find_dropped(plan), None)
        if flat is not None and cached[2] is None:
            cached = (key, cached[1], flat.index_select(0, cached[1]))
        self._dropped_cache[name] = cached  # the most recent last
        while len(self._dropped_cache) > RECORDS_KEPT:
            del self._dropped_cache[next(iter(self._dropped_cache))]
        return cached[1], cached[2]

    def _weight_key(self) -> tuple:
        """The weight parameter and its storage, its version counter (bumped by every write through the parameter,
        not by the engine's own writes through ``.data``), dtype and device; ``()`` when unknown (an inference tensor
        keeps no counter), which never counts as unchanged."""
        weight = self.base_layer.weight
        if weight.is_inference() or weight.device.type == "meta":
            return ()
        return (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device)

    def notice_writes(self) -> None:
        """If someone else wrote the weight since the last check, drop what the engine derived from its old values:
        the recorded original values, the mixed-batch cache and, with no adapter in effect (the weight then holds
        the new original), the ``keep_original`` copy."""
        key = self._weight_key()
        if key and key == self._seen_weight:
            return
        self._seen_weight = key
        self._dropped_cache = {
            name: (mask_key, index, None) for name, (mask_key, index, _) in self._dropped_cache.items()
        }
        self._mixed_cache.clear()
        if not self._in_effect:
            self.persona_original = None

    def _mask_key(self, adapter_name: str) -> tuple:
        """What identifies ``adapter_name``'s mask as it is now: a record made under another key is stale."""
        bits = self.persona_mask_bits[adapter_name]
        return (version(bits), id(bits), bits.device)

    def forget_adapter(self, adapter_name: str) -> None:
        """Drop what the engine recorded for ``adapter_name`` (it is being deleted)."""
        self._dropped_cache.pop(adapter_name, None)
        self._keeps_all.pop(adapter_name, None)
        self._mixed_cache.clear()

    def kept_by(self, plan: list[tuple[str, float]]) -> torch.Tensor:
        """The packed mask of the entries every adapter of ``plan`` keeps (their masks ANDed; one mask as it is)."""
        kept = self.persona_mask_bits[plan[0][0]]
        for name, _ in plan[1:]:
            kept = kept & self.persona_mask_bits[name]
        return kept

    def _find_dropped(self, plan: list[tuple[str, float]]) -> torch.Tensor:
        dropped = ~unpack_mask(self.kept_by(plan), self.in_features)
        if self.fan_in_fan_out:
            dropped = dropped.T.contiguous()
        return torch.nonzero(dropped.view(-1)).squeeze(1)


def version(tensor: torch.Tensor) -> int:
    """``tensor``'s in-place write counter; -1 for an inference tensor, which keeps none."""
    return -1 if tensor.is_inference() else tensor._version
