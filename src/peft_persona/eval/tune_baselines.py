"""Baselines beside a ``tune`` run: arms of ``peft-persona compare`` (a CAA steering vector, a LoRA, the prompt with a
mask, other mask recipes) on the same persona, item counts, seed, NLL budget and grid, each at its best validation
point within the budget and scored once on the test items. They run on the plain model before the mask grid; their
state is ``<out>/baselines/<persona>.json``, so a rerun resumes them too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .compare_report import table
from .comparison import ARMS, ComparisonPlan, run_comparison
from .report import ci_text
from .tune import Log, TunePlan


def check_arms(arms: Sequence[str]) -> tuple[str, ...]:
    """The arms, each one ``peft-persona compare`` knows; raise naming the unknown ones."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--baselines: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return tuple(arms)


def baseline_plan(plan: TunePlan, arms: Sequence[str]) -> ComparisonPlan:
    """The comparison plan that scores ``arms`` under ``plan``'s budget, items, seed and mask grid."""
    return ComparisonPlan(
        arms=tuple(arms),  # ComparisonPlan checks them
        targets=plan.targets,
        sparsities=plan.sparsities,
        strengths=plan.strengths,
        n_validation=plan.n_validation,
        n_test=plan.n_test,
        nll_passages=plan.nll_passages,
        max_calibration=plan.max_calibration,
        nll_budget=plan.nll_budget,
        batch_size=plan.batch_size,
        seed=plan.seed,
    )


def run_baselines(
    model: nn.Module,
    tokenizer: Any,
    plan: TunePlan,
    arms: Sequence[str],
    out: Path,
    model_name: str,
    log: Log,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``arms`` (resuming from ``out/baselines``); returns each arm's chosen point and its test scores."""
    state = run_comparison(
        model,
        tokenizer,
        plan.persona,
        plan.data_root,
        baseline_plan(plan, arms),
        Path(out) / "baselines",
        model_name,
        log,
        progress,
        lora_cache=Path(out) / "baselines" / "lora",
    )
    return {"arms": list(arms), "test": {arm: state["test"][arm] for arm in arms}}


def baselines_section(results: dict[str, Any]) -> list[str]:
    """The report's baselines table, with the tuned mask's own held-out switch on the same test items beside it."""
    baselines = results.get("baselines")
    if not baselines:
        return []
    name = results["persona"]["name"]
    mask = []
    for fmt, block in results["test"]["personas"][name]["formats"].items():
        versus = block.get("vs_reference", {}).get("persona mask", {}).get("opposite mask")
        if versus:
            mask.append(f"{fmt} {ci_text(versus['margin'], 'diff', digits=3)}")
    return [
        "## Baselines (same items, seed and NLL budget)",
        "",
        "Each arm of `peft-persona compare` at its best validation point within the budget (chosen by the balanced "
        "switch: persona side minus opposite side, averaged over the two answer halves), scored once on the test "
        "items. The tuned mask's own held-out switch (persona mask minus opposite mask): "
        + ("; ".join(mask) or "not measured")
        + ".",
        "",
        *table({name: baselines}),
        "",
    ]
