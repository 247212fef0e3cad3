"""Mask construction time on SmolLM2-135M shapes (all 30 blocks, 210 matrices), against the paper code's loop.

    python benchmarks/bench_masks.py [--threads 2] [--repeats 3]

Baselines, written from the paper code's description: a Python loop over rows calling ``torch.topk`` per row, and
one whole-matrix ``torch.topk``. Floor: one plain copy of the weights (memory-bound). Ours keeps the exact tie rule
(lower column index; for contrastive, the persona's own Wanda score first). Random weights and statistics are used;
selection time does not depend on their values.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, markdown_table

from peft_persona import scoring

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=generator).to(args.device) for s in SHAPES]
    norms = [torch.rand(s[1], generator=generator).to(args.device) for s in SHAPES]
    z = [torch.randn(s[1], generator=generator).to(args.device) for s in SHAPES]

    def per_row_loop():
        for w, n in zip(weights, norms, strict=True):
            scores = scoring.wanda_scores(w, n)
            k = scoring.kept_per_row(w.shape[1], args.sparsity)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            for i in range(scores.shape[0]):
                mask[i, torch.topk(scores[i], k).indices] = True

    def whole_topk():
        for w, n in zip(weights, norms, strict=True):
            scoring.select_topk_reference(scoring.wanda_scores(w, n), scoring.kept_per_row(w.shape[1], args.sparsity))

    def ours_wanda():
        for w, n in zip(weights, norms, strict=True):
            keys = scoring.order_keys(scoring.wanda_scores(w, n))
            scoring.select_top_per_row(keys, scoring.kept_per_row(w.shape[1], args.sparsity))

    def ours_contrastive():
        for w, n, zz in zip(weights, norms, z, strict=True):
            primary, secondary = scoring.contrastive_scores(w, zz.clamp_min(0)), scoring.wanda_scores(w, n)
            scoring.select_lexicographic(primary, secondary, scoring.kept_per_row(w.shape[1], args.sparsity))

    def copy_floor():
        for w in weights:
            w.clone()

    def sync(fn):
        def run():
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        return run

    functions = {
        "per-row topk loop (paper code)": per_row_loop,
        "whole-matrix topk": whole_topk,
        "ours, wanda (exact ties)": ours_wanda,
        "ours, contrastive (exact ties, 2 keys)": ours_contrastive,
        "one copy of the weights": copy_floor,
    }
    times = interleaved_medians({k: sync(v) for k, v in functions.items()}, args.repeats)
    loop = times["per-row topk loop (paper code)"]
    floor = times["one copy of the weights"]
    rows = [[name, f"{t:.3f}", f"{loop / t:.1f}x", f"{t / floor:.1f}x"] for name, t in times.items()]
    print(
        f"device={args.device} threads={args.threads} sparsity={args.sparsity}, 210 matrices, "
        f"{sum(a * b for a, b in SHAPES) / 1e6:.1f}M weights"
    )
    print(markdown_table(["selection", "seconds", "speed-up vs loop", "time / copy"], rows))


if __name__ == "__main__":
    main()
