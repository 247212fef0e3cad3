"""What a user would pick instead of a mask, as named models for ``eval`` to score beside the masks.

Each baseline is a name (``caa:<persona>``, ``lora:<persona>``) and a context manager that yields the model to
score: a CAA steering vector (persona minus opposite calibration texts, at one block) added with ``+coefficient`` for
the persona and ``-coefficient`` for its opposite, on the base model (every adapter off); or the base model with a
LoRA fine-tuned on that side's calibration texts, merged. Both are built on first use, from the same calibration
texts the masks are extracted from; the comparison (:mod:`.comparison`) sweeps their layer, coefficient and budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..targets import decoder_linear_modules
from .conditions import active
from .finetune import LoraBudget, train_lora
from .items import Persona, calibration_texts
from .steering import SteeringVector, caa_vectors, decoder_blocks

Enter = Callable[[], contextlib.AbstractContextManager[nn.Module]]
BASELINES: tuple[str, ...] = ("caa", "lora")


def caa_baselines(
    model: nn.Module,
    tokenizer: Any,
    personas: Sequence[Persona],
    data_root: Path | None,
    layer: int | None = None,
    coefficient: float = 4.0,
    limit: int = 100,
) -> dict[str, Enter]:
    """``caa:<persona>`` and ``caa:<opposite>`` for every persona: one vector at block ``layer`` (default: half-way
    up) from at most ``limit`` calibration texts per side, added with ``+coefficient`` / ``-coefficient``."""
    where = len(decoder_blocks(model)) // 2 if layer is None else layer
    vectors: dict[str, SteeringVector] = {}

    def vector(persona: Persona) -> SteeringVector:
        if persona.name not in vectors:
            trait, opposite = calibration_texts(data_root, persona)
            with active(model, None), torch.inference_mode(False), torch.no_grad():
                vectors[persona.name] = caa_vectors(model, tokenizer, trait[:limit], opposite[:limit], [where])[where]
        return vectors[persona.name]

    def steered(persona: Persona, sign: float) -> Enter:
        @contextlib.contextmanager
        def enter() -> Iterator[nn.Module]:
            steering = vector(persona)
            with active(model, None), steering.applied(model, sign * coefficient):
                yield model

        return enter

    result: dict[str, Enter] = {}
    for persona in personas:
        result[f"caa:{persona.name}"] = steered(persona, 1.0)
        result.setdefault(f"caa:{persona.opposite}", steered(persona, -1.0))
    return result


def lora_baselines(
    base_factory: Callable[[], nn.Module],
    tokenizer: Any,
    personas: Sequence[Persona],
    data_root: Path | None,
    target_modules: Sequence[str] | None = None,
    budget: LoraBudget | None = None,
    limit: int = 100,
) -> dict[str, Enter]:
    """``lora:<persona>`` and ``lora:<opposite>``: a fresh base model (``base_factory``) with a LoRA trained on that
    side's calibration texts (at most ``limit``) for ``budget``, merged; trained once, on first use. The LoRA
    targets ``target_modules`` (default: every linear layer a mask targets)."""
    models: dict[str, nn.Module] = {}

    def trained(persona: Persona, side: int) -> Enter:
        name = persona.name if side == 0 else persona.opposite

        @contextlib.contextmanager
        def enter() -> Iterator[nn.Module]:
            if name not in models:
                texts = calibration_texts(data_root, persona)[side][:limit]
                with torch.inference_mode(False), torch.enable_grad():
                    base = base_factory()
                    targets = target_modules or sorted({n.rsplit(".", 1)[-1] for n in decoder_linear_modules(base)})
                    lora, _ = train_lora(base, tokenizer, texts, targets, budget or LoraBudget(), copy_model=False)
                models[name] = lora.merge_and_unload().eval()
            yield models[name]

        return enter

    result: dict[str, Enter] = {}
    for persona in personas:
        result[f"lora:{persona.name}"] = trained(persona, 0)
        result.setdefault(f"lora:{persona.opposite}", trained(persona, 1))
    return result
