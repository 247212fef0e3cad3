"""Forward time of a persona-masked model (cached mask) and of a merged one, as ratios to the base model.

    python benchmarks/bench_forward.py [--repeats 20] [--threads 2]

Prints a markdown table; docs/benchmarks.md records it. Ratios are measured in one run, round-robin.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import CONFIGS, interleaved_medians, markdown_table, n_params, random_llama

import peft_persona as pp
from peft_persona.targets import decoder_linear_modules, oriented_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in CONFIGS:
        base = random_llama(name)
        generator = torch.Generator().manual_seed(1)
        masks = {n: torch.rand(oriented_weight(m).shape, generator=generator) < 0.5 for n, m in decoder_linear_modules(base).items()}
        masked = pp.add_mask_adapter(copy.deepcopy(base), masks, "persona")
        merged = pp.add_mask_adapter(copy.deepcopy(base), masks, "persona")
        merged.merge_adapter()
        for batch, length in ((1, 1), (1, 128), (8, 128)):
            tokens = torch.randint(3, base.config.vocab_size, (batch, length), generator=generator)

            def run(model):
                return lambda: model(tokens, use_cache=False)

            with torch.no_grad():
                t = interleaved_medians({"base": run(base), "masked": run(masked), "merged": run(merged)}, args.repeats)
            rows.append([
                name, f"{n_params(base) / 1e6:.1f}M", f"{batch}x{length}", f"{t['base'] * 1e3:.2f}",
                f"{t['masked'] / t['base']:.2f}", f"{t['merged'] / t['base']:.2f}",
            ])
    print(markdown_table(["config", "params", "batch x tokens", "base ms", "masked / base", "merged / base"], rows))


if __name__ == "__main__":
    main()
