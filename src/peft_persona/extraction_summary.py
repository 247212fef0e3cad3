"""What an extraction did: the summary printed by ``peft-persona extract`` and written into model cards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .activation_stats import PersonaStats
from .bits import count_kept
from .options import ExtractionOptions


@dataclass
class ExtractionSummary:
    """What an :meth:`PersonaExtractor.extract` call did, for printing and for model cards."""

    method: str
    sparsity: float
    personas: list[str]
    n_texts: dict[str, int]
    n_tokens: dict[str, int]
    kept_fraction: float
    overlap: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        options: ExtractionOptions,
        names: list[str],
        stats: Mapping[str, PersonaStats | None],
        masks: Mapping[str, Mapping[str, torch.Tensor]],
        times: Sequence[float],
        sizes: Mapping[str, int] | None = None,
    ) -> ExtractionSummary:
        """The summary of a run from its statistics, masks (``bool``, or packed with ``sizes``, the weights per
        layer) and the four time stamps around its three stages."""
        first = masks[names[0]]
        sizes = sizes or {n: m.numel() for n, m in first.items()}
        return cls(
            method=options.method,
            sparsity=options.sparsity,
            personas=names,
            n_texts={n: s.meta.get("n_texts", 0) for n, s in stats.items() if s is not None},
            n_tokens={n: s.meta.get("n_tokens", 0) for n, s in stats.items() if s is not None},
            kept_fraction=sum(count_kept(m) for m in first.values()) / sum(sizes[n] for n in first),
            overlap=shared_kept_fraction(first, masks[names[1]]) if len(names) == 2 else None,
            seconds={
                "calibration": times[1] - times[0],
                "masks": times[2] - times[1],
                "adapters": times[3] - times[2],
                "total": times[3] - times[0],
            },
        )

    def __str__(self) -> str:
        lines = [
            f"method={self.method} sparsity={self.sparsity:.3f} kept={self.kept_fraction:.4f} of targeted weights",
            *(f"  {p}: {self.n_texts.get(p, 0)} texts, {self.n_tokens.get(p, 0)} tokens" for p in self.personas),
        ]
        if self.overlap is not None:
            lines.append(f"  overlap (fraction of kept weights the two masks share): {self.overlap:.4f}")
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def shared_kept_fraction(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the weights kept by ``first`` that ``second`` keeps too (``bool`` or packed masks alike)."""
    shared = sum(count_kept(first[n] & second[n]) for n in first)
    kept = sum(count_kept(first[n]) for n in first)
    return shared / kept if kept else 0.0
