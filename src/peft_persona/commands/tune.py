"""``peft-persona tune``: search sparsity x strength x target on a validation split, keep the best point under an NLL
budget, test it on held-out items against the controls, and save its adapters with the scores in their card."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .. import atomic
from ..options import DEFAULT_PHI, PHI_KINDS, STRUCTURES
from . import personas as persona_options
from . import preflight


def floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def arm_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated arms of ``peft-persona compare``."""
    from ..eval.tune_baselines import check_arms

    try:
        return check_arms([a.strip() for a in text.split(",") if a.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--baselines: ")) from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="find a sparsity, strength and target that move the persona within an NLL budget",
        description="Grid over sparsity x strength x target preset, scored on the validation split by persona margin "
        "and by NLL cost against the base; the best point under --nll-budget is tested once on held-out items "
        "against the controls. Writes tune.json, report.md, pareto.png and adapters/ (the chosen pair) to --out; "
        "rerun the same command to resume.",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Hub id, local path or embedded model name")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if it is a GGUF directory")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds a state.json)")
    add_search_options(parser)
    parser.add_argument("--nll-budget", type=float, default=0.2, help="largest NLL cost in nats/token (default 0.2)")
    parser.add_argument("--n-validation", type=int, default=40, help="validation items (default 40; 0: all)")
    parser.add_argument("--n-test", type=int, default=100, help="held-out test items per format (default 100; 0: all)")
    parser.add_argument("--nll-passages", type=int, default=16, help="neutral passages for the NLL cost (default 16)")
    parser.add_argument("--max-calibration", type=int, default=100, help="calibration texts per side (default 100)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed drawing the validation and test items")
    parser.add_argument(
        "--repo-id", default=None, help="Hub repo id named in the saved card (default peft-persona/NAME)"
    )
    parser.add_argument(
        "--baselines",
        type=arm_list,
        default=(),
        help="comma-separated arms of `peft-persona compare` scored beside the tuned mask on the same items, seed and "
        "budget, each at its best validation point (e.g. prompt,caa,lora,prompt+mask:contrastive; default none)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md and pareto.png from --out/tune.json; no model"
    )
    persona_options.add_arguments(parser, presets_default=None)
    parser.set_defaults(func=run)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """The grid and the recipe: sparsities, strengths, targets, layers, method, phi, structure, format, objective."""
    from ..eval.tune import TUNE_METHODS

    parser.add_argument(
        "--sparsities",
        type=floats,
        default=(0.05, 0.1, 0.2, 0.35, 0.5),
        help="comma-separated sparsities (default 0.05,0.1,0.2,0.35,0.5)",
    )
    parser.add_argument(
        "--strengths",
        type=floats,
        default=(0.25, 0.5, 1.0),
        help="comma-separated strengths in [0, 1] (default 0.25,0.5,1)",
    )
    parser.add_argument(
        "--targets", default="mlp,all", help="comma-separated target presets: mlp, attention, all (default mlp,all)"
    )
    parser.add_argument(
        "--layers", default=None, help="decoder blocks to mask, e.g. 8-23, or a band: early, middle, late (default all)"
    )
    parser.add_argument(
        "--method", default="contrastive", choices=TUNE_METHODS, help="mask recipe (default contrastive)"
    )
    parser.add_argument(
        "--phi", default=DEFAULT_PHI, choices=PHI_KINDS, help=f"contrastive channel weight (default {DEFAULT_PHI})"
    )
    parser.add_argument(
        "--structure", default="row", choices=STRUCTURES, help="row, or channel: whole input channels (default row)"
    )
    parser.add_argument("--format", default=None, help="item format scored on validation (default the persona's first)")
    parser.add_argument(
        "--objective",
        default="shift",
        choices=("shift", "switch"),
        help="shift: persona mask minus base; switch: persona mask minus opposite mask (default shift)",
    )


def plan_from(args: argparse.Namespace) -> Any:
    from ..eval.tune import TunePlan

    personas, data_root = persona_options.resolve(args)
    if len(personas) != 1:
        raise ValueError(f"tune searches one persona at a time; the options name {[p.name for p in personas]}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in ("mlp", "attention", "all")]
    if unknown:
        raise ValueError(f"--targets: unknown preset(s) {unknown}; use mlp, attention or all")
    return TunePlan(
        personas[0],
        data_root,
        sparsities=args.sparsities,
        strengths=args.strengths,
        targets=targets,
        layers=args.layers,
        method=args.method,
        phi=args.phi,
        structure=args.structure,
        fmt=args.format,
        objective=args.objective,
        nll_budget=args.nll_budget,
        n_validation=args.n_validation or None,
        n_test=args.n_test or None,
        nll_passages=args.nll_passages,
        max_calibration=args.max_calibration,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.harness import to_stderr
    from ..eval.tune import tune
    from ..eval.tune_baselines import run_baselines
    from ..models import load_model

    if args.report_only:
        return rewrite_report(Path(args.out))
    plan = plan_from(args)
    check_validation_items(plan, args.n_validation)
    preflight.check_model(args.model, args.gguf_file)
    out = preflight.check_output_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    with preflight.naming("--model", args.model):
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    baselines = None
    if args.baselines:  # on the plain model, before the grid wraps it; outside no_grad, since a LoRA trains
        baselines = run_baselines(
            model, tokenizer, plan, args.baselines, out, args.model, to_stderr, not args.no_progress
        )
    with torch.no_grad():
        model, results = tune(model, tokenizer, plan, out, progress=not args.no_progress)
    if baselines:
        results["baselines"] = baselines
    command = shlex.join(["peft-persona", *getattr(args, "argv", sys.argv[1:])])
    results["command"], results["model"] = command, args.model
    results["runtime_s"] = time.time() - started
    atomic.write_json(out / "tune.json", results, indent=1)
    write_report(results, out)
    save_chosen(model, results, out / "adapters", args.repo_id or f"peft-persona/{plan.persona.name}-mask")
    chosen = results["chosen"]
    print(
        f"chosen {chosen['target']} sparsity {chosen['sparsity']:g} strength {chosen['strength']:g}: shift "
        f"{chosen['shift']:+.3f}, switch {chosen['switch']:+.3f}, NLL cost {chosen['cost']:+.3f}; wrote "
        f"{out / 'report.md'} and {out / 'adapters'} in {results['runtime_s']:.0f}s"
    )
    return 0


def check_validation_items(plan: Any, n_validation: int) -> None:
    """Raise, naming ``--n-validation``, if the validation split cannot give the items the plan asks for."""
    from ..eval.items import load_items

    try:
        load_items(plan.data_root, plan.persona, plan.format, plan.n_validation, plan.seed, "validation")
    except ValueError as err:
        raise ValueError(
            f"--n-validation {n_validation}: {err}; lower it, pass 0 for every validation item, or give more data"
        ) from None


def write_report(results: dict[str, Any], out: Path) -> None:
    """``report.md`` and (with matplotlib) ``pareto.png`` from a run's results."""
    from ..eval import plots, tune_report

    try:
        plots.pareto_plot(results, out / "pareto.png")
    except ImportError as err:
        print(f"peft-persona tune: no plot ({err}); pip install 'peft-persona[plots]'", file=sys.stderr)
    atomic.write_text(out / "report.md", tune_report.render(results, results.get("command", "")))


def rewrite_report(out: Path) -> int:
    path = out / "tune.json"
    if not path.is_file():
        raise FileNotFoundError(f"--report-only needs {path}")
    write_report(json.loads(path.read_text()), out)
    print(f"rewrote {out / 'report.md'} and {out / 'pareto.png'} from {path}")
    return 0


def save_chosen(model: Any, results: dict[str, Any], folder: Path, repo_id: str) -> None:
    """The chosen persona and opposite adapters (strength in their configs) and a card carrying the tune scores.
    An earlier ``folder`` is replaced only once the new one is complete."""
    from ..eval.tune_report import card_report
    from ..hub import export_repo

    persona = results["persona"]
    names = [persona["name"], persona["opposite"]]
    with atomic.atomic_dir(folder, create=False) as fresh:
        export_repo(model, fresh, repo_id, adapter_names=names, eval_report=card_report(results))
