"""One comparison run for one persona: which arms, on which grids, at which sizes; used by ``peft-persona
compare`` and ``benchmarks/compare_methods.py``."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .arms import RECIPES, CaaArm, Host, LoraArm, MaskArm, PromptArm, Statistics
from .compare import Budget, Log, State, run_arms, splits
from .compare_report import recorded_commands
from .finetune import LoraBudget
from .items import Persona, calibration_texts, neutral_calibration
from .steering import decoder_blocks, default_layers

BASELINES = ("prompt", "caa", "lora")
ARMS: tuple[str, ...] = (
    *BASELINES,
    *(f"mask:{r}" for r in RECIPES),
    *(f"prompt+mask:{r}" for r in RECIPES),
)
DEFAULT_ARMS = (
    "prompt",
    "caa",
    "lora",
    "mask:wanda",
    "mask:contrastive",
    "mask:contrastive-sigmoid",
    "mask:contrastive-channel",
    "mask:difference",
    "mask:versus-neutral",
    "prompt+mask:contrastive",
)


@dataclass(frozen=True)
class ComparisonPlan:
    """What a comparison runs. ``bands`` adds the early/middle/late thirds of the blocks to every mask grid."""

    arms: tuple[str, ...] = DEFAULT_ARMS
    targets: tuple[str, ...] = ("all",)
    sparsities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35)
    strengths: tuple[float, ...] = (0.5, 1.0)
    bands: bool = False
    caa_coefficients: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    lora_steps: int = 30
    n_validation: int | None = 40
    n_test: int | None = 100
    nll_passages: int = 8
    max_calibration: int = 100
    nll_budget: float = 0.2
    batch_size: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")

    def fingerprint(self, model: str, persona: str) -> str:
        """What the scores depend on besides the grids (a grid may grow between runs; its points are kept)."""
        keys = ("n_validation", "n_test", "nll_passages", "max_calibration", "batch_size", "seed", "lora_steps")
        text = json.dumps([model, persona, *(getattr(self, k) for k in keys)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibration_sets(data_root: Path | None, persona: Persona, limit: int) -> dict[str, list]:
    """The persona's and the opposite's calibration texts (at most ``limit`` each, seeded), and neutral texts."""
    trait, opposite = calibration_texts(data_root, persona)
    rng = random.Random(0)
    return {
        "persona": rng.sample(trait, min(limit, len(trait))),
        "opposite": rng.sample(opposite, min(limit, len(opposite))),
        "neutral": neutral_calibration(data_root),
    }


def build_arms(
    plan: ComparisonPlan,
    host: Host,
    persona: Persona,
    texts: dict[str, list],
    lora_folder: Path,
    base_factory: Callable[[], nn.Module],
) -> list[Any]:
    """The plan's arms over one host model, in the plan's order."""
    from ..targets import decoder_linear_modules

    layers = ("all", "early", "middle", "late") if plan.bands else ("all",)
    grid = {"targets": plan.targets, "layers": layers, "sparsities": plan.sparsities, "strengths": plan.strengths}
    statistics = Statistics(host, texts, layers=None, batch_size=plan.batch_size)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in decoder_linear_modules(host.model)})
    made: dict[str, Callable[[], Any]] = {
        "prompt": lambda: PromptArm(host, persona),
        "caa": lambda: CaaArm(host, texts, default_layers(len(decoder_blocks(host.model))), plan.caa_coefficients),
        "lora": lambda: LoraArm(
            host,
            texts,
            leaves,
            lora_folder,
            base_factory,
            LoraBudget(steps=plan.lora_steps, batch_size=plan.batch_size),
        ),
    }
    arms = []
    for name in plan.arms:
        if name in made:
            arms.append(made[name]())
        else:
            family, recipe = name.split(":")
            arms.append(MaskArm(host, RECIPES[recipe], statistics, persona, grid, prompted=family == "prompt+mask"))
    return arms


def run_comparison(
    model: nn.Module,
    tokenizer: Any,
    persona: Persona,
    data_root: Path | None,
    plan: ComparisonPlan,
    out: Path,
    model_name: str,
    log: Log,
    progress: bool = True,
    command: Sequence[str] = (),
    lora_cache: Path | None = None,
    base_factory: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``plan`` for ``persona`` on ``model``; the state is ``out/<persona>.json``, the trained LoRAs
    are kept under ``lora_cache`` (default ``out/lora``). The LoRA arm trains and scores on fresh copies of the base
    from ``base_factory`` (say, a reload from disk); by default, copies of a copy of ``model`` taken now, before any
    arm has touched it (made only when the plan has a LoRA arm: it holds one more copy of the weights)."""
    out.mkdir(parents=True, exist_ok=True)
    if base_factory is None and "lora" in plan.arms:
        pristine = copy.deepcopy(model)
        base_factory = lambda: copy.deepcopy(pristine)  # noqa: E731
    host = Host(model, tokenizer)
    state = State(out / f"{persona.name}.json", plan.fingerprint(model_name, persona.name))
    state.data["settings"] = merged_settings(state.data.get("settings", {}), model_name, plan, " ".join(command))
    texts = calibration_sets(data_root, persona, plan.max_calibration)
    data = splits(persona, data_root, plan.n_validation, plan.n_test, plan.nll_passages, plan.seed)
    lora_folder = (lora_cache or out / "lora") / persona.name
    arms = build_arms(plan, host, persona, texts, lora_folder, base_factory or _no_base)
    return run_arms(arms, host.side(), tokenizer, data, state, Budget(plan.nll_budget, plan.batch_size), log, progress)


def _no_base() -> nn.Module:
    raise AssertionError("only the LoRA arm asks for a fresh base model")


def merged_settings(previous: dict[str, Any], model_name: str, plan: ComparisonPlan, command: str) -> dict[str, Any]:
    """A state's settings after one more run into it: this run's plan with the arms of every run so far (in order),
    and every command that scored into it (a state written before ``commands`` existed kept one ``command``)."""
    commands = recorded_commands(previous)
    if command and command not in commands:
        commands.append(command)
    arms = list(dict.fromkeys([*previous.get("plan", {}).get("arms", []), *plan.arms]))
    return {"model": model_name, "plan": {**asdict(plan), "arms": arms}, "commands": commands}
