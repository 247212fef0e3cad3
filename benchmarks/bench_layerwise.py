"""Peak memory of layer-by-layer extraction against whole-model extraction, on a checkpoint saved to disk.

    python benchmarks/bench_layerwise.py

A random-init Llama with TinyLlama-1.1B's shapes (1.1B parameters, float32 safetensors shards, 4.4 GB) is written
once under ``~/.cache/peft-persona/bench-llama-1b``. Each mode then runs in a fresh process: a contrastive pair
extracted from 2 x 16 random texts of 32-64 tokens and saved. The table gives each process's peak resident memory
(``ru_maxrss``) over the checkpoint's bytes, the wall time, and the SHA-256 of the saved masks, which must agree
between the two modes (bit-identical masks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import markdown_table, random_texts, word_tokenizer

SHAPES = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
CACHE = Path.home() / ".cache" / "peft-persona" / "bench-llama-1b"


def ensure_checkpoint(folder: Path) -> Path:
    """Write the random-init checkpoint and its tokenizer once."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES))
    model.save_pretrained(folder, max_shard_size="1GB")
    word_tokenizer(SHAPES["vocab_size"]).save_pretrained(folder)
    return folder


def run(mode: str, folder: Path) -> dict:
    """One extraction in this process; its peak RSS, time and masks digest."""
    import peft_persona as pp

    torch.set_num_threads(2)
    personas = {
        p: random_texts(16, SHAPES["vocab_size"], 32, 64, seed=s) for s, p in enumerate(("extravert", "introvert"))
    }
    start = time.perf_counter()
    if mode == "layerwise":
        extractor = pp.PersonaExtractor.from_pretrained(str(folder), batch_size=8)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        extractor = pp.PersonaExtractor(model, AutoTokenizer.from_pretrained(folder), batch_size=8)
    model = extractor.extract(personas, "contrastive", 0.5)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        digest = hashlib.sha256(b"".join((Path(out) / p / "adapter_model.safetensors").read_bytes() for p in personas))
    seconds = time.perf_counter() - start
    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": seconds,
        "masks_sha256": digest.hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", choices=["layerwise", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=CACHE)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args.checkpoint)))
        return
    folder = ensure_checkpoint(args.checkpoint)
    nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows = []
    for mode in ("layerwise", "whole"):
        out = (
            subprocess.run(
                [sys.executable, __file__, "--run", mode, "--checkpoint", str(folder)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        result = json.loads(out)
        rows.append(
            [
                mode,
                f"{nbytes / 1e9:.2f}",
                f"{result['peak_rss'] / 1e9:.2f}",
                f"{result['peak_rss'] / nbytes:.3f}",
                f"{result['seconds']:.0f}",
                result["masks_sha256"],
            ]
        )
    print(
        markdown_table(
            ["mode", "checkpoint GB", "peak RSS GB", "peak RSS / checkpoint", "seconds", "masks SHA-256"], rows
        )
    )


if __name__ == "__main__":
    main()
