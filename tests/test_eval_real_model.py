"""Real-model smoke test: SmolLM2-135M-Instruct scores 20 items per format, batched exactly like a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DATA_ROOT
from peft_persona.eval import harness, items
from peft_persona.eval.conditions import render

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize(
    ("persona", "fmt"), [("extraversion", "yes_no"), ("extraversion", "statement"), ("power", "paper_ab")]
)
def test_smollm2_scores_twenty_items_per_format(smollm2, persona, fmt):
    model, tokenizer = smollm2
    chosen = items.load_items(DATA_ROOT, items.PERSONAS[persona], fmt, 20)
    with torch.inference_mode():
        scores = harness.score_items(model, tokenizer, chosen, batch_size=8)
    values = harness.item_values(chosen, scores)
    summary = harness.summarize(fmt, values)
    assert len(scores) == 20 and all(len(s) == len(i.choices) for s, i in zip(scores, chosen, strict=True))
    assert all(math.isfinite(s.logprob) and s.logprob < 0 for group in scores for s in group)
    if fmt == "statement":
        assert summary["margin"]["n"] == 20 and 0 <= summary["auc"] <= 1
    else:
        assert summary["accuracy"]["n"] == 20 and 0 <= summary["first_choice_share"] <= 1
    # the first item, scored alone without padding or cache, gives the same numbers
    item = chosen[0]
    context = tokenizer(render(tokenizer, item.user), add_special_tokens=False)["input_ids"]
    for choice, score in zip(item.choices, scores[0], strict=True):
        continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), -1)
        naive = sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
        assert score.logprob == pytest.approx(naive, abs=2e-3)
