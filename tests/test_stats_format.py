"""The ``stats`` adapter format: masks re-derived from the base weights on load, bit-identical, or a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from peft import PeftModel
from safetensors.torch import load_file, save_file

import peft_persona as pp
from conftest import logits, tiny_gpt2, tiny_llama, tiny_tokenizer, word_texts
from hub_server import TOKENS
from peft_persona import cli
from peft_persona.errors import PersonaAdapterError, StatsMismatchError
from peft_persona.hub import push_to_hub
from peft_persona.inspection import inspect_adapters
from peft_persona.selection import ChannelSelection, kept_per_row, mask_digest, select_by_channels
from peft_persona.tuner import mask_layers

OWNER = next(iter(TOKENS))
PERSONAS = {"extravert": word_texts(1, 8), "introvert": word_texts(2, 8)}


def extract(method: str, save_format: str, model_factory=tiny_llama, sparsity: float = 0.5):
    extractor = pp.PersonaExtractor(model_factory(), tiny_tokenizer(), batch_size=4)
    personas = PERSONAS if method != "magnitude" else {"extravert": None}
    return extractor.extract(personas, method, sparsity, save_format=save_format)


@pytest.fixture(scope="module", params=["wanda", "contrastive", "magnitude"])
def saved(request, tmp_path_factory):
    """One extraction per method, saved in both formats; its masks and logits per adapter."""
    method = request.param
    out = tmp_path_factory.mktemp(method)
    model = extract(method, "stats")
    bits = extract(method, "bits")
    model.save_pretrained(out / "stats")
    bits.save_pretrained(out / "bits")
    names = list(model.peft_config)
    tokens = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = {}
    for name in names:
        model.set_adapter(name)
        expected[name] = (pp.get_masks(model, name), logits(model, tokens))
    return {"method": method, "dir": out, "names": names, "expected": expected, "tokens": tokens, "bits": bits}


def _equal_masks(got, want) -> bool:
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_stats_masks_equal_bits_masks_and_file_holds_only_statistics(saved):
    for name in saved["names"]:
        assert _equal_masks(saved["expected"][name][0], pp.get_masks(saved["bits"], name))
        folder = saved["dir"] / "stats" / name
        tensors = load_file(folder / "adapter_model.safetensors")
        suffixes = {key.rsplit(".", 1)[1] for key in tensors}
        want = {"persona_mask_channel", "persona_mask_digest"} | (
            {"persona_mask_tiebreak"} if saved["method"] == "contrastive" else set()
        )
        assert suffixes == want
        assert all(t.dtype == torch.float32 and t.dim() == 1 for k, t in tensors.items() if not k.endswith("digest"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["save_format"] == "stats" and config["calibration"]["weight_dtype"] == "float32"
        per_layer = 4 * (2 if saved["method"] == "contrastive" else 1)  # float32 bytes per input channel
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == sum(
            per_layer * layer.in_features + 32 for layer in mask_layers(saved["bits"]).values()
        )


def test_peft_from_pretrained_rederives_bit_identical_masks(saved):
    for name in saved["names"]:
        model = PeftModel.from_pretrained(tiny_llama(), saved["dir"] / "stats" / name, adapter_name=name)
        masks, expected_logits = saved["expected"][name]
        assert _equal_masks(pp.get_masks(model, name), masks)
        assert torch.equal(logits(model, saved["tokens"]), expected_logits)
        assert not any(
            k.endswith("persona_mask_bits." + name) for k in model.state_dict()
        )  # bits are derived, not saved


@pytest.mark.parametrize("made_on", ["kernels", "eager"])
def test_stats_adapters_cross_between_the_kernels_and_eager_selection(made_on, tmp_path, monkeypatch):
    """A ``stats`` adapter extracted where numba is installed loads where it is not (its digests check the masks
    the other path re-derives), and the other way round."""
    from peft_persona import fast_select

    monkeypatch.setenv(fast_select.ENV_SWITCH, "1" if made_on == "kernels" else "0")
    model = extract("contrastive", "stats")
    model.save_pretrained(tmp_path)
    monkeypatch.setenv(fast_select.ENV_SWITCH, "0" if made_on == "kernels" else "1")
    assert fast_select.enabled() == (made_on == "eager")
    for name in model.peft_config:
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / name, adapter_name=name)
        assert _equal_masks(pp.get_masks(loaded, name), pp.get_masks(model, name))


def test_transformers_load_adapter_rederives_and_switches(saved):
    base = tiny_llama()
    for name in saved["names"]:
        base.load_adapter(str(saved["dir"] / "stats" / name), adapter_name=name)
    for name in saved["names"]:
        base.set_adapter(name)
        assert _equal_masks(pp.get_masks(base, name), saved["expected"][name][0])
        assert torch.equal(logits(base, saved["tokens"]), saved["expected"][name][1])


def test_low_cpu_mem_usage_load(saved):
    name = saved["names"][0]
    model = PeftModel.from_pretrained(
        tiny_llama(), saved["dir"] / "stats" / name, adapter_name=name, low_cpu_mem_usage=True
    )
    assert _equal_masks(pp.get_masks(model, name), saved["expected"][name][0])
    assert torch.equal(logits(model, saved["tokens"]), saved["expected"][name][1])


def test_gpt2_conv1d_round_trip(tmp_path):
    model = extract("contrastive", "stats", tiny_gpt2)
    model.save_pretrained(tmp_path)
    for name in ("extravert", "introvert"):
        loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / name, adapter_name=name)
        assert _equal_masks(pp.get_masks(loaded, name), pp.get_masks(model, name))


def test_selection_matches_scoring_and_digest_is_sha256():
    weight = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    channel = torch.rand(20, generator=torch.Generator().manual_seed(1))
    channel[::3] = 0.0  # ties: zero scores on every third column
    tiebreak = torch.rand(20, generator=torch.Generator().manual_seed(2))
    k = kept_per_row(20, 0.5)
    mask = select_by_channels(weight, k, channel, tiebreak)
    assert (mask.sum(1) == k).all()
    assert torch.equal(
        mask,
        pp.selection.select_lexicographic(
            pp.selection.channel_scores(weight, channel), pp.selection.channel_scores(weight, tiebreak), k
        ),
    )
    packed = pp.bits.pack_mask(mask)
    import hashlib

    assert bytes(mask_digest(packed).tolist()) == hashlib.sha256(packed.numpy().tobytes()).digest()
    selection = ChannelSelection(0.5, channel, tiebreak, mask_digest(packed))
    assert torch.equal(selection.select(weight), mask)


# ------------------------------------------------------------------------------------------------ mismatches
def _untouched(model) -> bool:
    return not mask_layers(model) and not hasattr(model, "peft_config")


def test_other_dtype_is_an_error_naming_layer_and_dtype_and_nothing_is_loaded(saved):
    folder = saved["dir"] / "stats" / saved["names"][0]
    for load in (
        lambda m: PeftModel.from_pretrained(m, folder, adapter_name="x"),
        lambda m: m.load_adapter(str(folder), adapter_name="x"),
    ):
        base = tiny_llama(dtype=torch.bfloat16)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(StatsMismatchError) as info:
            load(base)
        message = str(info.value)
        assert "model.layers." in message and "float32" in message and "bfloat16" in message
        assert "torch_dtype=torch.float32" in message and "'bits'" in message
        assert _untouched(base)
        assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_other_checkpoint_is_an_error_naming_the_first_mismatching_layer(saved):
    folder = saved["dir"] / "stats" / saved["names"][0]
    base = tiny_llama()
    layer = base.model.layers[1].mlp.down_proj
    with torch.no_grad():  # a fine-tune: the fingerprint accepts it, the masks would differ
        layer.weight.mul_(1 + 0.05 * torch.randn_like(layer.weight))
    expected_ok = {k: v for k, v in saved["expected"].items()}
    try:
        PeftModel.from_pretrained(base, folder, adapter_name="x")
    except StatsMismatchError as err:
        assert "model.layers.1.mlp.down_proj" in str(err) and "another checkpoint" in str(err)
        assert _untouched(base)
    else:  # pragma: no cover - the perturbation must change that layer's mask
        pytest.fail(f"no error; masks {expected_ok.keys()}")


def test_tampered_statistics_through_load_state_dict_are_refused_and_restored(saved):
    name = saved["names"][0]
    model = PeftModel.from_pretrained(tiny_llama(), saved["dir"] / "stats" / name, adapter_name=name)
    key = next(k for k in model.state_dict() if k.endswith(f"persona_mask_channel.{name}"))
    state = {key: torch.rand(model.state_dict()[key].shape, generator=torch.Generator().manual_seed(3))}
    with pytest.raises(StatsMismatchError, match="restored"):
        model.load_state_dict(state, strict=False)
    assert _equal_masks(pp.get_masks(model, name), saved["expected"][name][0])
    assert not torch.equal(model.state_dict()[key], state[key])


def test_statistics_written_by_load_state_dict_rederive_the_mask(saved):
    """Loading another adapter's statistics (with its digest) through plain ``load_state_dict`` re-derives."""
    first, *rest = saved["names"]
    if not rest:
        pytest.skip("one adapter for this method")  # magnitude extracts a single control
    model = PeftModel.from_pretrained(tiny_llama(), saved["dir"] / "stats" / first, adapter_name=first)
    other = load_file(saved["dir"] / "stats" / rest[0] / "adapter_model.safetensors")
    state = {k.replace("base_model.model.", "base_model.model.", 1) + f".{first}": v for k, v in other.items()}
    model.load_state_dict(state, strict=False)
    assert _equal_masks(pp.get_masks(model, first), saved["expected"][rest[0]][0])
    assert torch.equal(logits(model, saved["tokens"]), saved["expected"][rest[0]][1])


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method", ["obs", "random"])
def test_methods_that_cannot_be_rederived_are_refused_before_calibration(method):
    with pytest.raises(PersonaAdapterError, match="save_format") as info:
        extract(method, "stats")
    if method == "obs":
        assert "Cholesky" in str(info.value)


def test_reference_mode_and_explicit_masks_are_refused():
    extractor = pp.PersonaExtractor(tiny_llama(), tiny_tokenizer())
    with pytest.raises(PersonaAdapterError, match="reference-mode"):
        extractor.extract(PERSONAS, "contrastive", 0.5, reference=True, save_format="stats")
    config = pp.PersonaMaskConfig(method="wanda", sparsity=0.5, save_format="stats")
    masks = {"model.layers.0.mlp.up_proj": torch.ones(128, 64, dtype=torch.bool)}
    with pytest.raises(PersonaAdapterError, match="explicit masks"):
        pp.add_mask_adapter(tiny_llama(), masks, "x", config=config)
    with pytest.raises(PersonaAdapterError, match="no selection statistics"):
        from peft import get_peft_model

        get_peft_model(tiny_llama(), config)
    with pytest.raises(PersonaAdapterError, match="save_format"):
        pp.PersonaMaskConfig(save_format="zip")


def test_masks_of_a_stats_adapter_are_not_set_by_hand_but_combine_gives_bits(saved, tmp_path):
    model = extract("contrastive", "stats")
    masks = pp.get_masks(model, "extravert")
    with pytest.raises(TypeError, match="selection statistics"):
        model.base_model.set_masks("extravert", masks)
    model.base_model.combine_adapters(["extravert", "introvert"], "both", how="union")
    assert model.peft_config["both"].save_format == "bits"
    model.save_pretrained(tmp_path, selected_adapters=["both"])
    assert any(k.endswith("persona_mask_bits") for k in load_file(tmp_path / "both" / "adapter_model.safetensors"))


def test_hotswap_and_read_adapter_masks_rederive(saved):
    first, *rest = saved["names"]
    if not rest:
        pytest.skip("one adapter for this method")
    model = PeftModel.from_pretrained(tiny_llama(), saved["dir"] / "stats" / first, adapter_name=first)
    other = saved["dir"] / "stats" / rest[0]
    assert _equal_masks(pp.read_adapter_masks(other, model), saved["expected"][rest[0]][0])
    tensors = {id(t) for layer in mask_layers(model).values() for t in layer.buffers()}
    pp.hotswap_adapter(model, first, other)
    assert _equal_masks(pp.get_masks(model, first), saved["expected"][rest[0]][0])
    assert torch.equal(logits(model, saved["tokens"]), saved["expected"][rest[0]][1])
    still = {id(t) for layer in mask_layers(model).values() for t in layer.buffers()}
    assert {i for i in tensors if i in still} >= {
        id(t)
        for layer in mask_layers(model).values()
        for d in (layer.persona_mask_bits, layer.persona_mask_channel)
        for t in d.values()
    }
    with pytest.raises(PersonaAdapterError, match="not in the format"):
        pp.hotswap_adapter(model, first, saved["dir"] / "bits" / rest[0])


# ------------------------------------------------------------------------------------------------ CLI, inspect, Hub
def test_cli_extract_save_format_stats_and_inspect(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    for name, texts in PERSONAS.items():
        (tmp_path / f"{name}.csv").write_text(
            "question,matching,not_matching\n" + "".join(f"{t},{t} w7,w8\n" for t in texts)
        )
    args = [
        "extract",
        "--model",
        str(base),
        "--method",
        "contrastive",
        "--sparsity",
        "0.5",
        "--save-format",
        "stats",
        "--persona",
        f"extravert={tmp_path / 'extravert.csv'}",
        "--persona",
        f"introvert={tmp_path / 'introvert.csv'}",
        "--strength",
        "0.5",
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(args) == 0
    summaries = inspect_adapters(tmp_path / "out")
    assert {s.save_format for s in summaries} == {"stats"}
    assert all(abs(s.overall_density - 0.5) < 1e-12 for s in summaries)
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "out" / "extravert")]) == 0
    assert "format:           stats" in capsys.readouterr().out
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / "introvert", adapter_name="introvert")
    assert loaded.peft_config["introvert"].strength == 0.5
    assert all(m.sum(1).eq(m.shape[1] // 2).all() for m in pp.get_masks(loaded, "introvert").values())
    obs = args[:4] + ["obs"] + args[5:-1] + [str(tmp_path / "obs")]
    assert cli.main(obs) == 2
    assert "Cholesky" in capsys.readouterr().err and not (tmp_path / "obs").exists()


def test_hub_round_trip_in_a_fresh_process_without_importing_the_package(hub, hub_env, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=OWNER)
    tiny_llama().save_pretrained(tmp_path / "base")
    api.create_repo("user/stats-base", exist_ok=True)
    api.upload_folder(repo_id="user/stats-base", folder_path=str(tmp_path / "base"))
    model = extract("contrastive", "stats")
    push_to_hub(model, "user/stats-pair", token=OWNER, endpoint=hub.endpoint, base_model="user/stats-base")
    tokens = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(5))
    model.set_adapter("introvert")
    save_file({"tokens": tokens, "expected": logits(model, tokens)}, tmp_path / "io.safetensors")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        io = load_file({str(tmp_path / "io.safetensors")!r})
        with torch.no_grad():
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("user/stats-base"), "user/stats-pair",
                                             subfolder="introvert", adapter_name="introvert")
            plain = AutoModelForCausalLM.from_pretrained("user/stats-base")
            plain.load_adapter("user/stats-pair", adapter_name="introvert", adapter_kwargs={{"subfolder": "introvert"}})
            print("peft", torch.equal(peft(io["tokens"]).logits, io["expected"]))
            print("transformers", torch.equal(plain(io["tokens"]).logits, io["expected"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=hub_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peft True" in result.stdout and "transformers True" in result.stdout
    card = Path(
        hf_hub_download("user/stats-pair", "README.md", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    ).read_text()
    assert card.count("**Format**: `stats`") == 2


def test_selection_in_row_blocks_equals_one_pass(monkeypatch):
    from peft_persona import selection

    weight = torch.randn(37, 24, generator=torch.Generator().manual_seed(4))
    channel = torch.rand(24, generator=torch.Generator().manual_seed(5)).round(decimals=1)  # many ties
    tiebreak = torch.rand(24, generator=torch.Generator().manual_seed(6))
    whole = select_by_channels(weight, 9, channel, tiebreak)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 24 * 5)  # blocks of 5 rows, the last one shorter
    assert torch.equal(select_by_channels(weight, 9, channel, tiebreak), whole)
    assert torch.equal(
        select_by_channels(weight, 9, channel),
        pp.selection.select_top_per_row(pp.selection.order_keys(pp.selection.channel_scores(weight, channel)), 9),
    )
