"""Masks in and out of a model: build an adapter from explicit masks, read them back, combine and hot-swap them.

Every function here works on a ``PeftModel``, on a transformers model that loaded adapters with ``load_adapter``, and
on a plain module holding :class:`MaskedLinear` layers. Module names are those of the base model
(``model.layers.0.self_attn.q_proj``), without PEFT's ``base_model.model.`` prefix.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from ._peft_type import PERSONA_MASK
from .bits import unpack_mask
from .fingerprint import base_model_fingerprint
from .targets import is_maskable, oriented_weight
from .tuner.config import PersonaMaskConfig, check_safetensors_file
from .tuner.layer import PersonaMaskLayer
from .tuner.model import pending_masks

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BITS_KEY = ".persona_mask_bits"


def _clean_name(name: str) -> str:
    for prefix in ("base_model.model.", "_orig_mod."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


def mask_layers(model: nn.Module) -> dict[str, PersonaMaskLayer]:
    """Every persona mask layer in ``model``, by base-model module name."""
    return {_clean_name(n): m for n, m in model.named_modules() if isinstance(m, PersonaMaskLayer)}


def _layers_of(model: nn.Module, adapter_name: str) -> dict[str, PersonaMaskLayer]:
    layers = {n: m for n, m in mask_layers(model).items() if adapter_name in m.persona_mask_bits}
    if not layers:
        known = sorted({a for m in mask_layers(model).values() for a in m.persona_mask_bits})
        raise KeyError(f"no persona mask adapter named {adapter_name!r}; the model has {known}")
    return layers


def _peft_config_dict(model: nn.Module) -> dict:
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} carries no `peft_config` dict; it holds no PEFT adapters")
    return config


def get_masks(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The ``bool`` masks ``(out_features, in_features)`` of ``adapter_name``, by module name."""
    return {name: layer.get_mask(adapter_name) for name, layer in _layers_of(model, adapter_name).items()}


def validate_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check ``masks`` against ``model`` and return them keyed by clean module name.

    Raises a ``KeyError``, ``TypeError`` or ``ValueError`` naming the offending module for a missing or
    non-linear module, a non-``bool`` mask, or a shape that differs from the weight's ``(out, in)``.
    """
    if not masks:
        raise ValueError("no masks given: expected a dict of module name to torch.bool tensor")
    modules = {_clean_name(n): m for n, m in model.named_modules()}
    checked = {}
    for raw_name, mask in masks.items():
        name = _clean_name(raw_name)
        module = modules.get(name)
        if module is None:
            raise KeyError(f"mask for {raw_name!r}: the model has no module of that name")
        base = module.get_base_layer() if isinstance(module, PersonaMaskLayer) else module
        if not is_maskable(base):
            raise TypeError(f"mask for {name!r}: module is a {type(base).__name__}, not nn.Linear or Conv1D")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask for {name!r} must be a torch.bool tensor, got {got}")
        shape = tuple(oriented_weight(base).shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight (out, in) is {shape}")
        checked[name] = mask
    return checked


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
    model is touched.
    """
    config = copy.deepcopy(config) if config is not None else PersonaMaskConfig()
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    checked = validate_masks(base, masks)
    if config.target_modules is None:
        config.target_modules = set(checked)
    if config.method is None:
        config.method = "explicit"
    if config.base_model_fingerprint is None:
        config.base_model_fingerprint = base_model_fingerprint(base)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(base, "config", None), "name_or_path", None) or None

    with pending_masks(adapter_name, checked):
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            result = model
        elif getattr(model, "_hf_peft_config_loaded", False):
            model.add_adapter(config, adapter_name=adapter_name)
            result = model
        else:
            result = get_peft_model(model, config, adapter_name=adapter_name)
    targeted = set(_layers_of(result, adapter_name))
    if targeted != set(checked):
        delete_adapter(result, adapter_name)
        raise ValueError(
            f"adapter {adapter_name!r}: `target_modules` matched modules with no mask: {sorted(targeted - set(checked))}, "
            f"and masks were given for modules it did not match: {sorted(set(checked) - targeted)}"
        )
    return result


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer and from the model's ``peft_config``."""
    if isinstance(model, PeftModel) or hasattr(model, "delete_adapter"):
        model.delete_adapter(adapter_name)
        return
    for layer in _layers_of(model, adapter_name).values():  # pragma: no cover - plain modules only
        layer.delete_adapter(adapter_name)


def set_masks(model: nn.Module, adapter_name: str, masks: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every mask of ``adapter_name`` in place (hot swap): no tensor is reallocated.

    ``masks`` must name exactly the layers the adapter covers. A ``torch.compile``d model keeps its compiled graph.
    All masks are validated before any is written.
    """
    layers = _layers_of(model, adapter_name)
    checked = {_clean_name(n): m for n, m in masks.items()}
    unknown, missing = set(checked) - set(layers), set(layers) - set(checked)
    if unknown or missing:
        raise KeyError(
            f"masks for adapter {adapter_name!r} must name exactly its {len(layers)} layers; "
            f"unknown: {sorted(unknown)[:5]}, missing: {sorted(missing)[:5]}"
        )
    for name, layer in layers.items():
        try:
            layer._check_mask(checked[name], adapter_name)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
    for name, layer in layers.items():
        layer.set_mask(adapter_name, checked[name])


def read_adapter_masks(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read the masks stored in a saved adapter directory (or its ``adapter_model.safetensors``) for ``model``."""
    file = Path(path)
    if file.is_dir():
        file = file / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no persona mask weights at {file}")
    _check_peft_type(file.parent / "adapter_config.json")
    check_safetensors_file(file)
    tensors = load_file(str(file))
    layers = mask_layers(model)
    masks = {}
    for key, packed in tensors.items():
        if not key.endswith(BITS_KEY):
            continue
        name = _clean_name(key[: -len(BITS_KEY)])
        if name not in layers:
            raise KeyError(f"{file}: tensor {key!r} names module {name!r}, which holds no persona mask layer")
        masks[name] = unpack_mask(packed, layers[name].in_features)
    if not masks:
        raise ValueError(f"{file} holds no persona mask tensors (keys ending in {BITS_KEY!r})")
    return masks


def _check_peft_type(config_file: Path) -> None:
    if not config_file.is_file():
        return
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if peft_type != PERSONA_MASK.value:
        raise ValueError(f"{config_file} declares peft_type {peft_type!r}; a persona mask adapter has {PERSONA_MASK.value!r}")


def hotswap_adapter(model: nn.Module, adapter_name: str, path: str | os.PathLike) -> None:
    """Replace ``adapter_name``'s masks with those saved at ``path``, in place, without recompiling."""
    set_masks(model, adapter_name, read_adapter_masks(path, model))


def combine_adapters(
    model: nn.Module,
    adapters: Iterable[str],
    new_adapter_name: str,
    how: Literal["intersection", "union", "majority"] = "intersection",
) -> None:
    """Add ``new_adapter_name``, whose mask combines ``adapters``' masks per weight.

    ``intersection`` keeps a weight every adapter keeps, ``union`` one any adapter keeps, and ``majority`` one that
    strictly more than half of the adapters keep.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter")
    if how not in ("intersection", "union", "majority"):
        raise ValueError(f"combine_adapters: unknown mode {how!r}; use 'intersection', 'union' or 'majority'")
    configs = _peft_config_dict(model)
    if new_adapter_name in configs:
        raise ValueError(f"an adapter named {new_adapter_name!r} already exists")
    layer_sets = [set(_layers_of(model, a)) for a in adapters]
    if any(s != layer_sets[0] for s in layer_sets):
        raise ValueError(f"adapters {adapters} do not cover the same layers, so they cannot be combined")
    layers = _layers_of(model, adapters[0])
    combined = {}
    for name, layer in layers.items():
        stack = torch.stack([layer.get_mask(a) for a in adapters])
        if how == "intersection":
            combined[name] = stack.all(0)
        elif how == "union":
            combined[name] = stack.any(0)
        else:
            combined[name] = stack.sum(0, dtype=torch.int32) * 2 > len(adapters)
    config = copy.deepcopy(configs[adapters[0]])
    config.method, config.persona, config.opposite_persona, config.sparsity = "combined", new_adapter_name, None, None
    config.calibration = {"combined_from": adapters, "how": how}
    configs[new_adapter_name] = config
    for name, layer in layers.items():
        layer.update_layer(new_adapter_name, combined[name])
