"""The arms a comparison runs (see :mod:`peft_persona.eval.compare`): masks of each recipe, with or without the
persona prompt; the persona prompt alone; a CAA steering vector; a LoRA. Each builds what it needs on first use."""

from __future__ import annotations

import contextlib
import gc
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..extractor import PersonaExtractor
from ..tuner import get_masks, set_strength
from .adapters import versus_neutral
from .compare import Point, Side
from .conditions import active
from .finetune import LoraBudget, train_lora
from .items import Persona
from .steering import SteeringVector, caa_vectors


class Host:
    """The model under comparison (a ``PeftModel`` once masks exist) and its tokenizer; sides are read lazily."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def side(
        self, adapter: str | None = None, system: str | None = None, steer: tuple[SteeringVector, float] | None = None
    ) -> Side:
        """A side: ``adapter`` active (``None``: every adapter off), an optional system prompt and steering vector."""

        @contextlib.contextmanager
        def enter() -> Iterator[tuple[nn.Module, str | None]]:
            with (
                active(self.model, adapter),
                steer[0].applied(self.model, steer[1]) if steer else contextlib.nullcontext(),
            ):
                yield self.model, system

        return enter

    def drop(self, names: Sequence[str]) -> None:
        """Delete these adapters; unwrap the base model when no other adapter is left."""
        left = [n for n in getattr(self.model, "peft_config", {}) if n not in names]
        if not left:
            self.model = self.model.unload()
            return
        self.model.set_adapter(left[0])
        for name in names:
            self.model.delete_adapter(name)


# ------------------------------------------------------------------------------------------------ mask recipes
Build = Callable[[PersonaExtractor, dict[str, Any], tuple[str, str], float], Any]


def _wanda(extractor: PersonaExtractor, stats: dict[str, Any], names: tuple[str, str], sparsity: float) -> Any:
    extractor.extract({names[0]: stats["persona"]}, "wanda", sparsity)
    return extractor.extract({names[1]: stats["opposite"]}, "wanda", sparsity)


def _contrastive(**recipe: Any) -> Build:
    def build(extractor: PersonaExtractor, stats: dict[str, Any], names: tuple[str, str], sparsity: float) -> Any:
        personas = {names[0]: stats["persona"], names[1]: stats["opposite"]}
        return extractor.extract(personas, "contrastive", sparsity, **recipe)

    return build


def _difference(extractor: PersonaExtractor, stats: dict[str, Any], names: tuple[str, str], sparsity: float) -> Any:
    return extractor.extract({names[0]: stats["persona"], names[1]: stats["opposite"]}, "difference", sparsity)


def _versus_neutral(extractor: PersonaExtractor, stats: dict[str, Any], names: tuple[str, str], sparsity: float) -> Any:
    sides = {names[0]: stats["persona"], names[1]: stats["opposite"]}
    return versus_neutral(extractor, sides, stats["neutral"], sparsity)


@dataclass(frozen=True)
class MaskRecipe:
    """A named way to make a persona mask and its opposite from activation statistics."""

    name: str
    build: Build
    needs_neutral: bool = False


RECIPES: dict[str, MaskRecipe] = {
    r.name: r
    for r in (
        MaskRecipe("wanda", _wanda),
        MaskRecipe("contrastive", _contrastive()),
        MaskRecipe("contrastive-softplus", _contrastive(phi="softplus", tau=1.0)),
        MaskRecipe("contrastive-sigmoid", _contrastive(phi="sigmoid", tau=0.5)),
        MaskRecipe("contrastive-channel", _contrastive(structure="channel")),
        MaskRecipe("difference", _difference),
        MaskRecipe("versus-neutral", _versus_neutral, needs_neutral=True),
    )
}


class Statistics:
    """Persona, opposite and (on request) neutral activation statistics, calibrated once, on first use."""

    def __init__(self, host: Host, texts: dict[str, Sequence[Any]], layers: str | None, batch_size: int) -> None:
        self.host, self.texts, self.layers, self.batch_size = host, texts, layers, batch_size
        self.found: dict[str, Any] = {}
        self.seconds = 0.0

    def get(self, neutral: bool = False) -> dict[str, Any]:
        wanted = ["persona", "opposite"] + (["neutral"] if neutral else [])
        missing = [side for side in wanted if side not in self.found]
        if missing:
            start = time.perf_counter()
            extractor = PersonaExtractor(
                self.host.model, self.host.tokenizer, layers=self.layers, batch_size=self.batch_size
            )
            for side in missing:
                self.found[side] = extractor.calibrate(side, self.texts[side])
            self.seconds += time.perf_counter() - start
        return {side: self.found[side] for side in wanted}


class MaskArm:
    """Masks of one recipe over a target x sparsity x strength grid; with ``prompted``, the persona prompts too."""

    def __init__(
        self,
        host: Host,
        recipe: MaskRecipe,
        statistics: Statistics,
        persona: Persona,
        grid: dict[str, Sequence],
        prompted: bool = False,
    ) -> None:
        self.host, self.recipe, self.statistics, self.persona, self.grid = host, recipe, statistics, persona, grid
        self.prompted = prompted
        self.name = ("prompt+mask:" if prompted else "mask:") + recipe.name
        self.slug = "cmp-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)  # adapter names allow no ':'
        self.group: tuple[Any, ...] | None = None
        self.names: tuple[str, ...] = ()
        self.seconds = 0.0

    def points(self) -> Iterator[Point]:
        for target in self.grid["targets"]:
            for layers in self.grid.get("layers", ("all",)):
                for sparsity in self.grid["sparsities"]:
                    for strength in self.grid["strengths"]:
                        knobs = {"target": target, "sparsity": sparsity, "strength": strength}
                        yield self.point(knobs if layers == "all" else {**knobs, "layers": layers})

    def point(self, knobs: dict[str, Any]) -> Point:
        names = (f"{self.slug}-p", f"{self.slug}-o", f"{self.slug}-neutral")
        prompts = (self.persona.prompt, self.persona.opposite_prompt) if self.prompted else (None, None)

        group = (knobs["target"], knobs.get("layers"), knobs["sparsity"])

        def sides() -> tuple[Side, Side]:
            self._ensure(group)
            for name in names[:2]:
                set_strength(self.host.model, name, knobs["strength"])
            return self.host.side(names[0], prompts[0]), self.host.side(names[1], prompts[1])

        def neutral() -> contextlib.AbstractContextManager:
            self._ensure(group, neutral=True)
            set_strength(self.host.model, names[2], knobs["strength"])
            return self.host.side(names[2], prompts[0])()

        return Point(self.name, dict(knobs), sides, {"neutral Wanda": neutral})

    def _ensure(self, group: tuple[str, str | None, float], neutral: bool = False) -> None:
        """The adapters of ``(target, layers, sparsity)`` exist (and the neutral-Wanda control, if asked)."""
        names, (target, layers, sparsity) = (f"{self.slug}-p", f"{self.slug}-o"), group
        if self.group != group:
            self.release()
            stats = self.statistics.get(self.recipe.needs_neutral)
            start = time.perf_counter()
            extractor = PersonaExtractor(self.host.model, self.host.tokenizer, target=target, layers=layers)
            self.host.model = self.recipe.build(extractor, stats, names, sparsity)
            self.seconds = time.perf_counter() - start
            self.group, self.names = group, names
        if neutral and f"{self.slug}-neutral" not in self.names:
            extractor = PersonaExtractor(self.host.model, self.host.tokenizer, target=target, layers=layers)
            stats = self.statistics.get(neutral=True)["neutral"]
            self.host.model = extractor.extract({f"{self.slug}-neutral": stats}, "wanda", sparsity)
            self.names = (*self.names, f"{self.slug}-neutral")

    def release(self) -> None:
        if self.names:
            self.host.drop(self.names)
        self.group, self.names = None, ()

    def footprint(self) -> dict[str, float]:
        masks = get_masks(self.host.model, f"{self.slug}-p") if self.names else {}
        packed = sum(m.shape[0] * math.ceil(m.shape[1] / 8) for m in masks.values())
        return {"bytes": packed, "seconds": self.statistics.seconds + self.seconds}


class PromptArm:
    """The persona's system prompt against the opposite one, weights untouched."""

    name = "prompt"

    def __init__(self, host: Host, persona: Persona) -> None:
        self.host, self.persona = host, persona

    def points(self) -> Iterator[Point]:
        yield self.point({})

    def point(self, knobs: dict[str, Any]) -> Point:
        return Point(
            self.name,
            {},
            lambda: (self.host.side(None, self.persona.prompt), self.host.side(None, self.persona.opposite_prompt)),
        )

    def release(self) -> None:
        pass

    def footprint(self) -> dict[str, float]:
        return {"bytes": len((self.persona.prompt or "").encode()), "seconds": 0.0}


class CaaArm:
    """A CAA steering vector per block, added with ``+coefficient`` (persona) or ``-coefficient`` (opposite)."""

    name = "caa"

    def __init__(
        self, host: Host, texts: dict[str, Sequence[Any]], layers: Sequence[int], coefficients: Sequence[float]
    ) -> None:
        self.host, self.texts, self.layers, self.coefficients = host, texts, list(layers), list(coefficients)
        self.vectors: dict[int, SteeringVector] = {}
        self.seconds = 0.0

    def points(self) -> Iterator[Point]:
        for layer in self.layers:
            for coefficient in self.coefficients:
                yield self.point({"layer": layer, "coefficient": float(coefficient)})

    def point(self, knobs: dict[str, Any]) -> Point:
        def sides() -> tuple[Side, Side]:
            vector = self._vector(knobs["layer"])
            return (
                self.host.side(steer=(vector, knobs["coefficient"])),
                self.host.side(steer=(vector, -knobs["coefficient"])),
            )

        return Point(self.name, dict(knobs), sides)

    def _vector(self, layer: int) -> SteeringVector:
        if not self.vectors:
            start = time.perf_counter()
            with self.host.side()() as (model, _):
                self.vectors = caa_vectors(
                    model, self.host.tokenizer, self.texts["persona"], self.texts["opposite"], self.layers
                )
            self.seconds = time.perf_counter() - start
        return self.vectors[layer]

    def release(self) -> None:
        pass

    def footprint(self) -> dict[str, float]:
        vector = next(iter(self.vectors.values()), None)
        return {"bytes": 4 * vector.direction.numel() if vector is not None else 0, "seconds": self.seconds}


class LoraArm:
    """A LoRA per side, trained on that side's calibration texts for a fixed budget, each on its own fresh copy of the
    base model from ``base_factory`` (freed once saved), saved under ``folder`` (a rerun loads it), and scored as two
    adapters of one more fresh copy, switched with ``set_adapter``: one such copy at a time besides the host's model."""

    name = "lora"

    def __init__(
        self,
        host: Host,
        texts: dict[str, Sequence[Any]],
        target_modules: Sequence[str],
        folder: Path,
        base_factory: Callable[[], nn.Module],
        budget: LoraBudget | None = None,
    ) -> None:
        self.host, self.texts, self.targets, self.folder = host, texts, list(target_modules), folder
        self.base_factory, self.budget = base_factory, budget or LoraBudget()
        self.model: nn.Module | None = None
        self.seconds = 0.0

    def points(self) -> Iterator[Point]:
        yield self.point({})

    def point(self, knobs: dict[str, Any]) -> Point:
        def side(which: str) -> Side:
            @contextlib.contextmanager
            def enter() -> Iterator[tuple[nn.Module, None]]:
                yield self._model(which), None

            return enter

        return Point(self.name, {}, lambda: (side("persona"), side("opposite")))

    def _model(self, which: str) -> nn.Module:
        from peft import PeftModel

        if self.model is None:
            for side in ("persona", "opposite"):
                saved = self.folder / side
                if not (saved / "adapter_config.json").is_file():
                    start = time.perf_counter()
                    lora, _ = train_lora(
                        self.base_factory(),
                        self.host.tokenizer,
                        self.texts[side],
                        self.targets,
                        self.budget,
                        copy_model=False,  # the fresh copy is trained itself
                    )
                    self.seconds += time.perf_counter() - start
                    lora.save_pretrained(saved)
                    del lora
                    gc.collect()  # the trained copy goes before the next one is made
            model = PeftModel.from_pretrained(self.base_factory(), self.folder / "persona", adapter_name="persona")
            model.load_adapter(self.folder / "opposite", adapter_name="opposite")
            self.model = model.eval()
        self.model.set_adapter(which)
        return self.model

    def release(self) -> None:
        self.model = None

    def footprint(self) -> dict[str, float]:
        weights = self.folder / "persona" / "adapter_model.safetensors"
        return {"bytes": weights.stat().st_size if weights.is_file() else 0, "seconds": self.seconds}
