"""PersonaExtractor: calibrate on persona texts, score weights, select masks, hand them back as PEFT adapters.

Glue only: texts become tokens, tokens become padded batches, batches go through the model's forward pass. The
statistics are accumulated in :mod:`peft_persona.activation_stats`, the scores and the selection are
:mod:`peft_persona.scoring`'s, the recipe is an :class:`~peft_persona.options.ExtractionOptions`, and the masks become
adapters through :func:`peft_persona.masks.add_mask_adapter`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Union

import torch
from peft import PeftModel
from torch import nn

from . import distributed, scoring, selection
from .bits import count_kept, pack_mask
from .activation_stats import (
    Accumulator,
    ActivationRecorder,
    BatchLayout,
    GramAccumulator,
    LayerStats,
    PersonaStats,
    check_finite,
    gram_bytes,
    group_by_memory,
)
from .data import BUILTIN_LICENSE, Text, load_texts
from .fingerprint import base_model_fingerprint, probe_modules
from .layerwise import (
    DEFAULT_CACHE_BYTES,
    Checkpoint,
    HiddenCache,
    capture_block_inputs,
    empty_model,
    resident,
    resolve_checkpoint,
    return_freed_memory,
)
from .masks import add_mask_adapter, add_selection_adapter
from .models import ensure_pad_token
from .options import ExtractionOptions, Method
from .selection import ChannelSelection
from .targets import (
    block_index,
    decoder_block_list,
    in_features_of,
    modules_by_name,
    oriented_weight,
    parse_layers,
    select_targets,
    why_not_maskable,
)
from .tuner.config import PersonaMaskConfig

TextsLike = Union[str, Sequence[Text], PersonaStats, None]
OBS_MEMORY_BUDGET = 2 * 1024**3


@dataclass
class ExtractionSummary:
    """What an :meth:`PersonaExtractor.extract` call did, for printing and for model cards."""

    method: str
    sparsity: float
    personas: list[str]
    n_texts: dict[str, int]
    n_tokens: dict[str, int]
    kept_fraction: float
    overlap: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        options: ExtractionOptions,
        names: list[str],
        stats: Mapping[str, PersonaStats | None],
        masks: Mapping[str, Mapping[str, torch.Tensor]],
        times: Sequence[float],
        sizes: Mapping[str, int] | None = None,
    ) -> ExtractionSummary:
        """The summary of a run from its statistics, masks (``bool``, or packed with ``sizes``, the weights per
        layer) and the four time stamps around its three stages."""
        first = masks[names[0]]
        sizes = sizes or {n: m.numel() for n, m in first.items()}
        return cls(
            method=options.method,
            sparsity=options.sparsity,
            personas=names,
            n_texts={n: s.meta.get("n_texts", 0) for n, s in stats.items() if s is not None},
            n_tokens={n: s.meta.get("n_tokens", 0) for n, s in stats.items() if s is not None},
            kept_fraction=sum(count_kept(m) for m in first.values()) / sum(sizes[n] for n in first),
            overlap=mask_overlap(first, masks[names[1]]) if len(names) == 2 else None,
            seconds={
                "calibration": times[1] - times[0],
                "masks": times[2] - times[1],
                "adapters": times[3] - times[2],
                "total": times[3] - times[0],
            },
        )

    def __str__(self) -> str:
        lines = [
            f"method={self.method} sparsity={self.sparsity:.3f} kept={self.kept_fraction:.4f} of targeted weights",
            *(f"  {p}: {self.n_texts.get(p, 0)} texts, {self.n_tokens.get(p, 0)} tokens" for p in self.personas),
        ]
        if self.overlap is not None:
            lines.append(f"  overlap (fraction of kept weights the two masks share): {self.overlap:.4f}")
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


class PersonaExtractor:
    """Find persona subnetworks in a causal LM from calibration texts, with no training.

    Args:
        model: any transformers causal LM (``device_map`` models too) or a ``PeftModel`` holding persona masks
            (calibration then runs with the adapters disabled).
        tokenizer: its tokenizer; one without a pad token gets its EOS token as pad token, with a warning.
        target_modules: module names to mask; default every ``nn.Linear`` inside the decoder blocks, narrowed by
            ``target`` and ``layers``.
        target: ``"all"`` (default), ``"mlp"`` (the paper's ``prune_only_mlp``) or ``"attention"``: which sub-layers
            of the decoder blocks to mask (with the default ``target_modules``).
        layers: decoder blocks to mask, as indices or a string like ``"8-23"`` or ``"0,2,5-7"``; default all.
        max_length: texts are truncated to this many tokens.
        batch_size: sequences per forward pass; statistics do not depend on it.
        show_progress: show a tqdm progress bar over batches.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        target_modules: Sequence[str] | None = None,
        target: str = "all",
        layers: str | Sequence[int] | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        show_progress: bool = False,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be positive, got {max_length} and {batch_size}")
        self.peft_model: PeftModel | None = model if isinstance(model, PeftModel) else None
        self.base_model = model.get_base_model() if isinstance(model, PeftModel) else model
        self.tokenizer = tokenizer
        self.max_length, self.batch_size, self.show_progress = max_length, batch_size, show_progress
        ensure_pad_token(tokenizer)
        if target_modules is not None and (target != "all" or layers is not None):
            raise ValueError("give either target_modules or target/layers, not both")
        self.default_targets = target_modules is None and target == "all" and layers is None
        self.targets = (
            {"target_modules": "explicit"}
            if target_modules is not None
            else {"target": target, "layers": parse_layers(layers)}
        )
        names = list(target_modules) if target_modules is not None else select_targets(self.base_model, target, layers)
        self.modules = modules_by_name(self.base_model, names)
        for name, module in self.modules.items():
            reason = why_not_maskable(module)
            if reason is not None:
                raise TypeError(f"target module {name!r} is {reason}")
        self.summary: ExtractionSummary | None = None
        self._layerwise: dict[str, Any] | None = None  # set by from_pretrained(layerwise=True)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        layerwise: bool = True,
        tokenizer: Any = None,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        token: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        spill_dir: str | None = None,
        **kwargs: Any,
    ) -> PersonaExtractor:
        """An extractor for a checkpoint (Hub id or local directory); ``kwargs`` as for the constructor.

        With ``layerwise`` (the default) the model is built on the meta device and calibrated one decoder block at a
        time, each block's weights read from the checkpoint's safetensors shards and released after it; the cached
        hidden states of all calibration tokens stay in memory up to ``cache_bytes`` and spill to ``spill_dir`` (a
        temporary folder) beyond it. The masks are bit-identical to a whole-model run in ``dtype``. The returned
        adapters hold masks but the model holds no weights: save them, and load them where you run the model. Without
        ``layerwise`` the model is loaded whole (embedded names and GGUF files too, see :func:`models.load_model`).
        ``tokenizer`` replaces the checkpoint's own.
        """
        if not layerwise:
            from .models import load_model

            model, own = load_model(name_or_path, dtype=dtype)
            return cls(model, tokenizer or own, **kwargs)
        if distributed.world()[1] > 1:
            raise ValueError("layer-by-layer calibration runs in one process; launch it without torchrun")
        from transformers import AutoTokenizer

        directory = resolve_checkpoint(name_or_path, revision=revision, token=token)
        checkpoint = Checkpoint(directory)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
        extractor = cls(empty_model(directory, dtype), tokenizer, **kwargs)
        extractor._layerwise = dict(checkpoint=checkpoint, dtype=dtype, cache_bytes=cache_bytes, spill_dir=spill_dir)
        return extractor

    def _resident(self, modules: Sequence[str]) -> contextlib.AbstractContextManager:
        """Inside, ``modules`` hold their weights (layer-by-layer mode reads them from the checkpoint)."""
        if self._layerwise is None:
            return contextlib.nullcontext()
        plan = self._layerwise
        return resident(self.base_model, modules, plan["checkpoint"], plan["dtype"])

    # ------------------------------------------------------------------------------------------- texts
    def _resolve_texts(self, name: str, texts: TextsLike) -> tuple[list[Text], dict[str, Any]]:
        source: dict[str, Any] = {}
        if isinstance(texts, str):
            source = {"source": texts}
            if texts.startswith("builtin:"):
                source["license"] = BUILTIN_LICENSE
            texts = load_texts(texts)
        elif hasattr(texts, "column_names"):
            raise TypeError(f"persona {name!r}: pass a Dataset as (dataset, column) or via data.dataset_texts")
        elif isinstance(texts, tuple) and len(texts) == 2 and hasattr(texts[0], "column_names"):
            from .data import dataset_texts

            source = {"source": f"datasets.Dataset column {texts[1]!r}"}
            texts = dataset_texts(*texts)
        texts = list(texts or [])
        if not texts:
            raise ValueError(f"persona {name!r}: the calibration set is empty")
        if all(isinstance(t, str) and not t.strip() for t in texts):
            raise ValueError(f"persona {name!r}: all {len(texts)} calibration texts are empty")
        return texts, source

    def _encode(self, name: str, texts: Sequence[Text]) -> list[list[int]]:
        encoded = []
        for text in texts:
            if isinstance(text, str):
                ids = (
                    self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
                    if text.strip()
                    else []
                )
            else:
                rendered = self.tokenizer.apply_chat_template(list(text), tokenize=False)
                ids = self.tokenizer(rendered, add_special_tokens=False, truncation=True, max_length=self.max_length)[
                    "input_ids"
                ]
            if ids:
                encoded.append(ids)
        if not encoded:
            raise ValueError(f"persona {name!r}: no calibration text produced any token")
        return encoded

    def _batches(self, encoded: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # little padding per batch
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = [encoded[i] for i in order[start : start + self.batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
            yield input_ids, attention

    @contextlib.contextmanager
    def _base_forward_context(self) -> Iterator[None]:
        with (
            torch.no_grad(),
            self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext(),
        ):
            yield

    def _record(self, encoded: list[list[int]], accumulators: Mapping[str, Accumulator], desc: str) -> None:
        """Forward every batch through the decoder (not the LM head), feeding each layer's input to its accumulator."""
        decoder = getattr(self.base_model, "base_model", self.base_model)
        device = self.base_model.get_input_embeddings().weight.device
        batches = self._batches(encoded)
        if self.show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(encoded) // self.batch_size), desc=desc, unit="batch")
        rank, size = distributed.world()
        if size == 1:
            recorder = ActivationRecorder(self.modules, accumulators)
            with self._base_forward_context(), recorder:
                for input_ids, attention in batches:
                    attention = attention.to(device)
                    recorder.set_layout(BatchLayout.from_attention_mask(attention))
                    decoder(input_ids=input_ids.to(device), attention_mask=attention, use_cache=False)
            return
        local: dict[int, dict[str, Accumulator]] = {}  # this rank's batches, one statistic each
        with self._base_forward_context():
            for index, (input_ids, attention) in enumerate(batches):
                if distributed.owner(index) != rank:
                    continue
                local[index] = {n: a.fresh() for n, a in accumulators.items()}
                with ActivationRecorder(self.modules, local[index]) as recorder:
                    attention = attention.to(device)
                    recorder.set_layout(BatchLayout.from_attention_mask(attention))
                    decoder(input_ids=input_ids.to(device), attention_mask=attention, use_cache=False)
        n_batches = -(-len(encoded) // self.batch_size)
        for name, accumulator in accumulators.items():
            totals = accumulator.state()
            distributed.add_in_batch_order(totals, {b: parts[name].state() for b, parts in local.items()}, n_batches)
            accumulator.set_counts(totals)

    def _prepare(self, name: str, texts: TextsLike) -> tuple[list[list[int]], dict[str, Any]]:
        """Token ids of a persona's texts, and the provenance record of its statistics."""
        texts, source = self._resolve_texts(name, texts)
        encoded = self._encode(name, texts)
        meta = dict(source, n_texts=len(encoded), n_tokens=sum(map(len, encoded)), max_length=self.max_length)
        return encoded, meta

    # ------------------------------------------------------------------------------------------- statistics
    def calibrate(self, name: str, texts: TextsLike) -> PersonaStats:
        """Stream ``texts`` through the model and return the persona's per-layer :class:`PersonaStats`."""
        if isinstance(texts, PersonaStats):
            return texts
        if self._layerwise is not None:
            return self._layerwise_run({name: texts}, ExtractionOptions("wanda"), select=False)[0][name]
        encoded, meta = self._prepare(name, texts)
        layers = {n: LayerStats.zeros(in_features_of(m), oriented_weight(m).device) for n, m in self.modules.items()}
        self._record(encoded, layers, desc=f"calibrating {name}")
        for layer, stats in layers.items():
            check_finite(layer, stats.sum_sq)
        return PersonaStats(name, layers, meta)

    def _obs_inverse_diagonals(self, name: str, texts: TextsLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``diag(H^-1)`` per layer; the Gram matrices of groups of layers that fit ``OBS_MEMORY_BUDGET`` are
        accumulated one group per pass over the texts."""
        encoded, meta = self._prepare(name, texts)
        sizes = {n: gram_bytes(in_features_of(m)) for n, m in self.modules.items()}
        result: dict[str, torch.Tensor] = {}
        for group in group_by_memory(sizes, OBS_MEMORY_BUDGET):
            grams = {
                n: GramAccumulator.zeros(in_features_of(self.modules[n]), oriented_weight(self.modules[n]).device)
                for n in group
            }
            self._record(encoded, grams, desc=f"OBS statistics {name}")
            mine = self._my_layers()
            for layer in group:
                check_finite(layer, grams[layer].gram.diagonal())
                gram = grams.pop(layer).gram
                if layer in mine:
                    result[layer] = scoring.obs_hessian_inverse_diagonal(gram)
        return result, meta

    # ------------------------------------------------------------------------------------------- masks
    def masks(
        self,
        stats: Mapping[str, PersonaStats | None],
        method: Method | None = None,
        sparsity: float | None = None,
        *,
        options: ExtractionOptions | None = None,
        packed: bool = False,
        **recipe: Any,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Masks per persona and layer from calibration statistics (no forward pass). See :meth:`extract`.

        ``packed`` returns each mask packed (``uint8``, 1 bit per weight, as on disk) instead of ``bool``.
        """
        options = resolve_options(options, method=method, sparsity=sparsity, **recipe)
        names = list(stats)
        check_personas(options, names)
        generator = torch.Generator().manual_seed(options.seed)
        result: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        mine = self._my_layers(split=options.calibrated)  # the random control's stream runs through every layer
        with self._base_forward_context():  # adapters write their masks into the weights; score the originals
            for layer, module in self.modules.items():
                if layer not in mine:
                    continue
                weight = oriented_weight(module)
                k = scoring.kept_per_row(weight.shape[1], options.sparsity)
                for persona in names:
                    mask = self._select(layer, weight, k, persona, stats, options, generator)
                    result[persona][layer] = (pack_mask(mask) if packed else mask).cpu()
        self._share_masks(result, split=options.calibrated, packed=packed)
        return result

    def _my_layers(self, split: bool = True) -> set[str]:
        """The layers whose masks this process selects: all of them in one process, every N-th of N ranks."""
        layers = list(self.modules)
        return {n for i, n in enumerate(layers) if not split or distributed.owner(i) == distributed.world()[0]}

    def _share_masks(self, masks: dict[str, dict[str, torch.Tensor]], split: bool = True, packed: bool = False) -> None:
        """Give every rank every layer's mask, from the rank that selected it (nothing to do in one process)."""
        if split and distributed.world()[1] > 1:
            shapes = {n: tuple(oriented_weight(m).shape) for n, m in self.modules.items()}
            for persona, persona_masks in masks.items():
                distributed.share_masks(persona_masks, list(self.modules), shapes, packed=packed)
                masks[persona] = {n: persona_masks[n] for n in self.modules}

    def _select(
        self,
        layer: str,
        weight: torch.Tensor,
        k: int,
        persona: str,
        stats: Mapping[str, PersonaStats | None],
        options: ExtractionOptions,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One layer's mask for one persona: ``k`` kept per row of ``weight`` ``(out, in)``."""
        if options.method == "random":
            scores = scoring.random_scores(tuple(weight.shape), generator).to(weight.device)
            if options.reference:
                return scoring.select_topk_reference(scores, k)
            return selection.select_top_per_row(selection.order_keys(scores), k)
        channel, tiebreak = self._channels(layer, weight.shape[1], persona, stats, options)
        if options.reference:
            return scoring.select_topk_reference(selection.channel_scores(weight, channel), k)
        return selection.select_by_channels(weight, k, channel, tiebreak)

    def _channels(
        self,
        layer: str,
        in_features: int,
        persona: str,
        stats: Mapping[str, PersonaStats | None],
        options: ExtractionOptions,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``float32`` channel vector ``c`` scoring ``|W| * c``, and the tie-break vector (or ``None``)."""
        if options.method == "magnitude":
            return torch.ones(in_features, dtype=torch.float32), None
        own = stats[persona].layers[layer]
        if options.method == "wanda":
            return (own.reference_norm if options.reference else own.feature_norm).float(), None
        if options.method == "contrastive":
            others = [s.layers[layer] for n, s in stats.items() if n != persona]
            rest = others[0] if len(others) == 1 else LayerStats.pooled(others)
            channel = scoring.phi(scoring.contrastive_z(own, rest), options.phi, options.tau).float()
            return channel, None if options.reference else own.feature_norm.float()
        raise ValueError(f"method {options.method!r} does not score from per-channel statistics")

    # ------------------------------------------------------------------------------------------- layer by layer
    def _layerwise_run(
        self, personas: Mapping[str, TextsLike], options: ExtractionOptions, select: bool = True
    ) -> tuple[dict[str, PersonaStats | None], dict[str, dict[str, torch.Tensor]], float]:
        """Statistics and (if ``select``) packed masks, one decoder block resident at a time; and the seconds spent
        selecting."""
        given = {n: t for n, t in personas.items() if isinstance(t, PersonaStats)}
        to_run = {n: self._prepare(n, t) for n, t in personas.items() if options.calibrated and n not in given}
        stats: dict[str, PersonaStats | None] = {
            n: given.get(n) or (PersonaStats(n, {}, to_run[n][1]) if n in to_run else None) for n in personas
        }
        blocks_name = decoder_block_list(self.base_model)
        by_block: dict[int, list[str]] = {}
        for layer in self.modules:
            if not layer.startswith(blocks_name + "."):
                raise ValueError(
                    f"layer-by-layer extraction masks layers inside the decoder blocks only; {layer!r} is not"
                )
            by_block.setdefault(block_index(layer.removeprefix(blocks_name + ".")), []).append(layer)
        return_freed_memory()  # freed blocks go back to the OS instead of piling up in the heap
        cache = HiddenCache(self._layerwise["cache_bytes"], self._layerwise["spill_dir"])
        masks: dict[str, dict[str, torch.Tensor]] = {n: {} for n in personas}
        generator, selecting = torch.Generator().manual_seed(options.seed), 0.0
        try:
            calls = self._capture_inputs({n: e for n, (e, _) in to_run.items()}, cache, blocks_name)
            for index in range(max(by_block) + 1):
                layers = by_block.get(index, [])
                with self._resident([f"{blocks_name}.{index}"]), self._base_forward_context():
                    accumulators = self._run_block(
                        index, layers, calls, cache, options, blocks_name, last=index == max(by_block)
                    )
                    if options.method != "obs":
                        for name, per_layer in accumulators.items():
                            stats[name].layers.update(per_layer)
                    start = time.perf_counter()
                    if select:
                        self._select_block(layers, stats, accumulators, options, generator, masks)
                    selecting += time.perf_counter() - start
        finally:
            cache.close()
        return stats, masks, selecting

    def _capture_inputs(self, encoded: Mapping[str, list[list[int]]], cache: Any, blocks_name: str) -> dict:
        """Run every batch up to the first decoder block; cache its hidden states, keep its other arguments."""
        embeddings = next(n for n, m in self.base_model.named_modules() if m is self.base_model.get_input_embeddings())
        decoder = getattr(self.base_model, "base_model", self.base_model)
        first = self.base_model.get_submodule(f"{blocks_name}.0")
        calls = {}
        with self._resident([embeddings]), self._base_forward_context():
            for name, ids in encoded.items():
                batches = list(self._batches(ids))
                for b, ((args, kwargs), (_, attention)) in enumerate(
                    zip(capture_block_inputs(decoder, first, batches), batches)
                ):
                    positional = bool(args)
                    cache.put((name, b), args[0] if positional else kwargs.pop("hidden_states"))
                    calls[(name, b)] = (positional, args[1:], kwargs, BatchLayout.from_attention_mask(attention))
        return calls

    def _run_block(
        self,
        index: int,
        layers: list[str],
        calls: Mapping,
        cache: Any,
        options: ExtractionOptions,
        blocks_name: str,
        last: bool,
    ) -> dict[str, dict[str, Accumulator]]:
        """Forward every cached batch through block ``index``, recording its targeted layers' inputs per persona."""
        block = self.base_model.get_submodule(f"{blocks_name}.{index}")
        zeros = GramAccumulator.zeros if options.method == "obs" else LayerStats.zeros
        result: dict[str, dict[str, Accumulator]] = {}
        for name in dict.fromkeys(p for p, _ in calls):
            result[name] = {layer: zeros(in_features_of(self.modules[layer]), "cpu") for layer in layers}
            with ActivationRecorder({n: self.modules[n] for n in layers}, result[name]) as recorder:
                for b in (b for p, b in calls if p == name):
                    positional, rest, kwargs, layout = calls[(name, b)]
                    recorder.set_layout(layout)
                    hidden = cache.get((name, b))
                    out = block(hidden, *rest, **kwargs) if positional else block(**kwargs, hidden_states=hidden)
                    if not last:
                        cache.put((name, b), out[0] if isinstance(out, tuple) else out)
            for layer, accumulator in result[name].items():
                check_finite(layer, accumulator.gram.diagonal() if options.method == "obs" else accumulator.sum_sq)
        return result

    def _select_block(
        self,
        layers: list[str],
        stats: Mapping[str, PersonaStats | None],
        accumulators: Mapping,
        options: ExtractionOptions,
        generator: torch.Generator,
        masks: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """The packed masks of one resident block's layers, for every persona, in the order ``masks`` would pick."""
        for layer in layers:
            weight = oriented_weight(self.modules[layer])
            k = scoring.kept_per_row(weight.shape[1], options.sparsity)
            for persona in masks:
                if options.method == "obs":
                    diagonal = scoring.obs_hessian_inverse_diagonal(accumulators[persona][layer].gram)
                    mask = selection.select_top_per_row(selection.order_keys(scoring.obs_scores(weight, diagonal)), k)
                else:
                    mask = self._select(layer, weight, k, persona, stats, options, generator)
                masks[persona][layer] = pack_mask(mask)

    # ------------------------------------------------------------------------------------------- adapters
    def extract(
        self,
        personas: Mapping[str, TextsLike],
        method: Method | None = None,
        sparsity: float | None = None,
        *,
        options: ExtractionOptions | None = None,
        save_format: str = "bits",
        **recipe: Any,
    ) -> PeftModel:
        """Calibrate (if needed), build one mask per persona and return them as adapters of one ``PeftModel``.

        Args:
            personas: persona name to texts: a list of strings or chat-message lists, a source string for
                :func:`peft_persona.data.load_texts`, a ``(Dataset, column)`` pair, a :class:`PersonaStats`, or
                ``None`` for the ``magnitude`` and ``random`` controls.
            method, sparsity, **recipe: the recipe, as the fields of :class:`ExtractionOptions` (``phi``, ``tau``,
                ``reference``, ``seed`` by keyword)
                (defaults: ``wanda``, ``0.5``, ``relu``, ``1.0``, ``False``, ``0``). ``wanda``: one mask per persona
                from its own statistics; ``contrastive``: two personas against each other, or each of k > 2
                against the pooled rest; ``obs``: SparseGPT-style saliency ``W^2 / diag(H^-1)``, no weight update;
                ``magnitude`` and ``random`` (seeded): controls. ``reference`` reproduces the paper code's
                statistics and ``torch.topk`` tie handling, for comparison only.
            options: the whole recipe as one :class:`ExtractionOptions`, instead of the keywords.
            save_format: ``"bits"`` (default) saves each mask, 1 bit per weight; ``"stats"`` saves only the
                per-channel statistics that select it and re-derives it from the base weights on load (wanda,
                contrastive and magnitude only; see :class:`PersonaMaskConfig`).

        Returns:
            The ``PeftModel`` (created on the first call, reused after) with one adapter per persona, named after
            it. As in PEFT, the first adapter ever created is active and later ones are added inactive: choose with
            ``set_adapter``. ``self.summary`` describes the run.
        """
        options = resolve_options(options, method=method, sparsity=sparsity, **recipe)
        names = list(personas)
        check_personas(options, names)
        PersonaMaskConfig(
            method=options.method, sparsity=options.sparsity, save_format=save_format, calibration=options.record()
        )  # a format the recipe cannot have fails before calibration
        if self.peft_model is not None:
            clash = [n for n in names if n in self.peft_model.peft_config]
            if clash:
                raise ValueError(f"adapters named {clash} already exist on the model")
        times = [time.perf_counter()]
        if self._layerwise is not None:
            stats, masks, selecting = self._layerwise_run(personas, options)
            times += [time.perf_counter() - selecting, time.perf_counter()]
        else:
            stats, obs_diagonals = self._statistics(personas, options)
            times.append(time.perf_counter())
            if options.method == "obs":
                masks = self._obs_masks(obs_diagonals, options.sparsity)
            else:
                masks = self.masks(stats, options=options, packed=True)  # 1 bit per weight until the adapters exist
            times.append(time.perf_counter())
        self._add_adapters(names, masks, stats, options, save_format)
        times.append(time.perf_counter())
        sizes = {n: oriented_weight(m).numel() for n, m in self.modules.items()}
        self.summary = ExtractionSummary.of(options, names, stats, masks, times, sizes)
        return self.peft_model

    def _statistics(
        self, personas: Mapping[str, TextsLike], options: ExtractionOptions
    ) -> tuple[dict[str, PersonaStats | None], dict[str, dict[str, torch.Tensor]]]:
        """Each persona's statistics (``None`` for controls) and, for OBS, its ``diag(H^-1)`` per layer."""
        stats: dict[str, PersonaStats | None] = {}
        obs_diagonals: dict[str, dict[str, torch.Tensor]] = {}
        for name, texts in personas.items():
            if not options.calibrated:
                stats[name] = None
            elif options.method == "obs":
                obs_diagonals[name], meta = self._obs_inverse_diagonals(name, texts)
                stats[name] = PersonaStats(name, {}, meta)
            else:
                stats[name] = self.calibrate(name, texts)
        return stats, obs_diagonals

    def _add_adapters(
        self,
        names: list[str],
        masks: Mapping[str, Mapping[str, torch.Tensor]],
        stats: Mapping[str, PersonaStats | None],
        options: ExtractionOptions,
        save_format: str = "bits",
    ) -> None:
        covered = None if self.default_targets else sorted(self.modules)
        with self._resident(probe_modules(self.base_model, covered)):
            fingerprint = base_model_fingerprint(self.base_model, covered)
        dtypes = sorted({str(oriented_weight(m).dtype).removeprefix("torch.") for m in self.modules.values()})
        for name in names:
            record = dict(stats[name].meta) if stats[name] is not None else {}
            if save_format == "stats":
                record["weight_dtype"] = dtypes[0] if len(dtypes) == 1 else dtypes
            config = PersonaMaskConfig(
                target_modules=set(self.modules),
                persona=name,
                opposite_persona=_opposite(name, names) if options.method == "contrastive" else None,
                method=options.method,
                sparsity=options.sparsity,
                calibration={**record, **options.record(), "targets": self.targets},
                base_model_fingerprint=fingerprint,
                base_model_name_or_path=getattr(self.base_model.config, "name_or_path", None) or None,
            )
            model = self.peft_model if self.peft_model is not None else self.base_model
            if save_format == "stats":
                selections = {
                    layer: ChannelSelection(
                        options.sparsity,
                        *self._channels(layer, in_features_of(module), name, stats, options),
                        digest=None,
                    )
                    for layer, module in self.modules.items()
                }
                self.peft_model = add_selection_adapter(model, masks[name], selections, name, config)
            else:
                self.peft_model = add_mask_adapter(model, masks[name], adapter_name=name, config=config)

    def _obs_masks(
        self, diag: Mapping[str, Mapping[str, torch.Tensor]], sparsity: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        masks: dict[str, dict[str, torch.Tensor]] = {n: {} for n in diag}
        mine = self._my_layers()
        with self._base_forward_context():
            for layer, module in self.modules.items():
                if layer not in mine:
                    continue
                weight = oriented_weight(module)
                k = scoring.kept_per_row(weight.shape[1], sparsity)
                for persona, per_layer in diag.items():
                    keys = scoring.order_keys(scoring.obs_scores(weight, per_layer[layer]))
                    masks[persona][layer] = pack_mask(scoring.select_top_per_row(keys, k)).cpu()
        self._share_masks(masks, packed=True)
        return masks


def mask_overlap(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the weights kept by ``first`` that ``second`` keeps too (``bool`` or packed masks alike)."""
    shared = sum(count_kept(first[n] & second[n]) for n in first)
    kept = sum(count_kept(first[n]) for n in first)
    return shared / kept if kept else 0.0


def resolve_options(options: ExtractionOptions | None, **keywords: Any) -> ExtractionOptions:
    """``options``, or one built from the keywords that were given; giving both is a ``TypeError``."""
    given = {k: v for k, v in keywords.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(ExtractionOptions)})
    if unknown:
        raise TypeError(
            f"unknown recipe keyword(s) {unknown}; ExtractionOptions has {[f.name for f in fields(ExtractionOptions)]}"
        )
    if options is not None and given:
        raise TypeError(f"pass either `options` or the keywords {sorted(given)}, not both")
    return options if options is not None else ExtractionOptions(**given)


def check_personas(options: ExtractionOptions, names: Sequence[str]) -> None:
    """Raise a ``ValueError`` if ``names`` do not suit the method: none at all, or fewer than two to contrast."""
    if not names:
        raise ValueError("no personas given")
    if options.method == "contrastive" and len(names) < 2:
        raise ValueError(f"contrastive extraction needs at least two personas, got {list(names)}")


def _opposite(name: str, names: Sequence[str]) -> str:
    others = [n for n in names if n != name]
    return others[0] if len(others) == 1 else "rest(" + ",".join(others) + ")"
