"""The numba kernels (:mod:`peft_persona.fast_select`) against eager PyTorch: the same masks, bit for bit, for the
scores extraction selects on (NaN, infinities, signed zeros, bf16 ties included), on one thread and on several; the
tie sets every path of the kernel settles (a few kept, a few dropped, many of each); and the switches that choose
between them. ``tests/test_selection.py`` checks both against a sort-based oracle."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from peft_persona import fast_select, selection


def both_paths(function, *args):
    """``function(*args)`` on the kernels, then in eager PyTorch."""
    kernel = function(*args)
    with fast_select.eager():
        return kernel, function(*args)


def test_the_kernels_are_installed_and_on():
    """The test extra installs numba, so that CI runs the kernels (without it, this module fails, never skips)."""
    assert fast_select.numba is not None and fast_select.enabled()


@st.composite
def channel_cases(draw):
    """A weight, a channel vector, a tie-break vector (any ``float32``: NaN, infinities, signed zeros, or small
    integers for ties) and ``k``."""
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 40))
    values = st.floats(width=32) | st.sampled_from([0.0, -0.0, 1.0, 2.0])
    weight, channel, tiebreak = (
        draw(arrays(np.float32, shape, elements=values)) for shape in [(rows, cols), cols, cols]
    )
    return torch.from_numpy(weight), torch.from_numpy(channel), torch.from_numpy(tiebreak), draw(st.integers(1, cols))


@settings(max_examples=200, deadline=None)
@given(channel_cases(), st.booleans())
def test_select_by_channels_matches_eager_on_any_floats(case, with_tiebreak):
    weight, channel, tiebreak, k = case
    kernel, eager = both_paths(selection.select_by_channels, weight, k, channel, tiebreak if with_tiebreak else None)
    assert torch.equal(kernel, eager)
    assert kernel.sum(1).eq(k).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_matrices_match_eager_on_every_thread_count(threads, dtype):
    """300 rows (two blocks on two threads), bf16 weights (many equal scores), at the usual sparsities."""
    generator = torch.Generator().manual_seed(threads)
    weight = torch.randn(300, 577, generator=generator).to(dtype)
    channel, tiebreak = torch.rand(577, generator=generator), torch.rand(577, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (1, 57, 288, 520, 576):
            kernel, eager = both_paths(selection.select_by_channels, weight, k, channel)
            assert torch.equal(kernel, eager), k
            kernel, eager = both_paths(selection.select_by_channels, weight, k, channel.sub(0.5).clamp_min(0), tiebreak)
            assert torch.equal(kernel, eager), k
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows_alike", [True, False])
@pytest.mark.parametrize("extra", [5, 150, 290])
def test_contrastive_tie_sets_of_every_size(extra, rows_alike):
    """A contrastive primary score is zero on the channels with ``z <= 0`` (296 of 576 here), so each row's cut
    falls among them and the Wanda score picks ``extra`` of them: a few kept (5), a few dropped (290 of 296, six
    dropped), and many of each (150): the kernel's three ways of settling a tie set. Rows scaled by 1e-3 or 1e3 at
    random make the floor a row carries to the next miss as often as it holds."""
    generator = torch.Generator().manual_seed(extra)
    weight = torch.randn(128, 576, generator=generator)
    if not rows_alike:
        weight *= 1e3 ** torch.randint(-1, 2, (128, 1), generator=generator)
    z = torch.rand(576, generator=generator) + 0.1
    z[torch.randperm(576, generator=generator)[:296]] = -1.0
    positive, wanda = z.clamp_min(0), torch.rand(576, generator=generator)
    assert int((positive > 0).sum()) == 280
    k = 280 + extra
    kernel, eager = both_paths(selection.select_by_channels, weight, k, positive, wanda)
    assert torch.equal(kernel, eager)
    assert kernel[:, positive > 0].all()  # every positive channel is kept before any tie
    primary, secondary = selection.channel_scores(weight, positive), selection.channel_scores(weight, wanda)
    kernel, eager = both_paths(selection.select_lexicographic, primary, secondary, k)
    assert torch.equal(kernel, eager)
    keys = selection.order_keys(primary)
    kernel, eager = both_paths(selection.select_top_per_row, keys, k)
    assert torch.equal(kernel, eager)
    assert kernel[:, positive == 0].sum(1).eq(extra).all()
    # without a secondary key the lowest tied columns win
    tied_columns = (positive == 0).nonzero().squeeze(1)
    assert kernel[:, tied_columns[:extra]].all() and not kernel[:, tied_columns[extra:]].any()


def test_selection_dispatches_to_the_kernels_on_cpu_only(monkeypatch):
    calls = []
    real = fast_select.top_by_channels
    monkeypatch.setattr(fast_select, "top_by_channels", lambda *a: calls.append(a) or real(*a))
    weight, channel = torch.randn(4, 8), torch.rand(8)
    selection.select_by_channels(weight, 3, channel)
    assert len(calls) == 1
    with fast_select.eager():
        selection.select_by_channels(weight, 3, channel)
    assert len(calls) == 1
    assert fast_select.applies(weight) and not fast_select.applies(weight, torch.empty(2, device="meta"))


@pytest.mark.parametrize("before", [None, "1"])
def test_eager_sets_and_restores_the_switch(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(fast_select.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(fast_select.ENV_SWITCH, before)
    with fast_select.eager():
        assert not fast_select.enabled() and os.environ[fast_select.ENV_SWITCH] == "0"
    assert os.environ.get(fast_select.ENV_SWITCH) == before and fast_select.enabled()
    monkeypatch.setenv(fast_select.ENV_SWITCH, "0")
    assert not fast_select.enabled()


def test_every_nan_is_one_key_above_every_number():
    """Which NaN ``NaN * NaN`` returns depends on the operands' order, which differs between torch's vectorised
    multiply and the kernel's; both paths therefore key every NaN as the same positive NaN."""
    bits = torch.tensor([0x7FC00000, 0x7FC00001, -0x00400000, -1, 0x7F800000, -0x00800000], dtype=torch.int32)
    nan_pos, nan_payload, nan_neg, nan_neg_payload, inf, neg_inf = bits.view(torch.float32)
    keys = selection.order_keys(torch.stack([nan_pos, nan_payload, nan_neg, nan_neg_payload, inf, neg_inf]))
    assert keys[:4].eq(keys[0]).all() and keys[0] > keys[4] > keys[5]
    weight = torch.stack([nan_neg, nan_pos]).view(1, 2)
    for channel in (torch.stack([nan_neg, torch.tensor(0.0)]), torch.stack([nan_payload, nan_neg])):
        kernel, eager = both_paths(selection.select_by_channels, weight, 1, channel)
        assert torch.equal(kernel, eager) and kernel.tolist() == [[True, False]]  # equal NaN keys: lower column


def test_without_numba_selection_runs_eager(monkeypatch):
    """What a plain install (no ``fast`` extra) does: the switch reads off, and selection gives the same masks."""
    weight, channel = torch.randn(70, 33), torch.rand(33)
    with_kernels = selection.select_by_channels(weight, 9, channel)
    monkeypatch.setattr(fast_select, "numba", None)
    monkeypatch.setattr(fast_select, "top_by_channels", None)  # any call would fail
    assert not fast_select.enabled() and not fast_select.applies(weight)
    assert torch.equal(selection.select_by_channels(weight, 9, channel), with_kernels)
