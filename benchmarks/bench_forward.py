"""Forward and generate speed of persona masks beside PEFT LoRA r=16 on the same modules, as ratios to the base model.

    python benchmarks/bench_forward.py [--config 100M] [--repeats 10] [--threads 2] [--device cpu] [--differ F]
        [--generate-only] [--pair DIR]

Variants, each its own copy of one random-init Llama (nothing downloaded), timed round-robin in one run:

* ``base``: the model without adapters (the floor: one copy of the weights, nothing else);
* ``persona``: an unmerged persona mask adapter, the default forward (W_eff written into the weight in place);
* ``persona, per-call W*M``: the same adapter with ``in_place = False``, computing ``W * M`` in every call (the
  previous release's forward, and the fallback used under autograd);
* ``persona merged``: ``merge_adapter()``, the paper code's approach (the pruned weights, no way back but a copy);
* ``LoRA r=16``: PEFT LoRA, unmerged, on the same modules;
* ``mixed``: a batch whose rows are split between two adapters (``adapter_names=``), persona and LoRA alike;
  ``cache_mixed`` is the persona model with ``set_weight_mode(cache_mixed=True)`` (what the first mixed call builds
  for the other adapter is kept: its sparse difference to the weight in effect for groups of at most 32 tokens,
  its dense ``W_eff`` for larger ones).

The two persona adapters drop 20% each, independently (they differ in 32% of the entries), or with ``--differ F``
in exactly the fraction F of the entries, like a real pair (mixed batches with ``cache_mixed`` read that
difference). ``--pair DIR``: the embedded SmolLM2-135M-Instruct instead, with the two adapters an ``extract`` run
saved in ``DIR`` (a real pair). ``--generate-only`` skips the forward table.

Prints markdown tables; docs/benchmarks.md records them. On a GPU (``--device cuda``) use ``--config 7B --dtype
bfloat16`` for the random-init 7B-shaped rows.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import CONFIGS, interleaved_medians, markdown_table, mask_pair, n_params, random_llama
from peft import LoraConfig, get_peft_model

import peft_persona as pp
from peft_persona.targets import decoder_linear_modules, oriented_weight
from peft_persona.tuner import set_weight_mode

SHAPES = ((1, 1), (1, 128), (8, 128))


def persona_model(base, masks_list, in_place=True, merged=False, cache_mixed=False):
    model = pp.add_mask_adapter(copy.deepcopy(base), masks_list[0], "a")
    for i, masks in enumerate(masks_list[1:]):
        pp.add_mask_adapter(model, masks, f"b{i}")
    model.set_adapter("a")
    set_weight_mode(model, in_place=in_place, cache_mixed=cache_mixed)
    if merged:
        model.merge_adapter()
    return model.eval()


def lora_model(base, modules):
    config = LoraConfig(r=16, lora_alpha=32, target_modules=sorted(modules), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a")
    model.add_adapter("b0", config)
    model.set_adapter("a")
    return model.eval()


def embedded_model() -> torch.nn.Module:
    from peft_persona.models import load_model

    return load_model()[0].eval()


def saved_pair(base: torch.nn.Module, folder: str) -> list[dict[str, torch.Tensor]]:
    """The masks of the two adapters an ``extract`` run saved in ``folder`` (in its subfolders' order)."""
    from pathlib import Path

    from peft import PeftModel

    from peft_persona.tuner import get_masks

    names = sorted(p.parent.name for p in Path(folder).glob("*/adapter_config.json"))
    if len(names) != 2:
        raise SystemExit(f"--pair {folder}: expected two adapter folders, found {names}")
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(Path(folder) / names[0]), adapter_name=names[0])
    model.load_adapter(str(Path(folder) / names[1]), adapter_name=names[1])
    return [get_masks(model, n) for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="100M", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--differ", type=float, default=None, help="fraction of entries where the two masks differ")
    parser.add_argument("--generate-only", action="store_true", help="only the generate table")
    parser.add_argument("--pair", default=None, help="folder of an extract run: its two adapters on SmolLM2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = (random_llama(args.config) if args.pair is None else embedded_model()).to(args.device, dtype)
    generator = torch.Generator().manual_seed(1)
    modules = decoder_linear_modules(base)
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in modules.items()}
    masks_list = [  # sparsity 0.2, the fluent regime
        {n: mask.to(args.device) for n, mask in masks.items()}
        for masks in (mask_pair(shapes, args.differ) if args.pair is None else saved_pair(base, args.pair))
    ]
    models = {
        "base": base,
        "persona": persona_model(base, masks_list),
        "persona, per-call W*M": persona_model(base, masks_list, in_place=False),
        "persona merged": persona_model(base, masks_list, merged=True),
        "LoRA r=16": lora_model(base, modules),
    }
    cached = persona_model(base, masks_list, cache_mixed=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    differ = sum(int((masks_list[0][n] != masks_list[1][n]).sum()) for n in shapes) / sum(
        masks_list[0][n].numel() for n in shapes
    )
    print(
        f"{args.config if args.pair is None else 'SmolLM2-135M-Instruct, pair ' + args.pair}: "
        f"{n_params(base) / 1e6:.1f}M parameters, {args.dtype}, {device_name}; the two masks differ in "
        f"{differ:.3f} of the entries\n"
    )

    rows = []
    for batch, length in [] if args.generate_only else SHAPES:
        tokens = torch.randint(3, base.config.vocab_size, (batch, length), generator=generator).to(args.device)
        runs = {name: (lambda m=m, t=tokens: (m(t, use_cache=False), sync())) for name, m in models.items()}
        if batch > 1:
            names = ["a", "b0"] * (batch // 2)
            runs["persona mixed (2 adapters)"] = lambda t=tokens, names=names: (
                models["persona"](t, use_cache=False, adapter_names=names),
                sync(),
            )
            runs["persona mixed (2 adapters), cache_mixed"] = lambda t=tokens, names=names: (
                cached(t, use_cache=False, adapter_names=names),
                sync(),
            )
            runs["LoRA mixed (2 adapters)"] = lambda t=tokens, names=names: (
                models["LoRA r=16"](t, use_cache=False, adapter_names=names),
                sync(),
            )
        with torch.no_grad():
            t = interleaved_medians(runs, args.repeats)
        for name in runs:
            rows.append(
                [
                    f"{batch}x{length}",
                    name,
                    f"{t[name] * 1e3:.2f}",
                    f"{t[name] / t['base']:.2f}",
                    f"{t[name] / t['LoRA r=16']:.2f}",
                ]
            )
    if rows:
        print(markdown_table(["batch x tokens", "variant", "ms", "/ base", "/ LoRA unmerged"], rows))

    prompt = torch.randint(3, base.config.vocab_size, (1, 16), generator=generator).to(args.device)
    batch4 = prompt.repeat(4, 1)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    gen = {name: (lambda m=m: (m.generate(input_ids=prompt, **settings), sync())) for name, m in models.items()}
    gen["persona mixed, 4 rows"] = lambda: (
        models["persona"].generate(input_ids=batch4, adapter_names=["a", "b0"] * 2, **settings),
        sync(),
    )
    gen["persona mixed, 4 rows, cache_mixed"] = lambda: (
        cached.generate(input_ids=batch4, adapter_names=["a", "b0"] * 2, **settings),
        sync(),
    )
    gen["LoRA mixed, 4 rows"] = lambda: (
        models["LoRA r=16"].generate(input_ids=batch4, adapter_names=["a", "b0"] * 2, **settings),
        sync(),
    )
    t = interleaved_medians(gen, max(3, args.repeats // 3))
    rows = []
    for name, seconds in t.items():
        tokens = args.new_tokens * (4 if "4 rows" in name else 1)
        rows.append([name, f"{tokens / seconds:.1f}", f"{t['base'] / seconds * (4 if '4 rows' in name else 1):.2f}"])
    print()
    print(markdown_table(["generate (16-token prompt, greedy)", "tokens/s", "tokens/s vs base (batch 1)"], rows))


if __name__ == "__main__":
    main()
