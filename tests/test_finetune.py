"""The LoRA fine-tuning baseline: it learns the calibration texts, leaves the base model alone and comes back merged."""

from __future__ import annotations

import torch

from conftest import tiny_llama, tiny_tokenizer, word_texts
from peft_persona.eval.finetune import LoraBudget, train_lora


def test_lora_learns_the_texts_and_leaves_the_base_untouched():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = word_texts(4, 6, min_len=6)
    budget = LoraBudget(rank=4, steps=40, batch_size=3, learning_rate=1e-2)
    lora, losses = train_lora(model, tokenizer, texts, ["q_proj", "v_proj", "up_proj", "down_proj"], budget)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tuned = lora.merge_and_unload()
    assert not any("lora" in name for name, _ in tuned.named_modules())
    assert set(tuned.state_dict()) == set(before)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(
        k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight")) for k in changed
    )
    _, same_losses = train_lora(model, tokenizer, texts, ["q_proj", "v_proj", "up_proj", "down_proj"], budget)
    assert same_losses == losses  # seeded


def test_texts_too_short_to_train_on_are_refused():
    import pytest

    with pytest.raises(ValueError, match="two or more tokens"):
        train_lora(tiny_llama(), tiny_tokenizer(), ["w7"], ["q_proj"])


def test_without_a_copy_the_lora_is_added_to_the_model_given():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    budget = LoraBudget(rank=4, steps=2, batch_size=3)
    copied, copied_losses = train_lora(model, tokenizer, word_texts(4, 6, min_len=6), ["q_proj"], budget)
    lora, losses = train_lora(model, tokenizer, word_texts(4, 6, min_len=6), ["q_proj"], budget, copy_model=False)
    assert lora.get_base_model() is model and copied.get_base_model() is not model
    assert losses == copied_losses  # the same training either way
