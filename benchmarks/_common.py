"""Helpers shared by the benchmark scripts: configs, a timer and table printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    # name: (LlamaConfig kwargs) -- random init, nothing downloaded
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000),
    "100M": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000
    ),
    "7B": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    ),
}
# SmolLM2-135M's shapes, random init
SMOLLM2_SHAPES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def random_llama(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = SMOLLM2_SHAPES if name == "smollm2-shapes" else CONFIGS[name]
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 .. w{vocab_size-1}`` built in-process (``w0`` pads, ``w1`` is unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", eos_token="w2", unk_token="w1")


def random_texts(n: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(3, vocab_size, (int(k),), generator=generator)) for k in lengths
    ]


def mask_pair(shapes: dict[str, tuple[int, ...]], differ: float | None, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two random masks per shape, each dropping 20% of the entries (sparsity 0.2): independent (``differ`` None:
    they then differ in 32% of the entries), or differing in exactly the fraction ``differ`` (at most 0.4) of them, as
    a real pair of persona masks does (the extract command's ``overlap`` gives it: ``2 * kept * (1 - overlap)``)."""
    generator = torch.Generator().manual_seed(seed)
    if differ is None:
        return [{n: torch.rand(s, generator=generator) < 0.8 for n, s in shapes.items()} for _ in range(2)]
    if not 0 <= differ <= 0.4:
        raise ValueError(f"--differ must lie in [0, 0.4] for two masks at sparsity 0.2, got {differ}")
    uniform = {n: torch.rand(s, generator=generator) for n, s in shapes.items()}
    first = {n: u >= 0.2 for n, u in uniform.items()}
    second = {n: ~((u < 0.2 - differ / 2) | ((u >= 0.2) & (u < 0.2 + differ / 2))) for n, u in uniform.items()}
    return [first, second]
