"""The CAA steering-vector baseline: the vector is the difference of last-token means, and applying it adds exactly
``coefficient * vector`` to one block's output and nothing once the block is left."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer, word_texts
from peft_persona.eval.steering import caa_vectors, decoder_blocks, default_layers, last_token_residuals


def one_by_one(model, tokenizer, texts, layer):
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1])
    return torch.stack(rows)


def test_vector_is_the_difference_of_last_token_means_whatever_the_batching():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    yes, no = word_texts(1, 7), word_texts(2, 5)
    vectors = caa_vectors(model, tokenizer, yes, no, layers=[0, 1], batch_size=3)
    for layer in (0, 1):
        expected = one_by_one(model, tokenizer, yes, layer).mean(0) - one_by_one(model, tokenizer, no, layer).mean(0)
        torch.testing.assert_close(vectors[layer].direction, expected, rtol=1e-5, atol=1e-5)
    batched = last_token_residuals(model, tokenizer, yes, [1], batch_size=7)[1]
    longest_first = sorted(yes, key=lambda t: -len(tokenizer(t)["input_ids"]))  # the order tokens.batches runs
    torch.testing.assert_close(batched, one_by_one(model, tokenizer, longest_first, 1), rtol=1e-5, atol=1e-5)


def test_applied_adds_the_scaled_vector_to_one_block_and_is_removed_after():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    vector = caa_vectors(model, tokenizer, word_texts(1, 4), word_texts(2, 4), layers=[0])[0]
    ids = torch.tensor([tokenizer(word_texts(3, 1)[0])["input_ids"]])
    seen = []  # what block 1 receives: block 0's (steered) output
    decoder_blocks(model)[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        base = model(input_ids=ids).logits
        hooks_before = len(decoder_blocks(model)[0]._forward_hooks)  # transformers may keep its own
        with vector.applied(model, 3.0):
            steered = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(seen[1], seen[0] + 3.0 * vector.direction)
    assert not torch.equal(steered, base)
    assert torch.equal(after, base) and torch.equal(seen[2], seen[0])
    assert len(decoder_blocks(model)[0]._forward_hooks) == hooks_before


def test_missing_layer_is_named():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match=r"steering layers \[5\] do not exist.*0 to 1"):
        caa_vectors(model, tokenizer, ["w7 w8"], ["w9 w10"], layers=[5])


def test_default_layers_sit_mid_depth():
    assert default_layers(30) == [10, 15, 20]
    assert default_layers(2) == [1]
