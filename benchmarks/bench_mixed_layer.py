"""Where a mixed-persona decode step goes, per layer: the persona mixed forward (the fused kernel of the ``fast`` extra,
and without it the sparse difference) and LoRA's beside the plain one, and the sparse product that the path without
numba adds, in three storage formats.

    python benchmarks/bench_mixed_layer.py [--config 100M] [--repeats 30] [--threads 2] [--differ F]

The 100M model's layers with 2048 inputs (``down_proj``, one per block), one decode step of 4 rows split between two
adapters (random masks at sparsity 0.2, independent or differing in the fraction ``--differ`` of the entries; LoRA
r=16 on the same modules), ``cache_mixed`` on and warmed; the persona mixed forward with the fused kernel
(:mod:`peft_persona.fast_mixed`, one pass over the original weight; and without ``cache_mixed``, reading the weight
holding ``W_eff`` and the engine's stash of original values) and under ``fast_select.eager()`` (the path
without numba: the weight in effect's product plus a sparse difference); then the sparse difference those layers
hold (CSR, ``int32`` indices) against the same with ``int64`` indices and the dense product of the same two rows with
the dense difference. Milliseconds per layer, medians of round-robin repeats. Prints a markdown table;
docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse

import torch
from _common import CONFIGS, interleaved_medians, markdown_table, mask_pair, random_llama
from bench_forward import lora_model, persona_model
from peft.tuners.lora import Linear as LoraLinear

from peft_persona.fast_select import eager
from peft_persona.targets import decoder_linear_modules
from peft_persona.tuner import mask_layers

NAMES = ["a", "b0"] * 2


def without_kernels(layers: list, x: torch.Tensor) -> list:
    with eager():
        return [m(x, adapter_names=NAMES) for m in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="100M", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--differ", type=float, default=None, help="fraction of entries where the two masks differ")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = random_llama(args.config)
    width = base.config.intermediate_size
    from peft_persona.targets import oriented_weight

    shapes = {n: tuple(oriented_weight(m).shape) for n, m in decoder_linear_modules(base).items()}
    pair = mask_pair(shapes, args.differ)
    persona = persona_model(base, pair, cache_mixed=True)
    uncached = persona_model(base, pair, cache_mixed=False)
    lora = lora_model(base, decoder_linear_modules(base))
    layers = [m for m in mask_layers(persona).values() if m.in_features == width]
    uncached_layers = [m for m in mask_layers(uncached).values() if m.in_features == width]
    lora_layers = [m for m in lora.modules() if isinstance(m, LoraLinear) and m.in_features == width]
    x = torch.randn(4, 1, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in layers:
            layer(x, adapter_names=NAMES)  # keeps each layer's original weight for the fused kernel
        with eager():
            for layer in layers:
                layer(x, adapter_names=NAMES)  # builds and keeps each layer's sparse difference
        sparse32 = [layer._mixed_cache[("difference", ("b0",))][1] for layer in layers]
        sparse64 = [s.to_dense().to_sparse_csr() for s in sparse32]
        dense = [s.to_dense() for s in sparse32]
        rows = x[1::2].reshape(-1, width).T.contiguous()
        functions = {
            "persona, one adapter (plain)": lambda: [m(x) for m in layers],
            "persona mixed, cache_mixed, fused kernel": lambda: [m(x, adapter_names=NAMES) for m in layers],
            "persona mixed, fused kernel, no cache (W_eff and stash)": lambda: [
                m(x, adapter_names=NAMES) for m in uncached_layers
            ],
            "persona mixed, cache_mixed, without numba (sparse difference)": lambda: without_kernels(layers, x),
            "LoRA r=16, one adapter": lambda: [m(x) for m in lora_layers],
            "LoRA r=16 mixed": lambda: [m(x, adapter_names=NAMES) for m in lora_layers],
            "sparse difference @ 2 rows, int32 CSR (what the path without numba adds)": lambda: [
                s @ rows for s in sparse32
            ],
            "sparse difference @ 2 rows, int64 CSR": lambda: [s @ rows for s in sparse64],
            "dense difference @ 2 rows": lambda: [d @ rows for d in dense],
        }
        t = interleaved_medians(functions, args.repeats)
    density = sum(s.values().numel() for s in sparse32) / sum(d.numel() for d in dense)
    table = [[name, f"{seconds * 1e3 / len(layers):.3f}"] for name, seconds in t.items()]
    print(
        f"{args.config}, {len(layers)} layers of {width} inputs, difference density {density:.3f}, "
        f"{args.threads} threads\n"
    )
    print(markdown_table(["per layer, one decode step of 4 rows", "ms"], table))


if __name__ == "__main__":
    main()
