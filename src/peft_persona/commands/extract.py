"""``peft-persona extract``: calibrate on persona texts and save one mask adapter per persona."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .. import adapter_files, atomic, distributed
from ..checks import check_sparsity, check_strength
from ..models import DEFAULT_MODEL
from ..options import (
    DEFAULT_PHI,
    DEFAULT_SPARSITY,
    DEFAULT_STRENGTH,
    DEFAULT_TAU,
    EXTRACTION_METHODS,
    PHI_KINDS,
    STRUCTURES,
    ExtractionOptions,
)
from ..targets import TARGET_PRESETS, parse_layers
from . import preflight

# Flag, then add_argument's keywords: one row per option, in the order --help lists them.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--model", dict(default=DEFAULT_MODEL, help=f"Hub id, local path or embedded name (default: {DEFAULT_MODEL})")),
    ("--gguf-file", dict(default=None, help="GGUF file inside --model to load (dequantised to float32)")),
    (
        "--layerwise",
        dict(
            action="store_true",
            help="calibrate one decoder block at a time, reading each block's weights from the checkpoint's "
            "safetensors shards, for models larger than memory (masks bit-identical to a whole-model run; not for "
            "GGUF)",
        ),
    ),
    (
        "--cache-gb",
        dict(
            type=float,
            default=2.0,
            help="with --layerwise: memory for the cached hidden states, in GiB; more spills to a temporary folder",
        ),
    ),
    (
        "--persona",
        dict(
            action="append",
            required=True,
            metavar="NAME=SOURCE",
            help="persona name and its texts, e.g. extravert=builtin:extraversion#yes (repeat for each persona)",
        ),
    ),
    (
        "--method",
        dict(default="contrastive", choices=EXTRACTION_METHODS, help="how masks are found (default contrastive)"),
    ),
    (
        "--sparsity",
        dict(
            type=float,
            default=DEFAULT_SPARSITY,
            help=f"fraction of each row's weights removed, in [0, 1) (default {DEFAULT_SPARSITY}; raise it only as "
            "far as the NLL cost allows, see peft-persona tune)",
        ),
    ),
    (
        "--strength",
        dict(
            type=float,
            default=DEFAULT_STRENGTH,
            help=f"strength saved with the adapters, in [0, 1] (default {DEFAULT_STRENGTH}): 1 removes the dropped "
            "weights, lower values scale them by 1 - strength",
        ),
    ),
    (
        "--target",
        dict(
            default="all",
            choices=TARGET_PRESETS,
            help="which sub-layers of the decoder blocks to mask: all (default), mlp (the paper's prune_only_mlp), "
            "attention",
        ),
    ),
    (
        "--layers",
        dict(
            default=None,
            help="decoder blocks to mask, e.g. 8-23 or 0,2,5-7, or a band: early, middle, late (a third of the "
            "blocks each; default: all)",
        ),
    ),
    (
        "--modules",
        dict(
            default=None,
            help="comma-separated module names to mask (e.g. model.layers.3.mlp.up_proj); replaces --target and "
            "--layers",
        ),
    ),
    (
        "--phi",
        dict(
            default=DEFAULT_PHI,
            choices=PHI_KINDS,
            help="contrastive channel weight: relu(z) (the paper's), softplus(z/tau), or sigmoid(z/tau), which lets "
            f"z order every channel (default {DEFAULT_PHI})",
        ),
    ),
    ("--tau", dict(type=float, default=DEFAULT_TAU, help=f"softplus and sigmoid temperature (default {DEFAULT_TAU})")),
    (
        "--structure",
        dict(
            default="row",
            choices=STRUCTURES,
            help="row (default): each output row keeps its best weights; channel: whole input channels are removed",
        ),
    ),
    ("--reference", dict(action="store_true", help="reproduce the paper code's statistics (comparison only)")),
    ("--max-length", dict(type=int, default=256, help="truncate calibration texts to this many tokens")),
    (
        "--batch-size",
        dict(type=int, default=8, help="calibration texts per forward pass (default 8; masks do not depend on it)"),
    ),
    ("--seed", dict(type=int, default=0, help="seed of the random control")),
    (
        "--save-format",
        dict(
            default="bits",
            choices=("bits", "stats"),
            help="bits (default): each mask, 1 bit per weight; stats: only the per-channel statistics that select "
            "it and a SHA-256 per layer, re-derived from the base weights on load (wanda, contrastive, magnitude)",
        ),
    ),
    ("--save-stats", dict(action="store_true", help="also save each persona's statistics (safetensors)")),
    ("--out", dict(required=True, type=Path, help="output directory: one sub-directory per persona")),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extract`` sub-command and its options."""
    parser = subparsers.add_parser(
        "extract",
        help="extract persona masks and save them as PEFT adapters",
        description="Extract persona masks from calibration texts and save one adapter per persona under --out.",
    )
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)
    parser.set_defaults(func=run)


def parse_personas(specs: list[str]) -> dict[str, str]:
    """``["a=src", ...]`` to ``{"a": "src"}``; a malformed or repeated name raises a ``ValueError`` naming it."""
    personas: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--persona {spec!r}: expected NAME=SOURCE")
        if name in personas:
            raise ValueError(f"--persona {name!r} given twice")
        adapter_files.check_adapter_name(name, "--persona name")
        personas[name] = source
    return personas


def check_arguments(args: argparse.Namespace) -> tuple[dict[str, str], ExtractionOptions, dict[str, Any]]:
    """Every argument checked before the model loads: personas and their texts, the recipe, ranges, the model and
    the output folder. Returns the personas, the recipe and the targeting keywords; raises one-line errors."""
    from .. import tokens
    from ..tuner import PersonaMaskConfig

    personas = parse_personas(args.persona)
    for name in ("max_length", "batch_size"):
        preflight.check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    preflight.check_positive(args.cache_gb, "--cache-gb", zero_ok=True)  # 0: spill every hidden state
    check_sparsity(args.sparsity, "--sparsity")
    check_strength(args.strength, "--strength")
    options = ExtractionOptions(
        args.method, args.sparsity, args.phi, args.tau, args.reference, args.seed, structure=args.structure
    )
    PersonaMaskConfig(
        method=args.method, sparsity=args.sparsity, save_format=args.save_format, calibration=options.record()
    )
    with preflight.naming("--layers", args.layers):
        parse_layers(args.layers)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    if modules is not None and (args.target != "all" or args.layers is not None):
        raise ValueError("--modules replaces --target and --layers; give one or the other")
    if args.layerwise and args.gguf_file is not None:
        raise ValueError("--layerwise reads safetensors checkpoints; a GGUF file is loaded whole (drop --layerwise)")
    if options.calibrated:
        for name, source in personas.items():  # read and check every calibration item now, not after the model
            try:
                tokens.resolve_texts(name, source)
            except (ValueError, TypeError, KeyError, OSError) as err:
                raise ValueError(f"--persona {name}={source}: {preflight.one_line(err)}") from None
    preflight.check_model(args.model, args.gguf_file)
    args.out = preflight.check_output_dir(args.out)
    targeting = {"target_modules": modules} if modules is not None else {"target": args.target, "layers": args.layers}
    return personas, options, targeting


def run(args: argparse.Namespace) -> int:
    from ..extractor import PersonaExtractor
    from ..models import load_model

    distributed.init_from_environment()  # torchrun / accelerate launch: join the process group
    personas, options, targeting = check_arguments(args)
    common = dict(
        **targeting, max_length=args.max_length, batch_size=args.batch_size, show_progress=distributed.is_main_process()
    )
    with preflight.naming("--model", args.model):
        if args.layerwise:
            extractor = PersonaExtractor.from_pretrained(args.model, cache_bytes=int(args.cache_gb * 1024**3), **common)
        else:
            model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
            extractor = PersonaExtractor(model, tokenizer, **common)
    stats = {}
    if args.save_stats and args.method in ("wanda", "contrastive"):
        personas = stats = {name: extractor.calibrate(name, source) for name, source in personas.items()}
    peft_model = extractor.extract(personas, options=options, save_format=args.save_format, strength=args.strength)
    if distributed.is_main_process():  # under torchrun every rank holds the same masks; one writes them
        print(extractor.summary)
        summary = {"out": str(args.out), "adapters": {n: str(args.out / n) for n in personas}}
        summary.update(vars(extractor.summary), processes=distributed.world()[1])
        write_result(peft_model, list(personas), args.out, summary, stats)
        print(f"saved {len(personas)} adapter(s) under {args.out}/: " + ", ".join(personas))
    distributed.barrier()
    return 0


def write_result(peft_model: Any, names: list[str], out: Path, summary: dict[str, Any], stats: dict[str, Any]) -> None:
    """The adapters, statistics files and ``summary.json`` of a run, built in a staging folder beside ``out`` and
    swapped in whole once complete (see :func:`peft_persona.atomic.atomic_dir`). Entries of an earlier ``out`` that
    this run does not write (other adapters) are kept, by hard link where the file system allows."""
    written = {*names, *(f"{n}.stats.safetensors" for n in names), "summary.json"}
    with atomic.atomic_dir(out) as fresh:
        if out.is_dir():
            atomic.link_tree(out, fresh, skip=written)
        save_adapters(peft_model, names, fresh)
        for name, persona_stats in stats.items():
            persona_stats.save(fresh / f"{name}.stats.safetensors")
        atomic.write_json(fresh / "summary.json", summary, indent=2, default=str)


def save_adapters(peft_model: Any, names: list[str], out: Path) -> None:
    """Save each adapter to ``out/<name>/``, all or nothing per adapter.

    Adapters are written into a staging folder beside ``out`` (not inside it), then each is renamed into place. If
    the process is killed at any point, ``out`` holds only complete adapters, and the next run removes the stale
    staging folder.
    """
    out = Path(out)
    for name in names:
        adapter_files.check_adapter_name(name, "persona name")
    staging = atomic.staging_dir(out)
    try:
        written = {}
        for index, name in enumerate(names):  # PEFT writes "default" at the root of the folder it is given
            peft_model.save_pretrained(str(staging / str(index)), selected_adapters=[name], save_embedding_layers=False)
            written[name] = staging / str(index) / (name if name != "default" else "")
        out.mkdir(parents=True, exist_ok=True)
        for name, folder in written.items():
            atomic.move_into_place(folder, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
