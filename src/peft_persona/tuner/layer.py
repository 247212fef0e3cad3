"""The persona mask layer: wraps a linear layer so that it computes ``y = x W_eff^T + b``.

``W_eff = W * (M + (1 - s) * (1 - M))`` for an adapter with mask ``M`` and strength ``s``: strength 1 removes the
dropped weights (``W * M``), strength 0 is the base layer. Several adapters in effect multiply their factors.

How the forward gets ``W_eff`` at base speed: the layer writes it *into the base weight, in place*, and keeps the
original values of the entries it changed (the "dropped" entries) for an exact restore. The forward is then the base
layer's own ``F.linear``: no ``W * M`` per call and no dense cache. The weight always holds the adapters in effect,
which are the merged adapters plus, while adapters are enabled, the active ones; a change of that set rewrites only
the entries whose value changes. Merging is therefore free, and an unmerge followed by a merge of another adapter
touches only the entries where the two masks differ. ``disable_adapter()``, ``unload()`` and ``delete_adapter``
restore the original weight bit-exactly.

The layer computes ``W_eff`` apart instead, leaving the weight alone, where writing into it would be wrong: when the
weight needs gradients, when accelerate offloads it, for a mixed-persona batch (``adapter_names=``), and when
:attr:`PersonaMaskLayer.in_place` is ``False``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..bits import byte_table, full_mask_packed, pack_mask, packed_shape, unpack_mask, unpack_to
from ..errors import StatsMismatchError
from ..selection import ChannelSelection, mask_digest
from ..targets import is_conv1d, oriented_weight

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class MaskBits(BufferDict):
    """A ``BufferDict`` whose entries keep their own persistence: the masks of ``stats`` adapters are derived from
    their statistics and are not saved, while the masks of ``bits`` adapters are."""

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=key not in self._non_persistent_buffers_set)

    def set_derived(self, key: str, buffer: torch.Tensor) -> None:
        """Hold ``buffer`` under ``key`` without saving it."""
        self.register_buffer(key, buffer, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)


class PersonaMaskLayer(BaseTunerLayer):
    """Mixin holding the bit-packed masks of every adapter on one layer, and their strengths.

    State:
      * ``persona_mask_bits[adapter]``: persistent ``uint8`` buffer ``(out, ceil(in / 8))``, the only tensor saved;
      * ``persona_strength[adapter]``: the adapter's strength in ``[0, 1]`` (a float, from its config);
      * for an adapter saved in the ``stats`` format, its bits are derived and not saved; saved instead are
        ``persona_mask_channel[adapter]`` and ``persona_mask_tiebreak[adapter]`` (``float32`` ``(in,)``) and
        ``persona_mask_digest[adapter]`` (``uint8`` ``(32,)``), with ``persona_stats_sparsity[adapter]`` from its
        config (see :class:`~peft_persona.selection.ChannelSelection`);
      * ``persona_dropped``: the original values of the weight entries the adapters in effect change, and
        ``persona_dropped_index``: their flat indices (``int32``); the only per-weight state besides the masks.
    """

    adapter_layer_names: tuple[str, ...] = ()  # nothing trainable
    other_param_names: tuple[str, ...] = (
        "persona_mask_bits",
        "persona_strength",
        "persona_mask_channel",
        "persona_mask_tiebreak",
        "persona_mask_digest",
        "persona_stats_sparsity",
    )
    in_place: bool = True  # write W_eff into the base weight; False computes it apart in every forward
    keep_original: bool = False  # keep a dense copy of the original weight: faster switching, one more weight copy

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.persona_mask_bits = MaskBits({}, persistent=True)
        self.persona_strength: dict[str, float] = {}
        self.persona_mask_channel = BufferDict({}, persistent=True)
        self.persona_mask_tiebreak = BufferDict({}, persistent=True)
        self.persona_mask_digest = BufferDict({}, persistent=True)
        self.persona_stats_sparsity: dict[str, float] = {}
        self._selection_source: dict[str, tuple] = {}  # the statistics each stats adapter's bits were derived from
        self.register_buffer("persona_dropped_index", None, persistent=False)
        self.register_buffer("persona_original", None, persistent=False)
        self.register_buffer("persona_dropped", None, persistent=False)
        self._in_effect: tuple = ()  # the (adapter, strength, mask version) that the base weight holds
        self.register_load_state_dict_post_hook(_sync_after_load)  # loaded masks reach the weight at once
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = oriented_weight(self.get_base_layer()).shape
        self.fan_in_fan_out = is_conv1d(self.get_base_layer())
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        selection: ChannelSelection | None = None,
        packed: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``adapter_name`` with ``mask`` (``bool``, ``(out, in)``; ``None`` keeps every weight) and ``strength``.

        With ``selection`` the adapter is a ``stats`` adapter: its mask is ``packed`` (already checked against the
        digest) or else re-derived from the original weight, and :class:`StatsMismatchError` is raised, with nothing
        changed, if it does not match the digest. Inside ``torch.inference_mode()`` the adapter's state is still made
        of normal tensors, so that it can change later outside it.
        """
        with torch.inference_mode(False):
            self._update_layer(adapter_name, mask, strength, selection, packed)

    def _update_layer(
        self,
        adapter_name: str,
        mask: torch.Tensor | None,
        strength: float,
        selection: ChannelSelection | None,
        packed: torch.Tensor | None,
    ) -> None:
        device = self._mask_device(mask is not None or packed is not None)
        if selection is not None:
            self._add_selection(adapter_name, selection, packed, device)
        elif device.type == "meta":
            packed = torch.empty(packed_shape((self.out_features, self.in_features)), dtype=torch.uint8, device="meta")
        elif mask is None:
            packed = full_mask_packed((self.out_features, self.in_features), device=device)
        else:
            packed = _packed(self.check_mask(mask, adapter_name)).to(device)
        self.persona_mask_bits[adapter_name] = packed
        self.persona_strength[adapter_name] = check_strength(strength, adapter_name)
        self.set_adapter(self.active_adapters)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Overwrite ``adapter_name``'s mask in place; the weight follows if the adapter is in effect.

        Every tensor keeps its identity, so a ``torch.compile``d model does not recompile.
        """
        self._known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before replacing its mask")
        if adapter_name in self._selection_source:
            raise TypeError(
                f"adapter {adapter_name!r} is saved as selection statistics (save_format='stats'): its mask is "
                "re-derived from them and cannot be set by hand; replace its statistics with `set_selection`, or "
                "use an adapter in the 'bits' format"
            )
        current = self.persona_mask_bits[adapter_name]
        packed = _packed(self.check_mask(mask, adapter_name))
        if current.device.type == "meta":  # the weight is not materialised (layer-by-layer extraction)
            self.persona_mask_bits[adapter_name] = packed.to(self._mask_device(True))
        else:
            current.copy_(packed.to(current.device))
        self.sync()

    def set_strength(self, adapter_name: str, strength: float) -> None:
        """Set ``adapter_name``'s strength; the weight follows at once if the adapter is in effect (no recompile)."""
        self._known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before changing its strength")
        self.persona_strength[adapter_name] = check_strength(strength, adapter_name)
        self.sync()

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """The ``bool`` mask ``(out, in)`` of ``adapter_name``."""
        return unpack_mask(self.persona_mask_bits[adapter_name], self.in_features)

    def check_mask(self, mask: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``mask`` if it is a ``bool`` tensor of the weight's ``(out_features, in_features)`` shape, or already
        packed (``uint8``, ``(out_features, ceil(in_features / 8))``, zero padding bits); else raise."""
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
            return check_packed(mask, (self.out_features, self.in_features), f"mask for adapter {adapter_name!r}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(
                f"mask for adapter {adapter_name!r} must be a torch.bool tensor (or packed uint8), got {got}"
            )
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"mask for adapter {adapter_name!r} has shape {tuple(mask.shape)}, but the layer's weight is "
                f"(out_features, in_features) = ({self.out_features}, {self.in_features})"
            )
        return mask

    def _mask_device(self, given: bool) -> torch.device:
        """Where masks live: on the weight's device; on the CPU for masks given to a layer whose weight is on meta."""
        device = oriented_weight(self.get_base_layer()).device
        return torch.device("cpu") if device.type == "meta" and given else device

    def _known(self, adapter_name: str) -> None:
        if adapter_name not in self.persona_mask_bits:
            raise KeyError(
                f"layer has no persona mask adapter {adapter_name!r}; it has {sorted(self.persona_mask_bits)}"
            )

    def _get_available_adapters(self) -> set[str]:
        return set(self.persona_mask_bits.keys())

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.sync()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.sync()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        was_active = adapter_name in self.active_adapters
        self._transition(tuple(e for e in self._in_effect if e[0] != adapter_name))
        super().delete_adapter(adapter_name)
        self._selection_source.pop(adapter_name, None)
        if was_active:
            self.sync()

    # ---------------------------------------------------------------------------------------- stats format
    def selection(self, adapter_name: str) -> ChannelSelection | None:
        """The statistics ``adapter_name``'s mask is derived from, or ``None`` for a ``bits`` adapter."""
        if adapter_name not in self._selection_source:
            return None
        return ChannelSelection(
            self.persona_stats_sparsity[adapter_name],
            self.persona_mask_channel[adapter_name],
            self.persona_mask_tiebreak[adapter_name] if adapter_name in self.persona_mask_tiebreak else None,
            self.persona_mask_digest[adapter_name],
        )

    def derive(self, selection: ChannelSelection) -> torch.Tensor:
        """The packed mask ``selection`` selects on the original weight; :class:`StatsMismatchError` if its
        SHA-256 differs from ``selection.digest``."""
        weight = self.original_weight()
        packed = pack_mask(selection.select(weight.T if self.fan_in_fan_out else weight))
        if not torch.equal(mask_digest(packed), selection.digest.cpu()):
            raise StatsMismatchError(
                f"the mask re-derived from the layer's {tuple(weight.shape)} {weight.dtype} weight does not match "
                "the saved digest"
            )
        return packed

    def set_selection(self, adapter_name: str, selection: ChannelSelection) -> None:
        """Replace a ``stats`` adapter's statistics and re-derive its mask (checked against the digest first)."""
        self._known(adapter_name)
        if adapter_name not in self._selection_source:
            raise TypeError(f"adapter {adapter_name!r} is saved as bits; set its mask with `set_mask`")
        packed = self.derive(selection)
        self._add_selection(adapter_name, selection, packed, self.persona_mask_bits[adapter_name].device)
        self.sync()

    def _add_selection(
        self, name: str, selection: ChannelSelection, packed: torch.Tensor | None, device: torch.device
    ) -> None:
        if packed is None:
            packed = (
                self.derive(selection)
                if device.type != "meta"
                else torch.empty(packed_shape((self.out_features, self.in_features)), dtype=torch.uint8, device="meta")
            )
        if not _copied_into(self.persona_mask_bits, name, packed):  # a hot swap keeps every tensor (no recompile)
            self.persona_mask_bits.set_derived(name, packed.to(device))
        for store, value in (
            (self.persona_mask_channel, selection.channel),
            (self.persona_mask_tiebreak, selection.tiebreak),
            (self.persona_mask_digest, selection.digest),
        ):
            if value is not None and not _copied_into(store, name, value):
                store[name] = value.to(device, torch.uint8 if store is self.persona_mask_digest else torch.float32)
        self.persona_stats_sparsity[name] = float(selection.sparsity)
        self._selection_source[name] = self._stats_snapshot(name)

    def _stats_snapshot(self, name: str) -> tuple:
        saved = (self.persona_mask_channel, self.persona_mask_tiebreak, self.persona_mask_digest)
        return tuple(d[name].detach().clone() if name in d else None for d in saved)

    def _rederive_changed(self) -> None:
        """Re-derive the mask of every ``stats`` adapter whose statistics differ from those it was derived from;
        on a digest mismatch, restore those statistics and raise."""
        for name, source in self._selection_source.items():
            now = self._stats_snapshot(name)
            if any(t is not None and t.device.type == "meta" for t in now) or _same(now, source):
                continue
            try:
                packed = self.derive(self.selection(name))
            except StatsMismatchError as err:
                for saved, value in zip(
                    (self.persona_mask_channel, self.persona_mask_tiebreak, self.persona_mask_digest), source
                ):
                    if value is not None and value.device.type != "meta":
                        saved[name].copy_(value)
                raise StatsMismatchError(
                    f"persona mask adapter {name!r}: {err}; its statistics were restored"
                ) from None
            if self.persona_mask_bits[name].device.type == "meta":  # injected without weights (low_cpu_mem_usage)
                self.persona_mask_bits.set_derived(name, packed.to(now[0].device))
            else:
                self.persona_mask_bits[name].copy_(packed)
            self._selection_source[name] = now

    # ---------------------------------------------------------------------------------------- effective weight
    def effect(self) -> tuple:
        """What the weight should hold now: ``(adapter, strength, mask version)`` for each adapter in effect."""
        names = list(self.merged_adapters)
        if not self._disable_adapters and self._writes_in_place():
            names += [n for n in self.active_adapters if n not in names]
        bits = self.persona_mask_bits
        return tuple(
            (n, self.persona_strength[n], bits[n]._version, id(bits[n]))
            for n in names
            if n in bits and self.persona_strength[n] > 0
        )

    def sync(self) -> None:
        """Bring the base weight to :meth:`effect`, rewriting only the entries whose value changes. A ``stats``
        adapter whose statistics were written (by ``load_state_dict``) first has its mask re-derived."""
        self._rederive_changed()
        target = self.effect()
        if target != self._in_effect:
            self._transition(target)
        bits = self.persona_mask_bits
        self._synced = (self._writes_in_place(), [(bits[n], bits[n]._version) for n, *_ in target])

    def _maybe_stale(self) -> bool:
        """A cheap per-call check (a few microseconds) that the last :meth:`sync` still holds: same grad mode, and no
        mask of the adapters in effect written since. Every public operation syncs by itself."""
        synced = getattr(self, "_synced", None)
        if synced is None or synced[0] != self._writes_in_place():
            return True
        return any(tensor._version != version for tensor, version in synced[1])

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

    def _dropped_index(self, plan: list[tuple[str, float]]) -> torch.Tensor:
        """Flat indices (into the weight's own layout) of the entries that some adapter of ``plan`` drops."""
        kept = self.persona_mask_bits[plan[0][0]]
        for name, _ in plan[1:]:
            kept = kept & self.persona_mask_bits[name]
        dropped = ~unpack_mask(kept, self.in_features)
        if self.fan_in_fan_out:
            dropped = dropped.T.contiguous()
        index = torch.nonzero(dropped.view(-1)).squeeze(1)
        return index.to(torch.int32) if dropped.numel() < 2**31 else index

    def _factors(self, name: str, strength: float, dtype: torch.dtype) -> torch.Tensor:
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
            values = values * self._factors(name, strength, values.dtype).reshape(-1)[index.long()]
        return values

    @torch.no_grad()
    def _transition(self, target: tuple) -> None:
        """Make the weight hold ``target``: restore the entries changed before, then change those ``target`` drops.

        Only dropped entries are written, by index; the original values of the entries changed are kept, in the
        weight's dtype, with their flat indices, for an exact restore.
        """
        weight = self.get_base_weight()
        if weight.device.type == "meta" or any(self.persona_mask_bits[n].device.type == "meta" for n, *_ in target):
            self._in_effect = ()  # nothing written; applied once the weights are real
            return
        if self.keep_original or self.persona_original is not None:
            self._transition_from_copy(weight, target)
            return
        flat = weight.view(-1)
        if self.persona_dropped_index is not None:
            flat.index_copy_(0, self.persona_dropped_index.long(), self.persona_dropped)
            self.persona_dropped_index = self.persona_dropped = None
        plan = self._plan(target)
        if plan:
            index = self._dropped_index(plan)
            stash = flat.index_select(0, index.long())
            if all(s == 1.0 for _, s in plan):
                flat.index_fill_(0, index.long(), 0)
            else:
                flat.index_copy_(0, index.long(), self._scaled(stash, index, plan))
            self.persona_dropped, self.persona_dropped_index = stash, index
        self._in_effect = target

    def _transition_from_copy(self, weight: torch.Tensor, target: tuple) -> None:
        """:meth:`_transition` with :attr:`keep_original`: rewrite the weight from the dense original copy."""
        if self.persona_original is None:
            self.persona_original = self.original_weight()
            self.persona_dropped = self.persona_dropped_index = None
        plan = self._plan(target)
        if not plan:
            weight.copy_(self.persona_original)
        else:
            torch.mul(self.persona_original, self._factors(*plan[0], weight.dtype), out=weight)
            for name, strength in plan[1:]:
                weight.mul_(self._factors(name, strength, weight.dtype))
        if not self.keep_original and not plan:
            self.persona_original = None
        self._in_effect = target

    def original_weight(self) -> torch.Tensor:
        """A copy of the base weight as loaded, without any adapter (in the weight's own layout)."""
        if self.persona_original is not None:
            return self.persona_original.clone()
        weight = self.get_base_weight().detach().clone()
        if self.persona_dropped_index is not None:
            weight.view(-1).index_copy_(0, self.persona_dropped_index.long(), self.persona_dropped)
        return weight

    def effective_weight(self, adapters: Sequence[str]) -> torch.Tensor:
        """``W_eff`` for ``adapters`` (``[]`` for the base weight), computed apart from the base weight."""
        weight = self.original_weight()
        for name, strength in self._plan([(n, self.persona_strength[n]) for n in adapters]):
            weight.mul_(self._factors(name, strength, weight.dtype))
        return weight

    def _keeps_everything(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s mask is all ones (a freshly injected adapter), read from the packed bits."""
        packed = self.persona_mask_bits[adapter_name]
        if packed.device.type == "meta":
            return False
        if self.in_features % 8 == 0:
            return bool((packed == 255).all())
        return torch.equal(packed, full_mask_packed((self.out_features, self.in_features), device=packed.device))

    def _dense_mask(self, adapter_name: str) -> torch.Tensor:
        mask = self.get_mask(adapter_name)
        return mask.T if self.fan_in_fan_out else mask

    # ---------------------------------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active ones) into the weight; merging an adapter already in effect
        writes nothing. :meth:`unmerge` restores the weight bit-exactly.

        With ``safe_merge``, the merged weight is checked against ``W * M`` computed apart (an extra copy of the
        weight); any difference, such as NaN or inf among the weights, restores the weight and raises a
        ``ValueError`` naming the adapter.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.persona_mask_bits]
        if not names:
            return
        self.merged_adapters.extend(names)
        self.sync()
        if safe_merge and not torch.equal(self.get_base_weight(), self._product_weight()):
            del self.merged_adapters[-len(names) :]
            self.sync()
            raise ValueError(
                f"safe_merge of persona mask adapter {names[0]!r}: the merged weight differs from W * M (the weight "
                "holds NaN or inf values); the weight was restored"
            )

    def _product_weight(self) -> torch.Tensor:
        """``W * M`` (or ``W`` scaled by ``1 - s`` off the mask) for the adapters in effect, computed apart as plain
        products: NaN where a dropped ``W`` is inf, which zeroing in place cannot represent."""
        expected = self.original_weight()
        for name, strength in self._plan(self._in_effect):
            expected = expected * (
                self._dense_mask(name) if strength == 1.0 else self._factors(name, strength, expected.dtype)
            )
        return expected

    def unmerge(self) -> None:
        """Undo :meth:`merge`. The weight then holds the active adapters (or the original, if adapters are disabled);
        entries that the merged and the active adapters treat alike are not touched."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.merged_adapters.clear()
        self.sync()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The base layer, with the adapters merged into its weight (``merge``) or with its original weight."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._in_effect = ()  # the weight keeps W_eff: forget how to restore it
        else:
            self._transition(())
        self.persona_dropped = self.persona_dropped_index = self.persona_original = None
        return self.get_base_layer()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_eff - W``: the change the adapter makes to the original weight (dense, in the weight's layout)."""
        return self.effective_weight([adapter_name]) - self.original_weight()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    # ---------------------------------------------------------------------------------------- mixed batches
    def _check_forward_args(self, x: torch.Tensor, adapter_names: Sequence[str] | None) -> None:
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """One matmul per distinct adapter in the batch, each on its own rows."""
        base = self.get_base_layer()
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        current = [n for n, *_ in self._in_effect]
        result = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            wanted = [] if name == BASE_ADAPTER or name not in self.persona_mask_bits else [name]
            if [n for n in wanted if self.persona_strength[n] > 0] == current:
                out = base(x[index])
            else:
                weight = self.effective_weight(wanted)
                out = F.linear(x[index], weight.T if self.fan_in_fan_out else weight, base.bias)
            if result is None:
                result = out.new_empty((len(adapter_names), *out.shape[1:]))
            result[index] = out
        return result


class MaskedLinear(nn.Module, PersonaMaskLayer):
    """A ``nn.Linear`` (or transformers ``Conv1D``) whose weight is multiplied by the active persona masks."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        selection: ChannelSelection | None = None,
        packed: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        PersonaMaskLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mask, strength, selection=selection, packed=packed)

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        self._check_forward_args(x, adapter_names)
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        if not torch.compiler.is_compiling() and self._maybe_stale():
            self.sync()  # grad mode switched, or masks written without going through the layer
        if self._disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged_adapters or self._synced[0]:
            return self.base_layer(x, *args, **kwargs)
        weight = self._functional_weight()
        return F.linear(x, weight.T if self.fan_in_fan_out else weight, self.get_base_layer().bias)

    def _functional_weight(self) -> torch.Tensor:
        """``W_eff`` of the active adapters as a differentiable function of the (unmodified) base weight."""
        weight = self.base_layer.weight  # the parameter itself, not ``get_base_weight()``'s detached data
        active = [(n, self.persona_strength[n]) for n in self.active_adapters if n in self.persona_mask_bits]
        for name, strength in self._plan(active):
            weight = weight * self._factors(name, strength, weight.dtype)
        return weight

    def __repr__(self) -> str:
        return "persona_mask." + super().__repr__()


def _copied_into(store: BufferDict, name: str, value: torch.Tensor) -> bool:
    """Copy ``value`` into ``store[name]`` in place if it exists with that shape on a real device; say if it did."""
    current = store[name] if name in store else None
    if current is None or current.device.type == "meta" or current.shape != value.shape:
        return False
    current.copy_(value)
    return True


def _packed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.uint8 else pack_mask(mask)


def check_packed(packed: torch.Tensor, shape: tuple[int, int], what: str) -> torch.Tensor:
    """``packed`` if it is the ``uint8`` packing of a mask of ``shape`` with zero padding bits; else raise."""
    want = packed_shape(shape)
    if tuple(packed.shape) != want:
        raise ValueError(
            f"{what} is packed uint8 of shape {tuple(packed.shape)}; a ({shape[0]}, {shape[1]}) weight needs {want}"
        )
    if shape[1] % 8 and packed.device.type != "meta" and bool((packed[:, -1] >> (shape[1] % 8)).any()):
        raise ValueError(f"{what}: padding bits past column {shape[1]} must be zero")
    return packed


def _same(now: tuple, before: tuple) -> bool:
    """Whether two statistics snapshots hold equal tensors (``None`` where an adapter has no tie-break vector)."""
    for a, b in zip(now, before):
        if (a is None) != (b is None) or (a is not None and (b.device.type == "meta" or not torch.equal(a, b))):
            return False
    return True


def _sync_after_load(layer: PersonaMaskLayer, incompatible_keys: Any) -> None:
    layer.sync()


def check_strength(strength: Any, adapter_name: str) -> float:
    """``strength`` as a float if it is a number in ``[0, 1]``; else a ``ValueError`` naming the adapter."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(
            f"strength of persona mask adapter {adapter_name!r} must be a number in [0, 1], got {strength!r}"
        )
    return float(strength)
