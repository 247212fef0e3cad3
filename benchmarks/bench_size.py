"""On-disk size of a persona mask adapter, in bits per masked weight.

    python benchmarks/bench_size.py

Saves a random-mask adapter (every linear layer of the decoder blocks) for random-init models and divides the size
of ``adapter_model.safetensors`` by the number of masked weights. The paper's code saves ``torch.bool`` tensors with
``torch.save``: 8 bits per weight.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _common import markdown_table, random_llama

import peft_persona as pp
from peft_persona.targets import decoder_linear_modules, oriented_weight


def main() -> None:
    rows = []
    for name in ("tiny", "100M", "smollm2-shapes"):
        model = random_llama(name)
        generator = torch.Generator().manual_seed(0)
        masks = {n: torch.rand(oriented_weight(m).shape, generator=generator) < 0.5 for n, m in decoder_linear_modules(model).items()}
        weights = sum(m.numel() for m in masks.values())
        with tempfile.TemporaryDirectory() as tmp:
            pp.add_mask_adapter(model, masks, "persona").save_pretrained(tmp, selected_adapters=["persona"])
            size = (Path(tmp) / "persona" / "adapter_model.safetensors").stat().st_size
        header = size - weights // 8
        rows.append([name, len(masks), f"{weights:,}", f"{size:,}", f"{header:,}", f"{size * 8 / weights:.4f}"])
    print(markdown_table(["model", "masked layers", "masked weights", "file bytes", "bytes beyond 1 bit/weight", "bits per masked weight"], rows))


if __name__ == "__main__":
    main()
