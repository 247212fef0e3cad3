"""The Markdown report of a ``tune`` run: grid, Pareto front, chosen point, held-out test against the controls and
(with ``--baselines``) the baselines."""

from __future__ import annotations

from typing import Any

from .report import ci_text, format_table, p_text, reference_table
from .tune import point_key
from .tune_baselines import baselines_section


def verdict(results: dict[str, Any]) -> list[str]:
    """Plain sentences: did the chosen persona mask beat each control, and switch against its opposite, on test?"""
    lines = []
    for fmt, block in results["test"]["personas"][results["persona"]["name"]]["formats"].items():
        tests = block.get("vs_reference", {}).get("persona mask", {})
        for ref in ("opposite mask", "magnitude mask", "neutral Wanda mask", "random mask", "base"):
            if ref in tests:
                margin = tests[ref]["margin"]
                word = (
                    "higher than"
                    if margin["diff"] > 0 and margin["p_value"] < 0.05
                    else "lower than"
                    if margin["diff"] < 0 and margin["p_value"] < 0.05
                    else "not distinguishable from"
                )
                lines.append(
                    f"- {fmt}: persona-mask margin is {word} the {ref}'s: Δ {ci_text(margin, 'diff', digits=3)}, "
                    f"p {p_text(margin['p_value'])}."
                )
    return lines


def grid_table(results: dict[str, Any]) -> list[str]:
    pareto, chosen = set(results["pareto"]), point_key(results["chosen"])
    rows = [
        "| target | sparsity | strength | persona margin | shift | switch | NLL cost | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(results["points"], key=lambda p: (p["target"], p["sparsity"], p["strength"])):
        mark = "chosen" if point_key(p) == chosen else "Pareto" if point_key(p) in pareto else ""
        rows.append(
            f"| {p['target']} | {p['sparsity']:g} | {p['strength']:g} | {p['persona_margin']:+.3f} | "
            f"{p['shift']:+.3f} | {p['switch']:+.3f} | {p['cost']:+.3f} | {mark} |"
        )
    return rows


def render(results: dict[str, Any], command: str = "") -> str:
    """The whole report."""
    persona, plan = results["persona"], results["plan"]
    out = [f"# tune: {persona['name']} (opposite {persona['opposite']})", ""]
    if command:
        out += ["Produced by:", "", "```", command, "```", ""]
    out += [
        f"Runtime {results['runtime_s'] / 60:.1f} min. Method {plan['method']}; validation format "
        f"`{results['format']}`, {plan['n_validation'] or 'all'} items; objective `{plan['objective']}`; NLL budget "
        f"+{plan['nll_budget']:g} nats/token over {plan['nll_passages']} neutral passages.",
        "",
    ]
    out += chosen_section(results) + held_out_section(results) + baselines_section(results)
    out += [
        "## Grid (validation)",
        "",
        "Pareto plot: `pareto.png`. Shift = persona-mask margin minus base margin; "
        "switch = persona-mask margin minus opposite-mask margin; cost = NLL of the worse of the two masks minus "
        "the base's.",
        "",
        *grid_table(results),
        "",
    ]
    return "\n".join(out)


def chosen_section(results: dict[str, Any]) -> list[str]:
    """The chosen point, the validation references and the controls at the chosen settings."""
    plan, chosen, reference = results["plan"], results["chosen"], results["reference"]
    out = ["## Chosen point", ""]
    budget = "within" if results["chosen_within_budget"] else "**no point was within** (the cheapest is shown)"
    out += [
        f"`{point_key(chosen)}`: shift {chosen['shift']:+.3f}, switch {chosen['switch']:+.3f}, NLL cost "
        f"{chosen['cost']:+.3f} nats/token ({budget} the budget).",
        "",
    ]
    if chosen[plan["objective"]] <= 0:
        out += [
            f"No grid point within the budget raised the validation {plan['objective']} above zero: the chosen "
            "point is the least harmful one, not a persona effect.",
            "",
        ]
    prompts = "".join(
        f"; {name} margin {reference[name]['margin']:+.3f}"
        for name in ("persona prompt", "opposite prompt")
        if name in reference
    )
    out += [
        "Validation references: base margin "
        f"{reference['base']['margin']:+.3f}, base NLL {reference['base']['nll']:.3f}{prompts}.",
        "",
    ]
    controls = results.get("controls", {})
    if controls:
        out += [
            "Controls at the chosen settings (validation): "
            + "; ".join(f"{n} shift {v['shift']:+.3f}, cost {v['cost']:+.3f}" for n, v in controls.items())
            + ".",
            "",
        ]
    return out


def held_out_section(results: dict[str, Any]) -> list[str]:
    """The held-out test at the chosen point: the verdict, per-format tables and the NLL on neutral text."""
    out = ["## Held-out test at the chosen point", "", *verdict(results), ""]
    for fmt, block in results["test"]["personas"][results["persona"]["name"]]["formats"].items():
        out += [f"### {fmt}", "", format_table(fmt, block), "", reference_table(fmt, block), ""]
    general = results["test"].get("general_ability", {})
    if general:
        out += [
            "NLL on neutral text (test run): "
            + "; ".join(f"{n} {v['corpus_nll']:.3f}" for n, v in general.items())
            + ".",
            "",
        ]
    return out


def card_report(results: dict[str, Any]) -> dict[str, Any]:
    """The scores a saved adapter's card shows: the chosen point on validation, and the held-out tests."""
    chosen, name = results["chosen"], results["persona"]["name"]
    rows = [
        {
            "split": "validation",
            "format": results["format"],
            "comparison": "chosen point",
            "value": f"{point_key(chosen)}: shift {chosen['shift']:+.3f}, switch {chosen['switch']:+.3f}, "
            f"NLL cost {chosen['cost']:+.3f}",
        }
    ]
    for fmt, block in results["test"]["personas"][name]["formats"].items():
        for ref, test in block.get("vs_reference", {}).get("persona mask", {}).items():
            rows.append(
                {
                    "split": "test",
                    "format": fmt,
                    "comparison": f"persona mask - {ref}",
                    "value": f"{ci_text(test['margin'], 'diff', digits=3)} (p {p_text(test['margin']['p_value'])})",
                }
            )
    return {
        "description": "Scores from `peft-persona tune` (margins in nats/token, 95% bootstrap CIs):",
        "results": rows,
    }
