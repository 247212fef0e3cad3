"""PersonaExtractor: calibrate on persona texts, score weights, select masks, hand them back as PEFT adapters.

Glue only: the statistics live in :mod:`peft_persona.calibrate`, the formulas in :mod:`peft_persona.scoring`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
from peft import PeftModel
from torch import nn

from . import scoring
from .calibrate import (
    ActivationRecorder,
    LayerStats,
    PersonaStats,
    batch_stats,
    check_finite,
    in_features_of,
    target_modules_by_name,
)
from .data import BUILTIN_LICENSE, Text, load_texts
from .fingerprint import base_model_fingerprint
from .targets import decoder_linear_modules, is_maskable, oriented_weight
from .masks import add_mask_adapter
from .tuner.config import PersonaMaskConfig

Method = Literal["wanda", "contrastive", "obs", "magnitude", "random"]
TextsLike = Union[str, Sequence[Text], PersonaStats, None]
CALIBRATED_METHODS = ("wanda", "contrastive", "obs")
CONTROL_METHODS = ("magnitude", "random")
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
    overlap: Optional[float]
    seconds: dict[str, float] = field(default_factory=dict)

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
        target_modules: module names to mask; default every ``nn.Linear`` inside the decoder blocks.
        max_length: texts are truncated to this many tokens.
        batch_size: sequences per forward pass; statistics do not depend on it.
        show_progress: show a tqdm progress bar over batches.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        target_modules: Optional[Sequence[str]] = None,
        max_length: int = 256,
        batch_size: int = 8,
        show_progress: bool = False,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be positive, got {max_length} and {batch_size}")
        self.peft_model: Optional[PeftModel] = model if isinstance(model, PeftModel) else None
        self.base_model = model.get_base_model() if isinstance(model, PeftModel) else model
        self.tokenizer = tokenizer
        self.max_length, self.batch_size, self.show_progress = max_length, batch_size, show_progress
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set pad_token")
            warnings.warn(f"tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding")
            tokenizer.pad_token = tokenizer.eos_token
        names = list(target_modules) if target_modules is not None else list(decoder_linear_modules(self.base_model))
        self.modules = target_modules_by_name(self.base_model, names)
        for name, module in self.modules.items():
            if not is_maskable(module):
                raise TypeError(f"target module {name!r} is a {type(module).__name__}, not nn.Linear or Conv1D")
        self.summary: Optional[ExtractionSummary] = None

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
                ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"] if text.strip() else []
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
        with torch.no_grad(), (self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()):
            yield

    def _run(self, encoded: list[list[int]], recorder: ActivationRecorder, on_batch: Any, desc: str) -> None:
        """Forward every batch through the decoder (not the LM head) with ``recorder``'s hooks attached."""
        decoder = getattr(self.base_model, "base_model", self.base_model)
        device = self.base_model.get_input_embeddings().weight.device
        batches = self._batches(encoded)
        if self.show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(encoded) // self.batch_size), desc=desc, unit="batch")
        with self._base_forward_context(), recorder:
            for input_ids, attention in batches:
                flat = attention.flatten().nonzero().squeeze(1)
                on_batch(flat.to(device), (flat // attention.shape[1]).to(device), attention.shape[0])
                decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)

    # ------------------------------------------------------------------------------------------- statistics
    def calibrate(self, name: str, texts: TextsLike) -> PersonaStats:
        """Stream ``texts`` through the model and return the persona's per-layer :class:`PersonaStats`."""
        if isinstance(texts, PersonaStats):
            return texts
        texts, source = self._resolve_texts(name, texts)
        encoded = self._encode(name, texts)
        layers = {n: LayerStats.zeros(in_features_of(m), oriented_weight(m).device) for n, m in self.modules.items()}
        batch: dict[str, Any] = {}

        def on_batch(tokens: torch.Tensor, seqs: torch.Tensor, n_seqs: int) -> None:
            batch.update(tokens=tokens, seqs=seqs, n_seqs=n_seqs)

        def compute(x: torch.Tensor):
            tokens, seqs = batch["tokens"].to(x.device), batch["seqs"].to(x.device)
            return batch_stats(x, tokens, seqs, batch["n_seqs"])

        recorder = ActivationRecorder(self.modules, compute, lambda layer, stats: layers[layer].add(stats))
        self._run(encoded, recorder, on_batch, desc=f"calibrating {name}")
        for layer, stats in layers.items():
            check_finite(layer, stats.sum_sq)
        meta = dict(source, n_texts=len(encoded), n_tokens=sum(map(len, encoded)), max_length=self.max_length)
        return PersonaStats(name, layers, meta)

    def _obs_inverse_diagonals(self, name: str, texts: TextsLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``diag(H^-1)`` per layer, accumulating ``X^T X`` for groups of layers that fit ``OBS_MEMORY_BUDGET``."""
        texts, source = self._resolve_texts(name, texts)
        encoded = self._encode(name, texts)
        groups: list[list[str]] = [[]]
        used = 0
        for layer, module in self.modules.items():
            size = in_features_of(module) ** 2 * 8
            if groups[-1] and used + size > OBS_MEMORY_BUDGET:
                groups.append([])
                used = 0
            groups[-1].append(layer)
            used += size
        result: dict[str, torch.Tensor] = {}
        batch: dict[str, Any] = {}
        for group in groups:
            grams = {
                n: torch.zeros(in_features_of(self.modules[n]), in_features_of(self.modules[n]), dtype=torch.float64,
                               device=oriented_weight(self.modules[n]).device)
                for n in group
            }

            def compute(x: torch.Tensor) -> torch.Tensor:
                valid = x.reshape(-1, x.shape[-1]).index_select(0, batch["tokens"].to(x.device)).double()
                return valid.T @ valid

            def on_batch(tokens: torch.Tensor, seqs: torch.Tensor, n_seqs: int) -> None:
                batch["tokens"] = tokens

            recorder = ActivationRecorder({n: self.modules[n] for n in group}, compute, lambda n, g: grams[n].add_(g))
            self._run(encoded, recorder, on_batch, desc=f"OBS statistics {name}")
            for layer in group:
                check_finite(layer, grams[layer].diagonal())
                result[layer] = scoring.obs_hessian_inverse_diagonal(grams.pop(layer))
        meta = dict(source, n_texts=len(encoded), n_tokens=sum(map(len, encoded)), max_length=self.max_length)
        return result, meta

    # ------------------------------------------------------------------------------------------- masks
    def masks(
        self,
        stats: Mapping[str, Optional[PersonaStats]],
        method: Method = "wanda",
        sparsity: float = 0.5,
        *,
        phi: Literal["relu", "softplus"] = "relu",
        tau: float = 1.0,
        reference: bool = False,
        seed: int = 0,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Masks per persona and layer from calibration statistics (no forward pass). See :meth:`extract`."""
        names = list(stats)
        _check_method(method, names, sparsity)
        generator = torch.Generator().manual_seed(seed)
        result: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for layer, module in self.modules.items():
            weight = oriented_weight(module)
            k = scoring.kept_per_row(weight.shape[1], sparsity)
            for persona in names:
                scores, secondary = self._scores(layer, weight, persona, stats, method, phi, tau, reference, generator)
                if reference:
                    mask = scoring.select_topk_reference(scores, k)
                elif secondary is not None:
                    mask = scoring.select_lexicographic(scores, secondary, k)
                else:
                    mask = scoring.select_top_per_row(scoring.order_keys(scores), k)
                result[persona][layer] = mask.cpu()
        return result

    def _scores(self, layer, weight, persona, stats, method, phi, tau, reference, generator):
        if method == "magnitude":
            return scoring.magnitude_scores(weight), None
        if method == "random":
            return scoring.random_scores(tuple(weight.shape), generator).to(weight.device), None
        own = stats[persona].layers[layer]
        if method == "wanda":
            norm = own.reference_norm if reference else own.feature_norm
            return scoring.wanda_scores(weight, norm), None
        if method == "contrastive":
            others = [s.layers[layer] for n, s in stats.items() if n != persona]
            rest = others[0] if len(others) == 1 else LayerStats.pooled(others)
            z = scoring.contrastive_z(own, rest)
            channel = scoring.phi(z, phi, tau)
            if reference:
                return scoring.contrastive_scores(weight, channel), None
            return scoring.contrastive_scores(weight, channel), scoring.wanda_scores(weight, own.feature_norm)
        raise ValueError(f"method {method!r} does not score from statistics")

    # ------------------------------------------------------------------------------------------- adapters
    def extract(
        self,
        personas: Mapping[str, TextsLike],
        method: Method = "wanda",
        sparsity: float = 0.5,
        *,
        phi: Literal["relu", "softplus"] = "relu",
        tau: float = 1.0,
        reference: bool = False,
        seed: int = 0,
    ) -> PeftModel:
        """Calibrate (if needed), build one mask per persona and return them as adapters of one ``PeftModel``.

        Args:
            personas: persona name to texts: a list of strings or chat-message lists, a source string for
                :func:`peft_persona.data.load_texts`, a ``(Dataset, column)`` pair, a :class:`PersonaStats`, or
                ``None`` for the ``magnitude`` and ``random`` controls.
            method: ``wanda`` (one mask per persona from its own statistics), ``contrastive`` (two personas against
                each other, or each of k > 2 against the pooled rest), ``obs`` (SparseGPT-style saliency
                ``W^2 / diag(H^-1)``, no weight update), ``magnitude`` or ``random`` (seeded) controls.
            sparsity: fraction of each output row's weights removed, in [0, 1).
            phi: contrastive channel weight, ``relu`` (default) or ``softplus(z / tau)``.
            reference: reproduce the paper code's statistics (per-sequence L2 norms averaged over texts) and its
                ``torch.topk`` tie handling, for comparison. Not the default.
            seed: seed of the ``random`` control.

        Returns:
            The ``PeftModel`` (created on the first call, reused after) with one adapter per persona, named after
            it. As in PEFT, the first adapter ever created is active and later ones are added inactive: choose with
            ``set_adapter``. ``self.summary`` describes the run.
        """
        names = list(personas)
        _check_method(method, names, sparsity)
        if self.peft_model is not None:
            clash = [n for n in names if n in self.peft_model.peft_config]
            if clash:
                raise ValueError(f"adapters named {clash} already exist on the model")
        started = time.perf_counter()
        stats: dict[str, Optional[PersonaStats]] = {}
        obs_diag: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            if method in CONTROL_METHODS:
                stats[name] = None
            elif method == "obs":
                diag, meta = self._obs_inverse_diagonals(name, personas[name])
                obs_diag[name], stats[name] = diag, PersonaStats(name, {}, meta)
            else:
                stats[name] = self.calibrate(name, personas[name])
        calibrated = time.perf_counter()
        if method == "obs":
            masks = self._obs_masks(obs_diag, sparsity)
        else:
            masks = self.masks(stats, method, sparsity, phi=phi, tau=tau, reference=reference, seed=seed)
        selected = time.perf_counter()
        fingerprint = base_model_fingerprint(self.base_model)
        for name in names:
            config = PersonaMaskConfig(
                target_modules=set(self.modules),
                persona=name,
                opposite_persona=_opposite(name, names) if method == "contrastive" else None,
                method=method,
                sparsity=sparsity,
                calibration=_calibration_record(stats[name], method, phi, tau, reference, seed),
                base_model_fingerprint=fingerprint,
                base_model_name_or_path=getattr(self.base_model.config, "name_or_path", None) or None,
            )
            model = self.peft_model if self.peft_model is not None else self.base_model
            self.peft_model = add_mask_adapter(model, masks[name], adapter_name=name, config=config)
        done = time.perf_counter()
        total = sum(m.numel() for m in masks[names[0]].values())
        self.summary = ExtractionSummary(
            method=method,
            sparsity=sparsity,
            personas=names,
            n_texts={n: s.meta.get("n_texts", 0) for n, s in stats.items() if s is not None},
            n_tokens={n: s.meta.get("n_tokens", 0) for n, s in stats.items() if s is not None},
            kept_fraction=sum(int(m.sum()) for m in masks[names[0]].values()) / total,
            overlap=mask_overlap(masks[names[0]], masks[names[1]]) if len(names) == 2 else None,
            seconds={
                "calibration": calibrated - started,
                "masks": selected - calibrated,
                "adapters": done - selected,
                "total": done - started,
            },
        )
        return self.peft_model

    def _obs_masks(self, diag: Mapping[str, Mapping[str, torch.Tensor]], sparsity: float) -> dict[str, dict[str, torch.Tensor]]:
        masks: dict[str, dict[str, torch.Tensor]] = {n: {} for n in diag}
        for layer, module in self.modules.items():
            weight = oriented_weight(module)
            k = scoring.kept_per_row(weight.shape[1], sparsity)
            for persona, per_layer in diag.items():
                keys = scoring.order_keys(scoring.obs_scores(weight, per_layer[layer]))
                masks[persona][layer] = scoring.select_top_per_row(keys, k).cpu()
        return masks


def mask_overlap(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the weights kept by ``first`` that ``second`` keeps too."""
    shared = sum(int((first[n] & second[n]).sum()) for n in first)
    kept = sum(int(first[n].sum()) for n in first)
    return shared / kept if kept else 0.0


def _check_method(method: str, names: Sequence[str], sparsity: float) -> None:
    if method not in CALIBRATED_METHODS + CONTROL_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {CALIBRATED_METHODS + CONTROL_METHODS}")
    if not names:
        raise ValueError("no personas given")
    if method == "contrastive" and len(names) < 2:
        raise ValueError(f"contrastive extraction needs at least two personas, got {list(names)}")
    scoring.kept_per_row(1, sparsity)  # validates the range


def _opposite(name: str, names: Sequence[str]) -> str:
    others = [n for n in names if n != name]
    return others[0] if len(others) == 1 else "rest(" + ",".join(others) + ")"


def _calibration_record(stats: Optional[PersonaStats], method: str, phi: str, tau: float, reference: bool, seed: int) -> dict:
    record: dict[str, Any] = dict(stats.meta) if stats is not None else {}
    if method == "contrastive":
        record.update(phi=phi, tau=tau)
    if method == "random":
        record["seed"] = seed
    if reference:
        record["reference_mode"] = True
    return record
