"""Adapters from explicit masks, and masks from saved adapter files.

Every function here works on a ``PeftModel``, on a transformers model that loaded adapters with ``load_adapter``, and
on a plain module holding persona mask layers. Module names are those of the base model
(``model.layers.0.self_attn.q_proj``), without PEFT's ``base_model.model.`` prefix.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from . import adapter_files
from .adapter_files import check_adapter_name
from .fingerprint import base_model_fingerprint
from .targets import clean_module_name, oriented_weight, why_not_maskable
from .tuner import PersonaMaskConfig, PersonaMaskLayer, mask_layers, set_masks
from .tuner.model import adapter_layers


def validate_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check ``masks`` against ``model`` and return them keyed by clean module name.

    Raises a ``KeyError``, ``TypeError`` or ``ValueError`` naming the offending module for a missing or
    non-linear module, a non-``bool`` mask, or a shape that differs from the weight's ``(out, in)``.
    """
    if not masks:
        raise ValueError("no masks given: expected a dict of module name to torch.bool tensor")
    modules = {clean_module_name(n): m for n, m in model.named_modules()}
    checked = {}
    for raw_name, mask in masks.items():
        name = clean_module_name(raw_name)
        module = modules.get(name)
        if module is None:
            raise KeyError(f"mask for {raw_name!r}: the model has no module of that name")
        base = module.get_base_layer() if isinstance(module, PersonaMaskLayer) else module
        reason = why_not_maskable(base)
        if reason is not None:
            raise TypeError(f"mask for {name!r}: module is {reason}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask for {name!r} must be a torch.bool tensor, got {got}")
        shape = tuple(oriented_weight(base).shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight (out, in) is {shape}")
        checked[name] = mask
    return checked


def _complete_config(config: Optional[PersonaMaskConfig], base: nn.Module, modules: set[str]) -> PersonaMaskConfig:
    config = copy.deepcopy(config) if config is not None else PersonaMaskConfig()
    if config.target_modules is None:
        config.target_modules = set(modules)
    if config.method is None:
        config.method = "explicit"
    if config.base_model_fingerprint is None:
        config.base_model_fingerprint = base_model_fingerprint(base, sorted(modules))
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(base, "config", None), "name_or_path", None) or None
    return config


def add_mask_adapter(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    config: Optional[PersonaMaskConfig] = None,
) -> nn.Module:
    """Add an adapter built from explicit masks (module name to ``bool`` tensor ``(out, in)``).

    ``model`` may be a plain transformers model (a ``PeftModel`` is returned), a ``PeftModel`` (the adapter is added
    to it and it is returned), or a transformers model that already holds adapters from ``load_adapter`` (the adapter
    is added through transformers' ``add_adapter`` and the model is returned). Everything is validated before the
    model is touched; the adapter is injected with all-ones masks, which are then overwritten in place.
    """
    check_adapter_name(adapter_name)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    checked = validate_masks(base, masks)
    config = _complete_config(config, base, set(checked))
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        result = model
    elif getattr(model, "_hf_peft_config_loaded", False):
        model.add_adapter(config, adapter_name=adapter_name)
        result = model
    else:
        result = get_peft_model(model, config, adapter_name=adapter_name)
    targeted = set(adapter_layers(result, adapter_name))
    if targeted != set(checked):
        result.delete_adapter(adapter_name)
        raise ValueError(
            f"adapter {adapter_name!r}: `target_modules` matched modules with no mask: {sorted(targeted - set(checked))}, "
            f"and masks were given for modules it did not match: {sorted(set(checked) - targeted)}"
        )
    set_masks(result, adapter_name, checked)
    return result


def read_adapter_masks(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read the masks stored in a saved adapter directory (or its ``adapter_model.safetensors``) for ``model``."""
    in_features = {name: layer.in_features for name, layer in mask_layers(model).items()}
    return adapter_files.read_masks(path, in_features)


def hotswap_adapter(model: nn.Module, adapter_name: str, path: str | os.PathLike) -> None:
    """Replace ``adapter_name``'s masks with those saved at ``path``, in place, without recompiling.

    The file must hold exactly one mask of the right shape per layer of the adapter; it is checked before any mask
    is written.
    """
    layers = adapter_layers(model, adapter_name)
    file = Path(path) / adapter_files.SAFETENSORS_WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    adapter_files.check_mask_tensors(file, {n: (layer.out_features, layer.in_features) for n, layer in layers.items()})
    set_masks(model, adapter_name, read_adapter_masks(path, model))
