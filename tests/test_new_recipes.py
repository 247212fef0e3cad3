"""Mask recipes beyond the paper, each against a brute-force oracle: z-ordered contrastive (sigmoid), the difference
recipe, channel-structured masks and layer bands; and the signed selection keys they rely on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama, tiny_tokenizer, word_texts
from peft_persona import PersonaExtractor, recipes
from peft_persona.options import ExtractionOptions
from peft_persona.selection import order_keys
from peft_persona.targets import band_layers, oriented_weight, parse_layers, select_targets
from test_extractor import brute_force_select


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=2, max_size=40))
def test_order_keys_order_like_the_floats_negative_ones_included(values):
    scores = torch.tensor(values, dtype=torch.float32)
    keys = order_keys(scores)
    for i in range(len(values)):
        for j in range(len(values)):
            assert (keys[i] < keys[j]) == (scores[i] < scores[j])
    non_negative = scores >= 0
    assert torch.equal(keys[non_negative], (scores[non_negative] + 0.0).view(torch.int32))  # unchanged bit patterns


@pytest.fixture(scope="module")
def setting():
    extractor = PersonaExtractor(tiny_llama(), tiny_tokenizer(), batch_size=4)
    stats = {"e": extractor.calibrate("e", word_texts(6, 10)), "i": extractor.calibrate("i", word_texts(7, 10))}
    weights = {n: oriented_weight(m).detach() for n, m in list(extractor.modules.items())[:4]}
    return extractor, stats, weights


def test_sigmoid_contrastive_is_ordered_by_z_everywhere(setting):
    extractor, stats, weights = setting
    masks = extractor.masks(stats, "contrastive", 0.2, phi="sigmoid", tau=0.5)
    for name, weight in weights.items():
        z = recipes.contrastive_z(stats["e"].layers[name], stats["i"].layers[name])
        k = weight.shape[1] - math.ceil(weight.shape[1] * 0.2)
        for persona, signed, own in (("e", z, stats["e"]), ("i", -z, stats["i"])):
            primary = weight.abs() * torch.sigmoid(signed / 0.5).float()
            secondary = weight.abs() * own.layers[name].feature_norm.float()
            assert torch.equal(masks[persona][name], brute_force_select(primary, k, secondary)), (persona, name)


def test_difference_prunes_what_the_other_side_needs_most(setting):
    extractor, stats, weights = setting
    masks = extractor.masks(stats, "difference", 0.3)
    for name, weight in weights.items():
        own, other = stats["e"].layers[name].feature_norm, stats["i"].layers[name].feature_norm
        k = weight.shape[1] - math.ceil(weight.shape[1] * 0.3)
        primary = weight.abs() * (own - other).float()
        assert (primary < 0).any()  # negative scores do occur, and rank below every positive one
        expected = brute_force_select(primary, k, weight.abs() * own.float())
        assert torch.equal(masks["e"][name], expected), name


def test_channel_structure_removes_whole_input_channels(setting):
    extractor, stats, weights = setting
    masks = extractor.masks(stats, "contrastive", 0.25, structure="channel")
    for name, weight in weights.items():
        mask = masks["e"][name]
        assert torch.equal(mask, mask[:1].expand_as(mask))  # every row keeps the same columns
        z = recipes.contrastive_z(stats["e"].layers[name], stats["i"].layers[name])
        column = (weight.abs() * z.clamp_min(0).float()).sum(0, keepdim=True)
        tiebreak = (weight.abs() * stats["e"].layers[name].feature_norm.float()).sum(0, keepdim=True)
        k = weight.shape[1] - math.ceil(weight.shape[1] * 0.25)
        assert torch.equal(mask[0], brute_force_select(column, k, tiebreak)[0]), name


def test_channel_structure_is_refused_where_it_has_no_channel_score_or_cannot_be_saved_as_stats(setting):
    extractor, stats, _ = setting
    with pytest.raises(ValueError, match="structure 'channel' needs a per-channel score"):
        ExtractionOptions("obs", 0.2, structure="channel")
    with pytest.raises(Exception, match="channel-structured masks need 'bits'"):
        extractor.extract(stats, "contrastive", 0.2, structure="channel", save_format="stats")
    with pytest.raises(ValueError, match="difference extraction needs at least two personas"):
        extractor.extract({"e": stats["e"]}, "difference", 0.2)


def test_layer_bands_split_the_blocks_in_thirds():
    assert [band_layers(b, 30) for b in ("early", "middle", "late")] == [
        list(range(0, 10)),
        list(range(10, 20)),
        list(range(20, 30)),
    ]
    assert [band_layers(b, 2) for b in ("early", "middle", "late")] == [[0], [1], [1]]  # never empty
    assert parse_layers("middle", 9) == [3, 4, 5] and parse_layers("middle") is None
    model = tiny_llama()
    assert {n.split(".")[2] for n in select_targets(model, "mlp", "late")} == {"1"}
    peft_model = PersonaExtractor(model, tiny_tokenizer(), target="mlp", layers="late").extract(
        {"late-band": word_texts(1, 4)}, "wanda", 0.2
    )
    assert peft_model.peft_config["late-band"].calibration["targets"] == {"target": "mlp", "layers": "late"}
    assert {n.split(".")[2] for n in peft_model.peft_config["late-band"].target_modules} == {"1"}
