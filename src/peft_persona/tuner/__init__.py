"""The persona mask adapter type, laid out like ``peft/tuners/<method>/``; importing it registers it with PEFT.

Modules, one job each:

* :mod:`.config`: :class:`PersonaMaskConfig`, the adapter's config; :mod:`.validation` checks its fields;
* :mod:`.layer`: :class:`PersonaMaskLayer` (adapter bookkeeping) and :class:`MaskedLinear` (merge, forward);
* :mod:`.engine`: the in-place weight engine (``W_eff`` written into the base weight, exact restore);
* :mod:`.stats_format`: masks re-derived from the selection statistics of the ``stats`` save format;
* :mod:`.mixed`: mixed-persona batches (``adapter_names=``);
* :mod:`.model`: :class:`PersonaMaskModel`, the PEFT tuner, and the model-level mask operations;
* :mod:`.loading`: all-or-nothing loading (files checked before injection, rollback after a failure);
* :mod:`.integration`: every patch of PEFT and transformers, applied by :func:`register` (here, on import).

Once registered, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' ``model.load_adapter``
load persona masks like any other adapter.
"""

from .config import PERSONA_MASK, PersonaMaskConfig, PersonaPeftType
from .integration import register
from .layer import MaskedLinear, PersonaMaskLayer
from .mixed import mixed_batch
from .model import (
    COMBINE_MODES,
    PersonaMaskModel,
    combine_adapters,
    get_masks,
    mask_layers,
    set_masks,
    set_strength,
    set_weight_mode,
)

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
    "set_weight_mode",
]
