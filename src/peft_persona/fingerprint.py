"""Which linear layers a persona mask targets by default, and a fingerprint of the base model they belong to.

The fingerprint has two parts: a hash of the targeted layers' names and shapes (exact), and a *weight probe*, a few
normalised random projections of sampled weights. Independent weights differ by about 1 per probe value; a bf16 copy
of SmolLM2 differs by 0.002 and a 10% relative perturbation of every weight by 0.18, so the tolerance of 0.3 accepts
dtype casts and quantised copies of one checkpoint and refuses other models of the same architecture. It may not
detect a light fine-tune of the same base.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import torch
from torch import nn

FINGERPRINT_FORMAT = 1
PROBE_MODULES = 8
PROBE_SAMPLES = 4096
PROBE_TOLERANCE = 0.3
SKIP_ENV = "PEFT_PERSONA_SKIP_FINGERPRINT"


class FingerprintMismatchError(ValueError):
    """The adapter was extracted on a different base model than the one it is being loaded into."""


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_maskable(module: nn.Module) -> bool:
    """True for the layer types a persona mask can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out_features, in_features)``; a view, never a copy."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.T
    return module.weight


def _strip_tuner_names(name: str) -> str:
    return name.replace(".base_layer", "")


def decoder_block_list(model: nn.Module) -> str:
    """Name of the ``nn.ModuleList`` holding the decoder blocks: the one with the most parameters."""
    best_name, best_count = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best_name, best_count = name, count
    if best_name is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks, so the default targets (every linear layer "
            "inside the decoder blocks) are undefined; pass `target_modules` explicitly."
        )
    return best_name


def decoder_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every maskable layer inside the decoder blocks, by name (tuner wrappers see through to the base layer)."""
    blocks = _strip_tuner_names(decoder_block_list(model))
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        clean = _strip_tuner_names(name)
        if clean.startswith(blocks + ".") and is_maskable(module) and clean not in found:
            found[clean] = module
    if not found:
        raise ValueError(f"no nn.Linear or Conv1D layer found inside the decoder blocks `{blocks}`")
    return found


def base_model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of ``model``'s decoder linear layers: structure hash plus a dtype-robust weight probe."""
    modules = decoder_linear_modules(model)
    structure = hashlib.sha256()
    for name, module in sorted(modules.items()):
        out_f, in_f = oriented_weight(module).shape
        structure.update(f"{name}:{out_f}x{in_f}\n".encode())
    names = sorted(modules)
    picks = [names[round(i * (len(names) - 1) / max(PROBE_MODULES - 1, 1))] for i in range(min(PROBE_MODULES, len(names)))]
    probe = []
    generator = torch.Generator().manual_seed(0)
    for name in picks:
        weight = oriented_weight(modules[name]).detach()
        out_f, in_f = weight.shape
        flat = torch.randint(0, out_f * in_f, (PROBE_SAMPLES,), generator=generator)
        signs = torch.randint(0, 2, (PROBE_SAMPLES,), generator=generator).double() * 2 - 1
        sample = weight[flat // in_f, flat % in_f].double().cpu()
        norm = sample.pow(2).sum().sqrt().clamp_min(1e-30)
        probe.append(round(float((signs * sample).sum() / norm), 6))
    return {
        "format": FINGERPRINT_FORMAT,
        "num_layers": len(modules),
        "structure_sha256": structure.hexdigest(),
        "weight_probe": probe,
    }


def check_base_model_fingerprint(expected: dict[str, Any] | None, model: nn.Module, adapter_name: str) -> None:
    """Raise :class:`FingerprintMismatchError` if ``model`` is not the base model ``expected`` was taken from."""
    if not expected or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        warnings.warn(f"adapter {adapter_name!r}: base model fingerprint not checked, the model has merged adapters")
        return
    if any(p.device.type == "meta" for p in model.parameters()):
        return
    actual = base_model_fingerprint(model)
    hint = f"Set {SKIP_ENV}=1 to load it anyway."
    if actual["structure_sha256"] != expected.get("structure_sha256"):
        raise FingerprintMismatchError(
            f"adapter {adapter_name!r} was extracted on a base model with different linear layers "
            f"({expected.get('num_layers')} layers, structure {str(expected.get('structure_sha256'))[:12]}) than this "
            f"model ({actual['num_layers']} layers, structure {actual['structure_sha256'][:12]}). {hint}"
        )
    diffs = [abs(a - b) for a, b in zip(actual["weight_probe"], expected.get("weight_probe", []))]
    if diffs and max(diffs) > PROBE_TOLERANCE:
        raise FingerprintMismatchError(
            f"adapter {adapter_name!r} was extracted on a base model with the same architecture but different "
            f"weights (weight probe differs by {max(diffs):.3f} > {PROBE_TOLERANCE}). {hint}"
        )
