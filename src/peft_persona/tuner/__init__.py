"""The persona mask adapter type, laid out like ``peft/tuners/<method>/``; importing it registers it with PEFT.

PEFT's ``PeftType`` is a closed Enum and ``register_peft_method`` rejects unknown names, so the type is a ``str``
Enum member of the package's own (see :mod:`.config`) written into ``peft.mapping``'s four tables. Once registered,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' ``model.load_adapter`` load persona
masks like any other adapter.
"""

import logging

from peft import mapping

from .config import PERSONA_MASK, PersonaMaskConfig, PersonaPeftType
from .layer import MaskedLinear, PersonaMaskLayer
from .loading import guard_transformers_load_adapter
from .mixed import mixed_batch
from .model import (
    COMBINE_MODES,
    REPORT_FILTER,
    PersonaMaskModel,
    combine_adapters,
    get_masks,
    mask_layers,
    set_masks,
    set_strength,
)

TRANSFORMERS_PEFT_LOGGER = "transformers.integrations.peft"


def register() -> None:
    """Make PEFT (and transformers, through PEFT) know the ``PERSONA_MASK`` adapter type. Idempotent."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PERSONA_MASK] = PersonaMaskConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PERSONA_MASK] = PersonaMaskModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PERSONA_MASK] = PersonaMaskModel.prefix
    mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING[PERSONA_MASK] = PersonaMaskModel
    logger = logging.getLogger(TRANSFORMERS_PEFT_LOGGER)
    if REPORT_FILTER not in logger.filters:
        logger.addFilter(REPORT_FILTER)
    guard_transformers_load_adapter()


register()

__all__ = [
    "COMBINE_MODES",
    "PERSONA_MASK",
    "MaskedLinear",
    "PersonaMaskConfig",
    "PersonaMaskLayer",
    "PersonaMaskModel",
    "PersonaPeftType",
    "combine_adapters",
    "get_masks",
    "mask_layers",
    "mixed_batch",
    "register",
    "set_masks",
    "set_strength",
]
