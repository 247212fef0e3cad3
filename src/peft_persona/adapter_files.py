"""The on-disk format of a persona mask adapter: file names, tensor names, and reading and checking saved adapters.

A saved adapter is a directory holding PEFT's two files (names from ``peft.utils.constants``):

* ``adapter_config.json``: a ``PersonaMaskConfig`` with ``"peft_type": "PERSONA_MASK"``;
* ``adapter_model.safetensors``: one ``uint8`` tensor ``base_model.model.<module>.persona_mask_bits`` per masked
  layer, shaped ``(out_features, ceil(in_features / 8))`` (see :mod:`peft_persona.bits`).

Several adapters saved together sit in one sub-directory each; PEFT saves an adapter named ``default`` at the root.
This module is the only place that knows these names; everything that reads adapter files goes through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .bits import unpack_mask
from .errors import PersonaAdapterError
from .targets import clean_module_name

PEFT_TYPE = "PERSONA_MASK"
PREFIX = f"{PEFT_TYPE.lower()}_"  # "persona_mask_": PEFT's prefix of every adapter buffer
BITS_BUFFER = f"{PREFIX}bits"  # the layer attribute holding the packed masks
BITS_SUFFIX = f".{BITS_BUFFER}"  # how every mask tensor name ends in adapter_model.safetensors
ROOT_ADAPTER = "default"  # name of an adapter saved at a directory's root that records no persona
PathLike = Union[str, os.PathLike]

__all__ = [
    "BITS_SUFFIX", "CONFIG_NAME", "PEFT_TYPE", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME",
    "adapter_dirs", "check_adapter_name", "check_mask_tensors", "check_safetensors", "digest", "mask_tensor_key",
    "mask_tensor_module", "read_config", "read_masks", "validate_weights",
]
MAX_NAME_LENGTH = 128
_FORBIDDEN_IN_NAMES = set("/\\.:\0")


def check_adapter_name(name: object, what: str = "adapter name") -> str:
    """``name`` if it is safe as an adapter name, which becomes a directory name and a buffer key; else raise.

    A name must be a non-empty string of at most 128 characters without path separators, dots (so neither ``..``
    nor an absolute path), colons, control characters or surrounding whitespace.
    """
    if not isinstance(name, str):
        raise PersonaAdapterError(f"{what} must be a string, got {type(name).__name__}")
    bad = sorted({c for c in name if c in _FORBIDDEN_IN_NAMES or ord(c) < 32})
    if not name or name != name.strip() or len(name) > MAX_NAME_LENGTH or bad:
        reason = f"contains {bad!r}" if bad else "is empty, too long or padded with whitespace"
        raise PersonaAdapterError(
            f"{what} {name!r} {reason}; use letters, digits, '_' or '-' (it becomes a directory name and a buffer key)"
        )
    return name


def mask_tensor_key(module: str) -> str:
    """The name of ``module``'s mask tensor in ``adapter_model.safetensors``."""
    return f"base_model.model.{module}{BITS_SUFFIX}"


def mask_tensor_module(key: str) -> str:
    """The base-model module name of a mask tensor name (``base_model.model.<module>.persona_mask_bits``)."""
    return clean_module_name(key[: -len(BITS_SUFFIX)] if key.endswith(BITS_SUFFIX) else key)


def read_config(directory: PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a persona mask adapter directory, as a dict.

    Raises :class:`PersonaAdapterError` naming the file if it is missing, not JSON, or not a persona mask config.
    """
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise PersonaAdapterError(f"no {CONFIG_NAME} in {Path(directory)}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PersonaAdapterError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PersonaAdapterError(f"{file} holds a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != PEFT_TYPE:
        raise PersonaAdapterError(
            f"{file}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}; not a persona mask adapter"
        )
    return config


def check_safetensors(file: PathLike) -> None:
    """Raise :class:`PersonaAdapterError` naming ``file`` if it is not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise PersonaAdapterError(f"{file} is not a readable safetensors file ({err})") from None


def validate_weights(file: PathLike) -> list[str]:
    """Check an adapter's weights file and return its mask tensor names.

    The file must be readable safetensors holding at least one mask tensor, each 2-D ``uint8``.
    """
    from safetensors import safe_open

    file = Path(file)
    if not file.is_file():
        raise PersonaAdapterError(f"no {SAFETENSORS_WEIGHTS_NAME} at {file.parent}")
    check_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        keys = [key for key in handle.keys() if key.endswith(BITS_SUFFIX)]
        for key in keys:
            meta = handle.get_slice(key)
            dtype, shape = meta.get_dtype(), meta.get_shape()
            if dtype != "U8" or len(shape) != 2:
                raise PersonaAdapterError(f"{file}: tensor {key!r} is {dtype} {tuple(shape)}, not 2-D uint8")
    if not keys:
        raise PersonaAdapterError(f"{file} holds no persona mask tensors (keys ending in {BITS_SUFFIX!r})")
    return keys


def check_mask_tensors(file: PathLike, expected: Mapping[str, tuple[int, int]]) -> None:
    """Check that ``file`` holds exactly one mask tensor per module of ``expected`` (module name to the weight's
    ``(out_features, in_features)``), each ``uint8`` of the packed shape ``(out, ceil(in / 8))``, and nothing else.

    Reads the header only. Raises :class:`PersonaAdapterError` naming the file and the first offending tensor.
    """
    from safetensors import safe_open

    check_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        found = {key: handle.get_slice(key) for key in handle.keys()}
    wanted = {mask_tensor_key(module): module for module in expected}
    unexpected = sorted(set(found) - set(wanted))
    missing = sorted(set(wanted) - set(found))
    if unexpected:
        raise PersonaAdapterError(f"{file}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    if missing:
        raise PersonaAdapterError(f"{file}: no tensor {missing[0]!r} for module {wanted[missing[0]]!r} ({len(missing)} missing)")
    for key, module in sorted(wanted.items()):
        out_features, in_features = expected[module]
        shape, dtype = tuple(found[key].get_shape()), found[key].get_dtype()
        if dtype != "U8" or shape != (out_features, (in_features + 7) // 8):
            raise PersonaAdapterError(
                f"{file}: tensor {key!r} is {dtype} {shape}; module {module!r} with weight ({out_features}, "
                f"{in_features}) needs U8 {(out_features, (in_features + 7) // 8)}"
            )


def adapter_dirs(directory: PathLike) -> dict[str, Path]:
    """The persona mask adapters saved in ``directory``, by name.

    Every sub-directory holding an ``adapter_config.json`` is an adapter named after the sub-directory. An adapter
    at the root itself is named after its config's ``persona``, or ``default`` if it records none.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no adapter directory at {root}")
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():
        found[read_config(root).get("persona") or ROOT_ADAPTER] = root
    for child in sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        found[child.name] = child
    if not found:
        raise PersonaAdapterError(f"no {CONFIG_NAME} in {root} or in any folder directly below it")
    return found


def read_masks(path: PathLike, in_features: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The ``bool`` masks saved at ``path`` (an adapter directory or its weights file), by module name.

    ``in_features`` gives each module's input width; a tensor for a module not in it raises a ``KeyError``.
    """
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / SAFETENSORS_WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no persona mask weights at {file}")
    if (file.parent / CONFIG_NAME).is_file():
        read_config(file.parent)
    keys = validate_weights(file)
    tensors = load_file(str(file))
    masks = {}
    for key in keys:
        name = mask_tensor_module(key)
        if name not in in_features:
            raise KeyError(f"{file}: tensor {key!r} names module {name!r}, which holds no persona mask layer")
        try:
            masks[name] = unpack_mask(tensors[key], in_features[name])
        except (TypeError, ValueError) as err:
            raise PersonaAdapterError(f"{file}: tensor {key!r}: {err}") from None
    return masks


def digest(directory: PathLike) -> str:
    """SHA-256 prefix of an adapter directory's weights file, to recognise unchanged adapters."""
    sha = hashlib.sha256()
    with open(Path(directory) / SAFETENSORS_WEIGHTS_NAME, "rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()[:16]


STAGING_MARK = ".staging-"  # staging folders sit beside an output folder: .<out name>.staging-<pid>-<random>


def staging_dir(out: PathLike) -> Path:
    """A new, empty staging folder beside ``out`` (on the same file system, so a rename moves its content into
    ``out`` atomically); stale ones left by killed runs are removed first."""
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-", dir=out.parent))


def remove_stale_staging(out: PathLike) -> list[Path]:
    """Delete staging folders beside ``out`` whose process is gone; return them."""
    import shutil

    out = Path(out)
    removed = []
    for folder in out.parent.glob(f".{out.name}{STAGING_MARK}*"):
        pid = folder.name[len(f".{out.name}{STAGING_MARK}") :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(source: PathLike, target: PathLike) -> None:
    """Move the complete folder ``source`` to ``target`` by renames, replacing an older ``target``.

    ``target`` is at every moment either absent, the old complete folder or the new one, never a partial one.
    """
    import shutil

    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = source.with_name(source.name + ".old")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
