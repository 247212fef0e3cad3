"""Checks of a PersonaMaskConfig's fields, which may come from an untrusted ``adapter_config.json``.

Every error is a :class:`PersonaAdapterError` naming the field. Regular expressions in ``target_modules`` and
``exclude_modules`` are refused when they could backtrack catastrophically (a repeated group that itself repeats or
branches, such as ``(a+)+`` or ``(a|a)*``), because PEFT matches them against every module name at injection.
"""

from __future__ import annotations

import re
from typing import Any

from ..checks import check_sparsity, check_strength
from ..errors import PersonaAdapterError
from ..options import CONFIG_METHODS

try:  # Python >= 3.11
    from re import _parser as regex_parser  # noqa: PLC2701 - the standard library's own regex parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as regex_parser  # type: ignore[no-redef]

MAX_REGEX_LENGTH = 512
MAX_LIST_LENGTH = 100_000
LAYERS_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


SAVE_FORMATS: tuple[str, ...] = ("bits", "stats")
STATS_METHODS: tuple[str, ...] = ("wanda", "contrastive", "magnitude")


def _field(field: str) -> str:
    return f"PersonaMaskConfig: `{field}`"


def _fail(field: str, message: str) -> PersonaAdapterError:
    return PersonaAdapterError(f"{_field(field)} {message}")


def check_regex(field: str, pattern: str) -> None:
    """Refuse a pattern that does not compile, is longer than 512 characters, or nests repetition."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise _fail(field, f"is a regular expression of {len(pattern)} characters; at most {MAX_REGEX_LENGTH}")
    try:
        parsed = regex_parser.parse(pattern)
    except re.error as err:
        raise _fail(field, f"is not a valid regular expression ({err})") from None
    if _nested_repeat(parsed, inside=False):
        raise _fail(
            field,
            f"{pattern!r} repeats a group that repeats or branches itself, which can make matching take forever; "
            "list the module names explicitly",
        )


def _nested_repeat(items: Any, inside: bool) -> bool:
    for op, argument in items:
        name = str(op)
        if name in _REPEATS:
            _, maximum, body = argument
            many = maximum is regex_parser.MAXREPEAT or maximum > 1
            if (inside and many) or _nested_repeat(body, inside or many):
                return True
        elif name == "BRANCH":
            if inside or any(_nested_repeat(branch, inside) for branch in argument[1]):
                return True
        elif name in ("SUBPATTERN", "ATOMIC_GROUP") and _nested_repeat(argument[-1], inside):
            return True
    return False


def _check_names(field: str, value: Any, regex_allowed: bool = True) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if regex_allowed:
            check_regex(field, value)
        return value
    if (
        isinstance(value, (list, set, tuple))
        and len(value) <= MAX_LIST_LENGTH
        and all(isinstance(v, str) for v in value)
    ):
        if not value and field == "target_modules":
            raise _fail(field, "is empty; name at least one module, or use null for every decoder linear layer")
        return set(value)
    raise _fail(field, f"must be null, a string or a list of strings, got {type(value).__name__}")


def _check_layers(config: Any) -> None:
    layers = config.layers_to_transform
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise _fail("layers_to_transform", f"must be null, an integer or a list of integers, got {layers!r}")
    pattern = config.layers_pattern
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if pattern is not None and not (
        isinstance(patterns, list) and all(isinstance(p, str) and LAYERS_PATTERN.match(p) for p in patterns)
    ):
        raise _fail("layers_pattern", f"must be null or names of letters, digits, '_' and '.', got {pattern!r}")
    if pattern and not layers:
        raise _fail("layers_pattern", "only applies together with `layers_to_transform`")


def _check_provenance(config: Any) -> None:
    for field in ("persona", "opposite_persona", "base_model_name_or_path", "revision"):
        if getattr(config, field, None) is not None and not isinstance(getattr(config, field), str):
            raise _fail(field, f"must be null or a string, got {type(getattr(config, field)).__name__}")
    for field in ("calibration", "base_model_fingerprint"):
        if getattr(config, field) is not None and not isinstance(getattr(config, field), dict):
            raise _fail(field, f"must be null or an object, got {type(getattr(config, field)).__name__}")
    if config.sparsity is not None:
        check_sparsity(config.sparsity, _field("sparsity"), error=PersonaAdapterError)
    config.strength = check_strength(config.strength, _field("strength"), error=PersonaAdapterError)
    if config.method is not None and config.method not in CONFIG_METHODS:
        raise _fail("method", f"is {config.method!r}; expected one of {CONFIG_METHODS}")
    _check_save_format(config)
    if not isinstance(config.init_weights, bool):
        raise _fail("init_weights", f"must be true or false, got {config.init_weights!r}")
    if not isinstance(config.inference_mode, bool):
        raise _fail("inference_mode", f"must be true or false, got {config.inference_mode!r}")


def _check_save_format(config: Any) -> None:
    if config.save_format not in SAVE_FORMATS:
        raise _fail("save_format", f"is {config.save_format!r}; expected one of {SAVE_FORMATS}")
    if config.save_format != "stats":
        return
    if config.method == "obs":
        raise _fail(
            "save_format",
            "'stats' cannot hold obs masks: their selection reads a Cholesky inverse of the Hessian, which is not "
            "reproducible bit for bit; save obs masks in the 'bits' format",
        )
    if isinstance(config.calibration, dict) and config.calibration.get("structure", "row") != "row":
        raise _fail("save_format", "'stats' re-derives masks row by row; channel-structured masks need 'bits'")
    if config.method not in STATS_METHODS:
        raise _fail(
            "save_format",
            f"'stats' needs method in {STATS_METHODS} (masks re-derivable from per-channel "
            f"statistics), got method {config.method!r}; use 'bits'",
        )
    if config.sparsity is None:
        raise _fail("save_format", "'stats' needs `sparsity`, which sets how many weights each row keeps")
    if (config.calibration or {}).get("reference_mode"):
        raise _fail(
            "save_format", "'stats' cannot hold reference-mode masks (torch.topk breaks ties arbitrarily); use 'bits'"
        )


def check_config(config: Any) -> None:
    """Check every field of a :class:`PersonaMaskConfig`; normalise name lists to sets."""
    config.target_modules = _check_names("target_modules", config.target_modules)
    config.exclude_modules = _check_names("exclude_modules", config.exclude_modules)
    _check_layers(config)
    _check_provenance(config)
