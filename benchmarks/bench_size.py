"""On-disk size of persona mask adapters in both formats beside LoRA r=16, and the cost of re-deriving masks on load.

    python benchmarks/bench_size.py

Table 1: a random-mask ``bits`` adapter (every linear layer of the decoder blocks) for random-init models; its size
divided by the number of masked weights. The paper's code saves ``torch.bool`` tensors with ``torch.save``: 8 bits
per weight.

Table 2: the same layers as ``bits``, ``stats`` (contrastive: two float32 vectors and a digest per layer; wanda:
one vector and a digest) and PEFT LoRA r=16 on the same modules (PEFT keeps LoRA weights in float32). For the
random-init models the three files are written by the real code (contrastive
extraction on random texts, then ``save_pretrained``). The Llama-2-7B-shaped row is built on the meta device, so no
7B weights are allocated: the LoRA file is PEFT's own state dict of that model written as zeros, and the two persona
files are written from tensors of exactly the shapes and dtypes the formats prescribe (file size does not depend on
the values).

Table 3: re-deriving masks when a ``stats`` adapter is loaded (``PeftModel.from_pretrained``, whole call) against
the selection step of the extraction that made it (``PersonaExtractor.masks``, per adapter), timed in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import CONFIGS, markdown_table, random_llama, random_texts, word_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import peft_persona as pp
from peft_persona.targets import decoder_linear_modules, oriented_weight

WEIGHTS = "adapter_model.safetensors"


def bits_per_weight_rows() -> list[list[object]]:
    rows = []
    for name in ("tiny", "100M", "smollm2-shapes"):
        model = random_llama(name)
        generator = torch.Generator().manual_seed(0)
        masks = {
            n: torch.rand(oriented_weight(m).shape, generator=generator) < 0.5
            for n, m in decoder_linear_modules(model).items()
        }
        weights = sum(m.numel() for m in masks.values())
        with tempfile.TemporaryDirectory() as tmp:
            pp.add_mask_adapter(model, masks, "persona").save_pretrained(tmp, selected_adapters=["persona"])
            size = (Path(tmp) / "persona" / WEIGHTS).stat().st_size
        header = size - weights // 8
        rows.append([name, len(masks), f"{weights:,}", f"{size:,}", f"{header:,}", f"{size * 8 / weights:.4f}"])
    return rows


def lora_size(model: torch.nn.Module, modules: list[str], out: Path) -> int:
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=modules))
    lora.save_pretrained(out)
    return (out / WEIGHTS).stat().st_size


def real_files(name: str, tmp: Path) -> tuple[list[object], list[object]]:
    """Both persona formats and LoRA written by the real code on a random-init model; and the load timings."""
    model = random_llama(name)
    modules = list(decoder_linear_modules(model))
    tokenizer = word_tokenizer(model.config.vocab_size)
    extractor = pp.PersonaExtractor(model, tokenizer, batch_size=8, max_length=64)
    stats = {
        p: extractor.calibrate(p, random_texts(16, model.config.vocab_size, 16, 64, seed=s)) for s, p in enumerate("ab")
    }
    start = time.perf_counter()
    extractor.masks(stats, "contrastive", 0.5)
    selection = (time.perf_counter() - start) / 2  # two adapters
    extractor.extract(stats, "contrastive", 0.5, save_format="stats").save_pretrained(tmp / "stats")
    extractor.extract({"a_bits": stats["a"], "b_bits": stats["b"]}, "contrastive", 0.5).save_pretrained(tmp / "bits")
    extractor.extract({"a_wanda": stats["a"]}, "wanda", 0.5, save_format="stats").save_pretrained(tmp / "wanda")
    loads = {}
    for kind, folder in (("stats", tmp / "stats" / "a"), ("bits", tmp / "bits" / "a_bits")):
        fresh = random_llama(name)
        start = time.perf_counter()
        PeftModel.from_pretrained(fresh, folder, adapter_name="a")
        loads[kind] = time.perf_counter() - start
    size_row = [
        name,
        len(modules),
        (tmp / "bits" / "a_bits" / WEIGHTS).stat().st_size,
        (tmp / "stats" / "a" / WEIGHTS).stat().st_size,
        (tmp / "wanda" / "a_wanda" / WEIGHTS).stat().st_size,
        lora_size(random_llama(name), modules, tmp / "lora"),
    ]
    time_row = [
        name,
        f"{selection:.3f}",
        f"{loads['stats']:.3f}",
        f"{loads['bits']:.3f}",
        f"{loads['stats'] / selection:.2f}",
    ]
    return size_row, time_row


def shaped_files(name: str, tmp: Path) -> list[object]:
    """The 7B-shaped row, on the meta device: file sizes from the formats' exact shapes and PEFT's LoRA state dict."""
    from accelerate import init_empty_weights
    from peft import get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name]))
    layers = {n: tuple(oriented_weight(m).shape) for n, m in decoder_linear_modules(model).items()}
    prefix = "base_model.model."
    bits = {
        f"{prefix}{n}.persona_mask_bits": torch.zeros(o, (i + 7) // 8, dtype=torch.uint8)
        for n, (o, i) in layers.items()
    }
    stats, wanda = {}, {}
    for n, (_, i) in layers.items():
        for tensors in (stats, wanda):
            tensors[f"{prefix}{n}.persona_mask_channel"] = torch.zeros(i)
            tensors[f"{prefix}{n}.persona_mask_digest"] = torch.zeros(32, dtype=torch.uint8)
        stats[f"{prefix}{n}.persona_mask_tiebreak"] = torch.zeros(i)
    lora_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(layers)))
    lora = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in get_peft_model_state_dict(lora_model).items()}
    sizes = []
    for label, tensors in (("bits", bits), ("stats", stats), ("wanda", wanda), ("lora", lora)):
        save_file(tensors, tmp / f"{label}.safetensors", metadata={"format": "pt"})
        sizes.append((tmp / f"{label}.safetensors").stat().st_size)
        del tensors
    return [f"{name}{' (Llama-2-7B shapes)' if name == '7B' else ''}, meta device", len(layers), *sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["100M", "smollm2-shapes"])
    parser.add_argument("--shaped", nargs="*", default=["7B"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        markdown_table(
            [
                "model",
                "masked layers",
                "masked weights",
                "file bytes",
                "bytes beyond 1 bit/weight",
                "bits per masked weight",
            ],
            bits_per_weight_rows(),
        )
    )
    size_rows, time_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            (Path(tmp) / name).mkdir()
            size_row, time_row = real_files(name, Path(tmp) / name)
            size_rows.append(size_row)
            time_rows.append(time_row)
        for name in args.shaped:
            (Path(tmp) / f"shaped-{name}").mkdir()
            size_rows.append(shaped_files(name, Path(tmp) / f"shaped-{name}"))
    print()
    print(
        markdown_table(
            [
                "model",
                "masked layers",
                "bits bytes",
                "stats bytes (contrastive)",
                "stats bytes (wanda)",
                "LoRA r=16 bytes",
                "stats / bits (contrastive, wanda)",
                "stats / LoRA (contrastive, wanda)",
            ],
            [
                [
                    *r[:2],
                    f"{r[2]:,}",
                    f"{r[3]:,}",
                    f"{r[4]:,}",
                    f"{r[5]:,}",
                    f"{r[3] / r[2]:.2%}, {r[4] / r[2]:.2%}",
                    f"{r[3] / r[5]:.2%}, {r[4] / r[5]:.2%}",
                ]
                for r in size_rows
            ],
        )
    )
    print()
    print(
        markdown_table(
            [
                "model",
                "selection at extraction, s per adapter",
                "stats load, s",
                "bits load, s",
                "stats load / selection",
            ],
            time_rows,
        )
    )


if __name__ == "__main__":
    main()
