"""Persona strength: W_eff = W * (M + (1 - s)(1 - M)), set per adapter, saved, changeable at run time."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from peft import PeftModel

import peft_persona as pp
from conftest import MODEL_FACTORIES, logits, masked_reference, random_masks, tiny_llama
from peft_persona.targets import oriented_weight
from peft_persona.tuner import mask_layers


def soft_reference(factory, masks, strength):
    """The base model with every masked weight scaled by hand: kept weights as they are, dropped ones by 1 - s."""
    reference = factory(0)
    with torch.no_grad():
        for name, mask in masks.items():
            weight = oriented_weight(reference.get_submodule(name))
            weight.copy_(torch.where(mask, weight, weight * (1.0 - strength)))
    return reference


def test_strength_zero_is_base_and_one_is_the_hard_mask(arch, tokens):
    factory = MODEL_FACTORIES[arch]
    masks = random_masks(factory(0), 1)
    model = pp.add_mask_adapter(factory(0), masks, "p", config=pp.PersonaMaskConfig(strength=0.0))
    assert torch.equal(logits(model, tokens), logits(factory(0), tokens))
    pp.set_strength(model, "p", 1.0)
    assert torch.equal(logits(model, tokens), logits(masked_reference(factory, 0, [masks]), tokens))
    pp.set_strength(model, "p", 0.4)
    assert torch.equal(logits(model, tokens), logits(soft_reference(factory, masks, 0.4), tokens))
    assert model.peft_config["p"].strength == 0.4


def test_strength_is_saved_and_honoured_on_load(tmp_path, tokens):
    masks = random_masks(tiny_llama(), 1)
    model = pp.add_mask_adapter(tiny_llama(), masks, "p", config=pp.PersonaMaskConfig(strength=0.6))
    model.save_pretrained(tmp_path)
    expected = logits(soft_reference(tiny_llama, masks, 0.6), tokens)
    through_peft = PeftModel.from_pretrained(
        tiny_llama(), str(tmp_path / "p" if (tmp_path / "p").is_dir() else tmp_path)
    )
    assert through_peft.peft_config["default"].strength == 0.6
    assert torch.equal(logits(through_peft, tokens), expected)
    plain = tiny_llama()
    plain.load_adapter(str(tmp_path / "p" if (tmp_path / "p").is_dir() else tmp_path), adapter_name="p")
    assert torch.equal(logits(plain, tokens), expected)


def test_strength_changes_without_recompile(tokens):
    masks = random_masks(tiny_llama(), 1)
    model = pp.add_mask_adapter(tiny_llama(), masks, "p")
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits(compiled, tokens)
        pp.set_strength(model, "p", 0.3)
        out = logits(compiled, tokens)
    assert torch.equal(out, logits(soft_reference(tiny_llama, masks, 0.3), tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_merge_unmerge_and_unload_are_bit_exact(dtype, tokens):
    original = {k: v.clone() for k, v in tiny_llama(0, dtype).state_dict().items()}
    m1, m2 = random_masks(tiny_llama(), 1), random_masks(tiny_llama(), 2)
    model = pp.add_mask_adapter(tiny_llama(0, dtype), m1, "a", config=pp.PersonaMaskConfig(strength=0.3))
    pp.add_mask_adapter(model, m2, "b", config=pp.PersonaMaskConfig(strength=0.8))
    unmerged = logits(model, tokens)
    model.merge_adapter(safe_merge=True)
    assert torch.equal(logits(model, tokens), unmerged)
    model.unmerge_adapter()
    for name in ("b", "a", "b"):
        model.set_adapter(name)
        model.merge_adapter()
        model.unmerge_adapter()
    model.set_adapter("a")
    assert torch.equal(logits(model, tokens), unmerged)
    plain = model.unload()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())


def test_merged_and_unmerged_soft_adapters_agree_with_reference(tokens):
    masks = random_masks(tiny_llama(), 3)
    model = pp.add_mask_adapter(tiny_llama(), masks, "p", config=pp.PersonaMaskConfig(strength=0.5))
    plain = model.merge_and_unload()
    assert torch.equal(logits(plain, tokens), logits(soft_reference(tiny_llama, masks, 0.5), tokens))


def test_combine_adapters_takes_a_strength(tokens):
    m1, m2 = random_masks(tiny_llama(), 1), random_masks(tiny_llama(), 2)
    model = pp.add_mask_adapter(tiny_llama(), m1, "p1")
    pp.add_mask_adapter(model, m2, "p2")
    pp.combine_adapters(model, ["p1", "p2"], "both", how="intersection", strength=0.25)
    model.set_adapter("both")
    assert model.peft_config["both"].strength == 0.25
    both = {n: m1[n] & m2[n] for n in m1}
    assert torch.equal(logits(model, tokens), logits(soft_reference(tiny_llama, both, 0.25), tokens))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "1", True])
def test_bad_strength_is_refused_naming_the_field(bad):
    with pytest.raises(pp.PersonaAdapterError, match="`strength`"):
        pp.PersonaMaskConfig(strength=bad)
    model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), "p")
    with pytest.raises(ValueError, match="strength of persona mask adapter 'p'"):
        pp.set_strength(model, "p", bad)
    with pytest.raises(KeyError, match="no persona mask adapter named 'q'"):
        pp.set_strength(model, "q", 0.5)


def test_only_the_packed_bits_are_kept_per_adapter():
    """Per loaded adapter: 1 bit per weight. Per layer, for the two adapters most recently in effect, the indices of
    the entries each drops (8 bytes each) and their original values (the active adapter's are the stash)."""
    masks = random_masks(tiny_llama(), 1, keep=0.75)
    model = pp.add_mask_adapter(tiny_llama(), masks, "a")
    for seed in (2, 3, 4):
        pp.add_mask_adapter(model, random_masks(tiny_llama(), seed), f"x{seed}")
    for name, layer in mask_layers(model).items():
        bits = [b for n, b in layer.named_buffers() if n.startswith("persona_mask_bits.")]
        assert len(bits) == 4 and all(
            b.dtype == torch.uint8 and b.numel() == layer.out_features * layer.in_features // 8 for b in bits
        )
        dropped = int((~masks[name]).sum())  # only "a" is active
        assert layer.persona_dropped.numel() == layer.persona_dropped_index.numel() == dropped
        assert layer.persona_dropped_index.dtype == torch.int64
        assert set(layer._dropped_cache) == {"a"}  # the adapters never in effect record nothing
        assert layer._dropped_cache["a"][1] is layer.persona_dropped_index  # one record, not two
        assert layer._dropped_cache["a"][2] is layer.persona_dropped  # its original values are the stash itself
        others = {n for n, b in layer.named_buffers() if b is not None and not n.startswith("persona_mask_bits.")}
        assert others == {"persona_dropped", "persona_dropped_index"}
    for name in ("x2", "x3", "x4", "a"):
        model.set_adapter(name)
    assert all(list(layer._dropped_cache) == ["x4", "a"] for layer in mask_layers(model).values())  # the last two


@pytest.mark.parametrize("keep_original", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_operation_sequences_keep_the_weight_exact(seed, keep_original, tokens):
    """Any mix of switches, strengths, merges, disables and mask swaps: outputs match W_eff computed apart, and the
    original weights come back bit-exactly (with the compact record of dropped entries, or a dense original copy)."""
    from peft_persona.tuner import mask_layers, set_weight_mode

    rng = torch.Generator().manual_seed(seed)
    arch = sorted(MODEL_FACTORIES)[seed % 2]
    factory = MODEL_FACTORIES[arch]
    original = {k: v.clone() for k, v in factory(0).state_dict().items()}
    masks = {n: random_masks(factory(0), s) for n, s in (("a", 1), ("b", 2), ("c", 3))}
    strengths = {"a": 1.0, "b": 1.0, "c": 1.0}
    model = pp.add_mask_adapter(factory(0), masks["a"], "a")
    set_weight_mode(model, keep_original=keep_original)  # per model: other models keep the default
    for n in ("b", "c"):
        pp.add_mask_adapter(model, masks[n], n)
    assert all(layer.keep_original is keep_original for layer in mask_layers(model).values())
    active, merged = ["a"], False
    for step in range(12):
        op = int(torch.randint(0, 5, (1,), generator=rng))
        name = "abc"[int(torch.randint(0, 3, (1,), generator=rng))]
        if op == 0:
            model.base_model.set_adapter(name)  # unmerges first, if merged
            active, merged = [name], False
        elif op == 1 and not merged:
            strengths[name] = float(torch.randint(0, 5, (1,), generator=rng)) / 4
            pp.set_strength(model, name, strengths[name])
        elif op == 2 and not merged:
            model.merge_adapter()
            merged = True
        elif op == 3 and merged:
            model.unmerge_adapter()
            merged = False
        elif op == 4 and not merged:
            masks[name] = random_masks(factory(0), 10 + step)
            pp.set_masks(model, name, masks[name])
        reference = factory(0)
        with torch.no_grad():
            for n in active:
                for module, mask in masks[n].items():
                    weight = oriented_weight(reference.get_submodule(module))
                    weight.copy_(weight * torch.where(mask, torch.tensor(1.0), torch.tensor(1.0 - strengths[n])))
        assert torch.equal(logits(model, tokens), logits(reference, tokens)), (step, op, name)
        with model.disable_adapter():
            assert torch.equal(logits(model, tokens), logits(factory(0), tokens))
    if merged:
        model.unmerge_adapter()
    plain = model.unload()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())


def test_gradients_reach_the_base_weight_through_the_mask(tokens):
    """Training the base under a mask: the layer leaves the weight alone and gives it the gradient of W * M."""
    masks = random_masks(tiny_llama(), 1)
    model = pp.add_mask_adapter(tiny_llama(), masks, "a")
    for param in model.parameters():
        param.requires_grad_(True)
    model.train()
    model(tokens).logits.square().mean().backward()
    layer = mask_layers(model)["model.layers.0.mlp.up_proj"]
    grad = layer.get_base_layer().weight.grad
    assert (
        grad is not None
        and bool((grad[~masks["model.layers.0.mlp.up_proj"]] == 0).all())
        and bool(grad.abs().sum() > 0)
    )
    assert torch.equal(layer.get_base_layer().weight, tiny_llama().get_submodule("model.layers.0.mlp.up_proj").weight)
    with torch.no_grad():  # back in inference, the weight holds W * M again
        assert torch.equal(model(tokens).logits, logits(masked_reference(tiny_llama, 0, [masks]), tokens))


def test_weight_mode_is_per_model(tokens):
    """``in_place`` is each model's own switch: a model computing ``W_eff`` apart leaves its weights as loaded, gives
    the same outputs, and its later adapters follow it, while another model keeps the default."""
    from peft_persona.tuner import set_weight_mode

    masks = random_masks(tiny_llama(), 1)
    default = pp.add_mask_adapter(tiny_llama(), masks, "p")
    apart = pp.add_mask_adapter(tiny_llama(), masks, "p")
    set_weight_mode(apart, in_place=False)
    pp.add_mask_adapter(apart, random_masks(tiny_llama(), 2), "q")
    assert torch.equal(logits(default, tokens), logits(apart, tokens))
    original = tiny_llama().state_dict()
    for name, layer in mask_layers(apart).items():
        assert not layer.in_place and layer.persona_dropped is None
        assert torch.equal(layer.get_base_layer().weight, original[f"{name}.weight"])
    assert all(layer.in_place and layer.persona_dropped is not None for layer in mask_layers(default).values())
    set_weight_mode(apart, in_place=True)
    assert torch.equal(logits(default, tokens), logits(apart, tokens))
    assert all(layer.persona_dropped is not None for layer in mask_layers(apart).values())
