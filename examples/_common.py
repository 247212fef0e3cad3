"""Helpers shared by the examples: the embedded model, a persona pair, and a small Yes/No persona probe.

The probe is a quick stand-in for the evaluation harness (``peft_persona.eval``), kept here so that the examples
run on their own; its statements are written for these examples and are not in the calibration data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PAIR = {"extravert": "builtin:extraversion#yes", "introvert": "builtin:extraversion#no"}
EXTRAVERT_STATEMENTS = [
    "I start conversations with strangers at parties.",
    "Spending the evening with a big group of friends recharges me.",
    "I like being the centre of attention.",
    "I would rather talk a problem through with people than think about it alone.",
    "A weekend without social plans feels empty to me.",
    "I enjoy meeting new people every day.",
]
INTROVERT_STATEMENTS = [
    "I need time alone after a day of meetings.",
    "I prefer a quiet evening with a book to a crowded party.",
    "I think carefully before I speak in a group.",
    "Small talk with strangers tires me out.",
    "I enjoy long walks on my own.",
    "I would rather have one close friend than many acquaintances.",
]


def load_embedded(model: str | None = None):
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct unless another model is named."""
    from peft_persona.models import DEFAULT_MODEL, load_model

    return load_model(model or DEFAULT_MODEL)


def extract_pair(
    model, tokenizer, method: str = "contrastive", sparsity: float = 0.2, max_length: int = 64, strength: float = 0.5
):
    """A ``PeftModel`` with the adapters ``extravert`` and ``introvert`` extracted from the built-in data, at
    ``strength`` (default: sparsity 0.2, strength 0.5, what ``peft-persona tune`` chose for extraversion on
    SmolLM2-135M-Instruct)."""
    from peft_persona import PersonaExtractor

    extractor = PersonaExtractor(model, tokenizer, max_length=max_length, batch_size=16)
    return extractor.extract(PAIR, method=method, sparsity=sparsity, strength=strength)


def _answer_ids(tokenizer) -> tuple[int, int]:
    yes, no = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("Yes", "No"))
    return yes, no


@torch.no_grad()
def yes_margins(model, tokenizer, statements: list[str]) -> list[float]:
    """``log P(Yes) - log P(No)`` of the first answer token to "Is this something you would say?" per statement.

    All statements go through the model in one left-padded batch.
    """
    yes, no = _answer_ids(tokenizer)
    prompts = [
        tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f'Is the following statement something you would say?\n"{s}"\nAnswer Yes or No.',
                }
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        for s in statements
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    logprobs = torch.log_softmax(model(**batch).logits[:, -1].float(), dim=-1)
    return [float(m) for m in logprobs[:, yes] - logprobs[:, no]]


def persona_probe(model, tokenizer) -> dict[str, float]:
    """How extraverted the active model answers: agreement with extravert statements minus introvert statements,
    and the fraction of the 12 statements answered the extravert way."""
    extra = yes_margins(model, tokenizer, EXTRAVERT_STATEMENTS)
    intro = yes_margins(model, tokenizer, INTROVERT_STATEMENTS)
    extravert_way = sum(m > 0 for m in extra) + sum(m < 0 for m in intro)
    return {
        "extraversion_margin": round(sum(extra) / len(extra) - sum(intro) / len(intro), 4),
        "extravert_answers": round(extravert_way / (len(extra) + len(intro)), 4),
    }


@torch.no_grad()
def reply(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """A greedy reply to ``prompt`` from the active persona."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Print ``payload`` and, if ``path`` is given, write it there as JSON (the tests read it)."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
