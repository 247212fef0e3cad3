"""PersonaMaskModel: the PEFT tuner that injects :class:`MaskedLinear` layers."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .. import fingerprint, targets
from .config import PersonaMaskConfig
from .layer import MaskedLinear, PersonaMaskLayer

CombineMode = Literal["intersection", "union", "majority"]

# Masks handed to the layers while an adapter is being injected: {adapter name: {module name: bool mask}}.
_PENDING_MASKS: contextvars.ContextVar[Mapping[str, Mapping[str, torch.Tensor]]] = contextvars.ContextVar(
    "persona_pending_masks", default={}
)


@contextlib.contextmanager
def pending_masks(adapter_name: str, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, injecting ``adapter_name`` gives each layer its mask from ``masks`` instead of all ones."""
    token = _PENDING_MASKS.set({adapter_name: masks})
    try:
        yield
    finally:
        _PENDING_MASKS.reset(token)


class PersonaMaskModel(BaseTuner):
    """Injects persona masks into a model's linear layers.

    Example:
        ```py
        >>> from peft import get_peft_model
        >>> from peft_persona import PersonaMaskConfig
        >>> model = get_peft_model(base_model, PersonaMaskConfig(), adapter_name="persona")  # all-ones masks
        ```
    """

    prefix: str = "persona_mask_"
    tuner_layer_cls = PersonaMaskLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        fingerprint.check_base_model_fingerprint(config.base_model_fingerprint, model, adapter_name)
        if config.target_modules is None:
            config.target_modules = set(targets.decoder_linear_modules(model))
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(
        self,
        peft_config: PersonaMaskConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        mask = _PENDING_MASKS.get().get(adapter_name, {}).get(current_key)
        if isinstance(target, PersonaMaskLayer):
            target.update_layer(adapter_name, mask)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not targets.is_maskable(base):
            raise TypeError(
                f"module {current_key!r} is a {type(base).__name__}; persona masks wrap only torch.nn.Linear and "
                "transformers Conv1D layers. Narrow `target_modules` so that it does not match this module."
            )
        new_module = MaskedLinear(target, adapter_name, mask)
        if adapter_name not in self.active_adapters:
            new_module.set_adapter(self.active_adapters)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(False)

    # ------------------------------------------------------------------------------------ mask operations
    def set_masks(self, adapter_name: str, masks: dict[str, torch.Tensor]) -> None:
        """Overwrite ``adapter_name``'s masks in place (hot swap). See :func:`peft_persona.set_masks`."""
        from ..masks import set_masks

        set_masks(self.model, adapter_name, masks)

    def get_masks(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The ``bool`` masks of ``adapter_name`` by module name. See :func:`peft_persona.get_masks`."""
        from ..masks import get_masks

        return get_masks(self.model, adapter_name)

    def combine_adapters(
        self, adapters: Iterable[str], new_adapter_name: str, how: CombineMode = "intersection"
    ) -> None:
        """Create ``new_adapter_name`` from existing adapters, the analogue of LoRA's ``add_weighted_adapter``."""
        from ..masks import combine_adapters

        combine_adapters(self.model, adapters, new_adapter_name, how=how)
