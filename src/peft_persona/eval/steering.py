"""Contrastive activation addition (CAA): the steering-vector baseline that persona masks are compared against.

A vector per decoder block: the mean residual stream (the block's output) at the last real token of the persona's
calibration texts, minus the same mean over the opposite persona's texts. Applying it adds ``coefficient * vector``
to that block's output at every position; a negative coefficient steers toward the opposite persona.

This is what ``steering_vectors.train_steering_vector`` computes with its defaults (``read_token_index=-1``, mean
aggregator over paired differences: for equal-sized sets the mean of differences is the difference of means).
That package pins ``transformers<5``, so the few lines are written here instead of depending on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import tokens
from ..data import Text
from ..models import ensure_pad_token
from ..targets import decoder_block_list


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks (a ``PeftModel``'s base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(decoder_block_list(base))


@dataclass(frozen=True)
class SteeringVector:
    """One block's CAA direction. ``direction`` is float32 of the model's hidden size."""

    layer: int
    direction: torch.Tensor

    @contextlib.contextmanager
    def applied(self, model: nn.Module, coefficient: float) -> Iterator[nn.Module]:
        """Inside, block ``layer`` of ``model`` outputs its hidden states plus ``coefficient * direction``."""
        block = decoder_blocks(model)[self.layer]

        def add(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden + coefficient * self.direction.to(dtype=hidden.dtype, device=hidden.device)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handle = block.register_forward_hook(add)
        try:
            yield model
        finally:
            handle.remove()


@torch.no_grad()
def last_token_residuals(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Text],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[int, torch.Tensor]:
    """Per block in ``layers``: the ``(n_texts, hidden)`` float32 outputs at each text's last real token, in the order
    :func:`peft_persona.tokens.batches` runs the texts (longest first)."""
    encoded = tokens.encode(tokenizer, "steering", texts, max_length)
    device = model.get_input_embeddings().weight.device
    found: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, attention in tokens.batches(encoded, ensure_pad_token(tokenizer), batch_size):
        ids, attention = ids.to(device), attention.to(device)
        hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        last, rows = attention.sum(dim=1) - 1, torch.arange(ids.shape[0], device=device)
        for layer in layers:
            found[layer].append(hidden[layer + 1][rows, last].float().cpu())  # hidden_states[0] is the embedding
    return {layer: torch.cat(parts) for layer, parts in found.items()}


def caa_vectors(
    model: nn.Module,
    tokenizer: Any,
    persona_texts: Sequence[Text],
    opposite_texts: Sequence[Text],
    layers: Sequence[int],
    **kwargs: Any,
) -> dict[int, SteeringVector]:
    """The CAA vector of each block in ``layers``: persona mean minus opposite mean of the last-token residuals.

    ``model`` should be the plain base model (inside ``disable_adapter()`` for a ``PeftModel``). ``kwargs`` go to
    :func:`last_token_residuals`.
    """
    n_blocks = len(decoder_blocks(model))
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise ValueError(f"steering layers {bad} do not exist: the model has decoder blocks 0 to {n_blocks - 1}")
    positive = last_token_residuals(model, tokenizer, persona_texts, layers, **kwargs)
    negative = last_token_residuals(model, tokenizer, opposite_texts, layers, **kwargs)
    return {layer: SteeringVector(layer, positive[layer].mean(0) - negative[layer].mean(0)) for layer in layers}


def default_layers(n_blocks: int) -> list[int]:
    """The blocks a sweep tries: a third, a half and two thirds of the way up (steering works best mid-depth)."""
    return sorted({max(0, min(n_blocks - 1, round(n_blocks * f))) for f in (1 / 3, 1 / 2, 2 / 3)})
