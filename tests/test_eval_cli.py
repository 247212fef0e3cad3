"""`peft-persona eval` end to end on a tiny saved model: extraction of personas and controls, scoring, resume."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import DATA_ROOT, chat_tokenizer, tiny_llama
from peft_persona import cli
from peft_persona.adapter_files import adapter_dirs


def test_eval_command_extracts_scores_and_resumes(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    tiny_llama(0).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    adapters, out = tmp_path / "adapters", tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(model_dir),
        "--adapters",
        str(adapters),
        "--extract",
        "--data-root",
        str(DATA_ROOT),
        "--personas",
        "extraversion",
        "--sparsity",
        "0.5",
        "--strength",
        "1",
        "--n-items",
        "4",
        "--nll-passages",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert set(adapter_dirs(adapters)) == {"extraversion", "introversion", "random", "magnitude", "neutral"}
    results = json.loads((out / "results.json").read_text())
    assert "partial" not in results and results["skipped"] == []
    block = results["personas"]["extraversion"]["formats"]["yes_no"]
    assert len(block["conditions"]) == 10 and block["conditions"]["opposite mask"]["adapter"] == "introversion"
    assert results["meta"]["command"].startswith("peft-persona eval --model ")
    assert results["masks"]["density"]["magnitude"]["overall"] == 0.5
    report = (out / "report.md").read_text()
    assert "## extraversion" in report and "neutral Wanda mask" in report
    assert (out / "conditions.png").is_file() and (out / "mask_layers.png").is_file()

    assert cli.main(argv + ["--resume"]) == 0  # nothing changed: every condition is reused
    again = json.loads((out / "results.json").read_text())
    assert len(again["reused"]) == 20
    assert again["personas"]["extraversion"]["formats"] == results["personas"]["extraversion"]["formats"]
    (out / "report.md").unlink()
    (out / "conditions.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: report without plots, and a hint
    assert cli.main(["eval", "--out", str(out), "--report-only"]) == 0  # statistics and report from results.json only
    assert "install matplotlib" in capsys.readouterr().err and not (out / "conditions.png").exists()
    assert "## extraversion" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["personas"] == again["personas"]
    capsys.readouterr()


def test_eval_command_errors_are_clear(tmp_path, capsys):
    assert cli.main(["eval", "--personas", "nobody", "--out", str(tmp_path)]) == 2
    assert "unknown persona(s) ['nobody']" in capsys.readouterr().err
    assert cli.main(["eval", "--conditions", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown condition(s) ['magic']" in capsys.readouterr().err
    assert cli.main(["eval", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "data root" in capsys.readouterr().err
    assert cli.main(["eval", "--report-only", "--data-root", str(DATA_ROOT), "--out", str(tmp_path)]) == 2
    assert "--report-only needs" in capsys.readouterr().err


def test_eval_scores_the_baselines_on_request(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(0).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    common = ["eval", "--model", str(model_dir), "--data-root", str(DATA_ROOT), "--personas", "extraversion"]
    wanted = ["base", "CAA steering", "CAA steering, opposite", "LoRA", "LoRA, opposite"]
    assert cli.main([*common, "--conditions", *wanted, "--out", str(out)]) == 2  # a baseline needs --baselines
    argv = [*common, "--baselines", "caa", "lora", "--lora-steps", "2", "--n-items", "4", "--nll-passages", "1"]
    assert cli.main([*argv, "--batch-size", "4", "--threads", "1", "--conditions", *wanted, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    block = results["personas"]["extraversion"]["formats"]["yes_no"]["conditions"]
    assert list(block) == wanted and block["LoRA, opposite"]["adapter"] == "lora:introversion"
    assert block["CAA steering"]["items"]["margin"] != block["base"]["items"]["margin"]
    assert {"caa:extraversion", "lora:extraversion"} <= set(results["general_ability"])
    assert "CAA steering" in (out / "report.md").read_text()


def test_eval_extracts_the_versus_neutral_recipe_with_its_options(tmp_path):
    import random

    import torch

    from peft_persona import PersonaExtractor
    from peft_persona.eval import adapters, items
    from peft_persona.tuner import get_masks

    persona = items.PERSONAS["extraversion"]
    args = cli.build_parser().parse_args(
        ["eval", "--out", "o", "--extract", "--method", "versus-neutral", "--phi", "sigmoid", "--structure", "row"]
    )
    assert (args.method, args.phi, args.structure) == ("versus-neutral", "sigmoid", "row")
    model, tokenizer = tiny_llama(0), chat_tokenizer()
    out = tmp_path / "adapters"
    adapters.extract_adapters(
        model, tokenizer, [persona], DATA_ROOT, out, 0.2, "versus-neutral", max_calibration=8, neutral_passages=4,
        phi="sigmoid",
    )  # fmt: skip
    assert set(adapter_dirs(out)) == {"extraversion", "introversion", "random", "magnitude", "neutral"}
    saved = adapters.load_adapters(tiny_llama(0), out)[0]

    texts, _ = items.calibration_texts(DATA_ROOT, persona)
    texts = random.Random(0).sample(texts, 8)
    extractor = PersonaExtractor(tiny_llama(0), tokenizer, max_length=256, batch_size=8)
    neutral = items.neutral_calibration(DATA_ROOT, 4)
    reference = extractor.extract({"ref": texts, "plain": neutral}, "contrastive", 0.2, phi="sigmoid")
    expected = get_masks(reference, "ref")
    assert all(torch.equal(m, expected[k]) for k, m in get_masks(saved, "extraversion").items())


def test_eval_extracts_on_the_target_and_layer_band_it_is_given(tmp_path):
    from peft_persona.eval import adapters, items
    from peft_persona.targets import select_targets
    from peft_persona.tuner import get_masks

    args = cli.build_parser().parse_args(["eval", "--out", "o", "--extract", "--target", "mlp", "--layers", "late"])
    assert (args.target, args.layers) == ("mlp", "late")
    model, out = tiny_llama(0), tmp_path / "adapters"
    expected = set(select_targets(model, "mlp", "late"))
    assert expected and expected < set(select_targets(model, "all"))
    adapters.extract_adapters(
        model, chat_tokenizer(), [items.PERSONAS["extraversion"]], DATA_ROOT, out, 0.2, max_calibration=8,
        neutral_passages=4, target="mlp", layers="late",
    )  # fmt: skip
    saved = adapters.load_adapters(tiny_llama(0), out)[0]
    for name in ("extraversion", "introversion", "random", "magnitude", "neutral"):  # the controls on the same modules
        masks = get_masks(saved, name)
        assert {n.removeprefix("base_model.model.") for n in masks} == expected, name
        assert any(not bool(m.all()) for m in masks.values()), name


def test_a_malformed_layers_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from peft_persona import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --layers was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    argv = ["eval", "--out", str(tmp_path / "o"), "--adapters", str(tmp_path / "a"), "--extract", "--layers", "3-1"]
    assert cli.main([*argv, "--data-root", str(DATA_ROOT)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-persona eval: error: --layers 3-1: ") and "backwards" in err, err


def test_eval_extract_passes_the_whole_recipe_tau_included(tmp_path, monkeypatch):
    """``--phi sigmoid --tau 0.5`` (the recipe README recommends) reaches the extraction, not tau's default."""
    from peft_persona import models
    from peft_persona.commands import eval as eval_command
    from peft_persona.eval import adapters

    seen = {}

    class Extracted(Exception):
        pass

    def extract_adapters(*args, **kwargs):
        seen.update(kwargs)
        raise Extracted

    monkeypatch.setattr(adapters, "extract_adapters", extract_adapters)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_llama(0), chat_tokenizer()))
    argv = ["eval", "--out", "o", "--adapters", str(tmp_path), "--extract", "--phi", "sigmoid", "--tau", "0.5"]
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(Extracted):
        eval_command.prepared_model(args, [], DATA_ROOT)
    assert (seen["phi"], seen["tau"], seen["structure"]) == ("sigmoid", 0.5, "row")
