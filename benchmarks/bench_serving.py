"""Serving costs of persona masks beside PEFT LoRA r=16: adapter switching time and resident memory per adapter.

    python benchmarks/bench_serving.py [--config 100M] [--repeats 5] [--threads 2] [--processes 1] [--index-ops]
        [--mixed]

Switching: ``set_adapter`` between two loaded adapters, alone and followed by one single-token forward, against a
plain copy of the targeted weights (one pass over them) and against the forward alone. ``--processes N`` times the
switch table again in N - 1 fresh processes and prints each ratio's spread (the copy's speed differs between
processes). ``--index-ops``: the index operations a switch is made of, on the same weights, against the copy.
``--mixed``: mixed-persona decoding in the same run (``generate`` with ``adapter_names=``, 4 rows split between two
adapters, 16 new tokens after a 16-token prompt, greedy) with and without ``cache_mixed``, against PEFT LoRA r=16's
mixed decoding on the same modules, timed round-robin.
The ``keep_original`` rows switch with the fused kernel of :mod:`peft_persona.fast_mask` where numba is installed
(the ``fast`` extra); the ``eager`` row is the same switch with the kernels off (``PEFT_PERSONA_KERNELS=0``).
Memory: peak-free RSS of a fresh process holding the model and 1, 2, 4 or 8 adapters, each of them made active once
(so that each keeps its switching record), minus that of the model alone (each count its own process).
Prints markdown tables; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import CONFIGS, interleaved_medians, markdown_table, mask_pair, n_params, random_llama

COUNTS = (1, 2, 4, 8)


def masks_for(base, seed, keep=0.8):
    from peft_persona.targets import decoder_linear_modules, oriented_weight

    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(oriented_weight(m).shape, generator=generator) < keep
        for n, m in decoder_linear_modules(base).items()
    }


def build(kind, base, count):
    from peft import LoraConfig, get_peft_model

    import peft_persona as pp
    from peft_persona.targets import decoder_linear_modules

    if kind == "persona":
        model = pp.add_mask_adapter(base, masks_for(base, 0), "p0")
        for i in range(1, count):
            pp.add_mask_adapter(model, masks_for(base, i), f"p{i}")
        return model.eval()
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=sorted(decoder_linear_modules(base)), init_lora_weights=False
    )
    model = get_peft_model(base, config, adapter_name="p0")
    for i in range(1, count):
        model.add_adapter(f"p{i}", config)
    return model.eval()


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that RSS shows what is live."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(config: str, kind: str, count: int) -> None:
    """Print the RSS growth of building ``count`` adapters of ``kind`` on the model, after one forward."""
    torch.set_num_threads(1)
    keep_original = kind == "persona-keep-original"
    if keep_original:
        kind = "persona"
    base = random_llama(config)
    tokens = torch.randint(3, base.config.vocab_size, (1, 1))
    with torch.no_grad():
        base(tokens)
    release_free_memory()
    before = rss_bytes()
    model = build(kind, base, count)
    if keep_original:
        from peft_persona.tuner import set_weight_mode

        set_weight_mode(model, keep_original=True)
    with torch.no_grad():
        for i in reversed(range(count)):  # every adapter in effect once, so that each keeps its switching record
            model.set_adapter(f"p{i}")
            model(tokens)
    release_free_memory()
    print(json.dumps({"rss_growth": rss_bytes() - before}))


def memory_table(config: str) -> str:
    base = random_llama(config)
    from peft_persona.targets import decoder_linear_modules, oriented_weight

    targeted = sum(oriented_weight(m).numel() for m in decoder_linear_modules(base).values())
    rows = []
    labels = {"persona": "persona", "persona-keep-original": "persona, keep_original", "lora": "LoRA r=16"}
    for kind, label in labels.items():
        growth = {}
        for count in COUNTS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", config, kind, str(count)],
                capture_output=True,
                text=True,
                check=True,
            )
            growth[count] = json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]
            marginal = (growth[count] - growth[1]) / (count - 1) if count > 1 else float("nan")
            rows.append([label, count, f"{growth[count] / 2**20:.1f}", f"{marginal / 2**20:.1f}" if count > 1 else "-"])
    header = ["adapter", "loaded", "RSS growth MiB", "each adapter beyond the first, MiB"]
    note = (
        f"\n\n{targeted / 1e6:.1f}M targeted weights: 1 bit each is {targeted / 8 / 2**20:.1f} MiB per persona "
        f"adapter; the switching record of each of the two adapters most recently in effect (int64 indices of its "
        f"20% dropped entries, {targeted * 0.2 * 8 / 2**20:.1f} MiB, and their original fp32 values, "
        f"{targeted * 0.2 * 4 / 2**20:.1f} MiB; the active adapter's values are the stash itself). keep_original: "
        f"one dense copy of the targeted weights per model ({targeted * 4 / 2**20:.1f} MiB in fp32) and, with the "
        f"fused kernel, no record"
    )
    return markdown_table(header, rows) + note


def spread_table(config: str, repeats: int, threads: int, first: dict[str, float], processes: int) -> str:
    """Each switch ratio (to the copy) in ``processes`` processes: this one's ``first`` and fresh ones."""
    runs = [first]
    for _ in range(processes - 1):
        out = subprocess.run(
            [sys.executable, __file__, "--switch-child", config, str(repeats), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    copy = "copy of the targeted weights"
    rows = []
    for name in first:
        ratios = sorted(run[name] / run[copy] for run in runs)
        rows.append([name, " ".join(f"{r:.2f}" for r in ratios), f"{statistics.median(ratios):.2f}"])
    copies = ", ".join(f"{run[copy] * 1e3:.1f}" for run in runs)
    header = ["operation", f"/ weight copy in {len(runs)} processes, sorted", "median"]
    return markdown_table(header, rows) + f"\n\ncopy ms per process, in run order: {copies}"


def index_ops_table(config: str, repeats: int) -> str:
    """The writes a switch is made of, on the targeted weights with two random masks at sparsity 0.2."""
    from peft_persona.targets import decoder_linear_modules, oriented_weight

    base = random_llama(config)
    weights = [oriented_weight(m).detach() for m in decoder_linear_modules(base).values()]
    copies = [w.clone() for w in weights]
    kept_a, kept_b = mask_pair({str(i): tuple(w.shape) for i, w in enumerate(weights)}, None, seed=0)
    drop_a = [~kept_a[str(i)].view(-1) for i in range(len(weights))]
    drop_b = [~kept_b[str(i)].view(-1) for i in range(len(weights))]
    index_a = [d.nonzero().squeeze(1) for d in drop_a]
    index_b = [d.nonzero().squeeze(1) for d in drop_b]
    values_a = [w.view(-1)[i].clone() for w, i in zip(weights, index_a, strict=True)]
    only_a = [(a & ~b).nonzero().squeeze(1) for a, b in zip(drop_a, drop_b, strict=True)]
    only_b = [(b & ~a).nonzero().squeeze(1) for a, b in zip(drop_a, drop_b, strict=True)]
    values_only_a = [w.view(-1)[i].clone() for w, i in zip(weights, only_a, strict=True)]
    bool_b = [d.view_as(w) for d, w in zip(drop_b, weights, strict=True)]

    def each(fn):
        return lambda: [
            fn(*args)
            for args in zip(
                weights, copies, index_a, values_a, index_b, only_a, values_only_a, only_b, bool_b, strict=True
            )
        ]

    functions = {
        "copy of the targeted weights": each(lambda w, c, *_: c.copy_(w)),
        "index_copy_ (restore)": each(lambda w, c, ia, va, *_: w.view(-1).index_copy_(0, ia, va)),
        "index_fill_ (zero)": each(lambda w, c, ia, va, ib, *_: w.view(-1).index_fill_(0, ib, 0)),
        "index_select (read values)": each(lambda w, c, ia, va, ib, *_: w.view(-1).index_select(0, ib)),
        "switch writes: restore + zero": each(
            lambda w, c, ia, va, ib, *_: w.view(-1).index_copy_(0, ia, va).index_fill_(0, ib, 0)
        ),
        "pair difference: restore + zero where the masks differ": each(
            lambda w, c, ia, va, ib, oa, voa, ob, _: w.view(-1).index_copy_(0, oa, voa).index_fill_(0, ob, 0)
        ),
        "masked_fill_ (bool mask)": each(lambda w, *args: w.masked_fill_(args[-1], 0)),
    }
    with torch.no_grad():
        t = interleaved_medians(functions, repeats)
    copy = t["copy of the targeted weights"]
    rows = [[name, f"{seconds * 1e3:.1f}", f"{seconds / copy:.2f}"] for name, seconds in t.items()]
    return markdown_table(["operation (two random masks, sparsity 0.2)", "ms", "/ weight copy"], rows)


def switch_times(config: str, repeats: int) -> dict[str, float]:
    from peft_persona import fast_select  # importing the package registers the adapter type
    from peft_persona.targets import decoder_linear_modules, oriented_weight

    base = random_llama(config)
    weights = [oriented_weight(m) for m in decoder_linear_modules(base).values()]
    copies = [w.clone() for w in weights]
    persona = build("persona", base, 2)
    from peft_persona.tuner import set_weight_mode

    dense = build("persona", random_llama(config), 2)
    set_weight_mode(dense, keep_original=True)
    tokens = torch.randint(3, base.config.vocab_size, (1, 1))
    merged = build("persona", random_llama(config), 2)
    merged.merge_adapter()
    dense_merged = build("persona", random_llama(config), 2)
    set_weight_mode(dense_merged, keep_original=True)
    dense_merged.merge_adapter()
    eager = build("persona", random_llama(config), 2)
    set_weight_mode(eager, keep_original=True)
    turns = {id(m): itertools.cycle(["p1", "p0"]) for m in (persona, dense, merged, dense_merged, eager)}

    def switch(model, forward=False, merge=False, context=contextlib.nullcontext):
        """One switch of ``model`` to its other adapter: merged around it, or followed by a one-token forward."""

        def run():
            if merge:
                model.unmerge_adapter()
            with context():
                model.set_adapter(next(turns[id(model)]))
            if merge:
                model.merge_adapter()
            if forward:
                model(tokens)

        return run

    def copy_weights():
        for w, c in zip(weights, copies, strict=True):
            c.copy_(w)

    with torch.no_grad():
        return interleaved_medians(
            {
                "copy of the targeted weights": copy_weights,
                "forward alone (1 token)": lambda: persona(tokens),
                "set_adapter alone": switch(persona),
                "set_adapter + forward": switch(persona, forward=True),
                "merged switch (unmerge, set_adapter, merge)": switch(merged, merge=True),
                "set_adapter alone, keep_original": switch(dense),
                "set_adapter + forward, keep_original": switch(dense, forward=True),
                "merged switch, keep_original": switch(dense_merged, merge=True),
                "set_adapter alone, keep_original, eager (no kernel)": switch(eager, context=fast_select.eager),
            },
            repeats,
        )


def mixed_decode_table(config: str, repeats: int, new_tokens: int = 16) -> str:
    """Tokens/s of mixed-persona decoding (4 rows, two adapters) with and without ``cache_mixed``, and LoRA's."""
    from bench_forward import lora_model, persona_model

    from peft_persona.targets import decoder_linear_modules, oriented_weight

    base = random_llama(config)
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in decoder_linear_modules(base).items()}
    pair = mask_pair(shapes, None)
    models = {
        "persona mixed": persona_model(base, pair),
        "persona mixed, cache_mixed": persona_model(base, pair, cache_mixed=True),
        "LoRA r=16 mixed": lora_model(base, decoder_linear_modules(base)),
    }
    prompt = torch.randint(3, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    names = ["a", "b0"] * 2
    with torch.no_grad():
        runs = {
            k: (lambda m=m: m.generate(input_ids=prompt, adapter_names=names, **settings)) for k, m in models.items()
        }
        t = interleaved_medians(runs, max(3, repeats))
    lora = t["LoRA r=16 mixed"]
    rows = [[k, f"{4 * new_tokens / v:.1f}", f"{lora / v:.2f}"] for k, v in t.items()]
    return markdown_table(["mixed decoding, 4 rows, two adapters", "tokens/s", "/ LoRA mixed"], rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--switch-child":
        torch.set_num_threads(int(sys.argv[4]))
        print(json.dumps(switch_times(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="100M", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1, help="time the switch table in this many processes")
    parser.add_argument("--index-ops", action="store_true", help="also time the index operations of a switch")
    parser.add_argument("--mixed", action="store_true", help="also time mixed-persona decoding against LoRA's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.config}: {n_params(random_llama(args.config)) / 1e6:.1f}M parameters, fp32, "
        f"CPU {args.threads} threads\n"
    )
    started = time.perf_counter()
    times = switch_times(args.config, args.repeats)
    copy = times["copy of the targeted weights"]
    rows = [[name, f"{seconds * 1e3:.1f}", f"{seconds / copy:.2f}"] for name, seconds in times.items()]
    print(markdown_table(["operation", "ms", "/ weight copy"], rows), end="\n\n")
    if args.processes > 1:
        print(spread_table(args.config, args.repeats, args.threads, times, args.processes), end="\n\n")
    if args.index_ops:
        print(index_ops_table(args.config, args.repeats), end="\n\n")
    if args.mixed:
        print(mixed_decode_table(args.config, args.repeats), end="\n\n")
    print(memory_table(args.config))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
