"""The fused mixed-batch kernel (:mod:`peft_persona.fast_mixed`) against ``x @ (W * F).T`` per group, and the layer's
use of it: decoding-sized mixed batches run it, equal to each row alone to float32 rounding, from the original weight
(the ``keep_original`` copy, the base weight, or with ``cache_mixed`` one kept copy)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peft_persona as pp
from conftest import MODEL_FACTORIES, VOCAB, random_masks, tiny_llama
from peft_persona import fast_mixed, fast_select
from peft_persona.bits import pack_mask
from peft_persona.tuner import mask_layers, set_weight_mode
from peft_persona.tuner.mixed_forward import FUSED_MIXED_MAX_TOKENS


def reference(weight, x, groups, masks, strengths):
    out = torch.full((len(x), weight.shape[0]), float("nan"))
    for tokens, mask, strength in zip(groups, masks, strengths, strict=True):
        factor = 1.0 if mask is None else torch.where(mask, torch.tensor(1.0), torch.tensor(1.0 - strength))
        out[tokens] = (x[tokens].double() @ (weight * factor).double().T).float()
    return out


@st.composite
def mixed_cases(draw):
    """A weight whose width crosses the 16-column blocks, 1-9 tokens split into 1-4 groups (some under no mask)."""
    rows, cols, count = draw(st.integers(1, 9)), draw(st.integers(1, 70)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(rows, cols, generator=generator), torch.randn(count, cols, generator=generator)
    order = torch.randperm(count, generator=generator)
    cuts = sorted(draw(st.lists(st.integers(0, count), min_size=0, max_size=3)))
    bounds = [0, *cuts, count]
    groups = [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    masks = [
        None if draw(st.booleans()) and i else torch.rand(rows, cols, generator=generator) > 0.4
        for i in range(len(groups))
    ]
    strengths = [draw(st.sampled_from([1.0, 0.5, 0.25, 0.0])) for _ in groups]
    return weight, x, groups, masks, strengths


@settings(max_examples=200, deadline=None)
@given(mixed_cases(), st.sampled_from([None, 1.0, 0.5]))
def test_each_group_gets_the_weight_times_its_factor(case, held_strength):
    """From the original weight, or (``held_strength``) from the engine's state: ``W_eff`` of another mask in the
    weight and the original values it changed in a stash."""
    weight, x, groups, masks, strengths = case
    packed = [None if m is None else pack_mask(m) for m in masks]
    plan = fast_mixed.plan_groups(weight.shape, groups, packed, strengths)
    if held_strength is None:
        got = fast_mixed.mixed_linear(weight, x, plan)
    else:
        held = torch.rand(weight.shape, generator=torch.Generator().manual_seed(len(x))) > 0.3
        in_effect = weight * torch.where(held, torch.tensor(1.0), torch.tensor(1.0 - held_strength))
        got = fast_mixed.mixed_linear(in_effect, x, plan, pack_mask(held), weight[~held].contiguous())
    want = reference(weight, x, groups, masks, strengths)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_a_stash_that_does_not_fit_the_held_mask_is_refused_without_reading_past_it():
    generator = torch.Generator().manual_seed(2)
    weight, x = torch.randn(6, 40, generator=generator), torch.randn(2, 40, generator=generator)
    held = torch.rand(6, 40, generator=generator) > 0.5
    plan = fast_mixed.plan_groups((6, 40), [torch.tensor([0, 1])], [pack_mask(held)], [1.0])
    stash = weight[~held].contiguous()
    for wrong in (stash[:-1], stash[:3], torch.zeros(0), torch.cat([stash, stash])):
        with pytest.raises(ValueError, match="are not the entries that held drops"):
            fast_mixed.mixed_linear(weight * held, x, plan, pack_mask(held), wrong)
    with pytest.raises(ValueError, match="held and stash go together"):
        fast_mixed.mixed_linear(weight, x, plan, pack_mask(held))
    with pytest.raises(ValueError, match=r"held \(6, 4\) torch.uint8 and stash"):
        fast_mixed.mixed_linear(weight, x, plan, pack_mask(held)[:, :4].contiguous(), stash)


def test_a_decoding_step_on_model_shapes_matches_dense_products():
    """576 and 1536 columns (SmolLM2's), two adapters, two tokens each: 36 and 96 full blocks, no tail."""
    generator = torch.Generator().manual_seed(1)
    for cols in (576, 1536):
        weight, x = torch.randn(64, cols, generator=generator), torch.randn(4, cols, generator=generator)
        masks = [torch.rand(64, cols, generator=generator) > 0.2 for _ in range(2)]
        groups = [torch.tensor([0, 2]), torch.tensor([3, 1])]
        plan = fast_mixed.plan_groups(weight.shape, groups, [pack_mask(m) for m in masks], [1.0, 1.0])
        got = fast_mixed.mixed_linear(weight, x, plan)
        assert torch.allclose(got, reference(weight, x, groups, masks, [1.0, 1.0]), rtol=1e-5, atol=1e-4)


def test_bad_shapes_and_indices_are_named():
    weight, x = torch.randn(4, 24), torch.randn(2, 24)
    good = pack_mask(torch.ones(4, 24, dtype=torch.bool))
    plan = fast_mixed.plan_groups((4, 24), [torch.tensor([0, 1])], [good], [1.0])
    with pytest.raises(ValueError, match=r"input \(2, 23\) and a plan for \(4, 24\) do not fit a weight of shape"):
        fast_mixed.mixed_linear(weight, torch.randn(2, 23), plan)
    with pytest.raises(ValueError, match=r"a plan for \(4, 24\) do not fit a weight of shape \(5, 24\)"):
        fast_mixed.mixed_linear(torch.randn(5, 24), x, plan)
    with pytest.raises(ValueError, match="both must be float32 and the weight contiguous"):
        fast_mixed.mixed_linear(weight.double(), x, plan)
    with pytest.raises(ValueError, match=r"contiguous: False"):
        fast_mixed.mixed_linear(torch.randn(24, 4).T, x, plan)
    with pytest.raises(ValueError, match="the plan reaches token 1; the input has 1 rows"):
        fast_mixed.mixed_linear(weight, x[:1], plan)
    with pytest.raises(ValueError, match=r"packed mask \(4, 2\) torch.uint8 does not fit \(4, 24\)"):
        fast_mixed.plan_groups((4, 24), [torch.tensor([0, 1])], [good[:, :2].contiguous()], [1.0])
    with pytest.raises(ValueError, match="differ in length"):
        fast_mixed.plan_groups((4, 24), [torch.tensor([0, 1])], [good, good], [1.0])
    with pytest.raises(ValueError, match="negative token index -1"):
        fast_mixed.plan_groups((4, 24), [torch.tensor([0, -1])], [good], [1.0])


def test_supports_only_float32_without_grad_with_kernels_on():
    weight, x = torch.randn(4, 16), torch.randn(2, 16)
    assert fast_mixed.supports(weight, x)
    assert not fast_mixed.supports(weight.bfloat16(), x) and not fast_mixed.supports(weight, x.double())
    assert not fast_mixed.supports(weight.T, x)  # not contiguous
    assert not fast_mixed.supports(weight.requires_grad_(), x)
    with torch.no_grad():
        assert fast_mixed.supports(weight, x)
    with fast_select.eager():
        assert not fast_mixed.supports(weight.detach(), x)


# ---------------------------------------------------------------------------------------------- the layer's use
def decoding_model():
    factory = MODEL_FACTORIES["llama"]
    model = pp.add_mask_adapter(factory(0), random_masks(factory(0), 1), "extro")
    pp.add_mask_adapter(model, random_masks(factory(0), 2), "intro")
    pp.set_strength(model, "intro", 0.5)
    return model.eval()


def run_counting(model, tokens, names, monkeypatch):
    calls = []
    kernel = fast_mixed.mixed_linear
    monkeypatch.setattr(fast_mixed, "mixed_linear", lambda *a: (calls.append(a[1].shape[0]), kernel(*a))[1])
    with torch.no_grad():
        logits = model(tokens, adapter_names=names).logits
    monkeypatch.setattr(fast_mixed, "mixed_linear", kernel)
    return logits, calls


def alone(model, tokens, names):
    rows = []
    with torch.no_grad():
        for row, name in zip(tokens, names, strict=True):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(row[None]).logits[0])
            else:
                model.set_adapter(name)
                rows.append(model(row[None]).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", [{}, {"keep_original": True}, {"cache_mixed": True}, {"in_place": False}])
def test_decoding_steps_run_the_kernel_and_match_each_row_alone(mode, monkeypatch):
    model = decoding_model()
    set_weight_mode(model, **mode)
    names = ["extro", "intro", "__base__", "intro"]
    tokens = torch.randint(3, VOCAB, (4, 1), generator=torch.Generator().manual_seed(3))
    got, calls = run_counting(model, tokens, names, monkeypatch)
    assert calls == [4] * len(mask_layers(model))  # every layer, once, with all four tokens
    assert torch.allclose(got, alone(model, tokens, names), rtol=0, atol=1e-5)


def test_groups_above_the_limit_take_a_product_per_adapter(monkeypatch):
    model = decoding_model()
    names = ["extro", "intro"]
    tokens = torch.randint(3, VOCAB, (2, FUSED_MIXED_MAX_TOKENS + 1), generator=torch.Generator().manual_seed(4))
    got, calls = run_counting(model, tokens, names, monkeypatch)
    assert calls == [] and torch.allclose(got, alone(model, tokens, names), rtol=0, atol=1e-5)
    with fast_select.eager():  # and without the kernels, decoding steps too
        got, calls = run_counting(model, tokens[:, :1], names, monkeypatch)
    assert calls == [] and torch.allclose(got, alone(model, tokens[:, :1], names), rtol=0, atol=1e-5)


def test_by_default_the_kernel_reads_the_engines_state_without_a_copy(monkeypatch):
    """The weight holding ``W_eff`` and the engine's stash of original values: nothing kept, nothing copied."""
    model = decoding_model()
    model.set_adapter("extro")
    names = ["extro", "intro", "extro", "__base__"]
    tokens = torch.randint(3, VOCAB, (4, 1), generator=torch.Generator().manual_seed(5))
    held = []
    kernel = fast_mixed.mixed_linear
    monkeypatch.setattr(
        fast_mixed,
        "mixed_linear",
        lambda w, x, plan, h=None, s=None: (held.append((w, h, s)), kernel(w, x, plan, h, s))[1],
    )
    with torch.no_grad():
        got = model(tokens, adapter_names=names).logits
    layers = list(mask_layers(model).values())
    assert [(w.data_ptr(), s.data_ptr()) for w, _, s in held] == [
        (m.get_base_weight().data_ptr(), m.persona_dropped.data_ptr()) for m in layers
    ]
    assert all(not m._mixed_cache for m in layers)
    monkeypatch.setattr(fast_mixed, "mixed_linear", kernel)
    assert torch.allclose(got, alone(model, tokens, names), rtol=0, atol=1e-5)


def test_cache_mixed_keeps_one_original_and_the_plan_until_they_change():
    """With ``cache_mixed``: one copy of the original per layer (the fastest read) and the batch's plan, kept until
    the names, a mask or a strength change, or the weight is written."""
    model = decoding_model()
    set_weight_mode(model, cache_mixed=True)
    model.set_adapter("extro")
    names = ["extro", "intro", "extro", "__base__"]
    tokens = torch.randint(3, VOCAB, (4, 1), generator=torch.Generator().manual_seed(5))
    layer = next(iter(mask_layers(model).values()))
    with torch.no_grad():
        first = model(tokens, adapter_names=names).logits
        assert set(layer._mixed_cache) == {("original", None), ("plan", None)}
        kept, plan = layer._mixed_cache[("original", None)][1], layer._mixed_cache[("plan", None)][1]
        assert torch.equal(kept, layer.original_weight())
        assert torch.equal(model(tokens, adapter_names=names).logits, first)
        assert layer._mixed_cache[("original", None)][1] is kept and layer._mixed_cache[("plan", None)][1] is plan
        pp.set_strength(model, "intro", 0.25)  # a new strength: a new plan
        assert not torch.equal(model(tokens, adapter_names=names).logits, first)
        assert layer._mixed_cache[("plan", None)][1].offs.tolist() == [0.0, 0.75, 1.0]  # extro, intro, __base__
        with model.disable_adapter():  # a write by someone else: new original values
            model(tokens)  # the weight holds the original
            for module in mask_layers(model).values():
                module.base_layer.weight.mul_(2)  # through the parameter, as a user writes it
        got = model(tokens, adapter_names=names).logits
    assert torch.equal(layer._mixed_cache[("original", None)][1], kept * 2)
    assert torch.allclose(got, alone(model, tokens, names), rtol=0, atol=1e-5)


def test_several_adapters_in_effect_give_the_kernel_their_masks_anded(monkeypatch):
    model = decoding_model()
    pp.add_mask_adapter(model, random_masks(MODEL_FACTORIES["llama"](0), 3), "third")
    model.base_model.set_adapter(["extro", "third"])
    names = ["intro", "__base__"]
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(9))
    got, calls = run_counting(model, tokens, names, monkeypatch)
    assert calls and torch.allclose(got, alone(model, tokens, names), rtol=0, atol=1e-5)


def test_a_batch_with_no_adapter_acting_skips_the_kernel(monkeypatch):
    model = decoding_model()
    pp.set_strength(model, "intro", 0.0)
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(6))
    got, calls = run_counting(model, tokens, ["__base__", "intro"], monkeypatch)
    with model.disable_adapter(), torch.no_grad():
        assert calls == [] and torch.allclose(got, model(tokens).logits, rtol=0, atol=1e-6)


def test_gpt2_conv1d_layers_keep_the_product_path(monkeypatch):
    factory = MODEL_FACTORIES["gpt2"]
    model = pp.add_mask_adapter(factory(0), random_masks(factory(0), 1), "extro").eval()
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(7))
    got, calls = run_counting(model, tokens, ["extro", "__base__"], monkeypatch)
    assert calls == [] and torch.allclose(got, alone(model, tokens, ["extro", "__base__"]), rtol=0, atol=1e-5)


def test_bfloat16_keeps_the_product_path(monkeypatch):
    model = pp.add_mask_adapter(tiny_llama(0).bfloat16(), random_masks(tiny_llama(0), 1), "extro").eval()
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(8))
    _, calls = run_counting(model, tokens, ["extro", "__base__"], monkeypatch)
    assert calls == []
