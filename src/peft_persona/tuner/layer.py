"""The persona mask layer: wraps a linear layer so that it computes ``y = x W_eff^T + b``.

``W_eff = W * (M + (1 - s) * (1 - M))`` for an adapter with mask ``M`` and strength ``s`` (see :mod:`.engine`, which
writes ``W_eff`` into the base weight in place and restores it exactly). As in ``peft/tuners/<method>/layer.py``,
:class:`PersonaMaskLayer` keeps the adapters' bookkeeping (masks, strengths, the active set) and :class:`MaskedLinear`
is the module, with the merge protocol and the forward. Adapters saved in the ``stats`` format re-derive their masks
through :mod:`.stats_format`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..bits import full_mask_packed, pack_mask, packed_shape, unpack_mask
from ..checks import check_mask_shape, check_strength
from ..selection import ChannelSelection
from ..targets import is_conv1d, oriented_weight
from .engine import (
    DEFAULT_WEIGHT_MODE,
    WeightEngine,
    disarm_before_load,
    disarm_before_state_dict,
    sync_after_load,
)
from .mixed_forward import MixedBatchForward
from .stats_format import StatsFormatLayer


class PersonaMaskLayer(WeightEngine, StatsFormatLayer, BaseTunerLayer):
    """Mixin holding the bit-packed masks of every adapter on one layer, and their strengths.

    State:
      * ``persona_mask_bits[adapter]``: persistent ``uint8`` buffer ``(out, ceil(in / 8))``, the only tensor saved
        for a ``bits`` adapter (a ``stats`` adapter saves its statistics instead: :class:`.StatsFormatLayer`);
      * ``persona_strength[adapter]``: the adapter's strength in ``[0, 1]`` (a float, from its config);
      * the weight engine's record of the entries it changed, and its switches ``in_place`` and ``keep_original``
        (:class:`.WeightEngine`), given as keyword arguments when the layer is created.
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

    def __init__(
        self, base_layer: nn.Module, in_place: bool = True, keep_original: bool = False, cache_mixed: bool = False
    ) -> None:
        self.base_layer = base_layer
        self.init_stats_format()
        self.persona_strength: dict[str, float] = {}
        self.init_engine(in_place=in_place, keep_original=keep_original, cache_mixed=cache_mixed)
        self.register_state_dict_pre_hook(disarm_before_state_dict)  # a state read holds the original weight
        self.register_load_state_dict_pre_hook(disarm_before_load)
        self.register_load_state_dict_post_hook(sync_after_load)  # loaded masks reach the weight at once
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = oriented_weight(self.get_base_layer()).shape
        self.fan_in_fan_out = is_conv1d(self.get_base_layer())

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
            device = self._mask_device(mask is not None or packed is not None)
            if selection is not None:
                self.add_selection(adapter_name, selection, packed, device)
            elif device.type == "meta":
                packed = torch.empty(packed_shape(self._shape()), dtype=torch.uint8, device="meta")
            elif mask is None:
                packed = full_mask_packed(self._shape(), device=device)
            else:
                packed = packed_mask(self.check_mask(mask, adapter_name)).to(device)
            self.persona_mask_bits[adapter_name] = packed
            self.persona_strength[adapter_name] = check_adapter_strength(strength, adapter_name)
            self.set_adapter(self.active_adapters)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Overwrite ``adapter_name``'s mask in place; the weight follows if the adapter is in effect.

        Every tensor keeps its identity, so a ``torch.compile``d model does not recompile.
        """
        self._known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before replacing its mask")
        if self.is_stats_adapter(adapter_name):
            raise TypeError(
                f"adapter {adapter_name!r} is saved as selection statistics (save_format='stats'): its mask is "
                "re-derived from them and cannot be set by hand; replace its statistics with `set_selection`, or "
                "use an adapter in the 'bits' format"
            )
        current = self.persona_mask_bits[adapter_name]
        packed = packed_mask(self.check_mask(mask, adapter_name))
        if current.device.type == "meta":  # the weight is not materialised (layer-by-layer extraction)
            self.persona_mask_bits[adapter_name] = packed.to(self._mask_device(True))
        elif current.is_inference():  # keeps no version counter: a new tensor, so that the engine sees the change
            self.persona_mask_bits[adapter_name] = packed.to(current.device)
        else:
            current.copy_(packed.to(current.device))
        self.sync()

    def set_strength(self, adapter_name: str, strength: float) -> None:
        """Set ``adapter_name``'s strength; the weight follows at once if the adapter is in effect (no recompile)."""
        self._known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before changing its strength")
        self.persona_strength[adapter_name] = check_adapter_strength(strength, adapter_name)
        self.sync()

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """The ``bool`` mask ``(out, in)`` of ``adapter_name``."""
        return unpack_mask(self.persona_mask_bits[adapter_name], self.in_features)

    def check_mask(self, mask: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``mask`` if it is a ``bool`` tensor of the weight's ``(out_features, in_features)`` shape, or already
        packed (``uint8``, ``(out_features, ceil(in_features / 8))``, zero padding bits); else raise."""
        return check_mask_tensor(mask, self._shape(), f"adapter {adapter_name!r}")

    def sync(self) -> None:
        """Bring the base weight to :meth:`effect`, rewriting only the entries whose value changes. A ``stats``
        adapter whose statistics were written (by ``load_state_dict``) first has its mask re-derived."""
        self.rederive_changed()
        self.sync_weight()

    def _shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

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
        self.forget_selection(adapter_name)
        self.forget_adapter(adapter_name)
        if was_active:
            self.sync()


class MaskedLinear(nn.Module, MixedBatchForward, PersonaMaskLayer):
    """A ``nn.Linear`` (or transformers ``Conv1D``) whose weight is multiplied by the active persona masks.

    ``in_place``, ``keep_original`` and ``cache_mixed`` set the layer's weight engine (:mod:`.engine`); the rest is
    PEFT's ``update_layer`` signature.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        selection: ChannelSelection | None = None,
        packed: torch.Tensor | None = None,
        in_place: bool = DEFAULT_WEIGHT_MODE["in_place"],
        keep_original: bool = DEFAULT_WEIGHT_MODE["keep_original"],
        cache_mixed: bool = DEFAULT_WEIGHT_MODE["cache_mixed"],
    ) -> None:
        super().__init__()
        PersonaMaskLayer.__init__(
            self, base_layer, in_place=in_place, keep_original=keep_original, cache_mixed=cache_mixed
        )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mask, strength, selection=selection, packed=packed)

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
        if safe_merge and not torch.equal(self.get_base_weight(), self.product_weight()):
            del self.merged_adapters[-len(names) :]
            self.sync()
            raise ValueError(
                f"safe_merge of persona mask adapter {names[0]!r}: the merged weight differs from W * M (the weight "
                "holds NaN or inf values); the weight was restored"
            )

    def unmerge(self) -> None:
        """Undo :meth:`merge`. The weight then holds the active adapters (or the original, if adapters are disabled);
        entries that the merged and the active adapters treat alike are not touched."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters.clear()
        self.sync()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The base layer, with the adapters merged into its weight (``merge``) or with its original weight."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.release_weight(keep_effect=merge)
        return self.get_base_layer()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_eff - W``: the change the adapter makes to the original weight (dense, in the weight's layout)."""
        return self.effective_weight([adapter_name]) - self.original_weight()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    # ---------------------------------------------------------------------------------------- forward
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
        weight = self.functional_weight()
        return F.linear(x, weight.T if self.fan_in_fan_out else weight, self.get_base_layer().bias)

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

    def __repr__(self) -> str:
        return "persona_mask." + super().__repr__()


def check_adapter_strength(strength: Any, adapter_name: str) -> float:
    """``strength`` as a float if it is a number in ``[0, 1]``; else a ``ValueError`` naming the adapter."""
    return check_strength(strength, f"strength of persona mask adapter {adapter_name!r}")


def packed_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` packed to ``uint8`` (a mask already packed is returned as it is)."""
    return mask if mask.dtype == torch.uint8 else pack_mask(mask)


def check_mask_tensor(mask: Any, shape: tuple[int, int], owner: str) -> torch.Tensor:
    """``mask`` if it is a ``bool`` tensor of the weight's ``(out, in)`` ``shape``, or its packing (``uint8``
    ``(out, ceil(in / 8))``, zero padding bits); else a ``TypeError`` or ``ValueError`` naming ``owner``."""
    what = f"mask for {owner}"
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
        return check_packed(mask, shape, what)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{what} must be a torch.bool tensor (or packed uint8), got {got}")
    check_mask_shape(mask, shape, what)
    return mask


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
