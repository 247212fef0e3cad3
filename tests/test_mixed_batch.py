"""Mixed-persona batches (``adapter_names=``) through PEFT and plain transformers, in forward and generate."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from peft import PeftModel

import peft_persona as pp
from conftest import MODEL_FACTORIES, VOCAB, random_masks
from peft_persona.tuner import mask_layers
from peft_persona.tuner.mixed_forward import SPARSE_MIXED_MAX_TOKENS

ROWS = ["extro", "intro", "__base__", "extro", "intro", "extro"]


def peft_model(arch: str):
    factory = MODEL_FACTORIES[arch]
    model = pp.add_mask_adapter(factory(0), random_masks(factory(0), 1), "extro")
    pp.add_mask_adapter(model, random_masks(factory(0), 2), "intro")
    return model.eval()


def transformers_model(arch: str, tmp_path):
    """A plain transformers model that loaded both adapters with ``load_adapter`` (no PEFT wrapper)."""
    peft_model(arch).save_pretrained(tmp_path)
    model = MODEL_FACTORIES[arch](0)
    model.load_adapter(str(tmp_path / "extro" if (tmp_path / "extro").is_dir() else tmp_path), adapter_name="extro")
    model.load_adapter(str(tmp_path / "intro"), adapter_name="intro")
    return model.eval()


def each_row_alone(model, tokens, names):
    """Row ``i`` run by itself with ``names[i]`` as the active adapter (adapters disabled for ``__base__``)."""
    rows = []
    with torch.no_grad():
        for row, name in zip(tokens, names, strict=True):
            if name == "__base__":
                with base_only(model):
                    rows.append(model(row[None]).logits[0])
            else:
                model.set_adapter(name)
                rows.append(model(row[None]).logits[0])
    return torch.stack(rows)


@contextlib.contextmanager
def base_only(model):
    """Adapters off: PEFT's context manager, or transformers' disable/enable pair."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


@pytest.fixture(params=["peft", "transformers"])
def path(request):
    return request.param


def build(path, arch, tmp_path):
    return peft_model(arch) if path == "peft" else transformers_model(arch, tmp_path)


def test_each_row_gets_its_own_adapter(arch, path, tmp_path):
    model = build(path, arch, tmp_path)
    tokens = torch.randint(3, 1000, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(tokens, adapter_names=ROWS).logits
    alone = each_row_alone(model, tokens, ROWS)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    # the adapters really differ, so a row under the wrong one would fail
    assert (alone[0] - alone[1]).abs().max() > 1e-2 and (alone[0] - alone[2]).abs().max() > 1e-2


def test_generate_with_adapter_names(arch, path, tmp_path):
    model = build(path, arch, tmp_path)
    names = ["intro", "__base__", "extro"]
    prompt = torch.randint(3, 1000, (len(names), 5), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    mixed = model.generate(input_ids=prompt, adapter_names=names, **settings)
    for i, name in enumerate(names):
        one = dict(settings, attention_mask=settings["attention_mask"][i : i + 1])
        if name == "__base__":
            with base_only(model):
                alone = model.generate(input_ids=prompt[i : i + 1], **one)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompt[i : i + 1], **one)
        assert torch.equal(mixed[i], alone[0]), (i, name)


def test_beam_search_repeats_names_per_beam():
    model = peft_model("llama")
    prompt = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    mixed = model.generate(input_ids=prompt, adapter_names=["intro", "extro"], **settings)
    model.set_adapter("intro")
    assert torch.equal(mixed[0], model.generate(input_ids=prompt[:1], **settings)[0])


def test_one_matmul_per_distinct_adapter(monkeypatch):
    model = peft_model("llama")
    layer = mask_layers(model)["model.layers.0.mlp.up_proj"]
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, *a, **k: (calls.append(x.shape[0]), linear(x, *a, **k))[1]
    )
    x = torch.randn(len(ROWS), 3, layer.in_features)
    with torch.no_grad():
        layer(x, adapter_names=ROWS)
    assert sorted(calls) == [1, 2, 3]  # __base__ (1 row), intro (2 rows), extro (3 rows)


def test_errors_match_lora(path, tmp_path):
    model = build(path, "llama", tmp_path)
    tokens = torch.randint(3, 1000, (2, 4))
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(tokens, adapter_names=["extro", "typo"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(tokens, adapter_names=["extro"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(tokens, adapter_names=["extro", "intro"])
    model.eval()
    for module in mask_layers(model).values():
        module.merge()
    with pytest.raises(ValueError, match="merged adapters"):
        model(tokens, adapter_names=["extro", "intro"])
    for module in mask_layers(model).values():
        module.unmerge()
    with torch.no_grad():  # after the errors, the model still works and no hook is left behind
        assert model(tokens, adapter_names=["intro", "__base__"]).logits.shape[0] == 2
    assert all(not m._forward_pre_hooks for m in mask_layers(model).values())


def test_mixed_batch_leaves_the_active_adapter_alone(tmp_path):
    model = peft_model("gpt2")
    tokens = torch.randint(3, 1000, (2, 4))
    with torch.no_grad():
        before = model(tokens).logits
        model(tokens, adapter_names=["intro", "__base__"])
        assert torch.equal(model(tokens).logits, before)


def test_cache_mixed_keeps_each_adapters_weight_and_drops_it_when_the_mask_changes():
    """Groups above SPARSE_MIXED_MAX_TOKENS tokens (prefill): the other adapter's dense W_eff, kept, bit-equal."""
    from peft_persona.tuner import set_weight_mode

    model = peft_model("llama")
    rows = ["extro", "intro"]
    tokens = torch.randint(3, VOCAB, (2, SPARSE_MIXED_MAX_TOKENS + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(tokens, adapter_names=rows).logits
    set_weight_mode(model, cache_mixed=True)
    layer = next(iter(mask_layers(model).values()))
    with torch.no_grad():
        first = model(tokens, adapter_names=rows).logits
        kept = dict(layer._mixed_cache)
        second = model(tokens, adapter_names=rows).logits
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert list(kept) == [("intro",)] and kept[("intro",)][1] is layer._mixed_cache[("intro",)][1]
    pp.set_masks(model, "intro", random_masks(MODEL_FACTORIES["llama"](0), 7))
    with torch.no_grad():
        model(tokens, adapter_names=rows)
    assert list(layer._mixed_cache) == [("intro",)]  # replaced for the new mask, not added beside the old one
    assert layer._mixed_cache[("intro",)][1] is not kept[("intro",)][1]
    set_weight_mode(model, cache_mixed=False)
    assert not layer._mixed_cache


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_cache_mixed_decodes_with_the_sparse_difference_to_the_weight_in_effect(arch):
    """Groups of at most SPARSE_MIXED_MAX_TOKENS tokens (decoding), float32, no grad: the weight in effect's output
    plus W_eff(other) - W_eff(in effect) as a sparse CSR matrix holding exactly the entries where they differ."""
    from peft_persona.tuner import set_weight_mode

    factory = MODEL_FACTORIES[arch]
    model = pp.add_mask_adapter(factory(0), random_masks(factory(0), 1, keep=0.8), "extro")
    pp.add_mask_adapter(model, random_masks(factory(0), 2, keep=0.8), "intro")
    pp.add_mask_adapter(model, random_masks(factory(0), 3, keep=0.3), "far")  # differs from extro in over half
    model.eval().set_adapter("extro")
    rows = ["extro", "intro", "__base__", "intro", "far"]
    tokens = torch.randint(3, VOCAB, (5, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(tokens, adapter_names=rows).logits
    set_weight_mode(model, cache_mixed=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(tokens, adapter_names=rows).logits
        again = model(tokens, adapter_names=rows).logits
    assert not [w for w in caught if "Sparse" in str(w.message)]  # torch's sparse beta and invariant notices
    assert torch.allclose(got, plain, rtol=0, atol=1e-5) and torch.equal(got, again)
    for layer in mask_layers(model).values():
        differences = {k: v for k, v in layer._mixed_cache.items() if k[0] == "difference"}
        assert set(differences) == {("difference", ("intro",)), ("difference", ()), ("difference", ("far",))}
        assert differences[("difference", ("far",))][1] is None and ("far",) in layer._mixed_cache  # dense serves
        sparse = differences[("difference", ("intro",))][1]
        assert sparse.layout == torch.sparse_csr and sparse.col_indices().dtype == torch.int32
        want = layer.effective_weight(["intro"]) - layer.effective_weight(["extro"])
        want = want.T if layer.fan_in_fan_out else want
        assert torch.equal(sparse.to_dense(), want) and sparse.values().numel() == int(torch.count_nonzero(want))
    with torch.enable_grad():  # under grad the dense path serves
        assert torch.allclose(model(tokens, adapter_names=rows).logits, plain, rtol=0, atol=1e-5)
