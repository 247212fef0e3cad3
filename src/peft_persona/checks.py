"""The value rules shared by the API, the CLI and saved configs: each rule written once, each error naming its field.

Every check returns the value in its canonical type, or raises ``error`` (``ValueError`` unless the caller reading a
file passes :class:`~peft_persona.errors.PersonaAdapterError`) with a message that starts with ``what``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (``bool`` is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_sparsity(value: Any, what: str = "sparsity", error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a number in ``[0, 1)``."""
    if not is_number(value) or not 0.0 <= float(value) < 1.0:
        raise error(f"{what} must lie in [0, 1), got {value!r}")
    return float(value)


def check_strength(value: Any, what: str = "strength", error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a number in ``[0, 1]``."""
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise error(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_mask_shape(
    mask: torch.Tensor, shape: tuple[int, int], what: str, error: type[Exception] = ValueError
) -> None:
    """Raise unless ``mask`` is a 2-D tensor of the weight's ``(out, in)`` ``shape``."""
    if tuple(mask.shape) != tuple(shape):
        raise error(f"{what}: mask has shape {tuple(mask.shape)}, the weight (out, in) is {tuple(shape)}")
