"""The fused masking kernel (:mod:`peft_persona.fast_mask`) against PyTorch, bit for bit, and the engine's
``keep_original`` switch that uses it: the same weights with and without the kernels, and no per-adapter record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import peft_persona as pp
from conftest import random_masks, tiny_gpt2, tiny_llama
from peft_persona import fast_mask, fast_select
from peft_persona.bits import pack_mask
from peft_persona.targets import decoder_linear_modules, oriented_weight
from peft_persona.tuner import MaskedLinear, set_weight_mode

UNSIGNED = {torch.float32: (np.uint32, torch.uint32), torch.bfloat16: (np.uint16, torch.uint16)}
UNSIGNED[torch.float16] = UNSIGNED[torch.bfloat16]


@st.composite
def masked_cases(draw):
    """Any bit pattern of a 16- or 32-bit float weight (NaN payloads, infinities, signed zeros) and a mask."""
    dtype = draw(st.sampled_from(list(UNSIGNED)))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 41))
    numpy_type, torch_type = UNSIGNED[dtype]
    raw = draw(arrays(numpy_type, (rows, cols)))
    keep = draw(arrays(np.bool_, (rows, cols)))
    return torch.from_numpy(raw).view(dtype), torch.from_numpy(keep), torch_type


def exact(tensor: torch.Tensor, unsigned: torch.dtype) -> torch.Tensor:
    return tensor.view(unsigned)  # compares bit patterns: NaN payloads and -0.0 included


@settings(max_examples=300, deadline=None)
@given(masked_cases())
def test_copy_masked_keeps_every_bit_pattern_and_writes_plus_zero_elsewhere(case):
    source, keep, unsigned = case
    out = torch.full_like(source, 7.0)
    assert fast_mask.copy_masked(source, pack_mask(keep), out) is out
    expected = torch.where(keep, source, torch.zeros((), dtype=source.dtype))
    assert torch.equal(exact(out, unsigned), exact(expected, unsigned))


def test_copy_masked_names_the_shapes_that_do_not_fit():
    weight = torch.zeros(4, 12)
    with pytest.raises(ValueError, match=r"packed mask \(4, 1\) torch.uint8 does not fit a weight of shape \(4, 12\)"):
        fast_mask.copy_masked(weight, torch.zeros(4, 1, dtype=torch.uint8), torch.empty(4, 12))
    with pytest.raises(ValueError, match=r"source \(4, 12\) torch.float32 and out \(4, 12\) torch.bfloat16 differ"):
        fast_mask.copy_masked(weight, torch.zeros(4, 2, dtype=torch.uint8), torch.empty(4, 12, dtype=torch.bfloat16))


def test_copy_masked_names_an_unsupported_dtype_and_a_missing_numba(monkeypatch):
    packed = torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight dtype torch.float64 is not float32, bfloat16 or float16"):
        fast_mask.copy_masked(torch.zeros(4, 12, dtype=torch.float64), packed, torch.zeros(4, 12, dtype=torch.float64))
    monkeypatch.setattr(fast_select, "numba", None)  # without it the kernels would be Python loops over rows
    with pytest.raises(RuntimeError, match="needs numba"):
        fast_mask.copy_masked(torch.zeros(4, 12), packed, torch.zeros(4, 12))


def test_supports_only_contiguous_cpu_floats_of_16_or_32_bits_with_the_kernels_on(monkeypatch):
    packed = torch.zeros(4, 2, dtype=torch.uint8)
    assert fast_mask.supports(torch.zeros(4, 12), packed)
    assert fast_mask.supports(torch.zeros(4, 12, dtype=torch.bfloat16), packed)
    assert not fast_mask.supports(torch.zeros(4, 12, dtype=torch.float64), packed)
    assert not fast_mask.supports(torch.zeros(12, 4).T, packed)
    assert not fast_mask.supports(torch.zeros(4, 12, device="meta"), packed)
    with fast_select.eager():
        assert not fast_mask.supports(torch.zeros(4, 12), packed)
    monkeypatch.setattr(fast_select, "numba", None)  # no fast extra: the engine keeps its PyTorch path
    assert not fast_mask.supports(torch.zeros(4, 12), packed)


def switched_weights(model, order) -> list[dict[str, torch.Tensor]]:
    """The targeted weights after each ``set_adapter`` of ``order`` (and a forward, which writes them)."""
    held = []
    for names in order:
        model.base_model.set_adapter(names)  # PeftModel.set_adapter takes one name
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        held.append({n: oriented_weight(m).detach().clone() for n, m in decoder_linear_modules(model).items()})
    return held


@pytest.mark.parametrize(
    ("factory", "dtype"), [(tiny_llama, torch.float32), (tiny_llama, torch.bfloat16), (tiny_gpt2, torch.float32)]
)
def test_keep_original_switches_hold_the_same_weights_with_and_without_the_kernels(factory, dtype):
    """Single adapters, two at once, and back, at full strength, as the eager path writes them; no dropped-entry
    record is kept where the kernel ran (the Llama's layers: turning ``keep_original`` on drops the records made
    before; GPT-2's ``Conv1D`` weights are transposed and keep the index path)."""
    order = ["a", "b", ["a", "b"], "a", "b"]

    def run():
        model = pp.add_mask_adapter(factory().to(dtype), random_masks(factory(), 1), "a")
        pp.add_mask_adapter(model, random_masks(factory(), 2), "b")
        set_weight_mode(model, keep_original=True)
        return model, switched_weights(model, order)

    model, kernel = run()
    with fast_select.eager():
        _, eager = run()
    assert all(torch.equal(k[n], e[n]) for k, e in zip(kernel, eager, strict=True) for n in k)
    recorded = [set(layer._dropped_cache) for layer in model.modules() if isinstance(layer, MaskedLinear)]
    assert recorded and all(names == (set() if factory is tiny_llama else {"a", "b"}) for names in recorded)
    # and the weights are the products: W * (M_a & M_b) for both adapters at once
    base = factory().to(dtype)
    a, b = random_masks(factory(), 1), random_masks(factory(), 2)
    both = {n: oriented_weight(m).detach() * (a[n] & b[n]) for n, m in decoder_linear_modules(base).items()}
    assert all(torch.equal(kernel[2][n], both[n]) for n in both)
