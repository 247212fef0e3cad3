"""Persona metrics: plain functions, and ``evaluate`` modules shipped as package data.

from peft_persona.metrics import persona_alignment          # no evaluate needed
evaluate.load(peft_persona.metrics.path("persona_alignment"))  # the same, as an evaluate module (offline)
"""

from __future__ import annotations

from pathlib import Path

from .functions import mask_overlap, persona_alignment, persona_margin

METRICS = ("persona_alignment", "persona_margin", "mask_overlap")


def path(name: str) -> str:
    """Local directory of the ``evaluate`` module ``name``, for ``evaluate.load(path(name))``."""
    if name not in METRICS:
        raise KeyError(f"no persona metric {name!r}; available: {list(METRICS)}")
    return str(Path(__file__).resolve().parent / name)


__all__ = ["METRICS", "mask_overlap", "path", "persona_alignment", "persona_margin"]
