"""Does a persona mask beat the alternatives? Every method at its best validation point under one NLL budget,
scored on held-out test items; results per model and persona under docs/results/comparison/, the page in
docs/results/comparison.md.

    python benchmarks/compare_methods.py --model smollm2-135m-instruct --personas extraversion,agreeableness
    python benchmarks/compare_methods.py --render-only

Resumable: each (model, persona) keeps a state file rewritten after every scored point; a rerun scores only what is
missing. LoRA adapters are cached under ~/.cache/peft-persona/comparison. Reads the data sets from --data-root
(default ../shared/data).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from peft_persona.eval import compare, compare_report  # noqa: E402
from peft_persona.eval.arms import RECIPES, CaaArm, Host, LoraArm, MaskArm, PromptArm, Statistics  # noqa: E402
from peft_persona.eval.finetune import LoraBudget  # noqa: E402
from peft_persona.eval.items import PERSONAS, calibration_texts, neutral_texts  # noqa: E402
from peft_persona.eval.steering import decoder_blocks, default_layers  # noqa: E402
from peft_persona.models import cache_dir, load_model  # noqa: E402
from peft_persona.targets import decoder_linear_modules  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "comparison"
ARMS = (
    "prompt",
    "caa",
    "lora",
    "mask:wanda",
    "mask:contrastive",
    "mask:contrastive-softplus",
    "mask:versus-neutral",
    "prompt+mask:contrastive",
)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or local path")
    p.add_argument("--personas", default="extraversion,agreeableness,desire-for-acquiring-power")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--sparsities", type=floats, default=(0.05, 0.1, 0.2, 0.35))
    p.add_argument("--strengths", type=floats, default=(0.5, 1.0))
    p.add_argument("--targets", default="all,mlp")
    p.add_argument("--caa-coefficients", type=floats, default=(1.0, 2.0, 4.0, 8.0))
    p.add_argument("--lora-steps", type=int, default=30)
    p.add_argument("--n-validation", type=int, default=40)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--nll-passages", type=int, default=8)
    p.add_argument("--max-calibration", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the state files (one folder per model)")
    p.add_argument("--render-only", action="store_true", help="only rewrite docs/results/comparison.md")
    return p.parse_args(argv)


def texts_for(args: argparse.Namespace, persona) -> dict[str, list]:
    trait, opposite = calibration_texts(args.data_root, persona)
    rng = random.Random(0)
    return {
        "persona": rng.sample(trait, min(args.max_calibration, len(trait))),
        "opposite": rng.sample(opposite, min(args.max_calibration, len(opposite))),
        "neutral": neutral_texts(args.data_root, "calibration", 50, per_passage=4),
    }


def build_arms(args: argparse.Namespace, host: Host, persona, texts: dict[str, list], slug: str, pristine) -> list:
    grid = {"targets": tuple(args.targets.split(",")), "sparsities": args.sparsities, "strengths": args.strengths}
    statistics = Statistics(host, texts, layers=None, batch_size=args.batch_size)
    n_blocks = len(decoder_blocks(host.model))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in decoder_linear_modules(host.model)})
    lora_folder = cache_dir() / "comparison" / slug / persona.name / "lora"
    made = {
        "prompt": lambda: PromptArm(host, persona),
        "caa": lambda: CaaArm(host, texts, default_layers(n_blocks), args.caa_coefficients),
        "lora": lambda: LoraArm(
            host,
            texts,
            leaves,
            lora_folder,
            lambda: copy.deepcopy(pristine),
            LoraBudget(steps=args.lora_steps, batch_size=args.batch_size),
        ),
    }
    arms = []
    for name in args.arms.split(","):
        if name in made:
            arms.append(made[name]())
        else:
            family, recipe = name.split(":")
            arms.append(MaskArm(host, RECIPES[recipe], statistics, persona, grid, prompted=family == "prompt+mask"))
    return arms


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    slug = Path(args.model).name.lower()
    folder = args.results / slug
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.personas.split(","):
        persona = PERSONAS[name]
        model, tokenizer = load_model(args.model)
        pristine = copy.deepcopy(model)  # the LoRA arm trains and merges on copies of it
        host = Host(model, tokenizer)
        settings = [
            slug,
            name,
            args.n_validation,
            args.n_test,
            args.nll_passages,
            args.max_calibration,
            args.batch_size,
        ]
        state = compare.State(folder / f"{name}.json", hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16])
        state.data["settings"] = {"command": "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:])}
        data = compare.splits(persona, args.data_root, args.n_validation, args.n_test, args.nll_passages, seed=1)
        arms = build_arms(args, host, persona, texts_for(args, persona), slug, pristine)
        compare.run_arms(arms, host.side(), tokenizer, data, state, compare.Budget(0.2, args.batch_size))


def render(results: Path) -> Path:
    """Rewrite ``comparison.md`` beside ``results`` from its intro and every model's state files."""
    lines = [line.rstrip() for line in (ROOT / "benchmarks" / "comparison_intro.md").read_text().splitlines()]
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        personas = compare_report.load_model_states(folder)
        if not personas:
            continue
        plot = compare_report.pareto_plot(personas, folder.name, folder / "pareto.png")
        lines += ["", f"## {folder.name}", "", *compare_report.table(personas), ""]
        for arm, moved in compare_report.verdict(personas).items():
            lines.append(
                f"- {arm}: moves the persona (rule above) on {len(moved)} of {len(personas)}: {moved or 'none'}"
            )
        commands = sorted({s.get("settings", {}).get("command", "") for s in personas.values()})
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
