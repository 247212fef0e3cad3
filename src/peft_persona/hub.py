"""Sharing persona mask adapters on the Hugging Face Hub: repo layout, generated model cards and ``push_to_hub``.

Repo layout: a single adapter sits at the repo root; two or more adapters (a persona and its opposite) get one folder
each, named after the adapter, loaded with ``subfolder=``. Beside them, ``README.md`` is a model card rendered from
``model_cards/persona_mask.md`` (package data). Everything is written to a temporary folder and validated (card
metadata, config, weights) before the upload, which is a single commit.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from safetensors.torch import save_file
from torch import nn

from . import adapter_files
from .adapter_files import BITS_SUFFIX as BITS_KEY
from .adapter_files import CONFIG_NAME
from .adapter_files import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from .adapter_files import adapter_dirs
from .data import BUILTIN_LICENSE
from .errors import PersonaAdapterError
from .tuner import PersonaMaskConfig
from .tuner.model import adapter_layers as _layers_of
from .tuner.model import peft_configs as _peft_config_dict

CARD_NAME = "README.md"
TEMPLATE = "persona_mask.md"
DEFAULT_LICENSE = "apache-2.0"
PAPER = "Ye et al., \"Your Language Model Secretly Contains Personality Subnetworks\", ICLR 2026, arXiv:2602.07164"
CITATION = """@inproceedings{ye2026personality,
  title         = {Your Language Model Secretly Contains Personality Subnetworks},
  author        = {Ye and others},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2602.07164},
  archivePrefix = {arXiv}
}"""
MAX_LIST, MAX_ROWS = 8, 200  # evaluation report: longest list and most rows shown in a card
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ModelOrDir = Union[nn.Module, str, os.PathLike]


PersonaHubError = PersonaAdapterError  # the package's one error class, under the name hub code has used


@dataclass
class StagedAdapter:
    """One adapter written to a staging folder: its name, folder in the repo (``""`` = root) and config."""

    name: str
    folder: str
    config: dict[str, Any]


def template_path() -> Path:
    """Path of the model card template shipped with the package (``peft_persona/model_cards/persona_mask.md``)."""
    return Path(str(resources.files("peft_persona") / "model_cards" / TEMPLATE))


# ------------------------------------------------------------------------------------------------ staging
def _read_config(directory: Path) -> dict[str, Any]:
    return adapter_files.read_config(directory)


def _check_weights(file: Path) -> None:
    adapter_files.validate_weights(file)


def _select(available: Sequence[str], adapter_names: Optional[Sequence[str]], where: str) -> list[str]:
    if adapter_names is None:
        return list(available)
    unknown = [n for n in adapter_names if n not in available]
    if unknown:
        raise PersonaHubError(f"{where} has no persona mask adapter(s) {unknown}; it has {list(available)}")
    if not adapter_names:
        raise PersonaHubError("adapter_names is empty: name at least one adapter")
    return list(adapter_names)


def _save_from_model(model: nn.Module, name: str, target: Path) -> None:
    from peft import PeftModel

    config = copy.deepcopy(_peft_config_dict(model)[name])
    config.inference_mode = True
    tensors = {
        f"base_model.model.{layer_name}{BITS_KEY}": layer.persona_mask_bits[name].detach().cpu().contiguous()
        for layer_name, layer in sorted(_layers_of(model, name).items())
    }
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    auto_mapping = None
    if config.task_type is None:
        auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    config.save_pretrained(str(target), auto_mapping_dict=auto_mapping)


def stage_adapters(
    model_or_dir: ModelOrDir,
    out_dir: Union[str, os.PathLike],
    adapter_names: Optional[Sequence[str]] = None,
    base_model: Optional[str] = None,
) -> list[StagedAdapter]:
    """Write the chosen adapters of a model or of a saved adapter directory to ``out_dir`` in the repo layout.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are written per adapter. ``base_model``, if given,
    replaces ``base_model_name_or_path`` in every config (so that ``AutoPeftModelForCausalLM`` finds the base on the
    Hub); without it, a path to the embedded default model becomes that model's Hub id. Every written adapter is
    checked: config type, readable weights holding mask tensors.
    """
    out = Path(out_dir)
    if isinstance(model_or_dir, nn.Module):
        configs = _peft_config_dict(model_or_dir)
        available = [n for n, c in configs.items() if isinstance(c, PersonaMaskConfig)]
        names = _select(available, adapter_names, type(model_or_dir).__name__)
        if not names:
            raise PersonaHubError(f"{type(model_or_dir).__name__} holds no persona mask adapter")
        sources: dict[str, Any] = {n: model_or_dir for n in names}
    else:
        dirs = adapter_dirs(model_or_dir)
        names = _select(list(dirs), adapter_names, str(model_or_dir))
        sources = {n: dirs[n] for n in names}
    staged = []
    for name in names:
        folder = "" if len(names) == 1 else name
        target = out / folder
        source = sources[name]
        if isinstance(source, nn.Module):
            _save_from_model(source, name, target)
        else:
            _read_config(source)
            _check_weights(source / ADAPTER_WEIGHTS_NAME)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / CONFIG_NAME, target / CONFIG_NAME)
            shutil.copyfile(source / ADAPTER_WEIGHTS_NAME, target / ADAPTER_WEIGHTS_NAME)
        config = _read_config(target)
        embedded = _embedded_base(config.get("base_model_name_or_path"))
        if base_model is None and embedded is not None:
            base_model = embedded["hub_id"]  # a path into the local model cache means nothing on the Hub
        if base_model is not None:
            config["base_model_name_or_path"] = base_model
            (target / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _check_weights(target / ADAPTER_WEIGHTS_NAME)
        staged.append(StagedAdapter(name, folder, config))
    return staged


# ------------------------------------------------------------------------------------------------ model card
def _embedded_base(path: Optional[str]) -> Optional[dict[str, str]]:
    """The embedded-model entry whose cache folder is ``path``, if any."""
    if not path:
        return None
    from .models import EMBEDDED, cache_dir

    for name, spec in EMBEDDED.items():
        if name == path or Path(path).resolve() == (cache_dir() / name).resolve():
            return spec
    return None


def base_model_reference(config: Mapping[str, Any]) -> tuple[Optional[str], str]:
    """``(hub_id or None, text)``: the Hub id to put in the card metadata and a human description of the base."""
    path = config.get("base_model_name_or_path")
    embedded = _embedded_base(path)
    if embedded is not None:
        member = Path(embedded["member"]).name
        return embedded["hub_id"], f"{embedded['hub_id']} (the GGUF build `{member}` of the PyPI wheel `{embedded['package']}`)"
    if path and HUB_ID.match(path) and not Path(path).exists():
        return path, path
    return None, f"a local model ({path})" if path else "an unrecorded base model"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def calibration_rows(calibration: Optional[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The calibration record as ``(field, value)`` rows, with a licence row added for the built-in data."""
    if not calibration:
        return [("source", "not recorded")]
    rows = [(str(k), _format_value(v)) for k, v in calibration.items()]
    has_license = any(k.lower() in ("license", "licence") for k in calibration)
    if not has_license and "builtin:" in json.dumps(calibration):
        rows.append(("license", f"CC-BY-4.0 ({BUILTIN_LICENSE})"))
    elif not has_license:
        rows.append(("license", "not recorded; check the licence of the calibration data"))
    return rows


def _modules_text(modules: Sequence[str], limit: int = 16) -> str:
    """Every module name, or for long lists the module kinds (name without the block index) with their counts."""
    if not modules:
        return "every linear layer of the decoder blocks"
    if len(modules) <= limit:
        return ", ".join(f"`{m}`" for m in modules)
    kinds: dict[str, int] = {}
    for name in modules:
        kind = re.sub(r"^.*?\.\d+\.", "", name)
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"`{kind}` ×{count}" for kind, count in sorted(kinds.items()))


def _fingerprint_text(fingerprint: Optional[Mapping[str, Any]]) -> str:
    if not fingerprint:
        return "none recorded"
    probe = ", ".join(f"{v:+.3f}" for v in fingerprint.get("weight_probe", []))
    return (
        f"format {fingerprint.get('format')}, {fingerprint.get('num_layers')} linear layers, structure sha256 "
        f"`{fingerprint.get('structure_sha256')}`, weight probe [{probe}]"
    )


def _eval_table(report: Any) -> tuple[list[str], list[list[str]]]:
    """A header and rows from an evaluation report: a list of result dicts, or a (nested) dict of metrics whose
    scalar leaves become ``dotted.key | value`` rows (lists longer than ``MAX_LIST``, such as per-item scores, are
    left out; at most ``MAX_ROWS`` rows)."""
    results = report.get("results", report) if isinstance(report, Mapping) else report
    if isinstance(results, list) and results and all(isinstance(r, Mapping) for r in results):
        header: list[str] = []
        for row in results:
            header += [k for k, v in row.items() if k not in header and not isinstance(v, (dict, list))]
        return header, [[_format_value(row.get(k, "")) for k in header] for row in results]
    if isinstance(results, Mapping):
        flat: list[list[str]] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            elif isinstance(value, (list, tuple)):
                if len(value) <= MAX_LIST and all(isinstance(v, (str, int, float, bool)) for v in value):
                    flat.append([prefix, _format_value(value)])  # longer lists (per-item scores) stay out of the card
            elif value is not None:
                flat.append([prefix, _format_value(value)])

        walk("", {k: v for k, v in results.items() if k != "description"})
        if len(flat) > MAX_ROWS:
            flat = flat[:MAX_ROWS] + [[f"({len(flat) - MAX_ROWS} more rows in the report)", ""]]
        return ["Metric", "Value"], flat
    raise PersonaHubError(f"eval_report: expected a dict or a list of dicts, got {type(report).__name__}")


def _load_report(eval_report: Any) -> Any:
    if eval_report is None or isinstance(eval_report, (dict, list)):
        return eval_report
    path = Path(eval_report)
    if not path.is_file():
        raise PersonaHubError(f"eval_report: no file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PersonaHubError(f"eval_report {path} is not valid JSON ({err})") from None


def _download_kwargs(adapter: StagedAdapter, revision: Optional[str]) -> str:
    """transformers 5 takes ``subfolder`` and ``revision`` of an adapter in ``adapter_kwargs``, not as arguments."""
    kwargs = {}
    if adapter.folder:
        kwargs["subfolder"] = adapter.folder
    if revision and revision != "main":
        kwargs["revision"] = revision
    return f", adapter_kwargs={json.dumps(kwargs)}" if kwargs else ""


def _peft_kwargs(adapter: StagedAdapter, revision: Optional[str]) -> str:
    parts = [f', subfolder="{adapter.folder}"'] if adapter.folder else []
    if revision and revision != "main":
        parts.append(f', revision="{revision}"')
    return "".join(parts)


def usage_snippet(repo_id: str, staged: Sequence[StagedAdapter], revision: Optional[str] = None) -> str:
    """The transformers code that loads the repo's adapters and switches between them."""
    hub_id, _ = base_model_reference(staged[0].config)
    lines = ["from transformers import AutoModelForCausalLM", ""]
    if _embedded_base(staged[0].config.get("base_model_name_or_path")):
        lines.append("# The masks were extracted on a GGUF build of this model (see above); if the fingerprint")
        lines.append("# check refuses these weights, see the FAQ of peft-persona.")
    lines.append(f'model = AutoModelForCausalLM.from_pretrained("{hub_id or "path/to/base-model"}")')
    for adapter in staged:
        lines.append(f'model.load_adapter("{repo_id}", adapter_name="{adapter.name}"{_download_kwargs(adapter, revision)})')
    lines.append(f'model.set_adapter("{staged[0].name}")  # the persona used from now on; generate as usual')
    return "\n".join(lines)


def build_model_card(
    repo_id: str,
    staged: Sequence[StagedAdapter],
    eval_report: Any = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the model card field is called license
    revision: Optional[str] = None,
):
    """Render the model card (a ``huggingface_hub.ModelCard``) for ``staged`` adapters pushed to ``repo_id``.

    ``eval_report`` is a report of the evaluation harness: a dict, a list of result dicts, or a path to a JSON file.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not staged:
        raise PersonaHubError("no adapters to describe")
    hub_id, base_text = base_model_reference(staged[0].config)
    personas = [a.config.get("persona") or a.name for a in staged]
    tags = ["peft-persona", "persona-mask", *personas]
    data = ModelCardData(
        library_name="peft", base_model=hub_id, license=license, tags=tags, pipeline_tag="text-generation"
    )
    adapters = []
    for a in staged:
        modules = sorted(a.config.get("target_modules") or [])
        sparsity = a.config.get("sparsity")
        adapters.append(
            {
                "name": a.name, "folder": a.folder, "persona": a.config.get("persona"),
                "opposite_persona": a.config.get("opposite_persona"), "method": a.config.get("method"),
                "sparsity_text": f"{sparsity:.2f}" if isinstance(sparsity, (int, float)) else "—",
                "num_modules": len(modules),
                "modules_text": _modules_text(modules),
                "calibration_rows": calibration_rows(a.config.get("calibration")),
                "fingerprint_text": _fingerprint_text(a.config.get("base_model_fingerprint")),
            }
        )
    report = _load_report(eval_report)
    header, rows = _eval_table(report) if report is not None else ([], [])
    source = report.get("description") if isinstance(report, Mapping) else None
    pair = [p for p in personas if p]
    title = f"Persona mask: {' / '.join(pair)}"
    summary = f"Persona mask{'s' if len(staged) > 1 else ''} for **{', '.join(pair)}** on {base_text}."
    card = ModelCard.from_template(
        data,
        template_path=str(template_path()),
        title=title,
        summary=summary,
        adapters=adapters,
        repo_id=repo_id,
        base_model_display=hub_id or base_text,
        base_model_url=f"https://huggingface.co/{hub_id}" if hub_id else "#",
        snippet=usage_snippet(repo_id, staged, revision),
        peft_kwargs=_peft_kwargs(staged[0], revision),
        eval_rows=rows,
        eval_header=header,
        eval_source=source or "Results of the evaluation harness (`peft-persona eval`), as supplied at push time:",
        citation=CITATION,
        paper=PAPER,
    )
    return card


def _check_card(card: Any, where: str) -> None:
    from huggingface_hub import ModelCard

    parsed = ModelCard(str(card)).data
    if parsed.library_name != "peft" or "persona-mask" not in (parsed.tags or []):
        raise PersonaHubError(f"{where}: the generated model card lost its metadata")


# ------------------------------------------------------------------------------------------------ export / push
def export_repo(
    model_or_dir: ModelOrDir,
    out_dir: Union[str, os.PathLike],
    repo_id: str,
    adapter_names: Optional[Sequence[str]] = None,
    eval_report: Any = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002
    base_model: Optional[str] = None,
    revision: Optional[str] = None,
) -> list[StagedAdapter]:
    """Write the repo's content (adapters and ``README.md``) to the new folder ``out_dir``, all or nothing."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; export_repo writes a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        staged = stage_adapters(model_or_dir, partial, adapter_names, base_model)
        card = build_model_card(repo_id, staged, eval_report, license, revision)
        _check_card(card, repo_id)
        card.save(partial / CARD_NAME)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return staged


def _explain_http_error(err: Exception, repo_id: str, action: str) -> PersonaHubError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return PersonaHubError(f"{action} {repo_id!r}: the Hub refused the token (401); check HF_TOKEN or `hf auth login`")
    if status == 403:
        return PersonaHubError(f"{action} {repo_id!r}: the token has no write access to this namespace (403)")
    return PersonaHubError(f"{action} {repo_id!r} failed: {err}")


def push_to_hub(
    model_or_dir: ModelOrDir,
    repo_id: str,
    adapter_names: Optional[Sequence[str]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    eval_report: Any = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002
    base_model: Optional[str] = None,
    commit_message: Optional[str] = None,
    endpoint: Optional[str] = None,
):
    """Push persona mask adapters with a generated model card to ``repo_id`` in one commit; returns its ``CommitInfo``.

    ``model_or_dir`` is a ``PeftModel``, a transformers model holding adapters, or a saved adapter directory. One
    adapter goes to the repo root; several go to one folder each. ``revision`` is a branch, created from ``main`` if
    needed. ``private`` applies when the repo is created. Nothing is uploaded unless every file and the card validate.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not HUB_ID.match(repo_id):
        raise PersonaHubError(f"repo_id {repo_id!r} is not of the form 'namespace/name'")
    token = token or get_token()
    if token is None:
        raise PersonaHubError(
            f"pushing to {repo_id!r} needs a Hub token with write access: pass token=..., set HF_TOKEN, "
            "or run `hf auth login`"
        )
    with tempfile.TemporaryDirectory(prefix="peft-persona-push-") as tmp:
        folder = Path(tmp) / "repo"
        staged = export_repo(model_or_dir, folder, repo_id, adapter_names, eval_report, license, base_model, revision)
        api = HfApi(endpoint=endpoint, token=token)
        names = ", ".join(a.name for a in staged)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message or f"Add persona mask adapter(s) {names}",
            )
        except HfHubHTTPError as err:
            raise _explain_http_error(err, repo_id, "pushing to") from err
