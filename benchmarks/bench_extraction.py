"""Whole extraction time as a ratio to a bare forward pass over the same calibration tokens.

    python benchmarks/bench_extraction.py [--models 100M smollm2] [--threads 2]

For each model: the bare forward is the plain CausalLM forward (``no_grad``, no cache) over exactly the batches the
extractor builds; the extraction is ``PersonaExtractor.extract`` end to end (calibration, scores, selection, adapters).
Timed round-robin in one run; the median of ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import markdown_table, n_params, random_llama, random_texts, word_tokenizer

from peft_persona import PersonaExtractor, tokens

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def workloads(name: str):
    if name == "100M":
        model = random_llama("100M")
        tokenizer = word_tokenizer(model.config.vocab_size)
        texts = {"a": random_texts(64, 32000, 16, 128, seed=1), "b": random_texts(64, 32000, 16, 128, seed=2)}
        yield "100M random init, 2x64 random texts of 16-128 tokens", model, tokenizer, texts
        return
    from peft_persona.data import load_texts
    from peft_persona.models import load_model

    model, tokenizer = load_model()
    yield (
        "SmolLM2-135M, builtin extraversion 2x100 statements",
        model,
        tokenizer,
        {"extravert": "builtin:extraversion#yes", "introvert": "builtin:extraversion#no"},
    )
    train = f"{SHARED}/paper-persona/train.csv"
    yield (
        "SmolLM2-135M, paper power train.csv, first 2x200 Q/A",
        model,
        tokenizer,
        {"power": load_texts(f"{train}#matching")[:200], "no_power": load_texts(f"{train}#not_matching")[:200]},
    )


def bare_forward(extractor: PersonaExtractor, personas: dict) -> None:
    with torch.no_grad():
        for name, texts in personas.items():
            encoded, _ = tokens.prepare(extractor.tokenizer, name, texts, extractor.max_length)
            for input_ids, attention in tokens.batches(encoded, extractor.tokenizer.pad_token_id, extractor.batch_size):
                extractor.base_model(input_ids=input_ids, attention_mask=attention, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["100M", "smollm2"])
    parser.add_argument("--methods", nargs="+", default=["wanda", "contrastive", "obs"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models:
        for label, model, tokenizer, personas in workloads(model_name):
            times: dict[str, list[float]] = {"forward": [], **{m: [] for m in args.methods}}
            parts: dict[str, dict[str, float]] = {}
            n_tokens = 0
            for _ in range(args.repeats):
                extractor = PersonaExtractor(model, tokenizer, batch_size=8, max_length=256)
                start = time.perf_counter()
                bare_forward(extractor, personas)
                times["forward"].append(time.perf_counter() - start)
                for method in args.methods:
                    extractor = PersonaExtractor(model, tokenizer, batch_size=8, max_length=256)
                    start = time.perf_counter()
                    peft_model = extractor.extract(personas, method=method, sparsity=0.5)
                    times[method].append(time.perf_counter() - start)
                    parts[method] = extractor.summary.seconds
                    n_tokens = sum(extractor.summary.n_tokens.values())
                    model = peft_model.unload()
            forward = statistics.median(times["forward"])
            for method in args.methods:
                total = statistics.median(times[method])
                rows.append(
                    [
                        label,
                        f"{n_params(model) / 1e6:.0f}M",
                        n_tokens,
                        method,
                        f"{forward:.2f}",
                        f"{total:.2f}",
                        f"{total / forward:.2f}",
                        f"{parts[method]['calibration'] / forward:.2f}",
                    ]
                )
    print(
        markdown_table(
            [
                "workload",
                "params",
                "calibration tokens",
                "method",
                "bare forward s",
                "extraction s",
                "extraction / forward",
                "calibration only / forward",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
