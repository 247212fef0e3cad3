"""PNG plots of a run (matplotlib, Agg backend): per-condition accuracy and margin with CI bars, per-layer masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tune import point_key


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, labels: list[str], values: list[float], lows: list[float], highs: list[float], title: str) -> None:
    errors = [
        [v - lo for v, lo in zip(values, lows, strict=True)],
        [hi - v for v, hi in zip(values, highs, strict=True)],
    ]
    ax.barh(range(len(values)), values, xerr=errors, color="#4878a8", ecolor="black", capsize=2)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def conditions_plot(results: dict[str, Any], path: Path) -> None:
    """One row per persona and format: accuracy (choice formats) and margin per condition with 95% CI bars."""
    plt = _pyplot()
    panels = [(p, f, b) for p, e in results["personas"].items() for f, b in e["formats"].items() if b["conditions"]]
    fig, axes = plt.subplots(max(1, len(panels)), 2, figsize=(11, 2.2 * max(1, len(panels))), squeeze=False)
    for row, (persona, fmt, block) in enumerate(panels):
        names = list(block["conditions"])
        values = [block["conditions"][n] for n in names]
        left, right = axes[row]
        if fmt == "statement":
            left.axis("off")
            left.text(0.5, 0.5, f"{persona} / statement:\nno choice, margin only", ha="center", va="center", fontsize=8)
        else:
            acc = [v["accuracy"] for v in values]
            _bars(
                left,
                names,
                [a["accuracy"] * 100 for a in acc],
                [a["ci_low"] * 100 for a in acc],
                [a["ci_high"] * 100 for a in acc],
                f"{persona} / {fmt}: accuracy %",
            )
            left.axvline(50, color="grey", lw=0.8, ls="--")
        key = "diff" if fmt == "statement" else "margin"
        margins = [v["margin"] for v in values]
        _bars(
            right,
            names,
            [m[key] for m in margins],
            [m["ci_low"] for m in margins],
            [m["ci_high"] for m in margins],
            f"{persona} / {fmt}: margin (nats/token)",
        )
        right.axvline(0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mask_layers_plot(results: dict[str, Any], path: Path) -> None:
    """Per-block mask density of every adapter, and per-block persona/opposite difference rate."""
    plt = _pyplot()
    masks = results["masks"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    for name, value in masks["density"].items():
        blocks = list(value["per_block"])
        top.plot(range(len(blocks)), list(value["per_block"].values()), marker=".", label=name)
    top.set_title("mask density per transformer block", fontsize=9)
    top.set_xlabel("block")
    top.legend(fontsize=6, ncol=3)
    for name, value in masks["persona_vs_opposite"].items():
        rates = value["per_block_difference_rate"]
        bottom.plot(range(len(rates)), list(rates.values()), marker=".", label=f"{name} vs opposite")
    for name, value in masks["persona_vs_control"].items():
        rates = value["per_block_difference_rate"]
        bottom.plot(range(len(rates)), list(rates.values()), ls=":", label=f"{name} vs random")
    bottom.set_title("difference rate per transformer block", fontsize=9)
    bottom.set_xlabel("block")
    bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``conditions.png`` and, if the run had adapters, ``mask_layers.png`` into ``out``."""
    written = [Path(out) / "conditions.png"]
    conditions_plot(results, written[0])
    if results.get("masks"):
        written.append(Path(out) / "mask_layers.png")
        mask_layers_plot(results, written[1])
    return written


def pareto_plot(results: dict[str, Any], path: Path) -> None:
    """Validation objective against NLL cost for every grid point, the Pareto front, the chosen point, the prompt
    baseline (no weight change: cost 0) and the controls at the chosen point's settings."""
    plt = _pyplot()
    objective = results["plan"]["objective"]
    points, chosen = results["points"], results["chosen"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for target, marker in (("mlp", "o"), ("attention", "^"), ("all", "s")):
        mine = [p for p in points if p["target"] == target]
        if mine:
            scatter = ax.scatter(
                [p["cost"] for p in mine],
                [p[objective] for p in mine],
                c=[p["strength"] for p in mine],
                cmap="viridis",
                vmin=0,
                vmax=1,
                marker=marker,
                s=[20 + 60 * p["sparsity"] for p in mine],
                label=f"grid, target {target}",
            )
    if points:
        fig.colorbar(scatter, ax=ax, label="strength")
    front = [p for p in points if point_key(p) in set(results["pareto"])]
    front.sort(key=lambda p: p["cost"])
    ax.plot([p["cost"] for p in front], [p[objective] for p in front], color="black", lw=1, label="Pareto front")
    ax.scatter([chosen["cost"]], [chosen[objective]], marker="*", s=220, color="red", label="chosen", zorder=5)
    ax.set_xscale("symlog", linthresh=0.1)  # the budget region stays readable next to the broken points
    ax.axvline(results["plan"]["nll_budget"], color="grey", ls="--", lw=1, label="NLL budget")
    ax.axhline(0, color="grey", lw=0.5)
    reference = results["reference"]
    if "persona prompt" in reference:
        ax.scatter(
            [0],
            [reference["persona prompt"]["margin"] - reference["base"]["margin"]],
            marker="P",
            s=90,
            color="tab:orange",
            label="persona prompt (shift)",
            zorder=4,
        )
    for name, value in results.get("controls", {}).items():
        ax.scatter([value["cost"]], [value["shift"]], marker="x", s=60, label=f"{name} control (shift)", zorder=4)
    ax.set_xlabel("NLL cost on neutral text (nats/token vs base; linear below 0.1, log above)")
    ax.set_ylabel(f"validation {objective} (nats/token)")
    ax.set_title(f"{results['persona']['name']} / {results['format']}: tune grid", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
