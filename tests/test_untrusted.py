"""Untrusted adapters and bad input: a failed load leaves the model exactly as it was, nothing is written outside the
output, configs cannot hang a load, the base-model check catches what it should, and quantised layers are refused."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_persona as pp
from conftest import random_masks, tiny_llama
from peft_persona.fingerprint import base_model_fingerprint
from peft_persona.tuner import mask_layers


def model_state(model: nn.Module) -> tuple:
    """Everything a failed load must leave alone: adapters, active set, module types and every tensor."""
    configs = sorted(getattr(model, "peft_config", {}) or {})
    active = sorted({a for m in mask_layers(model).values() for a in m.active_adapters})
    modules = {name: type(module).__name__ for name, module in model.named_modules()}
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return configs, active, modules, tensors


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[:3] == after[:3]
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


def saved_adapter(tmp_path, name="persona", seed=1):
    directory = tmp_path / name
    pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), seed), name).save_pretrained(directory)
    return directory / name if (directory / name).is_dir() else directory


def model_with_adapter(tmp_path):
    model = tiny_llama()
    model.load_adapter(str(saved_adapter(tmp_path, "first", 3)), adapter_name="first")
    return model


BREAKAGES = {
    "empty weights": lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
    "corrupt weights": lambda d: (d / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    ),
    "only a pickle": lambda d: (
        (d / "adapter_model.bin").write_bytes(b"not read"),
        (d / "adapter_model.safetensors").unlink(),
    ),
    "a missing mask": lambda d: save_file(
        dict(list(load_file(str(d / "adapter_model.safetensors")).items())[1:]), str(d / "adapter_model.safetensors")
    ),
    "a wrong shape": lambda d: save_file(
        {k: v[:, :-1].contiguous() for k, v in load_file(str(d / "adapter_model.safetensors")).items()},
        str(d / "adapter_model.safetensors"),
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("path", ["transformers", "transformers-second", "peft", "peft-second", "hotswap"])
def test_failed_load_leaves_model_as_it_was(tmp_path, breakage, path):
    directory = saved_adapter(tmp_path)
    BREAKAGES[breakage](directory)
    if path == "transformers":
        model = tiny_llama()
        load = lambda: model.load_adapter(str(directory), adapter_name="persona")  # noqa: E731
    elif path == "transformers-second":
        model = model_with_adapter(tmp_path)
        load = lambda: model.load_adapter(str(directory), adapter_name="persona")  # noqa: E731
    elif path == "peft":
        model = tiny_llama()
        load = lambda: PeftModel.from_pretrained(model, str(directory))  # noqa: E731
    elif path == "peft-second":
        model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 3), "first")
        load = lambda: model.load_adapter(str(directory), adapter_name="persona")  # noqa: E731
    else:
        model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 3), "first")
        load = lambda: pp.hotswap_adapter(model, "first", directory)  # noqa: E731
    before = model_state(model)
    with pytest.raises((ValueError, TypeError, KeyError, FileNotFoundError)) as error:
        load()
    assert "adapter_model" in str(error.value) or "persona_mask_bits" in str(error.value)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name", ["/tmp/x", "..", "a/b", "a\\b", "", " x", "a.b", "__base__"])
def test_unsafe_adapter_names_are_refused(tmp_path, name):
    """Names that would escape a folder, and ``__base__``, which a mixed batch (``adapter_names=[...]``) reads as
    "no adapter" (an adapter under it would be silently skipped there)."""
    with pytest.raises(pp.PersonaAdapterError, match="adapter name"):
        pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), name)
    with pytest.raises(pp.PersonaAdapterError, match="adapter name"):
        get_peft_model(tiny_llama(), pp.PersonaMaskConfig(), adapter_name=name)
    directory = saved_adapter(tmp_path)
    model = tiny_llama()
    with pytest.raises(pp.PersonaAdapterError, match="adapter name"):
        model.load_adapter(str(directory), adapter_name=name)
    assert not hasattr(model, "peft_config") or not model.peft_config


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_backtracking_regex_in_config_is_refused_fast(tmp_path, field):
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config[field] = "(a+)+$" if field == "target_modules" else "(.*a){20}x"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    for load in (
        lambda: tiny_llama().load_adapter(str(directory)),
        lambda: PeftModel.from_pretrained(tiny_llama(), str(directory)),
    ):
        with pytest.raises(ValueError, match=field):
            load()
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("pattern", [r"(q|v)_proj", r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.mlp\..*"])
def test_ordinary_regexes_are_accepted(pattern):
    assert pp.PersonaMaskConfig(target_modules=pattern).target_modules == pattern


@pytest.mark.parametrize(
    "field, value",
    [
        ("sparsity", "0.5"),
        ("sparsity", float("nan")),
        ("sparsity", 1.0),
        ("method", "sgd"),
        ("persona", 3),
        ("target_modules", 5),
        ("layers_to_transform", "1"),
        ("layers_pattern", "(a+)+"),
        ("calibration", []),
        ("init_weights", "yes"),
        ("base_model_fingerprint", "abc"),
    ],
)
def test_config_fields_are_checked_by_name(field, value):
    kwargs = {"layers_to_transform": [0]} if field == "layers_pattern" else {}
    with pytest.raises(pp.PersonaAdapterError, match=field):
        pp.PersonaMaskConfig(**{field: value}, **kwargs)


@pytest.mark.parametrize("probe", [[], [float("nan")] * 8, ["x"]])
def test_malformed_fingerprint_probe_is_refused(tmp_path, probe):
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_fingerprint"]["weight_probe"] = probe
    (directory / "adapter_config.json").write_text(json.dumps(config).replace("NaN", "NaN"))
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(pp.FingerprintMismatchError, match="weight_probe"):
        model.load_adapter(str(directory))
    assert_same_state(before, model_state(model))


def test_model_with_nan_weights_fails_the_fingerprint(tmp_path):
    directory = saved_adapter(tmp_path)
    model = tiny_llama()
    with torch.no_grad():
        for module in mask_layers(pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1))):
            model.get_submodule(module).weight.fill_(float("nan"))
    with pytest.raises(pp.FingerprintMismatchError, match="NaN"):
        model.load_adapter(str(directory))


def test_adapter_for_another_width_without_fingerprint_is_refused_before_injection(tmp_path):
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_fingerprint"] = None
    (directory / "adapter_config.json").write_text(json.dumps(config))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
    ).eval()
    for load in (lambda m: m.load_adapter(str(directory)), lambda m: PeftModel.from_pretrained(m, str(directory))):
        before = model_state(wider)
        with pytest.raises(pp.PersonaAdapterError, match="needs U8"):
            load(wider)
        assert_same_state(before, model_state(wider))


class NoBlocks(nn.Module):
    """A model with linear layers but no nn.ModuleList of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.second(self.first(x))


def test_add_mask_adapter_works_without_a_block_list():
    torch.manual_seed(0)
    model = NoBlocks()
    masks = {"first": torch.rand(16, 8) < 0.5, "second": torch.rand(4, 16) < 0.5}
    x = torch.randn(3, 8)
    expected = nn.functional.linear(
        nn.functional.linear(x, model.first.weight * masks["first"], model.first.bias),
        model.second.weight * masks["second"],
        model.second.bias,
    )
    peft_model = pp.add_mask_adapter(model, masks, "persona")
    assert torch.allclose(peft_model(x), expected)
    assert peft_model.peft_config["persona"].base_model_fingerprint["num_layers"] == 2


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: an nn.Linear subclass whose weight holds packed integers."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.weight = nn.Parameter(
            torch.zeros(in_features * out_features // 2, 1, dtype=torch.uint8), requires_grad=False
        )


Linear4bit.__module__ = "bitsandbytes.nn.modules"


def test_quantised_linear_is_refused_by_name():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj = Linear4bit(64, 128)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.up_proj.*quantised"):
        get_peft_model(model, pp.PersonaMaskConfig(target_modules=["up_proj"]))
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.up_proj.*quantised"):
        pp.add_mask_adapter(model, {"model.layers.0.mlp.up_proj": torch.ones(128, 64, dtype=torch.bool)})


def test_init_weights_false_gives_seeded_nontrivial_masks():
    first = get_peft_model(tiny_llama(), pp.PersonaMaskConfig(init_weights=False), adapter_name="a")
    second = get_peft_model(tiny_llama(), pp.PersonaMaskConfig(init_weights=False), adapter_name="a")
    masks, again = pp.get_masks(first, "a"), pp.get_masks(second, "a")
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.45 < density < 0.55 and all(torch.equal(masks[k], again[k]) for k in masks)
    ones = get_peft_model(tiny_llama(), pp.PersonaMaskConfig(), adapter_name="a")
    assert all(m.all() for m in pp.get_masks(ones, "a").values())


def test_add_weighted_adapter_points_to_combine_adapters():
    model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), "a")
    with pytest.raises(TypeError, match="combine_adapters"):
        model.add_weighted_adapter(["a"], [1.0], "b")


def test_fingerprint_covers_the_masked_modules():
    model = tiny_llama()
    masks = {k: v for k, v in random_masks(model, 1).items() if k.startswith("model.layers.0.")}
    peft_model = pp.add_mask_adapter(model, masks, "a")
    assert peft_model.peft_config["a"].base_model_fingerprint == base_model_fingerprint(tiny_llama(), sorted(masks))


def test_pickle_is_never_reachable(tmp_path, monkeypatch):
    """Every load path, with an ``adapter_model.bin`` planted beside and instead of the safetensors file."""
    import pickle

    from peft_persona.inspection import inspect_adapters

    beside = saved_adapter(tmp_path, "beside")
    instead = saved_adapter(tmp_path, "instead")
    for directory in (beside, instead):
        torch.save({"planted": torch.zeros(1)}, directory / "adapter_model.bin")
    (instead / "adapter_model.safetensors").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was reached")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loads = {
        "transformers": lambda d: tiny_llama().load_adapter(str(d)),
        "peft": lambda d: PeftModel.from_pretrained(tiny_llama(), str(d)),
        "peft load_adapter": lambda d: pp.add_mask_adapter(
            tiny_llama(), random_masks(tiny_llama(), 3), "x"
        ).load_adapter(str(d), "y"),
        "hotswap": lambda d: pp.hotswap_adapter(
            pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 3), "x"), "x", d
        ),
        "read_adapter_masks": lambda d: pp.read_adapter_masks(
            d, pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 3))
        ),
        "inspect": lambda d: inspect_adapters(d),
    }
    for name, load in loads.items():
        load(beside)  # the safetensors file is used, the pickle beside it never
        with pytest.raises((ValueError, FileNotFoundError), match="adapter_model") as error:
            load(instead)
        assert "pickle was reached" not in str(error.value), name


@pytest.mark.parametrize(
    "in_features, sparsity, kept",
    [(2560, 0.9, 256), (10, 0.55, 4), (7, 0.0, 7), (100, 0.7, 30), (4096, 0.3, 2867), (10, 0.25, 7)],
)
def test_kept_per_row_is_exact(in_features, sparsity, kept):
    from peft_persona.selection import kept_per_row

    assert kept_per_row(in_features, sparsity) == kept


def test_safe_merge_checks_the_merged_weights():
    model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), "a")
    x = torch.randint(3, 1000, (1, 5))
    with torch.no_grad():
        unmerged = model(x).logits
        model.merge_adapter(safe_merge=True)
        assert torch.equal(model(x).logits, unmerged)
        model.unmerge_adapter()
    layer = mask_layers(model)["model.layers.0.mlp.up_proj"]
    weight = layer.get_base_layer().weight
    with torch.no_grad(), model.disable_adapter():  # the weight holds no mask inside
        weight[0, 0] = float("inf")  # inf * 0 is NaN: W * M cannot be represented by zeroing
    before = layer.original_weight()
    layer.set_mask("a", torch.zeros_like(pp.get_masks(model, "a")["model.layers.0.mlp.up_proj"]))
    with pytest.raises(ValueError, match="safe_merge of persona mask adapter 'a'"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.original_weight(), before) and not layer.merged


@pytest.mark.parametrize("breakage", ["corrupt weights", "a wrong shape", "only a pickle"])
def test_failed_hub_load_leaves_model_as_it_was(hub, hub_env, tmp_path, breakage):
    """From the loopback Hub, in a fresh process, through transformers and PEFT."""
    import subprocess
    import sys

    from huggingface_hub import HfApi

    from hub_server import TOKENS

    directory = saved_adapter(tmp_path)
    BREAKAGES[breakage](directory)
    repo = f"user/broken-{breakage.replace(' ', '-')}"
    api = HfApi(endpoint=hub.endpoint, token=next(iter(TOKENS)))
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(directory))
    script = f"""
import sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from conftest import tiny_llama
from test_untrusted import assert_same_state, model_state
from peft import PeftModel
model = tiny_llama()
before = model_state(model)
for load in (lambda: model.load_adapter({repo!r}), lambda: PeftModel.from_pretrained(model, {repo!r})):
    try:
        load()
    except ValueError as err:
        assert "adapter_model" in str(err), err
    else:
        raise SystemExit("loaded a broken adapter")
    assert_same_state(before, model_state(model))
print("unchanged")
"""
    result = subprocess.run([sys.executable, "-c", script], env=hub_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------- card, Hub staging, calibration
def rewrite_config(directory, **fields):
    file = directory / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "field, value",
    [
        ("calibration", "a string"),
        ("calibration", [1, 2]),
        ("base_model_fingerprint", 3),
        ("persona", {"a": 1}),
        ("persona", ["x"]),
        ("target_modules", 7),
        ("target_modules", ["ok", 1]),
        ("strength", "strong"),
        ("sparsity", True),
        ("method", 1.5),
    ],
)
def test_card_builder_refuses_unexpected_field_types_by_name(tmp_path, field, value):
    from peft_persona.hub import export_repo

    directory = saved_adapter(tmp_path)
    rewrite_config(directory, **{field: value})
    with pytest.raises(pp.PersonaAdapterError, match=f"field {field} must be"):
        export_repo(directory, tmp_path / "repo", "user/repo")
    assert not (tmp_path / "repo").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


@pytest.mark.parametrize("name", ["../..", "/tmp/evil", "a/b", "..", "x\ny"])
def test_hub_export_refuses_names_that_would_leave_the_folder(tmp_path, name):
    from peft_persona.hub import stage_adapters

    model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), "ok")
    model.peft_config[name] = model.peft_config["ok"]  # a name PEFT itself would accept
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(pp.PersonaAdapterError, match="adapter name"):
        stage_adapters(model, tmp_path / "out", adapter_names=["ok", name])
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before and list(tmp_path.iterdir()) == []


def test_card_escapes_every_user_string(tmp_path):
    import ast

    from peft_persona.card import StagedAdapter, build_model_card, usage_snippet

    persona = 'evil" ) ; import os  # <script>*|'
    config = json.loads((saved_adapter(tmp_path) / "adapter_config.json").read_text())
    config.update(persona=persona, opposite_persona="a|b\n# heading", calibration={"src|x": "v`w"})
    staged = [StagedAdapter("it's", "", config)]
    snippet = usage_snippet("user/repo", staged, revision='r"1')
    tree = ast.parse(snippet)  # the quotes did not break the code: it parses, and names stay string literals
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert any(any(k.value.value == "it's" for k in c.keywords if k.arg == "adapter_name") for c in calls)
    card = build_model_card("user/repo", staged)
    assert persona in card.data.tags  # the YAML metadata holds it as data, quoted by the YAML writer
    text = str(card).split("\n---\n", 1)[1]  # the Markdown body
    assert "<script>" not in text and "\\<script\\>" in text
    assert "\n# heading" not in text and "a\\|b" in text and "src\\|x" in text


@pytest.mark.parametrize(
    "texts, named",
    [
        ([None], "calibration item 0: expected a string or a list of chat messages, got NoneType"),
        (["ok", 3], "calibration item 1: expected a string or a list of chat messages, got int"),
        (["ok", b"bytes"], "calibration item 1: expected a string or a list of chat messages, got bytes"),
        (
            [{"role": "user", "content": "hi"}],
            "calibration item 0: expected a string or a list of chat messages, got dict",
        ),
        ([[{"role": "user"}]], "calibration item 0, message 0: field content must be a string, got nothing"),
        ([[{"role": "user", "content": 5}]], "calibration item 0, message 0: field content must be a string, got int"),
        ([["hi"]], "calibration item 0, message 0: expected a dict, got str"),
        ({"role": "user", "content": "hi"}, "expected a list of texts, got dict"),
        (b"bytes", "expected a list of texts, got bytes"),
    ],
)
def test_bad_calibration_items_are_named_before_any_forward(texts, named, monkeypatch):
    from conftest import tiny_tokenizer
    from peft_persona import blocks

    monkeypatch.setattr(blocks.BlockRunner, "layer_stats", lambda *a, **k: pytest.fail("the model ran"))
    extractor = pp.PersonaExtractor(tiny_llama(), tiny_tokenizer())
    with pytest.raises(TypeError) as caught:
        extractor.extract({"p": texts}, method="wanda")
    assert "persona 'p'" in str(caught.value) and named in str(caught.value)


def test_gpt2_calibration_texts_longer_than_its_positions_are_truncated():
    from conftest import tiny_gpt2, tiny_tokenizer

    model = tiny_gpt2()
    limit = model.config.n_positions
    extractor = pp.PersonaExtractor(model, tiny_tokenizer(), max_length=limit * 4)
    assert extractor.max_length == limit
    long_text = " ".join(["word"] * (limit * 3))
    peft_model = extractor.extract({"p": [long_text, "short text"]}, method="wanda")
    assert peft_model.peft_config["p"].calibration["max_length"] == limit


@pytest.mark.parametrize("peft_type", ["LORA", 5, None, "NOPE"])
def test_a_config_of_another_or_no_method_is_refused_by_field(tmp_path, peft_type):
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))
    with pytest.raises(pp.PersonaAdapterError, match=r"adapter_config\.json: `peft_type` is"):
        pp.PersonaMaskConfig.from_pretrained(str(directory))


@pytest.mark.parametrize("persona", [".*", "../up", "a/b"])
def test_a_root_adapter_named_by_its_persona_field_is_checked_naming_field_and_file(tmp_path, persona):
    from peft_persona.adapter_files import adapter_dirs
    from peft_persona.hub import export_repo

    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "persona": persona}))
    with pytest.raises(pp.PersonaAdapterError, match=r"adapter_config\.json: `persona` '.*' contains"):
        adapter_dirs(directory)
    staged = tmp_path / "staged"
    with pytest.raises(pp.PersonaAdapterError, match=r"`persona`"):
        export_repo(directory, staged, "user/x")  # nothing is written outside or half-written inside
    assert not staged.exists() or not any(staged.iterdir())
