"""The ``PERSONA_MASK`` PEFT type and its registration in PEFT's method tables.

PEFT's ``PeftType`` is a closed Enum and ``register_peft_method`` rejects unknown names, so the package defines its
own ``str``-valued Enum member and writes it into ``peft.mapping``'s tables. A plain string would crash transformers,
which calls ``peft_type.value.lower()``. If a future PEFT ships the member itself, that one is used.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType


class PersonaPeftType(str, enum.Enum):
    """PEFT type of persona masks, string-compatible with ``"PERSONA_MASK"`` in ``adapter_config.json``."""

    PERSONA_MASK = "PERSONA_MASK"


PERSONA_MASK = getattr(PeftType, "PERSONA_MASK", PersonaPeftType.PERSONA_MASK)
PREFIX = f"{PERSONA_MASK.value.lower()}_"  # "persona_mask_": every adapter buffer name starts with it


def register() -> None:
    """Make PEFT (and transformers, through PEFT) know the ``PERSONA_MASK`` adapter type. Idempotent."""
    from peft import mapping

    from .tuner.config import PersonaMaskConfig
    from .tuner.model import PersonaMaskModel

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PERSONA_MASK] = PersonaMaskConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PERSONA_MASK] = PersonaMaskModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PERSONA_MASK] = PREFIX
    mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING[PERSONA_MASK] = PersonaMaskModel
