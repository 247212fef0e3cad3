"""One SHA-256 per (model, method, persona) over the extracted masks, and the saved adapter configs: a fingerprint of
the extractor's outputs to diff before and after a refactor (they must be bit-identical).

    python benchmarks/mask_digests.py [--real] > digests.txt

The tiny model is a seeded random-init Llama (2 layers, hidden 64) with an in-process word tokenizer, extracted
whole and layer by layer (from a saved checkpoint); ``--real`` adds the embedded SmolLM2-135M-Instruct on a few
built-in extraversion texts. Only public API is used. Timings and other run-dependent fields are left out.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import tempfile
from pathlib import Path

import torch
from _common import random_llama, random_texts, word_tokenizer

import peft_persona as pp
from peft_persona.bits import pack_mask

VOLATILE = ("peft_version", "revision")
# (label, personas key, recipe keywords)
RECIPES = [
    ("wanda", "pair", dict(method="wanda")),
    ("wanda-reference", "pair", dict(method="wanda", reference=True)),
    ("contrastive-relu", "pair", dict(method="contrastive", phi="relu")),
    ("contrastive-softplus", "pair", dict(method="contrastive", phi="softplus", tau=0.5)),
    ("contrastive-reference", "pair", dict(method="contrastive", reference=True)),
    ("contrastive-one-vs-rest", "three", dict(method="contrastive")),
    ("obs", "pair", dict(method="obs")),
    ("magnitude", "controls", dict(method="magnitude")),
    ("random", "controls", dict(method="random", seed=3)),
    ("random-reference", "controls", dict(method="random", seed=3, reference=True)),
]


def digest(masks: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for layer in sorted(masks):
        sha.update(layer.encode() + b"\0")
        sha.update(pack_mask(masks[layer].bool()).contiguous().numpy().tobytes())
    return sha.hexdigest()


def saved(peft_model, name: str) -> tuple[dict, str]:
    """The adapter's saved config (less volatile fields) and a SHA-256 of its saved weights file."""
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, selected_adapters=[name], save_embedding_layers=False)
        root = Path(folder) / (name if name != "default" else "")
        config = json.loads((root / "adapter_config.json").read_text())
        weights = hashlib.sha256((root / "adapter_model.safetensors").read_bytes()).hexdigest()
    config = {k: v for k, v in config.items() if k not in VOLATILE}
    config["target_modules"] = sorted(config["target_modules"])  # a set: its order varies with the hash seed
    if str(config.get("base_model_name_or_path")).startswith(tempfile.gettempdir()):
        config["base_model_name_or_path"] = "<temporary checkpoint folder>"
    return config, weights


def extract(extractor, personas: dict, strength: float | None = None, **kw):
    if strength is not None and "strength" in inspect.signature(extractor.extract).parameters:
        return extractor.extract(personas, strength=strength, **kw)
    peft_model = extractor.extract(personas, **kw)
    if strength is not None:  # before `extract(strength=...)` existed
        for name in personas:
            pp.set_strength(peft_model, name, strength)
    return peft_model


def report(label: str, extractor, peft_model, personas: dict) -> None:
    summary = extractor.summary
    print(f"{label} summary kept={summary.kept_fraction!r} overlap={summary.overlap!r} tokens={summary.n_tokens}")
    for name in personas:
        config, weights = saved(peft_model, name)
        print(f"{label} {name} masks {digest(pp.get_masks(peft_model, name))}")
        print(f"{label} {name} file {weights}")
        print(f"{label} {name} config {json.dumps(config, sort_keys=True, default=str)}")


def run_all(model_label: str, make, sets: dict, sparsity: float) -> None:
    for label, which, recipe in RECIPES:
        extractor = make()
        personas = sets[which]
        peft_model = extract(extractor, personas, sparsity=sparsity, **recipe)
        report(f"{model_label} {label}", extractor, peft_model, personas)
    extractor = make()
    peft_model = extract(extractor, sets["pair"], strength=0.5, method="contrastive", sparsity=sparsity)
    report(f"{model_label} contrastive-strength-0.5", extractor, peft_model, sets["pair"])
    for method in ("wanda", "contrastive", "magnitude"):
        extractor = make()
        personas = sets["controls" if method == "magnitude" else "pair"]
        peft_model = extractor.extract(personas, method=method, sparsity=sparsity, save_format="stats")
        report(f"{model_label} {method}-stats-format", extractor, peft_model, personas)


def tiny(folder: Path) -> None:
    model = random_llama("tiny", seed=0)
    tokenizer = word_tokenizer(model.config.vocab_size)
    sets = {
        "pair": {"a": random_texts(9, 1000, 2, 14, seed=1), "b": random_texts(7, 1000, 2, 14, seed=2)},
        "three": {p: random_texts(6, 1000, 2, 14, seed=s) for s, p in enumerate("xyz", 3)},
        "controls": {"a": None, "b": None},
    }
    model.save_pretrained(folder, max_shard_size="60KB")
    tokenizer.save_pretrained(folder)
    run_all("tiny-whole", lambda: pp.PersonaExtractor(copy.deepcopy(model), tokenizer, batch_size=3), sets, 0.5)
    mlp = pp.PersonaExtractor(copy.deepcopy(model), tokenizer, batch_size=4, target="mlp", layers="1")
    report("tiny-whole mlp-layer1-wanda", mlp, mlp.extract(sets["pair"], sparsity=0.3), sets["pair"])
    stats = {n: pp.PersonaExtractor(model, tokenizer).calibrate(n, t) for n, t in sets["pair"].items()}
    for n, m in pp.PersonaExtractor(model, tokenizer).masks(stats, method="contrastive", sparsity=0.7).items():
        print(f"tiny-whole masks()-contrastive-0.7 {n} masks {digest(m)}")
    chats = {"a": [[{"role": "user", "content": t}] for t in sets["pair"]["a"]], "b": sets["pair"]["b"]}
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} w5 {{ m['content'] }} w2 {% endfor %}"
    chat = pp.PersonaExtractor(copy.deepcopy(model), tokenizer, batch_size=3)
    report("tiny-whole chat-wanda", chat, chat.extract(chats, sparsity=0.5), chats)
    run_all("tiny-layerwise", lambda: pp.PersonaExtractor.from_pretrained(str(folder), batch_size=3), sets, 0.5)


def real() -> None:
    from peft_persona.data import load_texts
    from peft_persona.models import load_model

    model, tokenizer = load_model()
    yes, no = load_texts("builtin:extraversion#yes"), load_texts("builtin:extraversion#no")
    sets = {"pair": {"extravert": yes[:4], "introvert": no[:4]}, "controls": {"a": None, "b": None}}
    sets["three"] = {"e1": yes[:3], "e2": yes[3:6], "i1": no[:3]}
    make = lambda: pp.PersonaExtractor(copy.deepcopy(model), tokenizer, batch_size=4, max_length=32)  # noqa: E731
    run_all("smollm2", make, sets, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        tiny(Path(folder))
    if args.real:
        real()


if __name__ == "__main__":
    main()
