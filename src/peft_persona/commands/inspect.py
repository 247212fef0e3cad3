"""``peft-persona inspect DIR_OR_REPO``: describe saved persona mask adapters without loading the base model."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show persona, method, sparsity, density per layer, fingerprint and size of saved adapters",
        description=(
            "Read adapter_config.json and adapter_model.safetensors of every persona mask adapter in a local "
            "directory or a Hub repo and print what they hold. The base model is never loaded."
        ),
    )
    parser.add_argument("target", metavar="DIR_OR_REPO", help="local adapter directory or Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--subfolder", default=None, help="only the adapter(s) in this folder")
    parser.add_argument("--token", default=None, help="Hub token for private repos (default: HF_TOKEN or stored login)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-layers", action="store_true", help="omit the per-layer density table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inspection import format_summaries, inspect_adapters

    summaries = inspect_adapters(args.target, revision=args.revision, subfolder=args.subfolder, token=args.token)
    if args.json:
        payload = [
            {
                "name": s.name,
                "location": s.location,
                "file_size": s.file_size,
                "density": s.overall_density,
                "save_format": s.save_format,
                "layer_density": s.density,
                "config": s.config,
            }
            for s in summaries
        ]
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(format_summaries(summaries, per_layer=not args.no_layers))
    return 0
