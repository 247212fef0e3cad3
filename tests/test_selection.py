"""The per-row selection against a sort-based oracle: random matrices with many ties, negative scores, infinities,
``int32`` extremes, odd shapes, transposed layouts and ``k`` from 0 to past the row length. The selection finds its
cut by histograms of the key bits (several passes, then only the unresolved rows), so these cases reach every path:
one-key buckets (ties), buckets that start exactly at the cut, the row's smallest key as the cut, and the
``torch.kthvalue`` fallback for rows whose keys span more than ``NARROW``. Every test runs twice: on the numba kernels
(:mod:`peft_persona.fast_select`) and in eager PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from peft_persona import fast_select
from peft_persona.selection import order_keys, select_lexicographic, select_top_per_row, select_topk_reference

INT32 = np.iinfo(np.int32)
# the monkeypatched environment variable is the same for every example of a test
ONE_PATH = HealthCheck.function_scoped_fixture


@pytest.fixture(autouse=True, params=["kernels", "eager"])
def selection_path(request, monkeypatch):
    """Run the test on the numba kernels (installed with the test extra: missing numba fails here) and in eager
    PyTorch."""
    monkeypatch.setenv(fast_select.ENV_SWITCH, "1" if request.param == "kernels" else "0")
    assert fast_select.enabled() == (request.param == "kernels"), "numba is part of the test extra"
    return request.param


def sorted_top(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle: a stable descending sort per row keeps the lower column first among equal keys."""
    mask = torch.zeros(keys.shape, dtype=torch.bool)
    order = torch.sort(keys.long(), dim=1, descending=True, stable=True).indices
    return mask.scatter_(1, order[:, : max(0, min(k, keys.shape[1]))], True)


def sorted_lexicographic(first: torch.Tensor, second: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle: stable sorts by the secondary key, then by the primary key (both descending)."""
    by_second = torch.sort(second.long(), dim=1, descending=True, stable=True).indices
    by_first = torch.sort(first.gather(1, by_second).long(), dim=1, descending=True, stable=True).indices
    order = by_second.gather(1, by_first)
    return torch.zeros(first.shape, dtype=torch.bool).scatter_(1, order[:, : max(0, min(k, first.shape[1]))], True)


def small_integers(shape):  # heavy ties, zeros, negative scores
    return arrays(np.float32, shape, elements=st.integers(-3, 3).map(float))


def any_floats(shape):  # negative zero, subnormals, infinities; no NaN (the oracle compares keys of numbers)
    return arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False))


def near_int32_extremes(shape):  # keys in narrow windows at both ends of int32, and spans wider than 2**31
    window = st.sampled_from([INT32.min, INT32.max - 40, -(2**30), 0])
    return window.flatmap(lambda low: arrays(np.int64, shape, elements=st.integers(low, low + 40))) | arrays(
        np.int64, shape, elements=st.sampled_from([INT32.min, INT32.min + 1, -1, 0, 1, INT32.max - 1, INT32.max])
    )


@st.composite
def matrices(draw, kinds):
    shape = (draw(st.integers(0, 7)), draw(st.integers(1, 48)))
    values = draw(draw(st.sampled_from(kinds))(shape))
    tensor = torch.from_numpy(values.astype(np.int32) if values.dtype == np.int64 else values)
    if draw(st.booleans()):  # the layout of a transposed weight
        tensor = tensor.t().contiguous().t()
    return tensor, draw(st.integers(-1, shape[1] + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[ONE_PATH])
@given(matrices([small_integers, any_floats]))
def test_select_top_per_row_equals_a_stable_sort(case):
    scores, k = case
    keys = order_keys(scores)
    assert torch.equal(select_top_per_row(keys, k), sorted_top(keys, k))


@settings(max_examples=200, deadline=None, suppress_health_check=[ONE_PATH])
@given(matrices([near_int32_extremes]))
def test_select_top_per_row_on_int32_extremes(case):
    keys, k = case
    assert torch.equal(select_top_per_row(keys, k), sorted_top(keys, k))


@settings(max_examples=200, deadline=None, suppress_health_check=[ONE_PATH])
@given(matrices([small_integers, any_floats]), st.data())
def test_select_lexicographic_equals_a_stable_sort(case, data):
    primary, k = case
    secondary = data.draw(data.draw(st.sampled_from([small_integers, any_floats]))(tuple(primary.shape)))
    secondary = torch.from_numpy(secondary)
    expected = sorted_lexicographic(order_keys(primary), order_keys(secondary), k)
    assert torch.equal(select_lexicographic(primary, secondary, k), expected)


def test_larger_rows_take_several_passes_and_still_match():
    """Rows of hundreds to thousands of keys: continuous scores, bf16-rounded ones (ties everywhere), mostly zero
    rows (the cut is the smallest key), huge and tiny magnitudes mixed, at the usual sparsities."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols in [(33, 577), (9, 4096), (130, 300)]:
        weight = torch.randn(rows, cols, generator=generator)
        channel = torch.rand(cols, generator=generator)
        cases = {
            "continuous": weight.abs() * channel,
            "bf16 ties": (weight.abs() * channel).bfloat16().float(),
            "mostly zero": weight.abs() * torch.randn(cols, generator=generator).sub(0.5).clamp_min(0),
            "wide magnitudes": weight.abs() * torch.randn(cols, generator=generator).mul(20).exp(),
            "signed": weight * channel,
        }
        for name, scores in cases.items():
            keys = order_keys(scores)
            for k in (1, cols // 10, cols // 2, cols - cols // 20, cols - 1):
                assert torch.equal(select_top_per_row(keys, k), sorted_top(keys, k)), (name, rows, cols, k)
                tie_break = (weight.abs() * channel.flip(0)).bfloat16().float()
                expected = sorted_lexicographic(keys, order_keys(tie_break), k)
                assert torch.equal(select_lexicographic(scores, tie_break, k), expected), (name, rows, cols, k)
            if name == "continuous":  # no ties: the same set as torch.topk
                assert torch.equal(select_top_per_row(keys, cols // 2), select_topk_reference(scores, cols // 2))
