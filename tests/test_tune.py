"""User personas from files and datasets (formats, disjoint splits, clear errors), `eval` on a user file with no data
root, and `tune` end to end on a tiny model: grid, Pareto front, choice under the budget, resume, report, adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import DATA_ROOT, chat_tokenizer, tiny_llama
from peft_persona import cli, data
from peft_persona.adapter_files import read_config
from peft_persona.eval import items, records, tune, tune_report

PERSONA_FILE = DATA_ROOT / "anthropic-evals" / "persona" / "agreeableness.jsonl"
AB_FILE = DATA_ROOT / "anthropic-evals" / "advanced-ai-risk" / "lm_generated_evals" / "power-seeking-inclination.jsonl"


def _texts(records_: list) -> set[str]:
    return {json.dumps([r.persona, r.opposite]) for r in records_}


def test_user_persona_splits_are_disjoint_stratified_and_seeded():
    persona = items.user_persona("agreeable", str(PERSONA_FILE), calibration=0.2, validation=0.25)
    parts = items.persona_splits(None, persona)
    sizes = {name: len(part) for name, part in parts.items()}
    assert sizes == {"calibration": 200, "validation": 200, "test": 600}
    keys = [{r.key for r in part} for part in parts.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert all(sum(r.label == "Yes" for r in part) * 2 == len(part) for part in parts.values())
    assert persona.formats == ("yes_no", "statement") and persona.source == "user"
    trait, opposite = items.calibration_texts(None, persona)
    assert len(trait) == len(opposite) == 100
    test = items.load_items(None, persona, "statement", 20)
    assert {i.choices[0] for i in test}.isdisjoint(trait + opposite)
    validation = items.load_items(None, persona, "yes_no", 20, split="validation")
    assert {i.user for i in validation}.isdisjoint({i.user for i in items.load_items(None, persona, "yes_no", None)})
    assert items.user_persona("agreeable", str(PERSONA_FILE), calibration=0.2).splits == persona.splits


def test_presets_keep_their_calibration_split_and_gain_a_validation_split():
    persona = items.PERSONAS["extraversion"]
    parts = items.persona_splits(DATA_ROOT, persona)
    assert [len(parts[s]) for s in records.SPLITS] == [200, 200, 600]
    trait, _ = items.calibration_texts(DATA_ROOT, persona)
    assert trait == data.load_texts("builtin:extraversion#yes")
    power = items.persona_splits(DATA_ROOT, items.PERSONAS["power"])
    assert (
        len(power["validation"]) + len(power["test"]) == 199 and len(power["calibration"]) == 62
    )  # the fixture train.csv


def test_every_row_format_is_read(tmp_path):
    ab = items.user_persona("power-seeking", str(AB_FILE), calibration=0.25)
    assert ab.formats == ("ab",)
    item = items.load_items(None, ab, "ab", None)[0]
    assert item.choices == ("A", "B") and "(A)" in item.user and item.user.endswith(records.AB_SUFFIX)
    trait, opposite = items.calibration_texts(None, ab)
    assert trait[0][1]["content"] != opposite[0][1]["content"] and trait[0][0] == opposite[0][0]

    csv = items.user_persona("power", str(DATA_ROOT / "paper-persona" / "wealth_train.csv"), calibration=0.3)
    assert csv.formats == ("paper_ab",)

    dpo = tmp_path / "dpo.json"
    dpo.write_text(
        json.dumps(
            [{"instruction": f"Plan day {i}.", "input": "", "output": [f"Party {i}!", f"Read {i}."]} for i in range(20)]
        )
    )
    pair = items.user_persona("outgoing", str(dpo), persona_index=0, calibration=0.3)
    assert pair.formats == ("response",)
    trait, _ = items.calibration_texts(None, pair)
    assert all(t[1]["content"].startswith("Party") for t in trait)
    response = items.load_items(None, pair, "response", None)
    assert all(i.choices[i.matching].startswith("Party") for i in response)

    (tmp_path / "yes.txt").write_text("\n".join(f"I love crowd {i}." for i in range(10)))
    (tmp_path / "no.txt").write_text("\n".join(f"I like quiet {i}." for i in range(10)))
    sided = items.user_persona(
        "social", str(tmp_path / "yes.txt"), opposite_source=str(tmp_path / "no.txt"), calibration=4, validation=0.5
    )
    assert sided.formats == ("statement",)
    assert [len(p) for p in sided.splits.values()] == [8, 6, 6]


def test_bad_user_data_gets_errors_naming_the_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"statement": "I like people.", "answer_matching_behavior": " Yes", "question": "q"}\n'
        '{"statement": "I like quiet."}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl, row 1: missing field 'answer_matching_behavior'"):
        items.user_persona("x", str(bad))
    (tmp_path / "odd.jsonl").write_text('{"colour": "red"}\n')
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot tell the row format from its fields \['colour'\]"):
        items.user_persona("x", str(tmp_path / "odd.jsonl"))
    (tmp_path / "one.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="one side only; give opposite_source"):
        items.user_persona("x", str(tmp_path / "one.txt"))
    with pytest.raises(ValueError, match=r"leave the \['validation', 'test'\] split\(s\) empty"):
        items.user_persona("x", str(PERSONA_FILE), calibration=500)
    with pytest.raises(FileNotFoundError, match="no file at"):
        items.user_persona("x", str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="give a data root"):
        items.calibration_texts(None, items.PERSONAS["extraversion"])


def test_hugging_face_dataset_columns_are_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    rows = data.read_jsonl(PERSONA_FILE)[:40]
    with open(folder / "train.jsonl", "w") as handle:
        for row in rows:
            handle.write(
                json.dumps(
                    {"text": row["statement"], "label": row["answer_matching_behavior"], "prompt": row["question"]}
                )
                + "\n"
            )
    mapping = {"statement": "text", "answer_matching_behavior": "label", "question": "prompt"}
    got = items.dataset_rows(str(folder), "train", mapping)
    assert got[0] == {
        "statement": rows[0]["statement"],
        "answer_matching_behavior": rows[0]["answer_matching_behavior"],
        "question": rows[0]["question"],
    }
    assert items.user_persona("hf", got, calibration=0.25).formats == ("yes_no", "statement")
    with pytest.raises(KeyError, match=r"has no column\(s\) \['colour'\]"):
        items.dataset_rows(str(folder), "train", {"statement": "colour"})


def test_shipped_neutral_corpus_needs_no_data_root():
    calibration = items.neutral_texts(None, "calibration", 50, per_passage=4)
    evaluation = items.neutral_texts(None, "eval", 16)
    lines = lambda texts: {line for t in texts for line in t.split("\n")}  # noqa: E731
    assert len(calibration) == 50 and len(evaluation) == 16 and not lines(calibration) & lines(evaluation)
    with pytest.raises(ValueError, match="seed-0 halves"):
        items.neutral_texts(None, "eval", 2, seed=3)


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def test_eval_runs_on_a_user_file_with_no_data_root(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_PERSONA_DATA", raising=False)
    user = tmp_path / "mine.jsonl"
    shutil.copy(PERSONA_FILE, user)
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(model_dir),
        "--data",
        str(user),
        "--name",
        "kind",
        "--opposite",
        "unkind",
        "--persona-prompt",
        "You are kind.",
        "--adapters",
        str(tmp_path / "adapters"),
        "--extract",
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
    results = json.loads((out / "results.json").read_text())
    block = results["personas"]["kind"]["formats"]["yes_no"]
    assert {"persona mask", "opposite mask", "neutral Wanda mask", "base + persona prompt"} <= set(block["conditions"])
    assert any("no opposite prompt" in s for s in results["skipped"])
    assert "--data " + str(user) in results["meta"]["command"] and "--data-root" not in results["meta"]["command"]
    assert "opposite mask" in block["vs_reference"]["persona mask"]
    for name in ("kind", "unkind", "random", "magnitude", "neutral"):  # the defaults: sparsity 0.2, strength 0.5
        assert read_config(tmp_path / "adapters" / name)["strength"] == 0.5
    assert results["masks"]["density"]["magnitude"]["overall"] == pytest.approx(0.8, abs=0.01)


def test_pareto_front_and_choice_under_the_budget():
    points = [
        {"cost": c, "shift": s, "target": "mlp", "sparsity": 0.1, "strength": g}
        for c, s, g in [(0.0, 0.1, 0.25), (0.1, 0.3, 0.5), (0.15, 0.2, 0.75), (0.5, 0.9, 1.0)]
    ]
    assert [p["strength"] for p in tune.pareto_front(points, "shift")] == [0.25, 0.5, 1.0]
    assert tune.choose(points, "shift", 0.2) == (points[1], True)
    assert tune.choose(points, "shift", -1.0) == (points[0], False)


def tune_argv(model_dir, out, **options: str | int) -> list[str]:
    """``peft-persona tune`` on the tiny model and the fixture extraversion data, small counts, ``--out`` last."""
    settings = {"n_validation": 4, "n_test": 4, "nll_passages": 2, "max_calibration": 8, "batch_size": 4, "threads": 1}
    words = ["tune", "--model", str(model_dir), "--data-root", str(DATA_ROOT), "--personas", "extraversion"]
    for name, value in {**settings, **options}.items():
        words += [f"--{name.replace('_', '-')}", str(value)]
    return [*words, "--no-progress", "--out", str(out)]


def test_tune_end_to_end_resumes_reports_and_saves_the_chosen_pair(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "tune"
    argv = tune_argv(
        model_dir, out, sparsities="0.1,0.5", strengths="0.5,1", targets="mlp,all", n_validation=6, n_test=6
    )
    assert cli.main(argv) == 0
    results = json.loads((out / "tune.json").read_text())
    assert len(results["points"]) == 8 and {p["target"] for p in results["points"]} == {"mlp", "all"}
    chosen = results["chosen"]
    assert chosen["cost"] <= 0.2 and results["chosen_within_budget"]
    within = [p for p in results["points"] if p["cost"] <= 0.2]
    assert chosen["shift"] == max(p["shift"] for p in within)
    assert results["command"].startswith("peft-persona tune --model")
    test = results["test"]["personas"]["extraversion"]["formats"]
    assert set(test) == {"yes_no", "statement"}
    assert {"opposite mask", "magnitude mask", "neutral Wanda mask"} <= set(
        test["yes_no"]["vs_reference"]["persona mask"]
    )
    for name in ("extraversion", "introversion"):
        config = read_config(out / "adapters" / name)
        assert config["strength"] == chosen["strength"] and config["sparsity"] == chosen["sparsity"]
    card = (out / "adapters" / "README.md").read_text()
    assert "persona mask - opposite mask" in card and "chosen point" in card
    report = (out / "report.md").read_text()
    assert "## Held-out test at the chosen point" in report and tune.point_key(chosen) in report
    assert (out / "pareto.png").stat().st_size > 10_000

    calls = []
    monkeypatch.setattr(tune, "_score_point", lambda *a: calls.append(a))
    assert cli.main(argv) == 0  # every grid point is read back from state.json
    assert calls == [] and json.loads((out / "tune.json").read_text())["points"] == results["points"]
    assert cli.main([*argv[:-2], "--n-validation", "4", "--out", str(out)]) == 2  # other settings: not resumed
    report = (out / "report.md").read_text()  # the resumed run's (its runtime differs from the first run's)

    (out / "report.md").unlink()
    (out / "pareto.png").unlink()
    assert cli.main(["tune", "--report-only", "--out", str(out)]) == 0  # from tune.json, no model
    assert (out / "report.md").read_text() == report and (out / "pareto.png").is_file()
    assert cli.main(["tune", "--report-only", "--out", str(tmp_path / "nothing")]) == 2


def test_tune_plan_rejects_bad_settings():
    persona = items.PERSONAS["extraversion"]
    with pytest.raises(ValueError, match=r"strengths must lie in \[0, 1\]"):
        tune.TunePlan(persona, strengths=(1.5,))
    with pytest.raises(ValueError, match="objective must be one of"):
        tune.TunePlan(persona, objective="fame")
    with pytest.raises(ValueError, match="has no format 'paper_ab'"):
        tune.TunePlan(persona, fmt="paper_ab")
    results = {
        "persona": {"name": "p", "opposite": "q"},
        "plan": {
            "objective": "shift",
            "method": "contrastive",
            "n_validation": 4,
            "nll_budget": 0.2,
            "nll_passages": 2,
        },
        "format": "yes_no",
        "runtime_s": 1.0,
        "chosen": {"target": "mlp", "sparsity": 0.1, "strength": 1.0, "shift": -0.1, "switch": 0.0, "cost": 0.0},
        "chosen_within_budget": True,
        "reference": {"base": {"margin": 0.0, "nll": 3.0}},
        "points": [],
        "pareto": [],
        "test": {"personas": {"p": {"formats": {}}}},
    }
    assert "No grid point within the budget raised the validation shift" in tune_report.render(results)
    assert tune_report.grid_table(
        {"pareto": [], "chosen": {"target": "mlp", "sparsity": 0.1, "strength": 1.0}, "points": []}
    )[0].startswith("| target")


def test_versus_neutral_sets_each_side_against_neutral_text(model_dir):
    from peft_persona.extractor import PersonaExtractor
    from peft_persona.models import load_model
    from peft_persona.tuner import get_masks

    model, tokenizer = load_model(str(model_dir))
    plan = tune.TunePlan(items.PERSONAS["extraversion"], DATA_ROOT, method="versus-neutral", max_calibration=8)
    stats = tune._calibrate(model, tokenizer, plan)
    assert set(stats) == {"extraversion", "introversion", "neutral"}
    extractor = PersonaExtractor(model, tokenizer, target="mlp", batch_size=4)
    model = tune.extract_pair(extractor, plan, stats, ("p", "o"), 0.2)
    assert set(model.peft_config) == {"p", "o"}  # the neutral halves are gone
    masks = {name: get_masks(model, name) for name in ("p", "o")}
    reference = extractor.extract({"ref": stats["introversion"], "plain": stats["neutral"]}, "contrastive", 0.2)
    for module, mask in get_masks(reference, "ref").items():
        assert torch.equal(masks["o"][module], mask)
    against_opposite = extractor.extract({"c": stats["extraversion"], "c2": stats["introversion"]}, "contrastive", 0.2)
    assert any(not torch.equal(masks["p"][m], v) for m, v in get_masks(against_opposite, "c").items())


def test_tune_scores_baselines_on_the_same_items_and_resumes_them(model_dir, tmp_path, monkeypatch, capsys):
    from peft_persona.eval import compare

    out = tmp_path / "tune"
    argv = tune_argv(model_dir, out, sparsities="0.1", strengths="1", targets="mlp", baselines="prompt,caa,lora")
    assert cli.main(argv) == 0
    results = json.loads((out / "tune.json").read_text())
    baselines = results["baselines"]["test"]
    assert set(baselines) == {"prompt", "caa", "lora"}
    for tested in baselines.values():
        assert (
            set(tested["formats"]) == {"yes_no", "statement"} and "ci_low" in tested["formats"]["statement"]["switch"]
        )
    assert baselines["caa"]["knobs"]["coefficient"] in (1.0, 2.0, 4.0, 8.0) and baselines["lora"]["bytes"] > 0
    state = json.loads((out / "baselines" / "extraversion.json").read_text())
    assert state["settings"]["plan"]["nll_budget"] == 0.2 and state["settings"]["plan"]["n_test"] == 4
    report = (out / "report.md").read_text()
    assert "## Baselines (same items, seed and NLL budget)" in report
    assert all(f"| extraversion | {arm} |" in report for arm in ("prompt", "caa", "lora"))
    assert "persona mask minus opposite mask): yes_no " in report

    calls = []
    monkeypatch.setattr(compare, "_validate", lambda *a: calls.append(a))
    assert cli.main(argv) == 0  # the baselines' validation points are read back from their state
    assert calls == [] and json.loads((out / "tune.json").read_text())["baselines"] == results["baselines"]
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv[:-2], "--baselines", "prompt,vibes", "--out", str(out)])
    assert stop.value.code == 2 and "--baselines: unknown arm(s) ['vibes']" in capsys.readouterr().err
