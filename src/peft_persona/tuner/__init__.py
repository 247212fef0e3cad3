"""The persona mask adapter type, laid out like ``peft/tuners/<method>/``."""

from .config import PersonaMaskConfig
from .layer import MaskedLinear, PersonaMaskLayer
from .model import PersonaMaskModel

__all__ = ["MaskedLinear", "PersonaMaskConfig", "PersonaMaskLayer", "PersonaMaskModel"]
