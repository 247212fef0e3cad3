"""PersonaMaskModel, the PEFT tuner that injects :class:`MaskedLinear` layers, and the model-level mask operations.

The operations (:func:`get_masks`, :func:`set_masks`, :func:`combine_adapters`) take any module holding persona mask
layers: a ``PeftModel``, a transformers model that loaded adapters with ``load_adapter`` (which keeps no tuner
object), or a plain module. :class:`PersonaMaskModel` exposes them as methods, as LoRA's model does
``add_weighted_adapter``. Module names are those of the base model (``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .. import adapter_files, fingerprint, targets
from . import loading, mixed
from .config import PersonaMaskConfig
from .engine import DEFAULT_WEIGHT_MODE
from .layer import MaskedLinear, PersonaMaskLayer, check_adapter_strength

CombineMode = Literal["intersection", "union", "majority"]
COMBINE_MODES: tuple[str, ...] = ("intersection", "union", "majority")


class PersonaMaskModel(BaseTuner):
    """Injects persona masks into a model's linear layers.

    Injection gives every targeted layer an all-ones mask (it keeps every weight); masks are then written in place
    with :meth:`set_masks`.

    Example:
        ```py
        >>> from peft import get_peft_model
        >>> from peft_persona import PersonaMaskConfig
        >>> model = get_peft_model(base_model, PersonaMaskConfig(), adapter_name="persona")  # all-ones masks
        >>> model.base_model.set_masks("persona", masks)  # {module name: bool tensor (out, in)}
        ```
    """

    prefix: str = adapter_files.PREFIX
    tuner_layer_cls = PersonaMaskLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter joins a model; several persona masks on one model is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Check everything, then inject; an injection that fails midway is rolled back."""
        adapter_files.check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        if config.target_modules is None:
            config.target_modules = set(targets.decoder_linear_modules(model))
        fingerprint.check_base_model_fingerprint(config.base_model_fingerprint, model, adapter_name, config)
        weights = loading.weights_file(config)
        if weights is not None:
            loading.check_weights_file(model, config, weights)
            if config.save_format == "stats":  # re-derive and check every mask before the model is touched
                loading.attach_selections(config, loading.derive_from_file(model, config, weights, adapter_name))
        before = loading.snapshot(model)
        self._weight_mode = weight_mode(model)  # new layers follow the model's persona layers
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            loading.rollback(model, adapter_name, before)
            raise
        finally:
            loading.detach_selections(config)
        mixed.accept_adapter_names(model)  # for transformers' load_adapter, which keeps no tuner
        loading.INJECTING.adapter = adapter_name  # read by the load-report filter (see integration.py)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's entry for ``adapter_names=`` in ``forward`` and ``generate``: a mixed-persona batch."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        with mixed.mixed_batch(self.model, adapter_names, num_beams=kwargs.get("num_beams")):
            yield

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not for masks: weighted sums of binary masks are not masks. Use :meth:`combine_adapters`."""
        raise TypeError(
            "persona mask adapters cannot be added with weights; combine them with "
            "`combine_adapters(adapters, new_adapter_name, how='intersection' | 'union' | 'majority')` "
            "(also `peft_persona.combine_adapters(model, ...)`)"
        )

    def _create_and_replace(
        self,
        peft_config: PersonaMaskConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        mask = None if peft_config.init_weights else _random_mask(target, f"{adapter_name}:{current_key}")
        stats = {}
        if peft_config.save_format == "stats":
            mask = None
            selection, packed = loading.take_selection(peft_config, adapter_name, current_key)
            stats = {"selection": selection, "packed": packed}
        if isinstance(target, PersonaMaskLayer):
            target.update_layer(adapter_name, mask, peft_config.strength, **stats)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        reason = targets.why_not_maskable(base)
        if reason is not None:
            raise TypeError(
                f"module {current_key!r} is {reason}; persona masks wrap only dense torch.nn.Linear and "
                "transformers Conv1D layers. Narrow `target_modules` so that it does not match this module."
            )
        mode = getattr(self, "_weight_mode", DEFAULT_WEIGHT_MODE)
        new_module = MaskedLinear(target, adapter_name, mask, peft_config.strength, **stats, **mode)
        if adapter_name not in self.active_adapters:
            new_module.set_adapter(self.active_adapters)
        self._replace_module(parent, target_name, new_module, target)
        if targets.oriented_weight(base).device.type == "meta" and (mask is not None or stats):
            # PEFT moved the new layer's buffers to the weight's device; masks given for an unmaterialised weight
            # (layer-by-layer extraction) stay on the CPU
            new_module.update_layer(adapter_name, mask, peft_config.strength, **stats)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(False)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``; without accelerate hooks on the model, minus its per-layer onload context,
        which costs more than the merge itself (a merge of the active adapter writes nothing)."""
        if self._has_accelerate_hooks():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
            return
        self._check_merge_allowed()
        for layer in self._tuner_layers():
            layer.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's ``unmerge_adapter``, with :meth:`merge_adapter`'s fast path."""
        if self._has_accelerate_hooks():
            super().unmerge_adapter()
            return
        for layer in self._tuner_layers():
            layer.unmerge()

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def _has_accelerate_hooks(self) -> bool:
        return any("_hf_hook" in m.__dict__ for m in self.model.modules())

    # ------------------------------------------------------------------------------------ mask operations
    def get_masks(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The ``bool`` masks of ``adapter_name`` by module name. See :func:`get_masks`."""
        return get_masks(self.model, adapter_name)

    def set_masks(self, adapter_name: str, masks: Mapping[str, torch.Tensor]) -> None:
        """Overwrite ``adapter_name``'s masks in place (hot swap). See :func:`set_masks`."""
        set_masks(self.model, adapter_name, masks)

    def set_strength(self, adapter_name: str, strength: float) -> None:
        """Set ``adapter_name``'s strength at run time. See :func:`set_strength`."""
        set_strength(self.model, adapter_name, strength)

    def set_weight_mode(
        self, in_place: bool | None = None, keep_original: bool | None = None, cache_mixed: bool | None = None
    ) -> None:
        """Set how every persona mask layer holds ``W_eff``. See :func:`set_weight_mode`."""
        set_weight_mode(self.model, in_place=in_place, keep_original=keep_original, cache_mixed=cache_mixed)

    def combine_adapters(
        self, adapters: Iterable[str], new_adapter_name: str, how: CombineMode = "intersection", strength: float = 1.0
    ) -> None:
        """Create ``new_adapter_name`` from existing adapters, the analogue of LoRA's ``add_weighted_adapter``."""
        combine_adapters(self.model, adapters, new_adapter_name, how=how, strength=strength)


def _random_mask(target: nn.Module, key: str) -> torch.Tensor:
    """A mask keeping a seeded random half of the layer's weights (``init_weights=False``), the same for a key."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.rand(targets.oriented_weight(base).shape, generator=generator) < 0.5


def mask_layers(model: nn.Module) -> dict[str, PersonaMaskLayer]:
    """Every persona mask layer in ``model``, by base-model module name."""
    return {targets.clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, PersonaMaskLayer)}


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, PersonaMaskLayer]:
    """The persona mask layers holding ``adapter_name``; a ``KeyError`` listing the known adapters if none does."""
    layers = {n: m for n, m in mask_layers(model).items() if adapter_name in m.persona_mask_bits}
    if not layers:
        known = sorted({a for m in mask_layers(model).values() for a in m.persona_mask_bits})
        raise KeyError(f"no persona mask adapter named {adapter_name!r}; the model has {known}")
    return layers


def peft_configs(model: nn.Module) -> dict[str, Any]:
    """The model's ``peft_config`` dict (adapter name to config); a ``TypeError`` if it holds no PEFT adapters."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} carries no `peft_config` dict; it holds no PEFT adapters")
    return config


def get_masks(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The ``bool`` masks ``(out_features, in_features)`` of ``adapter_name``, by module name."""
    return {name: layer.get_mask(adapter_name) for name, layer in adapter_layers(model, adapter_name).items()}


def set_masks(model: nn.Module, adapter_name: str, masks: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every mask of ``adapter_name`` in place (hot swap): no tensor is reallocated.

    ``masks`` must name exactly the layers the adapter covers. A ``torch.compile``d model keeps its compiled graph.
    All masks are validated before any is written.
    """
    layers = adapter_layers(model, adapter_name)
    checked = {targets.clean_module_name(n): m for n, m in masks.items()}
    unknown, missing = set(checked) - set(layers), set(layers) - set(checked)
    if unknown or missing:
        raise KeyError(
            f"masks for adapter {adapter_name!r} must name exactly its {len(layers)} layers; "
            f"unknown: {sorted(unknown)[:5]}, missing: {sorted(missing)[:5]}"
        )
    for name, layer in layers.items():
        try:
            layer.check_mask(checked[name], adapter_name)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
    for name, layer in layers.items():
        layer.set_mask(adapter_name, checked[name])


def set_strength(model: nn.Module, adapter_name: str, strength: float) -> None:
    """Set ``adapter_name``'s strength in ``[0, 1]`` on every layer and in its config (so it is saved).

    The weights of an adapter in effect follow at once, in place: a ``torch.compile``d model does not recompile.
    """
    strength = check_adapter_strength(strength, adapter_name)
    layers = adapter_layers(model, adapter_name)
    merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(
            f"adapter {adapter_name!r} is merged (e.g. {merged[0]}); unmerge it before changing its strength"
        )
    for layer in layers.values():
        layer.set_strength(adapter_name, strength)
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None:
        config.strength = strength


def weight_mode(model: nn.Module) -> dict[str, bool]:
    """The weight engine's switches of ``model``'s persona mask layers (the defaults if it has none)."""
    layer = next((m for m in model.modules() if isinstance(m, PersonaMaskLayer)), None)
    return layer.weight_mode() if layer is not None else dict(DEFAULT_WEIGHT_MODE)


def set_weight_mode(
    model: nn.Module, in_place: bool | None = None, keep_original: bool | None = None, cache_mixed: bool | None = None
) -> None:
    """Set how every persona mask layer of ``model`` holds ``W_eff`` (``None`` keeps a switch as it is).

    ``in_place`` (default ``True``) writes ``W_eff`` into the base weight, with an exact restore; ``False`` computes
    it apart in every forward. ``keep_original`` (default ``False``) keeps a dense copy of the original weight and
    switches from it, at the cost of one more copy (about as fast as the default's switching records).
    ``cache_mixed`` (default ``False``) keeps what mixed-persona batches (``adapter_names=``) build for each adapter
    used there: for decoding, its sparse difference to the weight in effect; for larger groups, its dense ``W_eff``.
    The weights follow at once; layers injected into the model later take the model's
    switches. See :mod:`peft_persona.tuner.engine`.
    """
    layers = mask_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} holds no persona mask layers")
    for layer in layers.values():
        layer.set_weight_mode(in_place=in_place, keep_original=keep_original, cache_mixed=cache_mixed)


def combine_adapters(
    model: nn.Module,
    adapters: Iterable[str],
    new_adapter_name: str,
    how: CombineMode = "intersection",
    strength: float = 1.0,
) -> None:
    """Add ``new_adapter_name``, whose mask combines ``adapters``' masks per weight, with ``strength``.

    ``intersection`` keeps a weight every adapter keeps, ``union`` one any adapter keeps, and ``majority`` one that
    strictly more than half of the adapters keep.
    """
    strength = check_adapter_strength(strength, new_adapter_name)
    adapters = list(adapters)
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter")
    if how not in COMBINE_MODES:
        raise ValueError(f"combine_adapters: unknown mode {how!r}; use one of {COMBINE_MODES}")
    configs = peft_configs(model)
    if new_adapter_name in configs:
        raise ValueError(f"an adapter named {new_adapter_name!r} already exists")
    layer_sets = [set(adapter_layers(model, a)) for a in adapters]
    if any(s != layer_sets[0] for s in layer_sets):
        raise ValueError(f"adapters {adapters} do not cover the same layers, so they cannot be combined")
    layers = adapter_layers(model, adapters[0])
    combined = {name: _combine([layer.get_mask(a) for a in adapters], how) for name, layer in layers.items()}
    config = copy.deepcopy(configs[adapters[0]])
    config.method, config.persona, config.opposite_persona, config.sparsity = "combined", new_adapter_name, None, None
    config.save_format = "bits"  # a combination is not selected from statistics
    config.calibration = {"combined_from": adapters, "how": how}
    config.strength = strength
    configs[new_adapter_name] = config
    for name, layer in layers.items():
        layer.update_layer(new_adapter_name, combined[name], strength)


def _combine(masks: list[torch.Tensor], how: str) -> torch.Tensor:
    stack = torch.stack(masks)
    if how == "intersection":
        return stack.all(0)
    if how == "union":
        return stack.any(0)
    return stack.sum(0, dtype=torch.int32) * 2 > len(masks)
