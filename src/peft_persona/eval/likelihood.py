"""Batched log-likelihood of continuations given contexts, equal (to float tolerance) to an unbatched loop.

Each request ``(context, continuation)`` is scored as ``sum_t log p(continuation_t | context, continuation_<t)``.
Requests are run left-padded with explicit position ids, so every row sees exactly the positions and keys it would
see alone. Requests whose model input is identical (e.g. " Yes" and " No" after one prompt) share one forward pass,
and a token prefix common to every request (the chat template's system turn) is run once and reused from the KV
cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import ensure_pad_token


@dataclass(frozen=True)
class Score:
    """Summed log-likelihood of a continuation and its token count."""

    logprob: float
    n_tokens: int

    @property
    def mean(self) -> float:
        """Per-token mean log-likelihood."""
        return self.logprob / self.n_tokens


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (chat templates carry their own)."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def score_continuations(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    prefix_cache: bool = True,
) -> list[Score]:
    """Score each ``continuations[i]`` after ``contexts[i]``; texts are tokenized separately and concatenated."""
    if len(contexts) != len(continuations):
        raise ValueError(f"contexts and continuations differ in length: {len(contexts)} vs {len(continuations)}")
    return score_ids(
        model,
        encode(tokenizer, contexts),
        encode(tokenizer, continuations),
        ensure_pad_token(tokenizer),
        batch_size,
        prefix_cache,
    )


def _common_prefix(sequences: Sequence[tuple[int, ...]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        i = 0
        while i < length and other[i] == first[i]:
            i += 1
        length = i
    return length


def score_ids(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    batch_size: int = 8,
    prefix_cache: bool = True,
) -> list[Score]:
    """:func:`score_continuations` on token ids."""
    if len(contexts) != len(continuations):
        raise ValueError(f"contexts and continuations differ in length: {len(contexts)} vs {len(continuations)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if not ctx:
            raise ValueError(f"request {i}: the context is empty; give at least one token (e.g. BOS)")
        if not cont:
            raise ValueError(f"request {i}: the continuation is empty")
    if not contexts:
        return []
    # The model input of a request is context + continuation[:-1]; its last len(continuation) logits score it.
    requests: dict[tuple[int, ...], list[int]] = {}
    for index, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        requests.setdefault(tuple(ctx) + tuple(cont[:-1]), []).append(index)
    needed = {key: max(len(continuations[i]) for i in idx) for key, idx in requests.items()}
    keys = sorted(requests, key=len, reverse=True)
    prefix_len = 0
    if prefix_cache and len(keys) > 1:
        prefix_len = min(_common_prefix(keys), min(len(k) - needed[k] for k in keys))
    device = next(model.parameters()).device
    prefix_kv = _run_prefix(model, keys[0][:prefix_len], device) if prefix_len >= 2 else None
    if prefix_kv is None:
        prefix_len = 0

    scores: list[Score | None] = [None] * len(contexts)
    with torch.no_grad():
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            keep = max(needed[k] for k in batch)
            rows = _forward(model, [k[prefix_len:] for k in batch], prefix_len, prefix_kv, keep, pad_token_id, device)
            for key, row in zip(batch, rows, strict=True):
                for index in requests[key]:
                    cont = continuations[index]
                    target = torch.tensor(list(cont), device=row.device)[:, None]
                    values = row[keep - len(cont) :].gather(1, target).squeeze(1)
                    scores[index] = Score(float(values.sum()), len(cont))
    return scores  # type: ignore[return-value]


def _run_prefix(model: nn.Module, prefix: Sequence[int], device: torch.device) -> Any | None:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    return getattr(out, "past_key_values", None)


def _expand_cache(cache: Any, batch: int) -> Any:
    expanded = copy.deepcopy(cache)
    if hasattr(expanded, "batch_repeat_interleave"):
        expanded.batch_repeat_interleave(batch)
        return expanded
    raise TypeError(f"cannot expand a {type(cache).__name__} to a batch; pass prefix_cache=False")  # pragma: no cover


def _forward(
    model: nn.Module,
    suffixes: Sequence[Sequence[int]],
    prefix_len: int,
    prefix_kv: Any | None,
    keep: int,
    pad_token_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Log-softmax of the last ``keep`` positions of each (left-padded) row: ``(batch, keep, vocab)``."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, suffix in enumerate(suffixes):
        ids[i, width - len(suffix) :] = torch.tensor(suffix)
        mask[i, width - len(suffix) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0) + prefix_len
    kwargs: dict[str, Any] = {}
    if prefix_kv is not None:
        mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=torch.long), mask], dim=1)
        kwargs["past_key_values"] = _expand_cache(prefix_kv, len(suffixes))
        kwargs["use_cache"] = True
    else:
        kwargs["use_cache"] = False
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
        **kwargs,
    )
    return torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)
