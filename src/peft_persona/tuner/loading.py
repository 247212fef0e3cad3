"""Loading an adapter all or nothing: its files are checked against the model before injection, and a load that
fails after injection is rolled back, so the model keeps exactly the adapters, active set and weights it had.

PEFT reads a persona adapter's config through :meth:`PersonaMaskConfig.from_pretrained`, which records the weights
file it checked. transformers' ``load_adapter`` reads the config through PEFT's base class and then loads the weights
itself, so :mod:`.integration` wraps it with :func:`guarded`: it finds and checks the weights file first, and removes
a persona adapter whose load failed. Both only act on persona mask adapters.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from .. import adapter_files
from ..errors import PersonaAdapterError
from ..targets import clean_module_name, oriented_weight
from . import stats_format

WEIGHTS_ATTRIBUTE = "_persona_weights_file"  # set on a config by from_pretrained; not a dataclass field, never saved
_pending = threading.local()  # weights file of the adapter transformers is loading in this thread
INJECTING = threading.local()  # ``adapter``: name of the persona adapter last injected in this thread


def weights_file(config: Any) -> str | None:
    """The checked weights file an adapter is about to be loaded from, if it is known."""
    return getattr(config, WEIGHTS_ATTRIBUTE, None) or getattr(_pending, "file", None)


def locate_weights(path: str, subfolder: str | None = None, **download: Any) -> str:
    """The adapter's ``adapter_model.safetensors``: a local file, or downloaded from the Hub into its cache.

    Raises :class:`PersonaAdapterError` if there is none, naming a pickle file found in its place.
    """
    directory = os.path.join(path, subfolder or "")
    if os.path.isdir(directory):
        file = os.path.join(directory, adapter_files.SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(file):
            pickle = os.path.join(directory, adapter_files.WEIGHTS_NAME)
            also = f"; {pickle} is a pickle and is never read" if os.path.isfile(pickle) else ""
            raise PersonaAdapterError(f"no {adapter_files.SAFETENSORS_WEIGHTS_NAME} in {directory}{also}")
        return file
    return adapter_files.download_adapter_file(path, adapter_files.SAFETENSORS_WEIGHTS_NAME, subfolder, download)


def targeted_modules(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """Module name to module (the persona layer where one wraps it) of every 2-D weight ``config`` targets."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        clean = clean_module_name(name)
        if clean in found or name.endswith(".base_layer") or not check_target_module_exists(config, name):
            continue  # excluded modules are falsy too
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        weight = getattr(base, "weight", None)
        if weight is not None and weight.dim() == 2:
            found[clean] = module
    return found


def targeted_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, int]]:
    """Module name to weight ``(out_features, in_features)`` of every module ``config`` targets in ``model``."""
    return {
        name: tuple(oriented_weight(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m).shape)
        for name, m in targeted_modules(model, config).items()
    }


def check_weights_file(model: nn.Module, config: Any, file: str) -> None:
    """Check ``file``'s tensors against the layers ``config`` targets in ``model``, in the config's format."""
    shapes = targeted_shapes(model, config)
    found = adapter_files.weights_format(file)
    if found != config.save_format:
        raise PersonaAdapterError(
            f"{file} holds a {found!r} adapter but its {adapter_files.CONFIG_NAME} says "
            f"save_format={config.save_format!r}"
        )
    if found == "bits":
        adapter_files.check_mask_tensors(file, shapes)
    else:
        adapter_files.check_stats_tensors(file, {n: s[1] for n, s in shapes.items()}, config.method == "contrastive")


def derive_from_file(model: nn.Module, config: Any, file: str, adapter_name: str) -> dict[str, tuple]:
    """Re-derive each layer's mask of a ``stats`` adapter from ``model``'s weights, before anything is injected.

    Returns module name to ``(ChannelSelection, packed mask)``. Raises :class:`StatsMismatchError` naming the first
    layer whose re-derived mask does not match its saved digest, with the likely cause and what to do.
    """
    selections = adapter_files.read_selections(file, config.sparsity)
    return stats_format.derive_from_file(
        targeted_modules(model, config),
        selections,
        lambda layer, dtype: _mismatch_message(adapter_name, file, layer, dtype, config),
    )


def _mismatch_message(adapter_name: str, file: str, layer: str, dtype: torch.dtype, config: Any) -> str:
    recorded = (config.calibration or {}).get("weight_dtype")
    now = str(dtype).removeprefix("torch.")
    head = (
        f"persona mask adapter {adapter_name!r} ({file}, save_format='stats'): the mask re-derived for layer "
        f"{layer!r} from this model's weights does not match the saved SHA-256 digest, so this is not the exact "
        "base model the adapter was extracted on. "
    )
    if recorded and recorded != now:
        cause = (
            f"The adapter was extracted on {recorded} weights and this model's are {now}: load the base model "
            f"with torch_dtype=torch.{recorded}"
        )
    else:
        source = config.base_model_name_or_path or "its base model"
        cause = (
            f"The weights differ from those it was extracted on (another checkpoint or revision of {source}): "
            f"load that exact checkpoint{f' in {recorded}' if recorded else ''}"
        )
    return head + cause + ", or use an adapter saved in the 'bits' format (`peft-persona extract --save-format bits`)."


SELECTIONS_ATTRIBUTE = "_persona_selections"  # set on a config for the time of one injection; never saved


def attach_selections(config: Any, derived: dict[str, tuple]) -> None:
    """Give the next injection of ``config`` its ``stats`` layers' statistics and checked masks."""
    object.__setattr__(config, SELECTIONS_ATTRIBUTE, derived)


def take_selection(config: Any, adapter_name: str, module_name: str) -> tuple:
    """The ``(ChannelSelection, packed mask)`` attached for ``module_name``; raise if a ``stats`` config has none."""
    found = (getattr(config, SELECTIONS_ATTRIBUTE, None) or {}).get(clean_module_name(module_name))
    if found is None:
        raise PersonaAdapterError(
            f"adapter {adapter_name!r} has save_format='stats' but no selection statistics for module "
            f"{clean_module_name(module_name)!r}: stats adapters come from `PersonaExtractor.extract(..., "
            "save_format='stats')` or from saved files; build adapters from explicit masks in the 'bits' format"
        )
    return found


def detach_selections(config: Any) -> None:
    if SELECTIONS_ATTRIBUTE in config.__dict__:
        object.__delattr__(config, SELECTIONS_ATTRIBUTE)


@dataclass
class Snapshot:
    """What a failed load must restore: the persona layers by name and their adapters, and the active set."""

    layers: dict[str, tuple[str, ...]]
    active: list[str] | None
    had_config: bool
    config_loaded: bool


def snapshot(model: nn.Module) -> Snapshot:
    from .layer import PersonaMaskLayer

    layers = {
        clean_module_name(n): tuple(m.persona_mask_bits.keys())
        for n, m in model.named_modules()
        if isinstance(m, PersonaMaskLayer)
    }
    active = next((list(m.active_adapters) for m in model.modules() if isinstance(m, PersonaMaskLayer)), None)
    return Snapshot(
        layers, active, hasattr(model, "peft_config"), bool(getattr(model, "_hf_peft_config_loaded", False))
    )


def rollback(model: nn.Module, adapter_name: str, before: Snapshot) -> None:
    """Undo the injection of ``adapter_name``: unwrap layers it created, drop it from the others and the config."""
    from .layer import PersonaMaskLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, PersonaMaskLayer):
            continue
        clean = clean_module_name(name)
        if clean not in before.layers:
            parent_name, _, child = name.rpartition(".")
            base = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
        elif adapter_name in module.persona_mask_bits and adapter_name not in before.layers[clean]:
            module.delete_adapter(adapter_name)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name not in _adapters_in(before):
        configs.pop(adapter_name, None)
        if not configs and not before.had_config:
            del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = before.config_loaded
    if before.active is not None:
        for module in model.modules():
            if isinstance(module, PersonaMaskLayer):
                module.set_adapter(before.active)


def _adapters_in(before: Snapshot) -> set[str]:
    return {a for adapters in before.layers.values() for a in adapters}


def _config_file(path: str | None, download: dict[str, Any]) -> str | None:
    """The adapter's ``adapter_config.json``: local, or from the Hub cache; ``None`` if it cannot be had."""
    if path is None:
        return None
    subfolder = download.get("subfolder")
    local = os.path.join(path, subfolder or "", adapter_files.CONFIG_NAME)
    if os.path.isfile(local):
        return local
    try:
        return adapter_files.download_adapter_file(path, adapter_files.CONFIG_NAME, subfolder, download)
    except Exception:  # noqa: BLE001 - transformers reports an unreachable adapter as it always does
        return None


def _is_persona_adapter(path: str | None, download: dict[str, Any]) -> bool:
    """Whether the adapter at ``path`` is a persona mask adapter; a config whose ``peft_type`` PEFT does not know
    raises :class:`PersonaAdapterError` naming the file (PEFT itself would fail with a bare ``KeyError``)."""
    from peft import mapping

    file = _config_file(path, download)
    if file is None:
        return False
    try:
        with open(file, encoding="utf-8") as handle:
            peft_type = json.load(handle).get("peft_type")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise PersonaAdapterError(f"{file} is not a JSON object") from None
    if not isinstance(peft_type, str) or peft_type not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise PersonaAdapterError(f"{file}: `peft_type` {peft_type!r} is not an adapter type PEFT knows")
    return peft_type == adapter_files.PEFT_TYPE


def _sync_layers(model: nn.Module) -> None:
    from .layer import PersonaMaskLayer

    for module in model.modules():
        if isinstance(module, PersonaMaskLayer):
            module.sync()


def guarded(original: Callable) -> Callable:
    """transformers' ``load_adapter`` made all or nothing for persona adapters (see the module docstring); other
    adapters go straight to ``original``. :mod:`.integration` installs it."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        path = bound.arguments.get("peft_model_id")
        download = dict(bound.arguments.get("adapter_kwargs") or {})
        if bound.arguments.get("peft_config") is not None or not _is_persona_adapter(path, download):
            return original(self, *args, **kwargs)
        name = bound.arguments.get("adapter_name") or "default"
        before = snapshot(self)
        file = locate_weights(str(path), download.pop("subfolder", None), **download)
        adapter_files.validate_weights(file)
        try:
            _pending.file = file
            result = original(self, *args, **kwargs)
            _sync_layers(self)  # transformers writes the masks without load_state_dict: apply them now
            return result
        except BaseException:
            if name not in _adapters_in(before):
                rollback(self, name, before)
            raise
        finally:
            _pending.file = None

    load_adapter._persona_guarded = True
    return load_adapter
