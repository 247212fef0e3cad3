"""The fine-tuning baseline: a LoRA trained for a small fixed budget on a persona's calibration texts.

This is what a user would try instead of a mask (the paper's SFT row): PEFT's own LoRA, rank 16 by default, on the
same linear layers the masks target, trained with the causal-LM loss on every real token of the same texts the
masks were calibrated on. Training is seeded and runs on the model's device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import tokens
from ..data import Text
from ..models import ensure_pad_token


@dataclass(frozen=True)
class LoraBudget:
    """The fixed training budget: optimizer ``steps`` of ``batch_size`` texts (cycling through them), AdamW."""

    rank: int = 16
    alpha: int = 32
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 2e-4
    max_length: int = 256
    seed: int = 0


def _batch(encoded: Sequence[list[int]], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids, attention = next(tokens.batches(encoded, pad_token_id, len(encoded)))
    ids, attention = ids.to(device), attention.to(device)
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}


def train_lora(
    base_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Text],
    target_modules: Sequence[str],
    budget: LoraBudget = LoraBudget(),
    copy_model: bool = True,
) -> tuple[nn.Module, list[float]]:
    """A copy of ``base_model`` with a LoRA fine-tuned on ``texts`` (a ``PeftModel``; ``merge_and_unload()`` gives a
    plain model), and the training loss of every step.

    ``base_model`` (a plain transformers model) is left unchanged, unless ``copy_model`` is ``False``: then the LoRA
    is added to ``base_model`` itself (a copy made for this alone: one copy of the weights less in memory);
    ``target_modules`` are module names or suffixes, as PEFT's ``LoraConfig`` takes them.
    """
    from peft import LoraConfig, get_peft_model

    encoded = [ids for ids in tokens.encode(tokenizer, "lora", texts, budget.max_length) if len(ids) > 1]
    if not encoded:
        raise ValueError("no calibration text has two or more tokens to train on")
    torch.manual_seed(budget.seed)
    config = LoraConfig(
        r=budget.rank,
        lora_alpha=budget.alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base_model) if copy_model else base_model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget.learning_rate)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(budget.seed)).tolist()
    device, losses, pad = base_model.get_input_embeddings().weight.device, [], ensure_pad_token(tokenizer)
    for step in range(budget.steps):
        picks = [order[(step * budget.batch_size + i) % len(order)] for i in range(budget.batch_size)]
        loss = model(**_batch([encoded[i] for i in picks], pad, device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model.eval(), losses
