"""Layer-by-layer calibration from sharded safetensors: masks bit-identical to a whole-model run, one block resident."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import peft_persona as pp
from conftest import tiny_llama, tiny_tokenizer, word_texts
from peft_persona import layerwise
from peft_persona.errors import PersonaAdapterError

PERSONAS = {"extravert": word_texts(1, 9), "introvert": word_texts(2, 7)}


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    """A tiny model saved as several safetensors shards, with its tokenizer."""
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_llama() if request.param == "llama" else tiny_qwen2()
    model.save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def _whole(folder, method, **kw):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return pp.PersonaExtractor(model, tiny_tokenizer(), batch_size=3).extract(
        PERSONAS if method not in ("magnitude", "random") else {"a": None, "b": None}, method, 0.5, **kw
    )


@pytest.mark.parametrize("method", ["wanda", "contrastive", "obs", "magnitude", "random"])
def test_layerwise_masks_are_bit_identical_to_the_whole_model(checkpoint, method):
    expected = _whole(checkpoint, method)
    extractor = pp.PersonaExtractor.from_pretrained(str(checkpoint), tokenizer=tiny_tokenizer(), batch_size=3)
    assert all(p.device.type == "meta" for p in extractor.base_model.model.layers.parameters())
    got = extractor.extract(PERSONAS if method not in ("magnitude", "random") else {"a": None, "b": None}, method, 0.5)
    for name in got.peft_config:
        want, have = pp.get_masks(expected, name), pp.get_masks(got, name)
        assert set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want), name
        assert got.peft_config[name].base_model_fingerprint == expected.peft_config[name].base_model_fingerprint
    assert all(p.device.type == "meta" for p in extractor.base_model.model.layers.parameters())  # nothing kept


def test_spilled_hidden_states_and_saved_adapters_load_on_the_real_model(checkpoint, tmp_path):
    extractor = pp.PersonaExtractor.from_pretrained(
        str(checkpoint), tokenizer=tiny_tokenizer(), batch_size=2, cache_bytes=0, spill_dir=str(tmp_path)
    )
    model = extractor.extract(PERSONAS, "contrastive", 0.5, save_format="stats")
    assert not list(tmp_path.iterdir())  # the spill folder is removed afterwards
    model.save_pretrained(tmp_path / "out")
    expected = _whole(checkpoint, "contrastive")
    from peft import PeftModel

    real = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "out" / "introvert", adapter_name="introvert"
    )
    want, have = pp.get_masks(expected, "introvert"), pp.get_masks(real, "introvert")
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert extractor.summary.overlap == pytest.approx(_overlap(expected))


def _overlap(model):
    a, b = pp.get_masks(model, "extravert"), pp.get_masks(model, "introvert")
    return sum(int((a[k] & b[k]).sum()) for k in a) / sum(int(a[k].sum()) for k in a)


def test_hidden_cache_spills_beyond_its_budget(tmp_path):
    cache = layerwise.HiddenCache(max_bytes=100, spill_dir=tmp_path)
    small, big = torch.ones(5), torch.arange(100, dtype=torch.float32)
    cache.put("a", small)
    cache.put("b", big)
    assert cache.spilled == 1 and torch.equal(cache.get("b"), big) and cache.get("a") is small
    cache.put("b", small)
    assert cache.spilled == 0 and cache.in_memory == 40
    cache.close()
    assert not list(tmp_path.iterdir())


def test_checkpoints_it_cannot_read_are_named(tmp_path):
    with pytest.raises(PersonaAdapterError, match="safetensors"):
        layerwise.Checkpoint(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.raises(PersonaAdapterError, match="no tensor 'nope'"):
        layerwise.Checkpoint(tmp_path / "m").read(["nope"])


def test_cli_layerwise_matches_whole_model_and_saves_statistics(tmp_path):
    from peft import PeftModel

    from peft_persona.activation_stats import PersonaStats
    from peft_persona.cli import main

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    for name, texts in PERSONAS.items():
        (tmp_path / f"{name}.csv").write_text(
            "question,matching,not_matching\n" + "".join(f"{t},{t} w7,w8\n" for t in texts)
        )
    common = [
        "extract",
        "--model",
        str(folder),
        "--method",
        "contrastive",
        "--sparsity",
        "0.5",
        "--save-stats",
        "--persona",
        f"extravert={tmp_path / 'extravert.csv'}",
        "--persona",
        f"introvert={tmp_path / 'introvert.csv'}",
    ]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert main(common + ["--layerwise", "--cache-gb", "0", "--out", str(tmp_path / "layerwise")]) == 0
    for name in PERSONAS:
        whole = PersonaStats.load(tmp_path / "whole" / f"{name}.stats.safetensors")
        by_layer = PersonaStats.load(tmp_path / "layerwise" / f"{name}.stats.safetensors")
        assert all(torch.equal(whole.layers[n].sum_sq, by_layer.layers[n].sum_sq) for n in whole.layers)
        masks = [
            pp.get_masks(PeftModel.from_pretrained(tiny_llama(), tmp_path / run / name, adapter_name=name), name)
            for run in ("whole", "layerwise")
        ]
        assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert (
        main(
            [
                "extract",
                "--model",
                str(folder),
                "--layerwise",
                "--gguf-file",
                "x.gguf",
                "--persona",
                f"a={tmp_path / 'extravert.csv'}",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )


def _save_shards(model, folder, per_shard: int) -> None:
    """Save ``model`` as safetensors shards with an index (transformers refuses to re-save a GGUF-loaded model)."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    names, weight_map = sorted(state), {}
    for start in range(0, len(names), per_shard):
        file = f"model-{start // per_shard:05d}.safetensors"
        save_file(
            {k: state[k] for k in names[start : start + per_shard]}, str(folder / file), metadata={"format": "pt"}
        )
        weight_map.update({k: file for k in names[start : start + per_shard]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(folder)


def test_smollm2_layerwise_is_bit_identical(smollm2, tmp_path):
    """The embedded SmolLM2 (GGUF, dequantised to fp32) saved as safetensors shards, extracted both ways."""
    model, tokenizer = smollm2
    _save_shards(model, tmp_path, per_shard=60)
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    texts = {"extravert": "builtin:extraversion#yes", "introvert": "builtin:extraversion#no"}
    from peft_persona.data import load_texts

    personas = {name: load_texts(source)[:12] for name, source in texts.items()}
    whole = pp.PersonaExtractor(model, tokenizer, batch_size=6).extract(personas, "contrastive", 0.5)
    extractor = pp.PersonaExtractor.from_pretrained(str(tmp_path), tokenizer=tokenizer, batch_size=6)
    by_layer = extractor.extract(personas, "contrastive", 0.5)
    for name in personas:
        want, have = pp.get_masks(whole, name), pp.get_masks(by_layer, name)
        assert len(want) == 210 and all(torch.equal(want[k], have[k]) for k in want), name
    whole.unload()


def test_return_freed_memory_sets_the_threshold_and_never_fails(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    monkeypatch.setattr(layerwise, "_glibc", lambda: FakeLibc())
    layerwise.return_freed_memory()
    assert calls == [("mallopt", layerwise.M_MMAP_THRESHOLD, 1 << 20), ("malloc_trim", 0)]
    monkeypatch.setattr(layerwise, "_glibc", lambda: None)  # not glibc: nothing to do
    layerwise.return_freed_memory()
