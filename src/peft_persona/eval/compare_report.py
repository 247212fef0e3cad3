"""The comparison page: a headline across models, one table per model (every arm at its chosen point, held-out
scores with CIs), the verdict rule, and one Pareto plot per model (validation switch against NLL cost, every point of
every arm)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PRIMARY = "statement"  # the verdict's format: held-out persona statements carry no Yes/No answer bias
BUDGET = 0.2


def ci(value: Mapping[str, float] | None, digits: int = 3) -> str:
    """``+0.123 [+0.010, +0.240]``, or ``-`` for a missing value."""
    if not value:
        return "-"
    return f"{value['mean']:+.{digits}f} [{value['ci_low']:+.{digits}f}, {value['ci_high']:+.{digits}f}]"


def _knobs(knobs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in knobs.items()) or "-"


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{int(n)} B"


def moves_persona(tested: Mapping[str, Any], fmt: str = PRIMARY, budget: float = BUDGET) -> bool:
    """The verdict rule for a mask arm: held-out switch CI above 0, above the neutral-Wanda control, within budget."""
    entry = tested["formats"].get(fmt, {})
    switch, neutral = entry.get("switch"), entry.get("vs neutral Wanda")
    return bool(switch and neutral and switch["ci_low"] > 0 and neutral["ci_low"] > 0 and tested["cost"] <= budget)


def table(personas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of every persona's arms at their chosen points."""
    rows = [
        "| persona | method | chosen (validation) | switch, statements [95% CI] | vs neutral Wanda, statements | "
        "switch, yes/no balanced | balanced acc. persona / opposite / base | answer-bias shift | both halves | "
        "NLL cost | size | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for persona, state in personas.items():
        for arm, tested in state["test"].items():
            statement, yes_no = tested["formats"].get("statement", {}), tested["formats"].get("yes_no", {})
            accuracy = "-"
            if yes_no.get("balanced_accuracy") is not None:
                accuracy = " / ".join(
                    f"{yes_no[k]:.2f}"
                    for k in ("balanced_accuracy", "opposite_balanced_accuracy", "base_balanced_accuracy")
                )
            budget_note = "" if tested["within_budget"] else " (none within budget: cheapest)"
            rows.append(
                f"| {persona} | {arm} | {_knobs(tested['knobs'])}{budget_note} | {ci(statement.get('switch'))} | "
                f"{ci(statement.get('vs neutral Wanda'))} | {ci(yes_no.get('switch'))} | {accuracy} | "
                f"{yes_no.get('answer_bias_shift', 0):+.2f} | {'yes' if yes_no.get('moves_both') else 'no'} | "
                f"{tested['cost']:+.3f} | {_size(tested['bytes'])} | {tested['seconds']:.0f} |"
            )
    return rows


def verdict(personas: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Per mask arm, the personas it was tested on (``tested``) and those on which it moves the persona by
    :func:`moves_persona` (``moved``)."""
    found: dict[str, dict[str, list[str]]] = {}
    for persona, state in personas.items():
        budget = _budget(state)
        for arm, tested in state["test"].items():
            if "mask:" in arm:
                entry = found.setdefault(arm, {"tested": [], "moved": []})
                entry["tested"].append(persona)
                if moves_persona(tested, budget=budget):
                    entry["moved"].append(persona)
    return found


def _budget(state: Mapping[str, Any]) -> float:
    return state.get("settings", {}).get("plan", {}).get("nll_budget", BUDGET)


def _headline_cell(tested: Mapping[str, Any] | None) -> str:
    if not tested:
        return "-"
    cell = ci(tested["formats"].get(PRIMARY, {}).get("switch"), digits=2)
    return cell if tested["within_budget"] else f"{cell} (cost {tested['cost']:+.2f}, over budget)"


def best_mask(state: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The mask arm alone (no prompt) to show for one persona: the one with the largest held-out statement switch
    among those passing :func:`moves_persona`, else among those within the budget; ``None`` if no mask arm ran."""
    masks = {a: t for a, t in state["test"].items() if a.startswith("mask:")}
    passing = {a: t for a, t in masks.items() if moves_persona(t, budget=_budget(state))}
    pool = passing or {a: t for a, t in masks.items() if t["within_budget"]} or masks
    if not pool:
        return None
    return max(pool.items(), key=lambda item: _switch_mean(item[1]))


def _switch_mean(tested: Mapping[str, Any]) -> float:
    return (tested["formats"].get(PRIMARY, {}).get("switch") or {}).get("mean", float("-inf"))


def headline(models: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """One row per model and persona: the held-out statement switch of the prompt, CAA, LoRA and the best mask alone
    (:func:`best_mask`) at their chosen points, and whether that mask passes the verdict rule."""
    rows = [
        "| model | persona | prompt | CAA | LoRA | best mask alone | mask passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, personas in models.items():
        for persona, state in personas.items():
            tests = state["test"]
            mask = best_mask(state)
            mask_cell = "-" if mask is None else f"{mask[0].removeprefix('mask:')}: {_headline_cell(mask[1])}"
            passes = mask is not None and moves_persona(mask[1], budget=_budget(state))
            rows.append(
                f"| {model} | {persona} | {_headline_cell(tests.get('prompt'))} | {_headline_cell(tests.get('caa'))} | "
                f"{_headline_cell(tests.get('lora'))} | {mask_cell} | {'yes' if passes else 'no'} |"
            )
    return rows


def load_model_states(folder: Path) -> dict[str, dict[str, Any]]:
    """``{persona: state}`` of the ``<persona>.json`` state files in one model's folder."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def pareto_plot(personas: Mapping[str, Mapping[str, Any]], title: str, out: Path) -> Path:
    """Validation switch against NLL cost for every point of every arm, one panel per persona."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(personas), figsize=(5 * len(personas), 4), squeeze=False)
    arms = sorted({v["arm"] for state in personas.values() for v in state["validation"].values()})
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    for ax, (persona, state) in zip(axes[0], personas.items(), strict=True):
        for arm in arms:
            points = [v for v in state["validation"].values() if v["arm"] == arm]
            ax.scatter([p["cost"] for p in points], [p["switch"] for p in points], s=14, color=colours[arm], label=arm)
        ax.axvline(BUDGET, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("symlog", linthresh=0.05)
        ticks = [
            t
            for t in (-0.05, 0, 0.05, 0.2, 1, 5, 20)
            if t <= max([0.2] + [v["cost"] for v in state["validation"].values()]) * 4
        ]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(title=persona, xlabel="NLL cost (nats/token, symlog)", ylabel="validation switch (nats/token, balanced)")
    axes[0][-1].legend(fontsize=6, loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def verdict_lines(personas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per mask arm: on which personas it moves the persona by :func:`moves_persona`."""
    return [
        f"- {arm}: moves the persona on {len(v['moved'])} of the {len(v['tested'])} tested "
        f"({', '.join(v['moved']) or 'none'})"
        for arm, v in verdict(personas).items()
    ]


def commands(personas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every command that scored into these states, in first-seen order (a state may hold several runs' arms)."""
    seen: dict[str, None] = {}
    for state in personas.values():
        seen.update(dict.fromkeys(recorded_commands(state.get("settings", {}))))
    return list(seen)


def recorded_commands(settings: Mapping[str, Any]) -> list[str]:
    """The commands one state's settings record (a state written before ``commands`` existed kept one ``command``)."""
    return list(settings.get("commands", [settings["command"]] if settings.get("command") else []))


def persona_page(personas: Mapping[str, Mapping[str, Any]], command: str) -> str:
    """The Markdown report of one ``compare`` run (one model, one or more personas): ``command``, and any earlier
    command whose results the states hold."""
    lines = [
        "# Persona masks against the alternatives",
        "",
        "Each method at its best validation point within the NLL budget (nats/token), scored once on test "
        "items. A mask recipe moves the persona when its held-out statement switch CI lies above 0, it beats the "
        "neutral-Wanda control (CI above 0) and its cost is within the budget.",
        "",
        *table(personas),
        "",
        *verdict_lines(personas),
        "",
        "Produced by:",
        "",
        "```",
        *[c for c in commands(personas) if c != command],
        command,
        "```",
    ]
    return "\n".join(lines) + "\n"
