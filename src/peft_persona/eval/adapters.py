"""Adapters for an evaluation: load saved persona mask adapters, or extract them (personas and controls)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter_files import adapter_dirs, digest
from ..extractor import PersonaExtractor
from ..options import DEFAULT_SPARSITY, DEFAULT_STRENGTH
from ..tuner.integration import building_peft_model
from .items import Persona, calibration_texts, neutral_calibration


def load_adapters(model: nn.Module, directory: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """A ``PeftModel`` holding every adapter saved under ``directory``, and each adapter's weights digest."""
    from peft import PeftModel

    found = adapter_dirs(directory)
    peft_model = None
    for name, path in found.items():
        if peft_model is None:
            with building_peft_model():
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.eval()
    return peft_model, {name: digest(path) for name, path in found.items()}


VERSUS_NEUTRAL = "versus-neutral"


def versus_neutral(
    extractor: PersonaExtractor, sides: Mapping[str, Any], neutral: Any, sparsity: float, **recipe: Any
) -> nn.Module:
    """The ``versus-neutral`` recipe: each of ``sides`` (adapter name to texts or statistics) as a contrastive mask
    against ``neutral`` text instead of against the other side, so what any text needs is not what is kept. Returns
    the ``PeftModel`` holding one adapter per side (the first active), and none of the neutral halves."""
    names = list(sides)
    for name, side in sides.items():
        model = extractor.extract({name: side, f"{name}-neutral": neutral}, "contrastive", sparsity, **recipe)
    model.set_adapter(names[0])
    for name in names:
        model.delete_adapter(f"{name}-neutral")
    return model


def extract_adapters(
    model: nn.Module,
    tokenizer: Any,
    personas: Sequence[Persona],
    data_root: Path,
    out_dir: str | Path,
    sparsity: float = DEFAULT_SPARSITY,
    method: str = "contrastive",
    seed: int = 0,
    max_calibration: int = 100,
    neutral_passages: int = 50,
    strength: float = DEFAULT_STRENGTH,
    target: str = "all",
    layers: str | Sequence[int] | None = None,
    **recipe: Any,
) -> None:
    """Extract and save, under ``out_dir``, each persona's and opposite's mask (``method``, or ``versus-neutral``, on
    the calibration split, at most ``max_calibration`` texts per side, the first after a ``seed`` shuffle; ``recipe``:
    more :class:`~peft_persona.options.ExtractionOptions` fields such as ``phi`` and ``structure``) and the three
    controls at the same sparsity: ``random``, ``magnitude``, and ``neutral`` (Wanda on neutral instructions disjoint
    from the NLL texts); every adapter at ``strength``, on the same modules: the ``target`` sub-layers of the decoder
    blocks ``layers`` (indices, ``"8-23"``, or a band ``early``/``middle``/``late``; default all)."""
    import random

    extractor = PersonaExtractor(model, tokenizer, max_length=256, batch_size=8, target=target, layers=layers)
    neutral = extractor.calibrate("neutral", neutral_calibration(data_root, neutral_passages))
    for persona in personas:
        texts, opposite = calibration_texts(data_root, persona)
        rng = random.Random(seed)
        texts = rng.sample(texts, min(max_calibration, len(texts)))
        opposite = rng.sample(opposite, min(max_calibration, len(opposite)))
        pair = {persona.name: texts, persona.opposite: opposite}
        if method == VERSUS_NEUTRAL:
            versus_neutral(extractor, pair, neutral, sparsity, strength=strength, **recipe)
        else:
            extractor.extract(pair, method=method, sparsity=sparsity, seed=seed, strength=strength, **recipe)
    extractor.extract({"random": None}, method="random", sparsity=sparsity, seed=seed, strength=strength)
    extractor.extract({"magnitude": None}, method="magnitude", sparsity=sparsity, strength=strength)
    extractor.extract({"neutral": neutral}, method="wanda", sparsity=sparsity, strength=strength)
    extractor.peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # masks never touch them
