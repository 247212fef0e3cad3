"""PersonaExtractor: statistics, the scoring formulas, exact row selection, contrastive pairs and errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from peft import PeftModel

import peft_persona as pp
from conftest import logits, tiny_gpt2, tiny_llama, tiny_tokenizer, word_texts
from peft_persona import recipes, selection
from peft_persona.activation_stats import LayerStats, PersonaStats
from peft_persona.cli import main as cli_main
from peft_persona.extractor import PersonaExtractor, shared_kept_fraction
from peft_persona.fingerprint import base_model_fingerprint
from peft_persona.targets import oriented_weight


# ------------------------------------------------------------------------------------------------ naive references
def naive_inputs(model, tokenizer, texts, max_length=256):
    """Per text, unbatched and unpadded, the input of every targeted layer: {layer: [tensor (T, d), ...]}."""
    extractor = PersonaExtractor(model, tokenizer, max_length=max_length)
    captured = {name: [] for name in extractor.modules}
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: captured[name].append(args[0][0].double()))
        for name, module in extractor.modules.items()
    ]
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            model(ids)
    for handle in handles:
        handle.remove()
    return captured


def naive_stats(per_text):
    per_seq_sumsq = torch.stack([x.square().sum(0) for x in per_text])
    per_seq_rms = torch.stack([x.square().mean(0).sqrt() for x in per_text])
    return {
        "sum_sq": per_seq_sumsq.sum(0),
        "seq_mean": per_seq_rms.mean(0),
        "seq_var": per_seq_rms.var(0, unbiased=False),
        "reference_norm": per_seq_sumsq.sqrt().mean(0),
    }


def brute_force_select(primary, k, secondary=None):
    """Per row in Python: sort by (-primary, -secondary, column) and keep the first k."""
    rows, cols = primary.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):

        def key(j, i=i):
            return -float(primary[i, j]), -float(secondary[i, j]) if secondary is not None else 0.0, j

        for j in sorted(range(cols), key=key)[:k]:
            mask[i, j] = True
    return mask


@pytest.fixture
def extractor():
    return PersonaExtractor(tiny_llama(), tiny_tokenizer(), batch_size=4)


# ------------------------------------------------------------------------------------------------ statistics
def test_statistics_match_naive_per_token_loop_with_padded_batches():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = word_texts(0, 11)
    stats = PersonaExtractor(model, tokenizer, batch_size=4).calibrate("p", texts)
    captured = naive_inputs(model, tokenizer, texts)
    for layer, per_text in captured.items():
        expected = naive_stats(per_text)
        got = stats.layers[layer]
        # batched float32 activations differ from unbatched ones by rounding only
        torch.testing.assert_close(got.sum_sq, expected["sum_sq"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.seq_mean, expected["seq_mean"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.seq_var, expected["seq_var"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.reference_norm, expected["reference_norm"], rtol=1e-5, atol=1e-9)
        assert got.n_seqs == 11 and got.n_tokens == sum(x.shape[0] for x in per_text)


def test_batched_and_unbatched_statistics_agree():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = word_texts(1, 9)
    one = PersonaExtractor(model, tokenizer, batch_size=1).calibrate("p", texts)
    many = PersonaExtractor(model, tokenizer, batch_size=5).calibrate("p", texts)
    for layer in one.layers:
        for stat in ("sum_sq", "rms_sum", "rms_sq_sum", "l2_sum"):
            torch.testing.assert_close(
                getattr(one.layers[layer], stat), getattr(many.layers[layer], stat), rtol=1e-6, atol=1e-9
            )


def test_truncation_at_max_length():
    stats = PersonaExtractor(tiny_llama(), tiny_tokenizer(), max_length=4).calibrate("p", word_texts(2, 6, min_len=8))
    assert stats.meta["n_tokens"] == 6 * 4 and stats.meta["max_length"] == 4


def test_chat_messages_are_rendered_with_the_template(extractor):
    messages = [[{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12"}]]
    stats = extractor.calibrate("p", messages)
    assert stats.meta["n_tokens"] == len(["user", ":", "w10", "w11", "w2", "assistant", ":", "w12", "w2"])


def test_stats_save_load_roundtrip_gives_same_masks(extractor, tmp_path):
    stats = {"a": extractor.calibrate("a", word_texts(3, 6)), "b": extractor.calibrate("b", word_texts(4, 6))}
    for name, s in stats.items():
        s.save(tmp_path / f"{name}.safetensors")
    loaded = {name: PersonaStats.load(tmp_path / f"{name}.safetensors") for name in stats}
    assert loaded["a"].meta == stats["a"].meta
    for method in ("wanda", "contrastive"):
        before = extractor.masks(stats, method, 0.5)
        after = extractor.masks(loaded, method, 0.5)
        assert all(torch.equal(before[p][n], after[p][n]) for p in before for n in before[p])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        PersonaStats.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------ selection
def test_selection_breaks_ties_by_lower_column():
    scores = torch.tensor([[1.0, 2, 2, 2, 0], [0, 0, 0, 0, 0], [3, 1, 1, 2, 2], [-0.0, 0.0, 1, 0, 0]])
    got = selection.select_top_per_row(selection.order_keys(scores), 2)
    assert got.tolist() == [
        [False, True, True, False, False],
        [True, True, False, False, False],
        [True, False, False, True, False],
        [True, False, True, False, False],
    ]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_selection_equals_brute_force_with_many_ties(sparsity):
    generator = torch.Generator().manual_seed(0)
    primary = torch.randint(0, 4, (13, 17), generator=generator).float()  # heavy ties
    secondary = torch.randint(0, 3, (13, 17), generator=generator).float()
    k = selection.kept_per_row(17, sparsity)
    assert torch.equal(selection.select_top_per_row(selection.order_keys(primary), k), brute_force_select(primary, k))
    expected = brute_force_select(primary, k, secondary)
    assert torch.equal(selection.select_lexicographic(primary, secondary, k), expected)


def test_kept_per_row_and_sparsity_range():
    assert selection.kept_per_row(10, 0.55) == 4 and selection.kept_per_row(7, 0.0) == 7
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            selection.kept_per_row(10, bad)


def _weights(extractor):
    return {name: oriented_weight(module).detach() for name, module in extractor.modules.items()}


def test_wanda_masks_equal_brute_force_formula(extractor):
    stats = {"p": extractor.calibrate("p", word_texts(5, 8))}
    masks = extractor.masks(stats, "wanda", 0.5)["p"]
    for name, weight in _weights(extractor).items():
        norm = stats["p"].layers[name].sum_sq.sqrt().float()
        expected = brute_force_select(weight.abs() * norm, math.floor(weight.shape[1] * 0.5))
        assert torch.equal(masks[name], expected), name


def test_contrastive_masks_equal_brute_force_formula_with_wanda_tie_break(extractor):
    stats = {"e": extractor.calibrate("e", word_texts(6, 10)), "i": extractor.calibrate("i", word_texts(7, 10))}
    masks = extractor.masks(stats, "contrastive", 0.6)
    for name, weight in list(_weights(extractor).items())[:4]:
        plus, minus = stats["e"].layers[name], stats["i"].layers[name]
        z = (plus.seq_mean - minus.seq_mean) / (plus.seq_var + minus.seq_var + 1e-6).sqrt()
        k = math.floor(weight.shape[1] * 0.4)
        for persona, signed, own in (("e", z, plus), ("i", -z, minus)):
            primary = weight.abs() * signed.clamp_min(0).float()
            secondary = weight.abs() * own.sum_sq.sqrt().float()
            assert torch.equal(masks[persona][name], brute_force_select(primary, k, secondary)), (persona, name)
    assert not torch.equal(masks["e"][name], masks["i"][name])


def test_contrastive_softplus_and_one_vs_rest(extractor):
    stats = {p: extractor.calibrate(p, word_texts(10 + i, 6)) for i, p in enumerate("abcd")}
    masks = extractor.masks(stats, "contrastive", 0.5, phi="softplus", tau=0.5)
    name, weight = next(iter(_weights(extractor).items()))
    rest = LayerStats.pooled(stats[p].layers[name] for p in "bcd")
    assert rest.n_seqs == 18  # the union of the other three calibration sets
    z = recipes.contrastive_z(stats["a"].layers[name], rest)
    primary = weight.abs() * torch.nn.functional.softplus(z / 0.5).float()
    secondary = weight.abs() * stats["a"].layers[name].feature_norm.float()
    assert torch.equal(masks["a"][name], brute_force_select(primary, weight.shape[1] // 2, secondary))
    assert len({tuple(masks[p][name].flatten().tolist()) for p in "abcd"}) == 4


def test_obs_masks_equal_formula():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = word_texts(8, 7)
    captured = naive_inputs(model, tokenizer, texts)
    extractor = PersonaExtractor(model, tokenizer, batch_size=3)
    peft_model = extractor.extract({"p": texts}, method="obs", sparsity=0.5)
    got = pp.get_masks(peft_model, "p")
    for name, per_text in list(captured.items())[:3]:
        x = torch.cat(per_text)
        hessian = 2 * x.T @ x
        hessian += 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
        diag = torch.linalg.inv(hessian).diagonal()
        weight = oriented_weight(extractor.modules[name]).detach()
        primary = weight.float().square() / diag.float()
        expected = brute_force_select(primary, weight.shape[1] // 2)
        agreement = (got[name] == expected).float().mean()
        assert agreement > 0.999, (name, agreement)  # float rounding of the inverse may swap a near-tie


def test_magnitude_and_random_controls(extractor):
    peft_model = extractor.extract({"mag": None}, method="magnitude", sparsity=0.25)
    extractor.extract({"r1": None}, method="random", sparsity=0.25, seed=1)
    extractor.extract({"r1b": None}, method="random", sparsity=0.25, seed=1)
    extractor.extract({"r2": None}, method="random", sparsity=0.25, seed=2)
    mag, r1, r1b, r2 = (pp.get_masks(peft_model, n) for n in ("mag", "r1", "r1b", "r2"))
    for name, weight in _weights(extractor).items():
        assert torch.equal(mag[name], brute_force_select(weight.abs(), math.floor(weight.shape[1] * 0.75)))
        assert (r1[name].sum(1) == math.floor(weight.shape[1] * 0.75)).all()
        assert torch.equal(r1[name], r1b[name])
    assert not all(torch.equal(r1[n], r2[n]) for n in r1)


def test_reference_mode_uses_paper_statistics(extractor):
    stats = {"p": extractor.calibrate("p", word_texts(9, 8))}
    masks = extractor.masks(stats, "wanda", 0.5, reference=True)["p"]
    name, weight = next(iter(_weights(extractor).items()))
    scores = weight.abs() * stats["p"].layers[name].reference_norm.float()
    expected = torch.zeros_like(masks[name]).scatter_(1, torch.topk(scores, weight.shape[1] // 2, dim=1).indices, True)
    assert torch.equal(masks[name], expected)
    assert not torch.equal(masks[name], extractor.masks(stats, "wanda", 0.5)["p"][name])


# ------------------------------------------------------------------------------------------------ adapters
def test_extract_returns_adapters_with_provenance_and_summary(tokens):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    extractor = PersonaExtractor(model, tokenizer, batch_size=4)
    peft_model = extractor.extract(
        {"extro": word_texts(20, 8), "intro": word_texts(21, 8)}, method="contrastive", sparsity=0.5
    )
    config = peft_model.peft_config["intro"]
    assert (config.persona, config.opposite_persona, config.method, config.sparsity) == (
        "intro",
        "extro",
        "contrastive",
        0.5,
    )
    assert config.calibration["n_texts"] == 8 and config.calibration["phi"] == "relu"
    assert config.base_model_fingerprint == base_model_fingerprint(tiny_llama())
    summary = extractor.summary
    assert summary.kept_fraction == 0.5 and 0 <= summary.overlap < 1
    assert summary.overlap == shared_kept_fraction(pp.get_masks(peft_model, "extro"), pp.get_masks(peft_model, "intro"))
    assert "overlap" in str(summary)
    peft_model.set_adapter("intro")
    masked = logits(peft_model, tokens)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, tokens), logits(tiny_llama(), tokens))
    # calibrating again through the PeftModel measures the base model, not the masked one
    again = PersonaExtractor(peft_model, tokenizer, batch_size=4).calibrate("extro", word_texts(20, 8))
    first = extractor.calibrate("extro", word_texts(20, 8))
    name = next(iter(first.layers))
    torch.testing.assert_close(again.layers[name].sum_sq, first.layers[name].sum_sq)
    assert not torch.equal(masked, logits(tiny_llama(), tokens))


def test_extract_works_on_gpt2_conv1d():
    extractor = PersonaExtractor(tiny_gpt2(), tiny_tokenizer(), batch_size=4)
    peft_model = extractor.extract({"a": word_texts(30, 5), "b": word_texts(31, 5)}, method="contrastive", sparsity=0.5)
    masks = pp.get_masks(peft_model, "a")
    assert masks["transformer.h.0.attn.c_attn"].shape == (192, 64)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_errors(extractor):
    with pytest.raises(ValueError, match="'p': the calibration set is empty"):
        extractor.calibrate("p", [])
    with pytest.raises(ValueError, match="all 2 calibration texts are empty"):
        extractor.calibrate("p", ["", "  "])
    with pytest.raises(ValueError, match="sparsity"):
        extractor.extract({"p": word_texts(1, 3)}, method="wanda", sparsity=1.0)
    with pytest.raises(ValueError, match="at least two personas"):
        extractor.extract({"p": word_texts(1, 3)}, method="contrastive")
    with pytest.raises(ValueError, match="unknown method"):
        extractor.extract({"p": word_texts(1, 3)}, method="sparsegpt")
    assert extractor.peft_model is None  # nothing was created


def test_tokenizer_without_pad_token_gets_eos_with_warning():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        PersonaExtractor(tiny_llama(), tokenizer)
    assert tokenizer.pad_token == "w2"


def test_non_finite_activations_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="model.layers.1.mlp.down_proj"):
        PersonaExtractor(model, tiny_tokenizer()).calibrate("p", word_texts(1, 3))


def test_cli_extract_on_local_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    for name, seed in (("e", 1), ("i", 2)):
        (tmp_path / f"{name}.csv").write_text(
            "question,matching,not_matching\n" + "".join(f"{t},{t} w7,w8\n" for t in word_texts(seed, 6))
        )
    code = cli_main(
        [
            "extract",
            "--model",
            str(model_dir),
            "--persona",
            f"extro={tmp_path / 'e.csv'}",
            "--persona",
            f"intro={tmp_path / 'i.csv'}",
            "--method",
            "contrastive",
            "--sparsity",
            "0.5",
            "--strength",
            "0.75",
            "--out",
            str(tmp_path / "out"),
            "--save-stats",
        ]
    )
    assert code == 0
    assert "overlap" in capsys.readouterr().out
    for name in ("extro", "intro"):
        assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
        assert PersonaStats.load(tmp_path / "out" / f"{name}.stats.safetensors").meta["n_texts"] == 6
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / "intro")
    assert all(m.sum(1).eq(m.shape[1] // 2).all() for m in pp.get_masks(reloaded, "default").values())
    assert reloaded.peft_config["default"].strength == 0.75
    assert cli_main(["extract", "--model", str(model_dir), "--persona", "broken", "--out", str(tmp_path / "x")]) == 2
    assert (
        cli_main(
            [
                "extract",
                "--model",
                str(model_dir),
                "--persona",
                f"extro={tmp_path / 'e.csv'}",
                "--strength",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()


def test_datasets_column_and_source_strings(extractor, tmp_path):
    from datasets import Dataset

    texts = word_texts(40, 5)
    from_dataset = extractor.calibrate("p", (Dataset.from_dict({"text": texts}), "text"))
    from_list = extractor.calibrate("p", texts)
    name = next(iter(from_list.layers))
    torch.testing.assert_close(from_dataset.layers[name].sum_sq, from_list.layers[name].sum_sq)
    assert from_dataset.meta["source"] == "datasets.Dataset column 'text'"
    with pytest.raises(KeyError, match="no column 'missing'"):
        extractor.calibrate("p", (Dataset.from_dict({"text": texts}), "missing"))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"statement": "{t}", "answer_matching_behavior": " Yes"}}\n' for t in texts))
    from_file = extractor.calibrate("p", str(path))
    assert from_file.meta["source"] == str(path) and from_file.meta["n_texts"] == 5


def test_target_presets_and_layer_ranges(tmp_path):
    from peft_persona.targets import parse_layers, select_targets

    model = tiny_llama()
    mlp = select_targets(model, "mlp")
    attention = select_targets(model, "attention", "1")
    assert mlp == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    assert attention == [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert len(select_targets(model)) == 14
    assert select_targets(tiny_gpt2(), "mlp", [0]) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert parse_layers("0,2,5-7") == [0, 2, 5, 6, 7] and parse_layers(None) is None
    for bad, message in (("7-3", "backwards"), ("a-b", "not an index"), ("5", r"layers \[5\] do not exist")):
        with pytest.raises(ValueError, match=message):
            select_targets(model, "all", bad)
    with pytest.raises(ValueError, match="unknown"):
        select_targets(model, "heads")

    extractor = PersonaExtractor(model, tiny_tokenizer(), target="mlp", layers="1")
    peft_model = extractor.extract({"a": word_texts(1, 4), "b": word_texts(2, 4)}, method="contrastive", sparsity=0.5)
    assert sorted(pp.get_masks(peft_model, "a")) == sorted(mlp[3:])
    assert peft_model.peft_config["a"].calibration["targets"] == {"target": "mlp", "layers": [1]}
    from peft_persona.card import build_model_card
    from peft_persona.hub import stage_adapters

    card = str(build_model_card("user/pair", stage_adapters(peft_model, tmp_path / "staged")))
    assert "targets" in card and "mlp" in card
    with pytest.raises(ValueError, match="either target_modules or target/layers"):
        PersonaExtractor(tiny_llama(), tiny_tokenizer(), target_modules=mlp, target="mlp")


def test_masks_can_be_returned_packed(extractor):
    stats = {n: extractor.calibrate(n, word_texts(s, 6)) for s, n in ((1, "a"), (2, "b"))}
    plain = extractor.masks(stats, "contrastive", 0.5)
    packed = extractor.masks(stats, "contrastive", 0.5, packed=True)
    for name in stats:
        assert all(packed[name][k].dtype == torch.uint8 for k in plain[name])
        assert all(
            torch.equal(pp.bits.unpack_mask(packed[name][k], plain[name][k].shape[1]), plain[name][k])
            for k in plain[name]
        )
        assert pp.bits.count_kept(packed[name]["model.layers.0.mlp.down_proj"]) == int(
            plain[name]["model.layers.0.mlp.down_proj"].sum()
        )
    assert pp.extractor.shared_kept_fraction(packed["a"], packed["b"]) == pp.extractor.shared_kept_fraction(
        plain["a"], plain["b"]
    )


def test_adapters_made_inside_inference_mode_keep_working_outside_it():
    """Extraction under ``torch.inference_mode()`` gives adapters that switch and restore outside it too."""
    model, tokenizer = tiny_llama(0), tiny_tokenizer()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 1000, (1, 8))
    with torch.inference_mode():
        peft_model = PersonaExtractor(model, tokenizer).extract(
            {"a": word_texts(0, 6), "b": word_texts(1, 6, low=500)}, method="contrastive", sparsity=0.3
        )
        first = peft_model(ids).logits
        peft_model.set_adapter("b")
        other = peft_model(ids).logits
    peft_model.set_adapter("a")
    assert torch.equal(peft_model(ids).logits, first) and not torch.equal(first, other)
    peft_model.unload()
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_defaults_are_the_tuned_pair_everywhere():
    from peft_persona.commands import eval as eval_command
    from peft_persona.commands import extract as extract_command
    from peft_persona.commands import tune as tune_command
    from peft_persona.eval.tune import TunePlan
    from peft_persona.options import (
        DEFAULT_PHI,
        DEFAULT_SPARSITY,
        DEFAULT_STRENGTH,
        DEFAULT_TAU,
        ExtractionOptions,
        resolve_options,
    )

    assert (DEFAULT_SPARSITY, DEFAULT_STRENGTH) == (0.2, 0.5)
    assert (ExtractionOptions().sparsity, ExtractionOptions().phi, ExtractionOptions().tau) == (
        DEFAULT_SPARSITY,
        DEFAULT_PHI,
        DEFAULT_TAU,
    )
    assert resolve_options(None, sparsity=None).sparsity == DEFAULT_SPARSITY  # None is the default, not 0.5
    assert TunePlan.__dataclass_fields__["phi"].default == DEFAULT_PHI
    for command in (extract_command, eval_command, tune_command):
        parser = argparse.ArgumentParser()
        command.register(parser.add_subparsers())
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        by_dest = {a.dest: a for a in next(iter(sub.choices.values()))._actions}
        assert by_dest["phi"].default == DEFAULT_PHI and f"default {DEFAULT_PHI}" in by_dest["phi"].help
        if command is not tune_command:
            assert by_dest["tau"].default == DEFAULT_TAU and f"default {DEFAULT_TAU}" in by_dest["tau"].help
        if command is not tune_command:
            assert (by_dest["sparsity"].default, by_dest["strength"].default) == (DEFAULT_SPARSITY, DEFAULT_STRENGTH)
            assert "0.5" in by_dest["strength"].help  # --help shows the default
    model = tiny_llama()
    peft_model = PersonaExtractor(model, tiny_tokenizer()).extract(
        {"extro": word_texts(20, 4), "intro": word_texts(21, 4)}, method="contrastive", sparsity=None
    )
    config = peft_model.peft_config["extro"]
    assert (config.sparsity, config.strength) == (DEFAULT_SPARSITY, DEFAULT_STRENGTH)


@pytest.mark.parametrize("show", [True, False])
def test_progress_bars_cover_calibration_masks_and_adapters_or_nothing(show, capfd):
    extractor = PersonaExtractor(tiny_llama(), tiny_tokenizer(), batch_size=4, show_progress=show)
    extractor.extract({"a": word_texts(1, 8), "b": word_texts(2, 8)}, "contrastive", 0.2)
    err = capfd.readouterr().err
    for step in ("masks", "adapters"):
        assert (f"{step}:" in err) is show, err[-500:]
