"""``peft-persona eval``: score persona masks, prompts and controls side by side; write results.json, report.md and
PNG plots."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..options import DEFAULT_PHI, DEFAULT_SPARSITY, DEFAULT_STRENGTH, DEFAULT_TAU, PHI_KINDS, STRUCTURES
from . import personas as persona_options
from . import preflight

# the persona-pair recipes --extract makes (the random, magnitude and neutral controls are always made too)
EXTRACT_METHODS = ("contrastive", "wanda", "difference", "obs", "versus-neutral")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate persona mask adapters against prompts and controls",
        description="Score every persona under base, prompt, mask and control conditions; write results.json, "
        "report.md and PNG plots to --out.",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Hub id, local path or embedded model name")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if it is a GGUF directory")
    parser.add_argument("--adapters", default=None, help="directory of saved adapters (one sub-directory each)")
    add_extract_options(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--conditions", nargs="+", default=None, help="condition names (default: all)")
    parser.add_argument(
        "--n-items",
        type=int,
        default=100,
        help="items per persona and format, balanced between the answers (default 100; 0: every test item)",
    )
    parser.add_argument("--n-paper-items", type=int, default=None, help="items per paper split (default --n-items)")
    parser.add_argument("--seed", type=int, default=1, help="seed drawing evaluation items from the held-out rows")
    parser.add_argument("--nll-passages", type=int, default=16, help="neutral passages for general-ability NLL")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--resume", action="store_true", help="reuse unchanged conditions from --out/results.json")
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=["caa", "lora"],
        default=[],
        help="also score what a user would pick instead of a mask, on the same items: a CAA steering vector (caa) "
        "and a LoRA fine-tuned on the same calibration texts (lora); their conditions are 'CAA steering' and 'LoRA'",
    )
    parser.add_argument("--caa-layer", type=int, default=None, help="block of the CAA vector (default: half-way up)")
    parser.add_argument("--caa-coefficient", type=float, default=4.0, help="CAA coefficient (default 4)")
    parser.add_argument("--lora-steps", type=int, default=30, help="LoRA training steps (default 30, batch 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="recompute the statistics and rewrite report.md and plots from --out/results.json; no model",
    )
    persona_options.add_arguments(parser, presets_default=None)
    parser.set_defaults(func=run)


def add_extract_options(parser: argparse.ArgumentParser) -> None:
    """``--extract`` and the recipe it extracts with: sparsity, strength, method, phi, tau, structure, target,
    layers."""
    parser.add_argument(
        "--extract",
        action="store_true",
        help="extract persona and control masks into --adapters first (skipped for adapters already there)",
    )
    parser.add_argument(
        "--sparsity", type=float, default=DEFAULT_SPARSITY, help=f"sparsity for --extract (default {DEFAULT_SPARSITY})"
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help=f"strength of every adapter made by --extract (default {DEFAULT_STRENGTH}; with sparsity "
        f"{DEFAULT_SPARSITY}, what tune chose for extraversion on SmolLM2)",
    )
    parser.add_argument(
        "--method",
        default="contrastive",
        choices=EXTRACT_METHODS,
        help="mask recipe for --extract (default contrastive; versus-neutral: each side against neutral text)",
    )
    parser.add_argument(
        "--phi",
        default=DEFAULT_PHI,
        choices=PHI_KINDS,
        help=f"contrastive channel weight for --extract (default {DEFAULT_PHI})",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=DEFAULT_TAU,
        help=f"softplus and sigmoid temperature for --extract (default {DEFAULT_TAU})",
    )
    parser.add_argument(
        "--structure", default="row", choices=STRUCTURES, help="row, or channel (whole input channels), for --extract"
    )
    from .extract import OPTIONS  # the same --target and --layers as extract's, applied to every --extract mask

    for flag, keywords in OPTIONS:
        if flag in ("--target", "--layers"):
            parser.add_argument(flag, **{**keywords, "help": f"for --extract: {keywords['help']}"})


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval import harness, items, plots, report
    from ..eval.conditions import CONDITIONS

    conditions = chosen_conditions(args.conditions, CONDITIONS, args.baselines)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.report_only:
        return rewrite_report(out)
    personas, data_root = persona_options.resolve(args)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (model, tokenizer), digests = prepared_model(args, personas, data_root)
    baselines = baseline_models(args, model, tokenizer, personas, data_root)
    previous = None
    if args.resume and (out / "results.json").is_file():  # a finished or partial (checkpointed) run
        previous = json.loads((out / "results.json").read_text())
    nll = items.neutral_texts(data_root, "eval", args.nll_passages) if args.nll_passages else []
    sources = {"paper": args.n_paper_items} if args.n_paper_items else None
    with torch.inference_mode():
        plan = harness.EvalPlan(
            personas,
            data_root,
            args.n_items or None,
            args.seed,
            conditions,
            args.batch_size,
            nll,
            n_items_by_source=sources,
            digests=digests,
            previous=previous,
            baselines=baselines,
        )
        results = harness.run(model, tokenizer, plan, on_block=lambda partial: checkpoint(partial, out))
    results["meta"] = report.metadata(args, personas, conditions, digests, time.time() - started)
    write_outputs(results, out, plots, report)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots in {time.time() - started:.0f}s")
    return 0


def checkpoint(partial: dict[str, Any], out: Path) -> None:
    """The results so far, marked ``partial``, in ``out/results.json`` (read back by ``--resume``)."""
    atomic.write_json(out / "results.json", {**partial, "partial": True}, indent=1)


def chosen_conditions(wanted: list[str] | None, known: Any, baselines: Sequence[str] = ()) -> list[Any]:
    """The conditions named by ``--conditions`` (all if none), in their canonical order, those of a baseline only
    with ``--baselines``; unknown names, or a baseline's condition without its ``--baselines``, raise."""
    from ..eval.conditions import baseline_of

    names = {c.name for c in known}
    if wanted and set(wanted) - names:
        raise ValueError(f"unknown condition(s) {sorted(set(wanted) - names)}; known: {[c.name for c in known]}")
    missing = [c for c in known if wanted and c.name in wanted and baseline_of(c) not in (None, *baselines)]
    if missing:
        names = [c.name for c in missing]
        raise ValueError(f"condition(s) {names} need --baselines {' '.join(sorted({baseline_of(c) for c in missing}))}")
    return [c for c in known if (not wanted or c.name in wanted) and baseline_of(c) in (None, *baselines)]


def prepared_model(args: argparse.Namespace, personas: Any, data_root: Any) -> tuple[Any, Any]:
    """``((model, tokenizer), digests)``: the base model with the adapters of ``--adapters`` loaded, extracted into
    that folder first with ``--extract`` when it holds none."""
    from ..eval.adapters import adapter_dirs, extract_adapters, load_adapters
    from ..models import load_model
    from ..targets import parse_layers

    if args.extract:
        if not args.adapters:
            raise ValueError("--extract needs --adapters DIR to save the masks in")
        with preflight.naming("--layers", args.layers):  # a malformed --layers fails before the model loads
            parse_layers(args.layers)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    if args.extract and not list(Path(args.adapters).glob("*/adapter_config.json")):
        recipe = {
            "phi": args.phi,
            "tau": args.tau,
            "structure": args.structure,
            "target": args.target,
            "layers": args.layers,
        }
        extract_adapters(
            model,
            tokenizer,
            personas,
            data_root,
            args.adapters,
            args.sparsity,
            args.method,
            strength=args.strength,
            **recipe,
        )
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)  # a clean base for loading
    digests: dict[str, str] = {}
    if args.adapters:
        adapter_dirs(args.adapters)
        model, digests = load_adapters(model, args.adapters)
    return (model, tokenizer), digests


def baseline_models(args: argparse.Namespace, model: Any, tokenizer: Any, personas: Any, data_root: Any) -> dict:
    """The ``--baselines`` as named models for the harness (built on first use)."""
    from ..eval.baselines import caa_baselines, lora_baselines
    from ..eval.finetune import LoraBudget
    from ..models import load_model

    made: dict[str, Any] = {}
    if "caa" in args.baselines:
        made.update(caa_baselines(model, tokenizer, personas, data_root, args.caa_layer, args.caa_coefficient))
    if "lora" in args.baselines:
        fresh = lambda: load_model(args.model, gguf_file=args.gguf_file)[0]  # noqa: E731
        budget = LoraBudget(steps=args.lora_steps)
        made.update(lora_baselines(fresh, tokenizer, personas, data_root, budget=budget))
    return made


def write_outputs(results: dict[str, Any], out: Path, plots: Any, report: Any) -> None:
    """``results.json``, the plots and ``report.md`` in ``out``."""
    atomic.write_json(out / "results.json", results, indent=1)
    _plots(plots, results, out)
    atomic.write_text(out / "report.md", report.render(results))


def rewrite_report(out: Path) -> int:
    """Recompute the paired tests from the per-item scores in ``out/results.json``; rewrite it, report.md and plots."""
    from ..eval import harness, plots, report

    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--report-only needs {path}")
    results = json.loads(path.read_text())
    for entry in results["personas"].values():
        for fmt, block in entry["formats"].items():
            harness.compare_block(fmt, block)
    write_outputs(results, out, plots, report)
    print(f"rewrote {out / 'report.md'} and plots from {path}")
    return 0


def _plots(plots: Any, results: dict, out: Path) -> None:
    try:
        plots.write_plots(results, out)
    except ImportError as err:
        print(
            f"peft-persona eval: no plots ({err}); install matplotlib: pip install 'peft-persona[plots]'",
            file=sys.stderr,
        )
