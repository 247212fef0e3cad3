"""The persona mask layer: wraps a linear layer and computes ``y = x (W * M)^T + b``."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..bits import full_mask_packed, pack_mask, packed_shape, unpack_mask
from ..targets import is_conv1d, oriented_weight


class PersonaMaskLayer(BaseTunerLayer):
    """Mixin holding the bit-packed masks of every adapter on one layer.

    State:
      * ``persona_mask_bits[adapter]``: persistent ``uint8`` buffer ``(out, ceil(in / 8))``, the only thing saved;
      * ``persona_mask_active``: non-persistent ``bool`` buffer in the weight's layout, the intersection of the active
        adapters' masks, rebuilt only when the active set or a mask changes;
      * ``persona_mask_stash[adapter]``: non-persistent buffer with the weights a merge zeroed, for a bit-exact unmerge.
    """

    adapter_layer_names: tuple[str, ...] = ()  # nothing trainable
    other_param_names: tuple[str, ...] = ("persona_mask_bits",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.persona_mask_bits = BufferDict({}, persistent=True)
        self.persona_mask_stash = BufferDict({}, persistent=False)
        self.register_buffer("persona_mask_active", None, persistent=False)
        self._active_key: Optional[tuple] = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = oriented_weight(self.get_base_layer()).shape
        self.fan_in_fan_out = is_conv1d(self.get_base_layer())
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, mask: Optional[torch.Tensor] = None, **kwargs: Any) -> None:
        """Add ``adapter_name`` with ``mask`` (``bool``, ``(out, in)``); ``None`` keeps every weight."""
        device = oriented_weight(self.get_base_layer()).device
        if device.type == "meta":
            packed = torch.empty(packed_shape((self.out_features, self.in_features)), dtype=torch.uint8, device="meta")
        elif mask is None:
            packed = full_mask_packed((self.out_features, self.in_features), device=device)
        else:
            packed = pack_mask(self.check_mask(mask, adapter_name).to(device))
        self.persona_mask_bits[adapter_name] = packed
        self.set_adapter(self.active_adapters)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Overwrite ``adapter_name``'s mask in place; the active-mask buffer is updated in place too.

        In-place updates keep every tensor's identity, so a ``torch.compile``d model does not recompile.
        """
        if adapter_name not in self.persona_mask_bits:
            raise KeyError(f"layer has no persona mask adapter {adapter_name!r}")
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before replacing its mask")
        packed = pack_mask(self.check_mask(mask, adapter_name).to(self.persona_mask_bits[adapter_name].device))
        self.persona_mask_bits[adapter_name].copy_(packed)
        if adapter_name in self.active_adapters:
            self._refresh_active_mask(in_place=True)

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """The ``bool`` mask ``(out, in)`` of ``adapter_name``."""
        return unpack_mask(self.persona_mask_bits[adapter_name], self.in_features)

    def check_mask(self, mask: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``mask`` if it is a ``bool`` tensor of the weight's ``(out_features, in_features)`` shape; else raise."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask for adapter {adapter_name!r} must be a torch.bool tensor, got {got}")
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"mask for adapter {adapter_name!r} has shape {tuple(mask.shape)}, but the layer's weight is "
                f"(out_features, in_features) = ({self.out_features}, {self.in_features})"
            )
        return mask

    def _get_available_adapters(self) -> set[str]:
        return set(self.persona_mask_bits.keys())

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if self._active_key != self._active_state():
            self._refresh_active_mask()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        super().delete_adapter(adapter_name)
        self._refresh_active_mask()

    # ---------------------------------------------------------------------------------------- active mask
    def _active_state(self) -> tuple:
        """Identity and version of the masks behind the active-mask buffer; a change means it is stale."""
        bits = self.persona_mask_bits
        return tuple((n, id(bits[n]), bits[n]._version, bits[n].device) for n in self.active_adapters if n in bits)

    def _refresh_active_mask(self, in_place: bool = False) -> None:
        state = self._active_state()
        names = [n for n, *_ in state if not self._keeps_everything(n)]  # an all-ones mask changes nothing
        if not names or any(self.persona_mask_bits[n].device.type == "meta" for n in names):
            self.persona_mask_active = None
            self._active_key = state
            return
        mask = self.get_mask(names[0])
        for name in names[1:]:
            mask &= self.get_mask(name)
        if self.fan_in_fan_out:
            mask = mask.T.contiguous()
        if in_place and self.persona_mask_active is not None and self.persona_mask_active.shape == mask.shape:
            self.persona_mask_active.copy_(mask)
        else:
            self.persona_mask_active = mask
        self._active_key = self._active_state()

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
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Zero the masked-out weights in place; the zeroed values are kept for a bit-exact :meth:`unmerge`.

        With ``safe_merge``, the merged weight is checked against ``W * M`` computed apart (an extra copy of the
        weight); any difference, such as NaN or inf among the weights, restores the weight and raises a
        ``ValueError`` naming the adapter.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.persona_mask_bits:
                continue
            weight = self.get_base_weight()
            kept = self._dense_mask(name)
            expected = weight * kept if safe_merge else None
            self.persona_mask_stash[name] = weight[~kept]
            weight.masked_fill_(~kept, 0)
            self.merged_adapters.append(name)
            if expected is not None and not torch.equal(weight, expected):
                self._unmerge_last(name)
                raise ValueError(
                    f"safe_merge of persona mask adapter {name!r}: the merged weight differs from W * M (the weight "
                    "holds NaN or inf values); the weight was restored"
                )

    def _unmerge_last(self, name: str) -> None:
        """Restore the weights zeroed by merging ``name``, the last adapter merged."""
        self.merged_adapters.remove(name)
        self.get_base_weight()[~self._dense_mask(name)] = self.persona_mask_stash[name]
        del self.persona_mask_stash[name]

    def unmerge(self) -> None:
        """Restore the weights zeroed by :meth:`merge`, bit-exactly, in reverse merge order."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.persona_mask_stash:
                weight[~self._dense_mask(name)] = self.persona_mask_stash[name]
                del self.persona_mask_stash[name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W * M - W``: the change the adapter makes to the base weight (dense, in the weight's layout)."""
        weight = self.get_base_weight()
        return torch.where(self._dense_mask(adapter_name), torch.zeros_like(weight), -weight)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class MaskedLinear(nn.Module, PersonaMaskLayer):
    """A ``nn.Linear`` (or transformers ``Conv1D``) whose weight is multiplied by the active persona mask."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, mask: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> None:
        super().__init__()
        PersonaMaskLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mask)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not torch.compiler.is_compiling() and self._active_key != self._active_state():
            self._refresh_active_mask()  # a mask was loaded or moved since the buffer was built
        if self.persona_mask_active is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        masked = base.weight * self.persona_mask_active
        if self.fan_in_fan_out:
            masked = masked.T
        return F.linear(x, masked, base.bias)

    def __repr__(self) -> str:
        return "persona_mask." + super().__repr__()
