"""Does a persona mask beat the alternatives? Every method at its best validation point under one NLL budget,
scored on held-out test items, per model and persona (``peft-persona compare``'s engine); the states under
docs/results/comparison/<model>/, the page in docs/results/comparison.md.

    python benchmarks/compare_methods.py --model smollm2-135m-instruct --personas extraversion,agreeableness
    python benchmarks/compare_methods.py --render-only

Resumable: each (model, persona) keeps a state file rewritten after every scored point; a rerun scores only what is
missing. Trained LoRAs are cached under ~/.cache/peft-persona/comparison. Reads the data sets from --data-root
(default ../shared/data).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from peft_persona.eval import compare_report  # noqa: E402
from peft_persona.eval.comparison import ComparisonPlan, run_comparison  # noqa: E402
from peft_persona.eval.harness import to_stderr  # noqa: E402
from peft_persona.eval.items import PERSONAS  # noqa: E402
from peft_persona.models import cache_dir, load_model  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "comparison"
INTRO = ROOT / "benchmarks" / "comparison_intro.md"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or local path")
    p.add_argument("--personas", default="extraversion,agreeableness,desire-for-acquiring-power")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the state files (one folder per model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render-only", action="store_true", help="only rewrite the page from the state files")
    for field in fields(ComparisonPlan):  # every plan field as --name, comma-separated for tuples
        kind = type(field.default)
        if kind is tuple:
            convert = (
                (lambda v: tuple(float(x) for x in v.split(",")))
                if field.name not in ("arms", "targets")
                else (lambda v: tuple(v.split(",")))
            )
            p.add_argument(f"--{field.name.replace('_', '-')}", type=convert, default=field.default)
        elif kind is bool:
            p.add_argument(f"--{field.name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(
                f"--{field.name.replace('_', '-')}", type=int if kind is int else float, default=field.default
            )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    plan = ComparisonPlan(**{f.name: getattr(args, f.name) for f in fields(ComparisonPlan)})
    slug = Path(args.model).name.lower()
    words, skip = [], False  # the command as run from the repository root, where the defaults of both are right
    for word in sys.argv[1:]:
        if skip or word.startswith(("--results", "--data-root")):
            skip = not skip and "=" not in word and word in ("--results", "--data-root")
            continue
        words.append(word)
    command = ["python", "benchmarks/compare_methods.py", *words]
    for name in args.personas.split(","):
        model, tokenizer = load_model(args.model)
        run_comparison(
            model,
            tokenizer,
            PERSONAS[name],
            args.data_root,
            plan,
            args.results / slug,
            args.model,
            to_stderr,
            command=command,
            lora_cache=cache_dir() / "comparison" / slug,
            base_factory=lambda: load_model(args.model)[0],  # a reload, not a copy held in memory beside the model
        )
        del model, tokenizer  # freed before the next persona's load: two 1.5B copies at once reached 23.5 GB
        gc.collect()


def render(results: Path) -> Path:
    """Rewrite ``comparison.md`` beside ``results`` from the intro and every model's state files."""
    lines = INTRO.read_text().rstrip().splitlines()
    models = {
        folder.name: states
        for folder in sorted(p for p in results.iterdir() if p.is_dir())
        if (states := compare_report.load_model_states(folder))
    }
    lines += [
        "",
        "## Headline",
        "",
        "Held-out statement switch (nats/token, 95% CI) of each method at its chosen point; the best mask alone is the "
        "recipe with the largest switch among those passing the verdict rule, else among those within the budget.",
        "",
        *compare_report.headline(models),
    ]
    for name, personas in models.items():
        folder = results / name
        plot = compare_report.pareto_plot(personas, folder.name, folder / "pareto.png")
        commands = compare_report.commands(personas)
        lines += [
            "",
            f"## {folder.name}",
            "",
            *compare_report.table(personas),
            "",
            *compare_report.verdict_lines(personas),
        ]
        for persona, state in personas.items():
            missing = [a for a in state.get("settings", {}).get("plan", {}).get("arms", []) if a not in state["test"]]
            if missing:
                lines += [
                    "",
                    f"Not finished for {persona} (run stopped; rerun the command to resume): {', '.join(missing)}.",
                ]
        lines += [
            "",
            "Produced by:",
            "",
            "```",
            *commands,
            "```",
            "",
            f"![{folder.name}]({plot.relative_to(results.parent)})",
        ]
    out = results.parent / "comparison.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    arguments = parse(None)
    if not arguments.render_only:
        run(arguments)
    print(render(arguments.results))
    print(shlex.join(sys.argv))
