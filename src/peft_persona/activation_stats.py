"""Activation statistics: stream a persona's texts through the model and keep O(d_in) statistics per layer.

For a targeted linear layer with input ``x_t`` (one non-padding token ``t``) and calibration sequences ``s``:

* ``sum_sq[j]  = sum_t x_tj^2``                      (Wanda: ``n_j = sqrt(sum_sq[j])``)
* ``a_j(s)     = sqrt(mean_{t in s} x_tj^2)``        (per-sequence RMS, length-invariant)
* ``rms_sum``, ``rms_sq_sum``: sums of ``a_j(s)`` and ``a_j(s)^2`` over sequences (contrastive mean / variance)
* ``l2_sum[j]  = sum_s sqrt(sum_{t in s} x_tj^2)``   (the paper code's per-sequence L2 norm; ``reference=True`` only)

Everything is accumulated in float64 on the layer's device; padding never enters a statistic.

The pieces: a :class:`BatchLayout` says which positions of a padded batch are real tokens; an
:class:`ActivationRecorder` puts forward pre-hooks on the targeted layers and feeds each layer's input to its
*accumulator*. Every accumulator follows one protocol (:class:`Accumulator`): ``contribution(x, layout)`` computes a
batch's share, once per distinct input tensor (q/k/v and gate/up share theirs), and ``add`` sums it in.
:class:`LayerStats` is the accumulator of Wanda and contrastive statistics, :class:`GramAccumulator` that of OBS
(``X^T X``), with :func:`group_by_memory` to bound how many Gram matrices are held at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STAT_NAMES = ("sum_sq", "rms_sum", "rms_sq_sum", "l2_sum")
STATS_FORMAT = "peft-persona-stats/1"


@dataclass
class LayerStats:
    """Streaming per-input-channel statistics of one linear layer's input."""

    sum_sq: torch.Tensor
    rms_sum: torch.Tensor
    rms_sq_sum: torch.Tensor
    l2_sum: torch.Tensor
    n_tokens: int = 0
    n_seqs: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None) -> LayerStats:
        return cls(*(torch.zeros(in_features, dtype=torch.float64, device=device) for _ in STAT_NAMES))

    @staticmethod
    def contribution(x: torch.Tensor, layout: BatchLayout) -> BatchStats:
        """One batch's share of the statistics, from a layer input ``x`` of shape ``(batch, seq, d)``."""
        return batch_stats(x, layout.tokens.to(x.device), layout.sequences.to(x.device), layout.n_sequences)

    def add(self, batch: BatchStats) -> None:
        self.sum_sq += batch.sum_sq
        self.rms_sum += batch.rms.sum(0)
        self.rms_sq_sum += batch.rms.square().sum(0)
        self.l2_sum += batch.l2.sum(0)
        self.n_tokens += batch.n_tokens
        self.n_seqs += batch.rms.shape[0]

    def fresh(self) -> LayerStats:
        """Zero statistics of the same size and device."""
        return LayerStats.zeros(self.sum_sq.numel(), self.sum_sq.device)

    def state(self) -> list[torch.Tensor]:
        """The sums (live tensors) and the two counts (a float64 copy, exact below 2**53), for
        :func:`peft_persona.distributed.add_in_batch_order`; :meth:`set_counts` writes the counts back."""
        counts = torch.tensor([self.n_tokens, self.n_seqs], dtype=torch.float64, device=self.sum_sq.device)
        return [self.sum_sq, self.rms_sum, self.rms_sq_sum, self.l2_sum, counts]

    def set_counts(self, state: list[torch.Tensor]) -> None:
        self.n_tokens, self.n_seqs = (int(c) for c in state[-1].tolist())

    @property
    def feature_norm(self) -> torch.Tensor:
        """Wanda's ``n_j = ||X_j||_2`` over all calibration tokens."""
        return self.sum_sq.sqrt()

    @property
    def seq_mean(self) -> torch.Tensor:
        """Mean over sequences of the per-sequence RMS ``a_j(s)``."""
        return self.rms_sum / self.n_seqs

    @property
    def seq_var(self) -> torch.Tensor:
        """Population variance over sequences of ``a_j(s)`` (clamped at 0 against rounding)."""
        return (self.rms_sq_sum / self.n_seqs - self.seq_mean.square()).clamp_min(0)

    @property
    def reference_norm(self) -> torch.Tensor:
        """The paper code's statistic: per-sequence L2 norms averaged over texts (length-confounded)."""
        return self.l2_sum / self.n_seqs

    @staticmethod
    def pooled(parts: Iterable[LayerStats]) -> LayerStats:
        """Statistics of the union of several calibration sets (sums add)."""
        parts = list(parts)
        total = LayerStats(*(sum(getattr(p, n) for p in parts) for n in STAT_NAMES))
        total.n_tokens = sum(p.n_tokens for p in parts)
        total.n_seqs = sum(p.n_seqs for p in parts)
        return total


@dataclass
class BatchStats:
    """One batch's contribution, computed once per distinct input tensor (q/k/v share theirs)."""

    sum_sq: torch.Tensor  # (d,)
    rms: torch.Tensor  # (n_seqs, d)
    l2: torch.Tensor  # (n_seqs, d)
    n_tokens: int


@dataclass
class PersonaStats:
    """Calibration statistics of one persona: a :class:`LayerStats` per targeted layer, plus provenance."""

    name: str
    layers: dict[str, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (no pickle); provenance goes into the header metadata."""
        tensors, counts = {}, {}
        for layer, stats in self.layers.items():
            for stat in STAT_NAMES:
                tensors[f"{layer}.{stat}"] = getattr(stats, stat).detach().cpu().contiguous()
            counts[layer] = [stats.n_tokens, stats.n_seqs]
        metadata = {
            "format": STATS_FORMAT,
            "name": self.name,
            "meta": json.dumps(self.meta),
            "counts": json.dumps(counts),
        }
        from .atomic import atomic_path

        with atomic_path(path) as partial:
            save_file(tensors, str(partial), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> PersonaStats:
        """Read a file written by :meth:`save`; a foreign or corrupt file raises a ``ValueError`` naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
        if metadata.get("format") != STATS_FORMAT:
            raise ValueError(f"{path} is not a peft-persona statistics file (format {metadata.get('format')!r})")
        tensors = load_file(str(path))
        counts = json.loads(metadata["counts"])
        layers = {
            layer: LayerStats(*(tensors[f"{layer}.{stat}"] for stat in STAT_NAMES), n_tokens=n_tok, n_seqs=n_seq)
            for layer, (n_tok, n_seq) in counts.items()
        }
        return cls(metadata["name"], layers, json.loads(metadata["meta"]))


def batch_stats(x: torch.Tensor, token_index: torch.Tensor, seq_index: torch.Tensor, n_seqs: int) -> BatchStats:
    """Statistics of one batch: ``x`` is ``(batch, seq, d)``; only the flat token positions ``token_index`` count."""
    valid = x.reshape(-1, x.shape[-1]).index_select(0, token_index).double()
    squares = valid.square()
    per_seq = torch.zeros(n_seqs, x.shape[-1], dtype=torch.float64, device=x.device).index_add_(0, seq_index, squares)
    lengths = torch.bincount(seq_index, minlength=n_seqs).to(per_seq).unsqueeze(1)
    return BatchStats(squares.sum(0), (per_seq / lengths).sqrt(), per_seq.sqrt(), int(token_index.numel()))


@dataclass(frozen=True)
class BatchLayout:
    """Which positions of a padded ``(batch, seq)`` batch are real tokens: their flat indices, and the sequence each
    belongs to."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    n_sequences: int

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> BatchLayout:
        flat = attention_mask.flatten().nonzero().squeeze(1)
        return cls(flat, flat // attention_mask.shape[1], attention_mask.shape[0])


class Accumulator(Protocol):
    """What an :class:`ActivationRecorder` feeds: a streaming statistic of one layer's input."""

    def contribution(self, x: torch.Tensor, layout: BatchLayout) -> Any:
        """A batch's share, from the layer input ``x`` (``(batch, seq, d)``); must depend on ``x`` and ``layout``
        only, so that layers fed the same tensor share it."""

    def add(self, contribution: Any) -> None:
        """Sum a contribution in."""

    def fresh(self) -> Accumulator:
        """An empty accumulator of the same shape (one per batch, for multi-process calibration)."""

    def state(self) -> list[torch.Tensor]:
        """The float64 tensors batches add to; see :func:`peft_persona.distributed.add_in_batch_order`."""

    def set_counts(self, state: list[torch.Tensor]) -> None:
        """Write back any count that :meth:`state` returned as a copy."""


@dataclass
class GramAccumulator:
    """``X^T X`` (float64) over the real tokens of a layer's input: OBS's Hessian, up to a factor 2."""

    gram: torch.Tensor

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None) -> GramAccumulator:
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device))

    @staticmethod
    def contribution(x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        valid = x.reshape(-1, x.shape[-1]).index_select(0, layout.tokens.to(x.device)).double()
        return valid.T @ valid

    def add(self, contribution: torch.Tensor) -> None:
        self.gram += contribution

    def fresh(self) -> GramAccumulator:
        return GramAccumulator(torch.zeros_like(self.gram))

    def state(self) -> list[torch.Tensor]:
        return [self.gram]

    def set_counts(self, state: list[torch.Tensor]) -> None:
        """Nothing to write back: the Gram matrix is the whole state."""


def gram_bytes(in_features: int) -> int:
    """Memory of one layer's float64 Gram matrix."""
    return in_features * in_features * 8


def group_by_memory(sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Split layers, in order, into groups whose summed ``sizes`` (bytes) stay within ``budget``; a layer larger
    than the budget gets a group of its own."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return [g for g in groups if g]


class ActivationRecorder:
    """Forward pre-hooks on ``modules`` that feed each one's input to its accumulator in ``accumulators``.

    Before each forward pass, :meth:`set_layout` tells the recorder which positions are real tokens. Layers fed the
    same input tensor one after the other (q/k/v, gate/up) share a single ``contribution`` per accumulator type: the
    recorder keeps the last input tensor and its contributions, so identity is exact and at most one extra
    activation is held alive.
    """

    def __init__(self, modules: Mapping[str, nn.Module], accumulators: Mapping[str, Accumulator]) -> None:
        missing = set(accumulators) - set(modules)
        if missing:
            raise KeyError(f"accumulators for unknown layers: {sorted(missing)[:5]}")
        self.modules = {name: modules[name] for name in accumulators}
        self.accumulators = dict(accumulators)
        self._layout: BatchLayout | None = None
        self._handles: list = []
        self._last: tuple[torch.Tensor, dict[type, Any]] | None = None

    def set_layout(self, layout: BatchLayout) -> None:
        """The layout of the batch about to be forwarded."""
        self._layout, self._last = layout, None

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    def _hook(self, name: str) -> Callable:
        accumulator = self.accumulators[name]

        def hook(module: nn.Module, args: tuple) -> None:
            if self._layout is None:
                raise RuntimeError("ActivationRecorder: set_layout must be called before each forward pass")
            x = args[0]
            if self._last is None or self._last[0] is not x:
                self._last = (x, {})
            shared = self._last[1]
            kind = type(accumulator)
            if kind not in shared:
                shared[kind] = accumulator.contribution(x, self._layout)
            accumulator.add(shared[kind])

        return hook


def check_finite(name: str, statistic: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming the layer if its statistic saw NaN or inf activations."""
    if not bool(torch.isfinite(statistic).all()):
        raise FloatingPointError(
            f"non-finite activations (NaN or inf) entered layer {name!r} during calibration; in fp16 this is usually "
            "an overflow: calibrate in bfloat16 or float32"
        )
