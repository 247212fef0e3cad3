"""Layer-by-layer calibration: run a model larger than memory one decoder block at a time.

The model is built on the meta device (accelerate's ``init_empty_weights``). The inputs of the first decoder block are
captured by running the model with only its input embeddings resident, up to that block (Wanda's ``Catcher``, here a
forward pre-hook that stops the pass). Each block's weights are then read from the checkpoint's safetensors shards
(``safe_open``), the block runs on the cached inputs of every calibration batch with the exact arguments the model's
own loop passes it, and its weights are released before the next block. The activations are therefore those of the
whole model, bit for bit. The cached hidden states stay in memory up to a budget and spill to disk beyond it.

GGUF checkpoints are dequantised whole by transformers and are not read block by block.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PersonaAdapterError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
DEFAULT_CACHE_BYTES = 2 * 1024**3


class Checkpoint:
    """The safetensors shards of a checkpoint directory: which file holds each tensor, read one tensor at a time."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            self.files = {k: self.directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SAFETENSORS_SINGLE).is_file():
            with safe_open(str(self.directory / SAFETENSORS_SINGLE), framework="pt") as handle:
                self.files = {k: self.directory / SAFETENSORS_SINGLE for k in handle.keys()}  # noqa: SIM118
        else:
            raise PersonaAdapterError(
                f"{self.directory} holds neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}: layer-by-layer "
                "calibration reads safetensors checkpoints; load GGUF and .bin checkpoints whole (without layerwise)"
            )

    @property
    def nbytes(self) -> int:
        """Total size of the shard files."""
        return sum(f.stat().st_size for f in set(self.files.values()))

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read from their shards; a name the checkpoint lacks raises, naming it."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise PersonaAdapterError(f"checkpoint {self.directory} has no tensor {name!r}")
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key).clone() for key in keys})  # own memory, not the mmap
        return tensors


def resolve_checkpoint(name_or_path: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local checkpoint directory, or the Hub snapshot of its config, tokenizer and safetensors files."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(name_or_path, revision=revision, token=token, allow_patterns=patterns))


def empty_model(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``directory``'s config, on the meta device except for its buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def resident(model: nn.Module, prefixes: Iterable[str], checkpoint: Checkpoint, dtype: torch.dtype) -> Iterator[None]:
    """Inside, the parameters of ``model`` under ``prefixes`` (module names) hold the checkpoint's values in
    ``dtype`` on the CPU; on exit they go back to the meta device."""
    from accelerate.utils import set_module_tensor_to_device

    prefixes = tuple(p.rstrip(".") + "." for p in prefixes)
    names = [n for n, p in model.named_parameters() if p.device.type == "meta" and n.startswith(prefixes)]
    stored = {n: n.replace(".base_layer.", ".") for n in names}  # a persona layer wraps the checkpoint's module
    try:
        tensors = checkpoint.read(stored.values())
        for name in names:
            tensor = tensors.pop(stored[name])
            set_module_tensor_to_device(
                model, name, "cpu", value=tensor.to(dtype) if tensor.is_floating_point() else tensor
            )
        yield
    finally:
        for name in names:
            set_module_tensor_to_device(model, name, "meta")
        return_freed_memory()


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Make glibc hand freed blocks back to the OS (elsewhere, nothing happens).

    glibc raises its mmap threshold as large blocks are freed, so the weights and score tensors of each decoder block
    end up in its heap and stay resident after they are freed: peak memory then creeps up block after block (2 GB
    instead of 1 GB on the 1.1B benchmark). This fixes the threshold at ``threshold`` bytes (process-wide: larger
    allocations are mapped and unmapped on their own) and trims the heap now.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.malloc_trim(0)


class _Captured(Exception):
    """Stops a forward pass once the first decoder block's inputs are captured."""


def capture_block_inputs(
    decoder: nn.Module, block: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """For each ``(input_ids, attention_mask)`` batch, the positional and keyword arguments ``decoder`` passes to
    ``block`` (its first decoder block); the pass stops there, so no block weight is needed."""
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def stop(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for input_ids, attention in batches:
            with contextlib.suppress(_Captured):
                decoder(input_ids=input_ids, attention_mask=attention, use_cache=False)
            yield captured.pop()
    finally:
        handle.remove()


class HiddenCache:
    """Per-batch hidden states, in memory up to ``max_bytes`` and spilled to safetensors files beyond it."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, spill_dir: str | os.PathLike | None = None) -> None:
        self.max_bytes, self.in_memory = max_bytes, 0
        self._memory: dict[Any, torch.Tensor] = {}
        self._spilled: dict[Any, Path] = {}
        self._spill_root = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        self.pop(key)
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.max_bytes:
            self._memory[key] = tensor
            self.in_memory += size
            return
        from safetensors.torch import save_file

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="peft-persona-hidden-", dir=self._spill_root)
        path = Path(self._tmp.name) / f"{len(self._spilled)}-{abs(hash(key))}.safetensors"
        save_file({"hidden": tensor.contiguous()}, str(path))
        self._spilled[key] = path

    def get(self, key: Any) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        from safetensors.torch import load_file

        return load_file(str(self._spilled[key]))["hidden"]

    def pop(self, key: Any) -> None:
        tensor = self._memory.pop(key, None)
        if tensor is not None:
            self.in_memory -= tensor.numel() * tensor.element_size()
        path = self._spilled.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    @property
    def spilled(self) -> int:
        """How many entries live on disk now."""
        return len(self._spilled)

    def close(self) -> None:
        self._memory.clear()
        self._spilled.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
