"""Mixed-persona batches: ``adapter_names=[...]`` gives each row of a batch its own adapter (``"__base__"``: none).

Through PEFT, ``PeftModel.forward`` and ``generate`` pass the names to :meth:`PersonaMaskModel
._enable_peft_forward_hooks`, as they do for LoRA. A transformers model that loaded persona adapters with
``load_adapter`` keeps no tuner object, so a forward pre-hook on the model itself takes the argument out of the call
(transformers would otherwise ignore it) and opens the same context for the length of that forward, and the model's
``generate`` is wrapped to open it for the whole generation (transformers refuses the unknown argument); both are
listed with the package's other patches in :mod:`.integration`. Either way, forward pre-hooks give each persona mask
layer the names, and the layer runs one matmul per distinct adapter on its own rows
(:meth:`.MaskedLinear._mixed_batch_forward`). The errors are PEFT's for LoRA.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from torch import nn

from ..adapter_files import BASE_ADAPTER
from .layer import PersonaMaskLayer

HOOKS_ATTRIBUTE = "_persona_mixed_batch_hooks"


def check_adapter_names(model: nn.Module, adapter_names: Any) -> list[str]:
    """``adapter_names`` as a list if the model is in eval mode and holds each name; PEFT's errors otherwise."""
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    known = {a for m in model.modules() if isinstance(m, PersonaMaskLayer) for a in m.persona_mask_bits}
    unexpected = {n for n in adapter_names if n != BASE_ADAPTER} - known
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    return list(adapter_names)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], num_beams: int | None = None) -> Iterator[None]:
    """Within the block, every persona mask layer of ``model`` runs row ``i`` under ``adapter_names[i]``.

    With beam search (``num_beams > 1``) each name is repeated once per beam, as generate repeats the rows.
    """
    names = check_adapter_names(model, adapter_names)
    if isinstance(num_beams, int) and num_beams > 1:
        names = [n for n in names for _ in range(num_beams)]
    handles = [
        m.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=names), with_kwargs=True)
        for m in model.modules()
        if isinstance(m, PersonaMaskLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def accept_adapter_names(model: nn.Module) -> None:
    """Make ``model(..., adapter_names=[...])`` (and ``generate``) work on a model without a PEFT wrapper.

    Patch 4 of :mod:`.integration`: it changes only this model instance. Idempotent."""
    if getattr(model, HOOKS_ATTRIBUTE, None):
        return
    model.register_forward_pre_hook(_open, with_kwargs=True)
    model.register_forward_hook(_close, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)  # deepcopy rebinds it to the copy
    setattr(model, HOOKS_ATTRIBUTE, True)


def _generate(model: nn.Module, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """The model class's ``generate``, with each row under its own adapter when ``adapter_names`` is given."""
    context = (
        contextlib.nullcontext()
        if adapter_names is None
        else mixed_batch(model, adapter_names, kwargs.get("num_beams"))
    )
    with context:
        return type(model).generate(model, *args, **kwargs)


def _open(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    adapter_names = kwargs.pop("adapter_names", None)
    stack = contextlib.ExitStack()
    model.__dict__.setdefault("_persona_mixed_batch_stacks", []).append(stack)  # closed by _close, even on error
    if adapter_names is not None:
        stack.enter_context(mixed_batch(model, adapter_names))
    return args, kwargs


def _close(model: nn.Module, args: tuple, output: Any) -> None:
    stacks = model.__dict__.get("_persona_mixed_batch_stacks")
    if stacks:
        stacks.pop().close()
