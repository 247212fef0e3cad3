"""peft-persona: persona subnetworks (binary weight masks) as first-class PEFT adapters.

Importing the package registers the ``PERSONA_MASK`` adapter type with PEFT, so that ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and transformers' ``model.load_adapter`` can load persona masks. This module exports
what a user calls; everything else is importable from its own module (see the API reference).
"""

from .errors import PersonaAdapterError
from .extractor import PersonaExtractor
from .fingerprint import FingerprintMismatchError
from .masks import add_mask_adapter, hotswap_adapter, read_adapter_masks
from .options import ExtractionOptions
from .tuner import (
    PERSONA_MASK,
    PersonaMaskConfig,
    PersonaMaskModel,
    combine_adapters,
    get_masks,
    set_masks,
    set_strength,
)

__version__ = "0.1.0"

__all__ = [
    "PERSONA_MASK",
    "ExtractionOptions",
    "FingerprintMismatchError",
    "PersonaAdapterError",
    "PersonaExtractor",
    "PersonaMaskConfig",
    "PersonaMaskModel",
    "add_mask_adapter",
    "combine_adapters",
    "get_masks",
    "hotswap_adapter",
    "read_adapter_masks",
    "set_masks",
    "set_strength",
]
