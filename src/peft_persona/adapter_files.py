"""The on-disk format of a persona mask adapter: file names, tensor names, and reading and checking saved adapters.

A saved adapter is a directory holding PEFT's two files (names from ``peft.utils.constants``):

* ``adapter_config.json``: a ``PersonaMaskConfig`` with ``"peft_type": "PERSONA_MASK"``;
* ``adapter_model.safetensors``, in one of two formats (the config's ``save_format``):

  * ``bits``: one ``uint8`` tensor ``base_model.model.<module>.persona_mask_bits`` per masked layer, shaped
    ``(out_features, ceil(in_features / 8))`` (see :mod:`peft_persona.bits`);
  * ``stats``: per masked layer, ``<module>.persona_mask_channel`` (``float32`` ``(in_features,)``), for contrastive
    masks ``<module>.persona_mask_tiebreak`` (the same), and ``<module>.persona_mask_digest`` (``uint8`` ``(32,)``,
    the SHA-256 of the packed mask); the masks are re-derived from the base weights (see
    :mod:`peft_persona.selection`).

Several adapters saved together sit in one sub-directory each; PEFT saves an adapter named ``default`` at the root.
This module is the only place that knows these names; everything that reads adapter files goes through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .bits import unpack_mask
from .errors import PersonaAdapterError
from .selection import ChannelSelection
from .targets import clean_module_name

PEFT_TYPE = "PERSONA_MASK"
PREFIX = f"{PEFT_TYPE.lower()}_"  # "persona_mask_": PEFT's prefix of every adapter buffer
BITS_BUFFER = f"{PREFIX}bits"  # the layer attribute holding the packed masks
BITS_SUFFIX = f".{BITS_BUFFER}"  # how every mask tensor name ends in adapter_model.safetensors
CHANNEL_SUFFIX = f".{PREFIX}channel"  # stats format: the float32 channel vector of a layer
TIEBREAK_SUFFIX = f".{PREFIX}tiebreak"  # stats format: the float32 tie-break vector (contrastive masks)
DIGEST_SUFFIX = f".{PREFIX}digest"  # stats format: SHA-256 of the packed mask, 32 uint8 values
ROOT_ADAPTER = "default"  # name of an adapter saved at a directory's root that records no persona
PathLike = str | os.PathLike

__all__ = [
    "BITS_SUFFIX",
    "CHANNEL_SUFFIX",
    "CONFIG_NAME",
    "DIGEST_SUFFIX",
    "PEFT_TYPE",
    "SAFETENSORS_WEIGHTS_NAME",
    "TIEBREAK_SUFFIX",
    "WEIGHTS_NAME",
    "adapter_dirs",
    "check_adapter_name",
    "check_config_types",
    "check_mask_tensors",
    "check_safetensors",
    "check_stats_tensors",
    "digest",
    "download_adapter_file",
    "hub_download_options",
    "mask_tensor_key",
    "mask_tensor_module",
    "read_config",
    "read_masks",
    "read_selections",
    "validate_weights",
    "weights_format",
]
MAX_NAME_LENGTH = 128
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch: no adapter may take it
_FORBIDDEN_IN_NAMES = set("/\\.:\0")


def check_adapter_name(name: object, what: str = "adapter name") -> str:
    """``name`` if it is safe as an adapter name, which becomes a directory name and a buffer key; else raise.

    A name must be a non-empty string of at most 128 characters without path separators, dots (so neither ``..``
    nor an absolute path), colons, control characters or surrounding whitespace, and not ``__base__``, which
    PEFT's mixed batches (``adapter_names=[...]``) read as "no adapter".
    """
    if not isinstance(name, str):
        raise PersonaAdapterError(f"{what} must be a string, got {type(name).__name__}")
    if name == BASE_ADAPTER:
        raise PersonaAdapterError(
            f"{what} {name!r} is reserved: in a mixed batch (adapter_names=[...]) PEFT reads it as 'no adapter'"
        )
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
    check_config_types(config, str(file))
    return config


# The type of every config field a card, an inspection or the Hub staging reads from an untrusted file.
_STRING_FIELDS = ("persona", "opposite_persona", "method", "save_format", "base_model_name_or_path", "revision")
_OBJECT_FIELDS = ("calibration", "base_model_fingerprint")


def check_config_types(config: dict[str, Any], where: str) -> None:
    """Raise :class:`PersonaAdapterError` naming ``where`` and the field if a field of a config read from a file has
    an unexpected type (strings, numbers, objects and lists where the package reads them)."""

    def fail(field: str, expected: str) -> PersonaAdapterError:
        got = type(config[field]).__name__
        return PersonaAdapterError(f"{where}: field {field} must be {expected}, got {got}")

    for field in _STRING_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], str):
            raise fail(field, "null or a string")
    for field in _OBJECT_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise fail(field, "null or an object")
    for field in ("sparsity", "strength"):
        value = config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise fail(field, "null or a number")
    modules = config.get("target_modules")
    listed = isinstance(modules, list) and all(isinstance(m, str) for m in modules)
    if modules is not None and not isinstance(modules, str) and not listed:
        raise fail("target_modules", "null, a string or a list of strings")
    probe = (config.get("base_model_fingerprint") or {}).get("weight_probe", [])
    if not isinstance(probe, list) or not all(isinstance(v, (int, float)) for v in probe):
        raise PersonaAdapterError(f"{where}: field base_model_fingerprint.weight_probe must be a list of numbers")


def check_safetensors(file: PathLike) -> None:
    """Raise :class:`PersonaAdapterError` naming ``file`` if it is not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise PersonaAdapterError(f"{file} is not a readable safetensors file ({err})") from None


def validate_weights(file: PathLike) -> list[str]:
    """Check an adapter's weights file and return its per-layer tensor names (the masks, or the digests of a
    ``stats`` file).

    The file must be readable safetensors holding at least one layer, in one format: 2-D ``uint8`` masks, or for
    ``stats`` a 1-D ``float32`` channel vector and a ``uint8`` ``(32,)`` digest per layer (and maybe a tie-break).
    """
    from safetensors import safe_open

    file = Path(file)
    if not file.is_file():
        raise PersonaAdapterError(f"no {SAFETENSORS_WEIGHTS_NAME} at {file.parent}")
    check_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        names = handle.keys()
        found = {key: handle.get_slice(key) for key in names}
    expected = {
        BITS_SUFFIX: ("U8", 2),
        CHANNEL_SUFFIX: ("F32", 1),
        TIEBREAK_SUFFIX: ("F32", 1),
        DIGEST_SUFFIX: ("U8", 1),
    }
    for key, meta in found.items():
        for suffix, (dtype, dims) in expected.items():
            if key.endswith(suffix) and (meta.get_dtype() != dtype or len(meta.get_shape()) != dims):
                raise PersonaAdapterError(
                    f"{file}: tensor {key!r} is {meta.get_dtype()} {tuple(meta.get_shape())}, not {dims}-D {dtype}"
                )
    bits = [k for k in found if k.endswith(BITS_SUFFIX)]
    digests = [k for k in found if k.endswith(DIGEST_SUFFIX)]
    if bits and digests:
        raise PersonaAdapterError(f"{file} mixes mask tensors ({bits[0]!r}) and stats tensors ({digests[0]!r})")
    if not bits and not digests:
        raise PersonaAdapterError(
            f"{file} holds no persona mask tensors (keys ending in {BITS_SUFFIX!r}, or {DIGEST_SUFFIX!r} for stats)"
        )
    return bits or digests


def weights_format(file: PathLike) -> str:
    """``"bits"`` or ``"stats"``: the format of a checked weights file (see :func:`validate_weights`)."""
    return "stats" if validate_weights(file)[0].endswith(DIGEST_SUFFIX) else "bits"


def check_mask_tensors(file: PathLike, expected: Mapping[str, tuple[int, int]]) -> None:
    """Check that ``file`` holds exactly one mask tensor per module of ``expected`` (module name to the weight's
    ``(out_features, in_features)``), each ``uint8`` of the packed shape ``(out, ceil(in / 8))``, and nothing else.

    Reads the header only. Raises :class:`PersonaAdapterError` naming the file and the first offending tensor.
    """
    from safetensors import safe_open

    check_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        names = handle.keys()
        found = {key: handle.get_slice(key) for key in names}
    wanted = {mask_tensor_key(module): module for module in expected}
    unexpected = sorted(set(found) - set(wanted))
    missing = sorted(set(wanted) - set(found))
    if unexpected:
        raise PersonaAdapterError(f"{file}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    if missing:
        raise PersonaAdapterError(
            f"{file}: no tensor {missing[0]!r} for module {wanted[missing[0]]!r} ({len(missing)} missing)"
        )
    for key, module in sorted(wanted.items()):
        out_features, in_features = expected[module]
        shape, dtype = tuple(found[key].get_shape()), found[key].get_dtype()
        if dtype != "U8" or shape != (out_features, (in_features + 7) // 8):
            raise PersonaAdapterError(
                f"{file}: tensor {key!r} is {dtype} {shape}; module {module!r} with weight ({out_features}, "
                f"{in_features}) needs U8 {(out_features, (in_features + 7) // 8)}"
            )


def check_stats_tensors(file: PathLike, expected: Mapping[str, int], tiebreak: bool) -> None:
    """Check that a ``stats`` file holds, for each module of ``expected`` (module name to ``in_features``), exactly
    a ``float32`` channel vector ``(in_features,)``, a tie-break vector of the same shape if ``tiebreak``, and a
    ``uint8`` ``(32,)`` digest, and nothing else. Reads the header only; the error names the first offender."""
    from safetensors import safe_open

    check_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        names = handle.keys()
        found = {key: handle.get_slice(key) for key in names}
    wanted: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for module, in_features in expected.items():
        suffixes = [(CHANNEL_SUFFIX, "F32", (in_features,)), (DIGEST_SUFFIX, "U8", (32,))]
        suffixes += [(TIEBREAK_SUFFIX, "F32", (in_features,))] if tiebreak else []
        for suffix, dtype, shape in suffixes:
            wanted[f"base_model.model.{module}{suffix}"] = (module, dtype, shape)
    unexpected, missing = sorted(set(found) - set(wanted)), sorted(set(wanted) - set(found))
    if unexpected:
        raise PersonaAdapterError(f"{file}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    if missing:
        raise PersonaAdapterError(
            f"{file}: no tensor {missing[0]!r} for module {wanted[missing[0]][0]!r} ({len(missing)} missing)"
        )
    for key, (module, dtype, shape) in sorted(wanted.items()):
        got = (found[key].get_dtype(), tuple(found[key].get_shape()))
        if got != (dtype, shape):
            raise PersonaAdapterError(
                f"{file}: tensor {key!r} is {got[0]} {got[1]}; module {module!r} needs {dtype} {shape}"
            )


def read_selections(file: PathLike, sparsity: float) -> dict[str, ChannelSelection]:
    """The per-layer statistics of a ``stats`` weights file, by module name, with the config's ``sparsity``."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    found: dict[str, ChannelSelection] = {}
    for key in (k for k in tensors if k.endswith(DIGEST_SUFFIX)):
        stem = key[: -len(DIGEST_SUFFIX)]
        if stem + CHANNEL_SUFFIX not in tensors:
            raise PersonaAdapterError(f"{file}: no tensor {stem + CHANNEL_SUFFIX!r} beside {key!r}")
        found[clean_module_name(stem)] = ChannelSelection(
            sparsity, tensors[stem + CHANNEL_SUFFIX], tensors.get(stem + TIEBREAK_SUFFIX), tensors[key]
        )
    return found


def adapter_dirs(directory: PathLike) -> dict[str, Path]:
    """The persona mask adapters saved in ``directory``, by name.

    Every sub-directory holding an ``adapter_config.json`` is an adapter named after the sub-directory. An adapter
    at the root itself is named after its config's ``persona``, or ``default`` if it records none; a ``persona`` that
    is not a valid adapter name raises a :class:`PersonaAdapterError` naming the field and the file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no adapter directory at {root}")
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():  # its name comes from the file: checked, naming the field and the file
        persona = read_config(root).get("persona") or ROOT_ADAPTER
        found[check_adapter_name(persona, f"{root / CONFIG_NAME}: `persona`")] = root
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
    if keys[0].endswith(DIGEST_SUFFIX):
        raise PersonaAdapterError(
            f"{file} is a 'stats' adapter: it holds selection statistics, not masks; its masks are re-derived from "
            "the base weights, so read them with `peft_persona.read_adapter_masks(path, model)` or load the adapter"
        )
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


HUB_DOWNLOAD_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")  # what an adapter download honours


def hub_download_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options among ``options`` (a loader's keyword arguments) that a Hub adapter download honours."""
    return {k: v for k, v in options.items() if k in HUB_DOWNLOAD_OPTIONS}


def download_adapter_file(
    repo_id: str,
    filename: str,
    subfolder: str | None = None,
    options: Mapping[str, Any] | None = None,
    endpoint: str | None = None,
) -> str:
    """Local path of ``filename`` (:data:`CONFIG_NAME` or :data:`SAFETENSORS_WEIGHTS_NAME`) of the adapter in Hub
    repo ``repo_id`` (folder ``subfolder``, ``None`` or ``""`` for the root), downloaded into the Hub cache.

    ``options`` are a loader's keyword arguments, of which only :data:`HUB_DOWNLOAD_OPTIONS` are passed on;
    ``endpoint`` overrides ``HF_ENDPOINT``. A file the repo does not hold raises :class:`PersonaAdapterError`
    naming the repo, folder and file.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(
            repo_id, filename, subfolder=subfolder or None, endpoint=endpoint, **hub_download_options(options or {})
        )
    except EntryNotFoundError:
        folder = f" folder {subfolder!r}" if subfolder else ""
        raise PersonaAdapterError(f"Hub repo {repo_id!r}{folder} has no {filename}") from None
