"""Mask selection time against one copy of the weights: SmolLM2-135M shapes (all 30 blocks, 210 matrices) against the
paper code's loop, then 7B-shaped matrices (one block's 4096 x 4096, 11008 x 4096 and 4096 x 11008) selected as
extraction does.

    python benchmarks/bench_masks.py [--threads 2] [--repeats 3] [--real] [--no-7b]

Baselines, written from the paper code's description: a Python loop over rows calling ``torch.topk`` per row, and
one whole-matrix ``torch.topk``. Floor: one plain copy of the weights (``clone``, memory-bound; for the 7B shapes it
includes the first touch of the fresh 64-180 MB outputs, so a copy into tensors already touched is shown too).
Ours is ``select_by_channels``, as extraction calls it, with the numba kernels (the ``fast`` extra) where installed
and in eager PyTorch; both keep the exact tie rule (lower column index; for contrastive, the persona's own Wanda
score first). Weights are random unless ``--real`` (SmolLM2-135M-Instruct's own, from the embedded GGUF);
statistics are random: selection time depends little on them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
from _common import interleaved_medians, markdown_table

from peft_persona import fast_select, selection

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]


def smollm2_weights(real: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """The 210 projection weights ``(out, in)`` of SmolLM2-135M: random, or the model's own (``real``)."""
    if not real:
        return [torch.randn(s, generator=generator) for s in SHAPES]
    from peft_persona.models import load_model

    model, _ = load_model()
    weights = []
    for layer in model.model.layers:
        for name in PROJECTIONS:
            module = getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)
            weights.append(module.weight.detach().float().clone())
    assert [tuple(w.shape) for w in weights] == SHAPES
    return weights


def ours_rows(weights, norms, z, args: argparse.Namespace, prefix: str = "ours, ") -> dict:
    """Selection as extraction runs it (``select_by_channels``, exact ties; contrastive scores ``|W| relu(z)`` and
    breaks its ties by the persona's own Wanda score), with the numba kernels where installed and in eager PyTorch."""

    def run(contrastive: bool, context) -> None:
        with context():
            for w, n, zz in zip(weights, norms, z, strict=True):
                k = selection.kept_per_row(w.shape[1], args.sparsity)
                if contrastive:
                    selection.select_by_channels(w, k, zz.clamp_min(0), n)
                else:
                    selection.select_by_channels(w, k, n)

    paths = [("numba kernel", contextlib.nullcontext)] if fast_select.enabled() and args.device == "cpu" else []
    paths.append(("eager PyTorch", fast_select.eager))
    return {
        f"{prefix}{method} ({path})": functools.partial(run, contrastive, context)
        for path, context in paths
        for method, contrastive in (("wanda", False), ("contrastive", True))
    }


def timed(functions: dict, args: argparse.Namespace) -> dict[str, float]:
    def sync(fn):
        def run():
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        return run

    return interleaved_medians({k: sync(v) for k, v in functions.items()}, args.repeats)


def smollm2_table(args: argparse.Namespace, generator: torch.Generator) -> None:
    weights = [w.to(args.device) for w in smollm2_weights(args.real, generator)]
    norms = [torch.rand(s[1], generator=generator).to(args.device) for s in SHAPES]
    z = [torch.randn(s[1], generator=generator).to(args.device) for s in SHAPES]

    def per_row_loop():
        for w, n in zip(weights, norms, strict=True):
            scores = selection.channel_scores(w, n)
            k = selection.kept_per_row(w.shape[1], args.sparsity)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            for i in range(scores.shape[0]):
                mask[i, torch.topk(scores[i], k).indices] = True

    def whole_topk():
        for w, n in zip(weights, norms, strict=True):
            selection.select_topk_reference(
                selection.channel_scores(w, n), selection.kept_per_row(w.shape[1], args.sparsity)
            )

    def copy_floor():
        for w in weights:
            w.clone()

    buffers = [torch.empty_like(w) for w in weights]

    def copy_into_buffers():
        for w, buffer in zip(weights, buffers, strict=True):
            buffer.copy_(w)

    times = timed(
        {
            "per-row topk loop (paper code)": per_row_loop,
            "whole-matrix topk": whole_topk,
            **ours_rows(weights, norms, z, args),
            "one copy of the weights": copy_floor,
            "copy into allocated tensors": copy_into_buffers,
        },
        args,
    )
    loop, floor = times["per-row topk loop (paper code)"], times["one copy of the weights"]
    rows = [[name, f"{t:.3f}", f"{loop / t:.1f}x", f"{t / floor:.1f}x"] for name, t in times.items()]
    print(
        f"SmolLM2-135M shapes, {'real' if args.real else 'random'} weights: device={args.device} "
        f"threads={args.threads} sparsity={args.sparsity}, 210 matrices, "
        f"{sum(a * b for a, b in SHAPES) / 1e6:.1f}M weights"
    )
    print(markdown_table(["selection", "seconds", "speed-up vs loop", "time / copy"], rows))


def seven_b_table(args: argparse.Namespace, generator: torch.Generator) -> None:
    weights = [torch.randn(s, generator=generator).to(args.device) for s in SHAPES_7B]
    norms = [torch.rand(s[1], generator=generator).to(args.device) for s in SHAPES_7B]
    z = [torch.randn(s[1], generator=generator).to(args.device) for s in SHAPES_7B]

    def copy_floor():
        for w in weights:
            w.clone()

    buffers = [torch.empty_like(w) for w in weights]

    def copy_into_buffers():
        for w, buffer in zip(weights, buffers, strict=True):
            buffer.copy_(w)

    times = timed(
        {
            **ours_rows(weights, norms, z, args, prefix=""),
            "one copy of the weights": copy_floor,
            "copy into allocated tensors (no page faults)": copy_into_buffers,
        },
        args,
    )
    floor = times["one copy of the weights"]
    rows = [[name, f"{t:.3f}", f"{t / floor:.1f}x"] for name, t in times.items()]
    print(
        f"\n7B shapes (random, float32): device={args.device} threads={args.threads} sparsity={args.sparsity}, "
        f"{' + '.join(f'{a} x {b}' for a, b in SHAPES_7B)}, eager rows in blocks of {selection.CHUNK_ELEMENTS} entries"
    )
    print(markdown_table(["select_by_channels", "seconds", "time / copy"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct's own weights (embedded GGUF)")
    parser.add_argument("--no-7b", dest="seven_b", action="store_false", help="skip the 7B-shaped matrices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    smollm2_table(args, generator)
    if args.seven_b:
        seven_b_table(args, generator)


if __name__ == "__main__":
    main()
