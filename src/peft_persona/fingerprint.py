"""A fingerprint of the base model a persona mask was extracted on, and the check made when it is injected.

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

from .errors import PersonaAdapterError
from .targets import decoder_linear_modules, oriented_weight

FINGERPRINT_FORMAT = 1
PROBE_MODULES = 8
PROBE_SAMPLES = 4096
PROBE_TOLERANCE = 0.3
SKIP_ENV = "PEFT_PERSONA_SKIP_FINGERPRINT"


class FingerprintMismatchError(PersonaAdapterError):
    """The adapter was extracted on a different base model than the one it is being loaded into."""


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
