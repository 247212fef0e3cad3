"""``tune``: a grid over sparsity x strength x target preset, scored on the validation split; the best point under an
NLL budget, then tested once on the held-out test split against the controls.

Each grid point holds a persona mask and its opposite (contrastive by default). It is scored by

- ``shift``: the persona mask's margin on the validation items minus the base model's;
- ``switch``: the persona mask's margin minus the opposite mask's (the paired switch effect);
- ``cost``: general-ability NLL (nats/token on neutral text) of the worse of the two masks minus the base's.

Statistics are calibrated once; masks are selected once per (target, sparsity); strength is set at run time. The
state file is rewritten after every point, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from .. import atomic
from ..checks import check_sparsity, check_strength
from ..extractor import PersonaExtractor
from ..options import DEFAULT_PHI, ExtractionOptions
from ..tuner import set_strength
from . import harness
from .adapters import VERSUS_NEUTRAL, versus_neutral
from .balance import balanced_mean
from .budget import choose, pareto_front
from .conditions import CONDITIONS, active
from .items import Persona, calibration_texts, load_items, neutral_calibration, neutral_texts

Log = Callable[[str], None]
OBJECTIVES = ("shift", "switch")
TUNE_METHODS = ("contrastive", "difference", "wanda", VERSUS_NEUTRAL)
RECIPE_DEFAULTS = {"phi": "relu", "structure": "row"}  # left out of fingerprints (states written before either existed)
TEST_CONDITIONS = (
    "base",
    "base + persona prompt",
    "base + opposite prompt",
    "persona mask",
    "opposite mask",
    "random mask",
    "magnitude mask",
    "neutral Wanda mask",
)
CONTROLS = ("random", "magnitude", "neutral")


def _breaks(check: Callable[[Any], float], value: Any) -> bool:
    """Whether ``value`` breaks the rule of ``check`` (a :mod:`peft_persona.checks` function)."""
    try:
        check(value)
    except ValueError:
        return True
    return False


@dataclass(frozen=True)
class TunePlan:
    """What ``tune`` searches and how it scores. ``fmt`` is the item format scored on validation (default the
    persona's first); ``n_validation``/``n_test`` items per split (``None``: all)."""

    persona: Persona
    data_root: Path | None = None
    sparsities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5)
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    targets: tuple[str, ...] = ("mlp", "all")
    layers: str | None = None
    method: str = "contrastive"
    phi: str = DEFAULT_PHI
    structure: str = "row"
    fmt: str | None = None
    objective: str = "shift"
    nll_budget: float = 0.2
    n_validation: int | None = 40
    n_test: int | None = 100
    nll_passages: int = 16
    max_calibration: int = 100
    batch_size: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        bad = [s for s in self.strengths if _breaks(check_strength, s)]
        bad += [s for s in self.sparsities if _breaks(check_sparsity, s)]
        if bad:
            raise ValueError(f"strengths must lie in [0, 1] and sparsities in [0, 1); got {bad}")
        if self.method not in TUNE_METHODS:
            raise ValueError(f"tune extracts {TUNE_METHODS} masks, got method {self.method!r}")
        method = "contrastive" if self.method == VERSUS_NEUTRAL else self.method
        ExtractionOptions(method, phi=self.phi, structure=self.structure)  # the recipe's own checks
        if (self.fmt or self.persona.formats[0]) not in self.persona.formats:
            raise ValueError(
                f"persona {self.persona.name!r} has no format {self.fmt!r}; it has {list(self.persona.formats)}"
            )

    @property
    def format(self) -> str:
        return self.fmt or self.persona.formats[0]

    def points(self) -> list[dict[str, Any]]:
        return [
            {"target": t, "sparsity": s, "strength": g}
            for t in self.targets
            for s in self.sparsities
            for g in self.strengths
        ]

    def fingerprint(self) -> str:
        """What the validation scores depend on; a state file with another fingerprint is not resumed."""
        keys = ("layers", "method", "n_validation", "nll_passages", "max_calibration", "seed", "batch_size")
        recipe = {k: getattr(self, k) for k in ("phi", "structure") if getattr(self, k) != RECIPE_DEFAULTS[k]}
        text = json.dumps(
            [self.persona.name, self.format, *(getattr(self, k) for k in keys), *([recipe] if recipe else [])]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def point_key(point: dict[str, Any]) -> str:
    return f"{point['target']}/sparsity={point['sparsity']:g}/strength={point['strength']:g}"


def margin_of(fmt: str, values: dict[str, list]) -> float:
    """The one margin a format's per-item values give (nats/token): matching minus not matching. Two-choice
    formats average it over the two answer halves, so an answer bias cannot raise it (see :mod:`.balance`)."""
    if fmt == "statement":
        return float(harness.summarize(fmt, values)["margin"]["diff"])
    return balanced_mean(values["margin"], values["matching"])["mean"]


def extract_pair(
    extractor: PersonaExtractor,
    plan: TunePlan,
    stats: dict[str, Any],
    names: tuple[str, str],
    sparsity: float,
    strength: float = 1.0,
) -> nn.Module:
    """The persona mask as adapter ``names[0]`` and the opposite's as ``names[1]``, by the plan's recipe (``wanda``
    scores each side from its own statistics; ``contrastive`` and ``difference`` set them against each other;
    ``versus-neutral`` sets each side contrastively against neutral text, ``stats["neutral"]``)."""
    sides = {names[0]: stats[plan.persona.name], names[1]: stats[plan.persona.opposite]}
    recipe = {"phi": plan.phi, "structure": plan.structure, "strength": strength}
    if plan.method == VERSUS_NEUTRAL:
        return versus_neutral(extractor, sides, stats["neutral"], sparsity, **recipe)
    return extractor.extract(sides, plan.method, sparsity, **recipe)


class Scorer:
    """Validation margin and neutral-text NLL of the model as it stands (adapter, strength, prompt)."""

    def __init__(self, model: nn.Module, tokenizer: Any, plan: TunePlan) -> None:
        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self.items = load_items(plan.data_root, plan.persona, plan.format, plan.n_validation, plan.seed, "validation")
        self.passages = neutral_texts(plan.data_root, "eval", plan.nll_passages) if plan.nll_passages else []

    def margin(self, adapter: str | None, system: str | None = None) -> float:
        with active(self.model, adapter):
            scores = harness.score_items(self.model, self.tokenizer, self.items, system, self.plan.batch_size)
        return margin_of(self.plan.format, harness.item_values(self.items, scores))

    def nll(self, adapter: str | None) -> float:
        if not self.passages:
            return 0.0
        with active(self.model, adapter):
            return harness.general_nll(self.model, self.tokenizer, self.passages, self.plan.batch_size)["corpus_nll"]


def read_state(path: Path, plan: TunePlan) -> dict[str, Any]:
    """The saved state at ``path`` if it was made by a plan with the same fingerprint; else a fresh state."""
    fresh = {"fingerprint": plan.fingerprint(), "points": {}, "reference": {}}
    if not path.is_file():
        return fresh
    state = json.loads(path.read_text())
    if state.get("fingerprint") != plan.fingerprint():
        raise ValueError(f"{path} was written by a tune run with other settings; use another --out or delete it")
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    atomic.write_json(path, state, indent=1)


def reference_scores(scorer: Scorer, persona: Persona) -> dict[str, Any]:
    """Base model and prompt baselines on the validation items; the prompts change no weight, so no NLL cost."""
    result = {"base": {"margin": scorer.margin(None), "nll": scorer.nll(None)}}
    for side, prompt in (("persona prompt", persona.prompt), ("opposite prompt", persona.opposite_prompt)):
        if prompt is not None:
            result[side] = {"margin": scorer.margin(None, prompt)}
    return result


class Statistics:
    """Persona and opposite statistics, calibrated on first use only (a resumed run may never need them)."""

    def __init__(self, model: nn.Module, tokenizer: Any, plan: TunePlan) -> None:
        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self._stats: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._stats is None:
            self._stats = _calibrate(self.model, self.tokenizer, self.plan)
        return self._stats


def run_grid(
    model: nn.Module,
    tokenizer: Any,
    plan: TunePlan,
    state_path: Path,
    log: Log,
    statistics: Statistics,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Score every grid point on the validation split (resuming from ``state_path``); returns the model (a
    ``PeftModel`` once any mask was made) and the state."""
    from tqdm.auto import tqdm

    state = read_state(state_path, plan)
    scorer = Scorer(model, tokenizer, plan)
    if not state["reference"]:
        state["reference"] = reference_scores(scorer, plan.persona)
        write_state(state_path, state)
    base = state["reference"]["base"]
    todo = [p for p in plan.points() if point_key(p) not in state["points"]]
    bar = tqdm(
        total=len(plan.points()),
        initial=len(plan.points()) - len(todo),
        desc=f"tune {plan.persona.name}",
        disable=not progress,
    )
    groups = sorted({(p["target"], p["sparsity"]) for p in todo}, key=lambda g: (plan.targets.index(g[0]), g[1]))
    for index, (target, sparsity) in enumerate(groups):
        model, names = _grid_adapters(model, tokenizer, plan, statistics.get(), target, sparsity, index)
        scorer.model = model
        for point in [p for p in todo if (p["target"], p["sparsity"]) == (target, sparsity)]:
            tick = time.time()
            state["points"][point_key(point)] = _score_point(scorer, names, point, base)
            write_state(state_path, state)
            log(f"{point_key(point)}: {time.time() - tick:.1f}s")
            bar.update(1)
    bar.close()
    return _drop_grid_adapters(model), state


def _calibrate(model: nn.Module, tokenizer: Any, plan: TunePlan) -> dict[str, Any]:
    """Persona and opposite statistics (and neutral ones for ``versus-neutral``) over every module any target preset
    masks (the default module set)."""
    import random

    persona = plan.persona
    texts, opposite = calibration_texts(plan.data_root, persona)
    rng = random.Random(0)
    texts = rng.sample(texts, min(plan.max_calibration, len(texts)))
    opposite = rng.sample(opposite, min(plan.max_calibration, len(opposite)))
    extractor = PersonaExtractor(model, tokenizer, layers=plan.layers, batch_size=plan.batch_size)
    stats = {
        persona.name: extractor.calibrate(persona.name, texts),
        persona.opposite: extractor.calibrate(persona.opposite, opposite),
    }
    if plan.method == VERSUS_NEUTRAL:
        stats["neutral"] = extractor.calibrate("neutral", neutral_calibration(plan.data_root))
    return stats


def _grid_adapters(
    model: nn.Module, tokenizer: Any, plan: TunePlan, stats: dict[str, Any], target: str, sparsity: float, index: int
) -> tuple[nn.Module, tuple[str, str]]:
    """The persona and opposite masks of one (target, sparsity), as adapters ``grid{index}-persona/-opposite``;
    the previous group's adapters are deleted once these exist (a ``PeftModel`` must keep one)."""
    names = (f"grid{index}-persona", f"grid{index}-opposite")
    extractor = PersonaExtractor(model, tokenizer, target=target, layers=plan.layers, batch_size=plan.batch_size)
    model = extract_pair(extractor, plan, stats, names, sparsity)
    model.set_adapter(names[0])
    for old in [n for n in model.peft_config if n.startswith("grid") and n not in names]:
        model.delete_adapter(old)
    return model, names


def _drop_grid_adapters(model: nn.Module) -> nn.Module:
    """The model without its grid adapters (an unwrapped base model if only those were there)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    others = [n for n in model.peft_config if not n.startswith("grid")]
    if not others:
        return model.unload()
    model.set_adapter(others[0])
    for name in [n for n in model.peft_config if n.startswith("grid")]:
        model.delete_adapter(name)
    return model


def _score_point(
    scorer: Scorer, names: tuple[str, str], point: dict[str, Any], base: dict[str, float]
) -> dict[str, Any]:
    """Margins and NLL of one point's two masks at the point's strength."""
    for name in names:
        set_strength(scorer.model, name, point["strength"])
    persona, opposite = scorer.margin(names[0]), scorer.margin(names[1])
    nll = {"persona": scorer.nll(names[0]), "opposite": scorer.nll(names[1])}
    return {
        **point,
        "persona_margin": persona,
        "opposite_margin": opposite,
        "shift": persona - base["margin"],
        "switch": persona - opposite,
        "nll_persona": nll["persona"],
        "nll_opposite": nll["opposite"],
        "cost": max(nll.values()) - base["nll"],
    }


def final_adapters(
    model: nn.Module, tokenizer: Any, plan: TunePlan, stats: dict[str, Any], point: dict[str, Any]
) -> nn.Module:
    """The chosen point's persona and opposite masks, named after them, and the ``random``, ``magnitude`` and
    ``neutral`` (Wanda on neutral text) controls with the same target, sparsity and strength."""
    persona = plan.persona
    extractor = PersonaExtractor(
        model, tokenizer, target=point["target"], layers=plan.layers, batch_size=plan.batch_size
    )
    sparsity, strength = point["sparsity"], point["strength"]
    extract_pair(extractor, plan, stats, (persona.name, persona.opposite), sparsity, strength)
    extractor.extract({"random": None}, "random", sparsity, seed=0, strength=strength)
    extractor.extract({"magnitude": None}, "magnitude", sparsity, strength=strength)
    neutral = stats["neutral"] if "neutral" in stats else neutral_calibration(plan.data_root)  # versus-neutral has it
    return extractor.extract({"neutral": neutral}, "wanda", sparsity, strength=strength)


def held_out_test(model: nn.Module, tokenizer: Any, plan: TunePlan, log: Log) -> dict[str, Any]:
    """The chosen adapters, the prompts and the controls on the held-out test split, every format of the persona,
    with paired bootstrap CIs (``vs_reference`` holds persona mask vs opposite mask, i.e. the switch effect)."""
    conditions = [c for c in CONDITIONS if c.name in TEST_CONDITIONS]
    passages = neutral_texts(plan.data_root, "eval", plan.nll_passages) if plan.nll_passages else []
    test_plan = harness.EvalPlan(
        [plan.persona], plan.data_root, plan.n_test, plan.seed, conditions, plan.batch_size, passages, split="test"
    )
    return harness.run(model, tokenizer, test_plan, log=log)


def control_scores(scorer: Scorer, base: dict[str, float]) -> dict[str, Any]:
    """The controls' validation margin shift and NLL cost, for the Pareto plot."""
    result = {}
    for name in CONTROLS:
        margin = scorer.margin(name)
        result[name] = {"margin": margin, "shift": margin - base["margin"], "cost": scorer.nll(name) - base["nll"]}
    return result


def tune(
    model: nn.Module, tokenizer: Any, plan: TunePlan, out_dir: Path, log: Log = harness.to_stderr, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The whole search: grid on validation (resumable), choice under the NLL budget, controls, held-out test.
    Writes ``out_dir/state.json`` as it goes; returns the model holding the chosen and control adapters, and the
    results (also ``out_dir/tune.json``)."""
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    statistics = Statistics(model, tokenizer, plan)
    model, state = run_grid(model, tokenizer, plan, out_dir / "state.json", log, statistics, progress)
    points = list(state["points"].values())
    chosen, within = choose(points, plan.objective, plan.nll_budget)
    model = final_adapters(model, tokenizer, plan, statistics.get(), chosen)
    scorer = Scorer(model, tokenizer, plan)
    results = {
        "plan": {f.name: getattr(plan, f.name) for f in fields(plan) if f.name not in ("persona", "data_root")},
        "persona": {
            "name": plan.persona.name,
            "opposite": plan.persona.opposite,
            "source": plan.persona.source,
            "prompt": plan.persona.prompt,
            "opposite_prompt": plan.persona.opposite_prompt,
        },
        "format": plan.format,
        "reference": state["reference"],
        "points": points,
        "pareto": [point_key(p) for p in pareto_front(points, plan.objective)],
        "chosen": chosen,
        "chosen_within_budget": within,
        "controls": control_scores(scorer, state["reference"]["base"]),
        "test": held_out_test(model, tokenizer, plan, log),
    }
    results["runtime_s"] = time.time() - start
    atomic.write_json(out_dir / "tune.json", results, indent=1)
    return model, results
