"""peft-persona: persona subnetworks (binary weight masks) as first-class PEFT adapters.

Importing the package registers the ``PERSONA_MASK`` adapter type with PEFT, so that ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and transformers' ``model.load_adapter`` can load persona masks.
"""

from ._peft_type import PERSONA_MASK, register
from .bits import pack_mask, unpack_mask
from .calibrate import LayerStats, PersonaStats
from .extractor import ExtractionSummary, PersonaExtractor
from .fingerprint import FingerprintMismatchError, base_model_fingerprint
from .masks import (
    add_mask_adapter,
    combine_adapters,
    get_masks,
    hotswap_adapter,
    read_adapter_masks,
    set_masks,
    validate_masks,
)
from .tuner import MaskedLinear, PersonaMaskConfig, PersonaMaskLayer, PersonaMaskModel

register()

__version__ = "0.1.0"

__all__ = [
    "PERSONA_MASK",
    "ExtractionSummary",
    "LayerStats",
    "PersonaExtractor",
    "PersonaStats",
    "FingerprintMismatchError",
    "MaskedLinear",
    "PersonaMaskConfig",
    "PersonaMaskLayer",
    "PersonaMaskModel",
    "add_mask_adapter",
    "base_model_fingerprint",
    "combine_adapters",
    "get_masks",
    "hotswap_adapter",
    "pack_mask",
    "read_adapter_masks",
    "set_masks",
    "unpack_mask",
    "validate_masks",
]
