"""Combine persona masks per weight: intersection, union and majority vote.

    python examples/combine_masks.py

Extracts an extravert and an introvert mask (``wanda``, each from its own texts) plus a magnitude-pruning control on
the embedded SmolLM2-135M-Instruct, then adds three adapters built from them with ``combine_adapters``:
``both`` (kept by both personas), ``either`` (kept by either) and ``vote`` (kept by at least two of the three). It
prints how many weights each keeps and how extraverted each answers on a small Yes/No probe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from _common import PAIR, load_embedded, persona_probe, write_json

import peft_persona as pp
from peft_persona import PersonaExtractor


def density(model, adapter: str) -> float:
    masks = pp.get_masks(model, adapter)
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.2,
        help="fraction of each row removed (default 0.2: a 135M model stays fluent)",
    )
    parser.add_argument("--summary-json", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded(args.model)
    extractor = PersonaExtractor(model, tokenizer, max_length=64, batch_size=16)
    peft_model = extractor.extract(PAIR, method="wanda", sparsity=args.sparsity)
    extractor.extract({"magnitude": None}, method="magnitude", sparsity=args.sparsity)

    pp.combine_adapters(peft_model, ["extravert", "introvert"], "both", how="intersection")
    pp.combine_adapters(peft_model, ["extravert", "introvert"], "either", how="union")
    pp.combine_adapters(peft_model, ["extravert", "introvert", "magnitude"], "vote", how="majority")

    summary = {"adapters": {}}
    for name in ("extravert", "introvert", "magnitude", "both", "either", "vote"):
        peft_model.set_adapter(name)
        summary["adapters"][name] = {
            "density": round(density(peft_model, name), 6),
            **persona_probe(peft_model, tokenizer),
        }
        adapter = summary["adapters"][name]
        print(f"{name:>10}: keeps {adapter['density']:.3f} of the weights, probe {adapter}")
    summary["vote_config"] = peft_model.peft_config["vote"].calibration
    write_json(args.summary_json, summary)
    return summary


if __name__ == "__main__":
    main()
