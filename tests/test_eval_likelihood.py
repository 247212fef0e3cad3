"""The batched scorer equals a naive unbatched loop; conditions switch adapters exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_FACTORIES, VOCAB, chat_tokenizer, logits, masked_reference, random_masks, tiny_llama
from peft_persona import add_mask_adapter
from peft_persona.eval import conditions
from peft_persona.eval.likelihood import Score, score_continuations, score_ids


def naive(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation_t | prefix) from one unpadded forward pass per request."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation))


def requests(seed: int, shared_prefix: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    contexts, continuations = [], []
    for _ in range(9):
        contexts.append(
            shared_prefix
            + torch.randint(3, VOCAB, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        )
        continuations.append(
            torch.randint(3, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        )
    contexts += [contexts[0], contexts[0]]  # two single-token answers to one context share a forward pass
    continuations += [[11], [12]]
    return contexts, continuations


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("shared_prefix", [[5, 6, 7, 8], []])
def test_batched_scores_equal_a_naive_loop(arch, prefix_cache, shared_prefix):
    model = MODEL_FACTORIES[arch](0)
    contexts, continuations = requests(1, shared_prefix or [4])
    scores = score_ids(model, contexts, continuations, pad_token_id=0, batch_size=3, prefix_cache=prefix_cache)
    for score, context, continuation in zip(scores, contexts, continuations, strict=True):
        assert score.n_tokens == len(continuation)
        assert score.logprob == pytest.approx(naive(model, context, continuation), abs=1e-4)
        assert score.mean == pytest.approx(score.logprob / len(continuation))


def test_text_interface_tokenizes_context_and_continuation_separately():
    model, tokenizer = tiny_llama(0), chat_tokenizer()
    scores = score_continuations(model, tokenizer, ["I would say", "I would say"], [" Yes", " No"], batch_size=2)
    ids = tokenizer("I would say", add_special_tokens=False)["input_ids"]
    yes, no = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" Yes", " No"))
    assert scores == [
        Score(pytest.approx(naive(model, ids, yes), abs=1e-5), 1),
        Score(pytest.approx(naive(model, ids, no), abs=1e-5), 1),
    ]


def test_scorer_errors_name_the_request():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="contexts and continuations differ in length: 2 vs 1"):
        score_ids(model, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="request 1: the context is empty"):
        score_ids(model, [[1], []], [[3], [4]])
    with pytest.raises(ValueError, match="request 0: the continuation is empty"):
        score_ids(model, [[1]], [[]])
    with pytest.raises(ValueError, match="batch_size"):
        score_ids(model, [[1]], [[2]], batch_size=0)
    assert score_ids(model, [], []) == []


def test_active_switches_adapters_and_restores_the_base_exactly(tokens):
    model = tiny_llama(0)
    base_logits = logits(model, tokens)
    masks = {"trait": random_masks(model, 1), "random": random_masks(model, 2)}
    peft_model = add_mask_adapter(model, masks["trait"], "trait")
    add_mask_adapter(peft_model, masks["random"], "random")
    for name in ("trait", "random", "trait"):
        with conditions.active(peft_model, name):
            expected = logits(masked_reference(tiny_llama, 0, [masks[name]]), tokens)
            assert torch.allclose(logits(peft_model, tokens), expected, atol=1e-5)
        with conditions.active(peft_model, None):
            assert torch.equal(logits(peft_model, tokens), base_logits)
    with pytest.raises(KeyError, match="no adapter 'nope'"), conditions.active(peft_model, "nope"):
        pass


def test_render_puts_the_system_prompt_first():
    tokenizer = chat_tokenizer()
    assert conditions.render(tokenizer, "Hi") == "<|user|> Hi <|end|> <|assistant|>"
    assert conditions.render(tokenizer, "Hi", "Be w1").startswith("<|system|> Be w1 <|end|> <|user|> Hi")
