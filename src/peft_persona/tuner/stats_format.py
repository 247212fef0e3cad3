"""The ``stats`` save format: a layer's mask re-derived from selection statistics instead of being saved.

A ``stats`` adapter saves, per layer, what selects its mask (a :class:`~peft_persona.selection.ChannelSelection`: the
channel vector, an optional tie-break vector, and the SHA-256 digest of the packed mask). The re-derivation rule is
written once, here: :func:`derive_packed` selects on the layer's original ``(out, in)`` weight and checks the digest.
Everything that re-derives a mask calls it: a layer (:class:`StatsFormatLayer`), the check of a file before injection
(:func:`derive_from_file`), and reading or hot-swapping a saved file (:func:`derive_saved`); :func:`stamp` gives a
freshly extracted mask its digest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .. import adapter_files
from ..bits import pack_mask, packed_shape
from ..errors import StatsMismatchError
from ..selection import ChannelSelection, mask_digest
from ..targets import oriented_weight


def derive_packed(selection: ChannelSelection, weight: torch.Tensor, mismatch: Callable[[], str]) -> torch.Tensor:
    """The packed mask ``selection`` selects on ``weight`` ``(out, in)``; :class:`StatsMismatchError` with the
    message ``mismatch()`` if its SHA-256 differs from ``selection.digest``."""
    packed = pack_mask(selection.select(weight))
    if not torch.equal(mask_digest(packed), selection.digest.cpu()):
        raise StatsMismatchError(mismatch())
    return packed


def stamp(selection: ChannelSelection, mask: torch.Tensor) -> tuple[ChannelSelection, torch.Tensor]:
    """``selection`` with the digest of ``mask`` (``bool``, or already packed), and the packed mask."""
    packed = mask if mask.dtype == torch.uint8 else pack_mask(mask)
    return ChannelSelection(selection.sparsity, selection.channel, selection.tiebreak, mask_digest(packed)), packed


def original_oriented(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight as loaded of a linear module, or of a persona mask layer wrapping one."""
    if isinstance(module, StatsFormatLayer):
        weight = module.original_weight()
        return weight.T if module.fan_in_fan_out else weight
    return oriented_weight(module)


def derive_from_file(
    modules: Mapping[str, nn.Module], selections: Mapping[str, ChannelSelection], message: Callable[..., str]
) -> dict[str, tuple]:
    """Module name to ``(selection, packed mask)`` for every module, re-derived from its weight as loaded; the first
    mismatch raises :class:`StatsMismatchError` with ``message(name, dtype)``."""
    derived = {}
    for name, module in modules.items():
        weight = original_oriented(module)
        selection = selections[name]
        derived[name] = (selection, derive_packed(selection, weight, partial(message, name, weight.dtype)))
    return derived


def derive_saved(file: Path, layers: Mapping[str, StatsFormatLayer]) -> dict[str, torch.Tensor]:
    """The packed masks a saved ``stats`` file selects on ``layers``' original weights; the error names the layer."""
    config = adapter_files.read_config(file.parent)
    selections = adapter_files.read_selections(file, config.get("sparsity"))
    derived = {}
    for name, selection in selections.items():
        if name not in layers:
            raise KeyError(f"{file}: statistics for module {name!r}, which holds no persona mask layer")
        try:
            derived[name] = layers[name].derive(selection)
        except StatsMismatchError as err:
            raise StatsMismatchError(
                f"{file}: layer {name!r}: {err}; the base weights differ from those it was "
                "extracted on (another dtype or checkpoint)"
            ) from None
    return derived


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


class StatsFormatLayer:
    """Mixin of :class:`~peft_persona.tuner.layer.PersonaMaskLayer` for adapters saved in the ``stats`` format.

    Such an adapter's bits (``persona_mask_bits``) are derived and not saved; saved instead are
    ``persona_mask_channel[adapter]`` and ``persona_mask_tiebreak[adapter]`` (``float32`` ``(in,)``) and
    ``persona_mask_digest[adapter]`` (``uint8`` ``(32,)``), with ``persona_stats_sparsity[adapter]`` from its config.
    Statistics written by ``load_state_dict`` re-derive the mask at the next sync.
    """

    def init_stats_format(self) -> None:
        self.persona_mask_bits = MaskBits({}, persistent=True)
        self.persona_mask_channel = BufferDict({}, persistent=True)
        self.persona_mask_tiebreak = BufferDict({}, persistent=True)
        self.persona_mask_digest = BufferDict({}, persistent=True)
        self.persona_stats_sparsity: dict[str, float] = {}
        self._selection_source: dict[str, tuple] = {}  # the statistics each stats adapter's bits were derived from

    def is_stats_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._selection_source

    def selection(self, adapter_name: str) -> ChannelSelection | None:
        """The statistics ``adapter_name``'s mask is derived from, or ``None`` for a ``bits`` adapter."""
        if adapter_name not in self._selection_source:
            return None
        return ChannelSelection(
            self.persona_stats_sparsity[adapter_name],
            self.persona_mask_channel[adapter_name],
            entry(self.persona_mask_tiebreak, adapter_name),
            self.persona_mask_digest[adapter_name],
        )

    def derive(self, selection: ChannelSelection) -> torch.Tensor:
        """The packed mask ``selection`` selects on the original weight; :class:`StatsMismatchError` if its
        SHA-256 differs from ``selection.digest``."""
        weight = self.original_weight()
        return derive_packed(
            selection,
            weight.T if self.fan_in_fan_out else weight,
            lambda: (
                f"the mask re-derived from the layer's {tuple(weight.shape)} {weight.dtype} weight does not match "
                "the saved digest"
            ),
        )

    def set_selection(self, adapter_name: str, selection: ChannelSelection) -> None:
        """Replace a ``stats`` adapter's statistics and re-derive its mask (checked against the digest first)."""
        self._known(adapter_name)
        if adapter_name not in self._selection_source:
            raise TypeError(f"adapter {adapter_name!r} is saved as bits; set its mask with `set_mask`")
        packed = self.derive(selection)
        self.add_selection(adapter_name, selection, packed, self.persona_mask_bits[adapter_name].device)
        self.sync()

    def add_selection(
        self, name: str, selection: ChannelSelection, packed: torch.Tensor | None, device: torch.device
    ) -> None:
        """Hold ``selection`` and its mask (``packed``, already checked; ``None`` derives it) for adapter ``name``."""
        if packed is None:
            packed = (
                self.derive(selection)
                if device.type != "meta"
                else torch.empty(packed_shape((self.out_features, self.in_features)), dtype=torch.uint8, device="meta")
            )
        if not copied_into(self.persona_mask_bits, name, packed):  # a hot swap keeps every tensor (no recompile)
            self.persona_mask_bits.set_derived(name, packed.to(device))
        for store, value in zip(
            self._stats_stores(), (selection.channel, selection.tiebreak, selection.digest), strict=True
        ):
            if value is not None and not copied_into(store, name, value):
                store[name] = value.to(device, torch.uint8 if store is self.persona_mask_digest else torch.float32)
        self.persona_stats_sparsity[name] = float(selection.sparsity)
        self._selection_source[name] = self._stats_snapshot(name)

    def _stats_stores(self) -> tuple[BufferDict, BufferDict, BufferDict]:
        return self.persona_mask_channel, self.persona_mask_tiebreak, self.persona_mask_digest

    def _stats_snapshot(self, name: str) -> tuple:
        return tuple(d[name].detach().clone() if name in d else None for d in self._stats_stores())

    def rederive_changed(self) -> None:
        """Re-derive the mask of every ``stats`` adapter whose statistics differ from those it was derived from;
        on a digest mismatch, restore those statistics and raise."""
        for name, source in self._selection_source.items():
            now = self._stats_snapshot(name)
            if any(t is not None and t.device.type == "meta" for t in now) or same_tensors(now, source):
                continue
            try:
                packed = self.derive(self.selection(name))
            except StatsMismatchError as err:
                for saved, value in zip(self._stats_stores(), source, strict=True):
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

    def forget_selection(self, adapter_name: str) -> None:
        self._selection_source.pop(adapter_name, None)


def copied_into(store: BufferDict, name: str, value: torch.Tensor) -> bool:
    """Copy ``value`` into ``store[name]`` in place if it exists with that shape on a real device; say if it did."""
    current = entry(store, name)
    if current is None or current.device.type == "meta" or current.shape != value.shape:
        return False
    current.copy_(value)
    return True


def entry(store: BufferDict, name: str) -> torch.Tensor | None:
    """``store[name]``, or ``None`` if ``store`` holds no such entry."""
    return store._buffers.get(name)  # a BufferDict keeps its entries as the module's buffers


def same_tensors(now: tuple, before: tuple) -> bool:
    """Whether two statistics snapshots hold equal tensors (``None`` where an adapter has no tie-break vector)."""
    for a, b in zip(now, before, strict=True):
        if (a is None) != (b is None) or (a is not None and (b.device.type == "meta" or not torch.equal(a, b))):
            return False
    return True
