"""The method comparison: every arm's grid scored on validation, its best point within the NLL budget scored on
test, resumable; the scores are the ones a direct computation gives."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA_ROOT, chat_tokenizer, tiny_llama
from peft_persona.eval import compare, compare_report, harness
from peft_persona.eval.arms import RECIPES, CaaArm, Host, LoraArm, MaskArm, PromptArm, Statistics
from peft_persona.eval.budget import choose
from peft_persona.eval.comparison import ComparisonPlan, merged_settings
from peft_persona.eval.finetune import LoraBudget
from peft_persona.eval.items import PERSONAS, calibration_texts, neutral_texts


def test_choose_takes_the_best_switch_within_the_budget_else_the_cheapest():
    points = [{"switch": 0.9, "cost": 0.5}, {"switch": 0.3, "cost": 0.1}, {"switch": 0.2, "cost": 0.0}]
    assert choose(points, "switch", 0.2) == ({"switch": 0.3, "cost": 0.1}, True)
    assert choose(points, "switch", -1.0) == ({"switch": 0.2, "cost": 0.0}, False)


def test_difference_balances_two_choice_items_and_groups_statements():
    a = {"margin": [1.0, 1.0, 1.0, -1.0], "matching": [0, 0, 0, 1]}
    b = {"margin": [0.0, 0.0, 0.0, 0.0], "matching": [0, 0, 0, 1]}
    assert compare.difference("yes_no", a, b)["mean"] == pytest.approx(0.0)  # +1 on one half, -1 on the other
    s = {"logprob": [-1.0, -2.0, -3.0, -4.0], "trait": [True, True, False, False]}
    t = {"logprob": [-1.0, -1.0, -1.0, -1.0], "trait": [True, True, False, False]}
    assert compare.difference("statement", s, t)["mean"] == pytest.approx(-1.5 - (-3.5))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model, tokenizer = tiny_llama(0), chat_tokenizer()
    persona = PERSONAS["extraversion"]
    trait, opposite = calibration_texts(DATA_ROOT, persona)
    texts = {"persona": trait[:6], "opposite": opposite[:6], "neutral": neutral_texts(DATA_ROOT, "calibration", 4, 2)}
    data = compare.splits(persona, DATA_ROOT, n_validation=6, n_test=6, n_passages=2, seed=1)
    return model, tokenizer, persona, texts, data, tmp_path_factory.mktemp("compare")


def arms_of(host, persona, texts, folder):
    statistics = Statistics(host, texts, layers=None, batch_size=4)
    grid = {"targets": ("mlp",), "sparsities": (0.1, 0.5), "strengths": (1.0,)}
    return [
        PromptArm(host, persona),
        CaaArm(host, texts, layers=[1], coefficients=[0.0, 2.0]),
        MaskArm(host, RECIPES["contrastive"], statistics, persona, grid),
        MaskArm(host, RECIPES["versus-neutral"], statistics, persona, grid),
        LoraArm(host, texts, ["q_proj", "down_proj"], folder / "lora", lambda: tiny_llama(0), LoraBudget(steps=2)),
    ]


def test_every_arm_is_scored_chosen_and_tested_and_a_rerun_resumes(setting, monkeypatch):
    model, tokenizer, persona, texts, data, folder = setting
    host = Host(model, tokenizer)
    state = compare.State(folder / "state.json", "fingerprint")
    budget = compare.Budget(nll_budget=0.2, batch_size=4)
    result = compare.run_arms(
        arms_of(host, persona, texts, folder),
        host.side(),
        tokenizer,
        data,
        state,
        budget,
        log=lambda _: None,
        progress=False,
    )
    assert set(result["test"]) == {"prompt", "caa", "mask:contrastive", "mask:versus-neutral", "lora"}
    assert len(result["validation"]) == 1 + 2 + 2 + 2 + 1
    for arm, tested in result["test"].items():
        scored = [v for v in result["validation"].values() if v["arm"] == arm]
        assert tested["validation"] == choose(scored, "switch", 0.2)[0]
        assert set(tested["formats"]) == set(persona.formats)
    assert "vs neutral Wanda" in result["test"]["mask:contrastive"]["formats"]["yes_no"]
    assert result["validation"]["caa/layer=1/coefficient=0"]["switch"] == 0.0  # adding nothing moves nothing
    assert result["test"]["prompt"]["cost"] == 0.0 and result["test"]["lora"]["bytes"] > 0
    assert not [
        n for n in getattr(host.model, "peft_config", {}) if n.startswith("cmp-")
    ]  # every arm released its adapters

    calls = []
    monkeypatch.setattr(compare, "measure", lambda *a, **k: calls.append(a) or pytest.fail("rescored"))
    again = compare.run_arms(
        arms_of(host, persona, texts, folder),
        host.side(),
        tokenizer,
        data,
        compare.State(folder / "state.json", "fingerprint"),
        budget,
        progress=False,
    )
    assert again == result and not calls


def test_the_lora_arm_trains_each_side_once_and_scores_both_as_adapters_of_one_copy(setting, tmp_path):
    from peft import PeftModel

    model, tokenizer, _, texts, _, _ = setting
    made = []

    def fresh():
        made.append(tiny_llama(0))
        return made[-1]

    def logits_of(arm):
        tokens = torch.tensor([[5, 6, 7, 8]])
        persona_side, opposite_side = arm.point({}).sides()
        with persona_side() as (persona_model, _), torch.no_grad():  # entering trains: grad on
            persona_logits = persona_model(tokens).logits
        with opposite_side() as (opposite_model, _), torch.no_grad():
            opposite_logits = opposite_model(tokens).logits
        assert persona_model is opposite_model  # one copy holds both sides
        return tokens, persona_logits, opposite_logits

    lora = lambda: LoraArm(Host(model, tokenizer), texts, ["q_proj"], tmp_path, fresh, LoraBudget(steps=2))  # noqa: E731
    tokens, persona_logits, opposite_logits = logits_of(lora())
    assert len(made) == 3  # a copy to train each side on, one to score both
    assert not torch.equal(persona_logits, opposite_logits)
    for side, logits in (("persona", persona_logits), ("opposite", opposite_logits)):
        with torch.no_grad():
            alone = PeftModel.from_pretrained(tiny_llama(0), tmp_path / side).eval()(tokens).logits
        assert torch.equal(alone, logits)
    logits_of(lora())
    assert len(made) == 4  # a rerun loads the saved LoRAs: nothing is trained again


def test_the_prompt_arm_scores_what_the_harness_scores_with_the_prompt(setting):
    model, tokenizer, persona, _, data, _ = setting
    host = Host(model, tokenizer)
    persona_side, _ = PromptArm(host, persona).point({}).sides()
    measured = compare.measure(persona_side, tokenizer, data[0], batch_size=4)
    items = data[0].items["yes_no"]
    direct = harness.item_values(items, harness.score_items(model, tokenizer, items, persona.prompt, 4))
    assert measured["values"]["yes_no"] == direct
    with torch.no_grad():
        plain = harness.general_nll(model, tokenizer, data[0].passages, 4)["corpus_nll"]
    assert measured["nll"] == plain


def test_a_state_from_other_settings_is_refused(tmp_path):
    compare.State(tmp_path / "s.json", "one").save()
    with pytest.raises(ValueError, match="other settings"):
        compare.State(tmp_path / "s.json", "two")


def test_the_compare_command_runs_resumes_and_reports(tmp_path, capsys):
    from peft_persona import cli

    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    argv = [
        "compare",
        "--model",
        str(folder),
        "--data-root",
        str(DATA_ROOT),
        "--personas",
        "extraversion",
        "--arms",
        "prompt,caa,mask:contrastive-sigmoid,mask:difference",
        "--sparsities",
        "0.2",
        "--strengths",
        "1",
        "--bands",
        "--caa-coefficients",
        "1",
        "--n-validation",
        "4",
        "--n-test",
        "4",
        "--nll-passages",
        "1",
        "--max-calibration",
        "6",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0
    state = json.loads((tmp_path / "out" / "extraversion.json").read_text())
    assert set(state["test"]) == {"prompt", "caa", "mask:contrastive-sigmoid", "mask:difference"}
    bands = {v["knobs"].get("layers", "all") for v in state["validation"].values() if v["arm"] == "mask:difference"}
    assert bands == {"all", "early", "middle", "late"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| extraversion | mask:difference |" in report and "peft-persona compare --model" in report
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(argv) == 0  # resumed: the same state, nothing rescored
    assert json.loads((tmp_path / "out" / "extraversion.json").read_text())["validation"] == state["validation"]
    assert cli.main([*argv[:-2], "--n-test", "5", "--out", str(tmp_path / "out")]) == 2  # other settings: refused
    capsys.readouterr()

    grown = [*argv]
    grown[grown.index("--arms") + 1] = "mask:wanda"  # a later run adds an arm to the same states
    assert cli.main(grown) == 0
    again = json.loads((tmp_path / "out" / "extraversion.json").read_text())
    assert set(again["test"]) == {*state["test"], "mask:wanda"}
    assert again["test"]["caa"] == state["test"]["caa"]
    assert again["settings"]["plan"]["arms"] == ["prompt", "caa", "mask:contrastive-sigmoid", "mask:difference",
                                                 "mask:wanda"]  # fmt: skip
    first, second = again["settings"]["commands"]
    assert "--arms prompt,caa," in first and "--arms mask:wanda" in second
    report = (tmp_path / "out" / "report.md").read_text()
    assert "--arms prompt,caa," in report and "--arms mask:wanda" in report


def test_settings_keep_every_command_and_arm_and_read_a_single_command():
    plan = ComparisonPlan(arms=("prompt", "mask:wanda"))
    old = {"command": "python one", "plan": {"arms": ["caa", "prompt"]}}
    merged = merged_settings(old, "m", plan, "python two")
    assert merged["commands"] == ["python one", "python two"] and merged["model"] == "m"
    assert merged["plan"]["arms"] == ["caa", "prompt", "mask:wanda"]
    assert merged_settings(merged, "m", plan, "python two")["commands"] == ["python one", "python two"]
    assert compare_report.commands({"a": {"settings": merged}, "b": {"settings": old}}) == ["python one", "python two"]


def test_verdict_counts_only_the_personas_an_arm_was_tested_on():
    from peft_persona.eval import compare_report

    def tested(low: float, neutral_low: float, cost: float) -> dict:
        block = {"switch": {"ci_low": low}, "vs neutral Wanda": {"ci_low": neutral_low}}
        return {"formats": {"statement": block}, "cost": cost}

    personas = {
        "a": {"test": {"prompt": {}, "mask:wanda": tested(0.01, 0.01, 0.1), "mask:difference": tested(1, 1, 3.0)}},
        "b": {"test": {"mask:wanda": tested(0.01, -0.01, 0.1)}, "settings": {"plan": {"nll_budget": 0.05}}},
    }
    assert compare_report.verdict_lines(personas) == [
        "- mask:wanda: moves the persona on 1 of the 2 tested (a)",
        "- mask:difference: moves the persona on 0 of the 1 tested (none)",  # over the NLL budget
    ]
    personas["b"]["test"]["mask:wanda"] = tested(0.01, 0.01, 0.1)  # within 0.2, over b's own budget of 0.05
    assert compare_report.verdict(personas)["mask:wanda"] == {"tested": ["a", "b"], "moved": ["a"]}


def test_headline_shows_each_baseline_and_the_best_mask_alone_per_model_and_persona():
    def tested(mean: float, low: float, neutral_low: float | None = None, cost: float = 0.01) -> dict:
        block = {"switch": {"mean": mean, "ci_low": low, "ci_high": mean + 0.1}}
        if neutral_low is not None:
            block["vs neutral Wanda"] = {"mean": mean, "ci_low": neutral_low, "ci_high": mean}
        return {"formats": {"statement": block}, "cost": cost, "within_budget": cost <= 0.2}

    passing = {
        "prompt": tested(1.0, 0.5),
        "caa": tested(2.0, 1.0, cost=0.9),  # the cheapest point, over budget
        "mask:wanda": tested(0.5, 0.1, neutral_low=-0.1),  # the largest switch, but not above the control
        "mask:contrastive-sigmoid": tested(0.3, 0.2, neutral_low=0.05),
        "mask:contrastive-channel": tested(0.2, 0.1, neutral_low=0.1),
        "prompt+mask:contrastive": tested(3.0, 2.0, neutral_low=1.0),  # with the prompt: not a mask alone
    }
    failing = {"mask:wanda": tested(0.02, -0.01, neutral_low=0.0), "mask:difference": tested(2.0, 1.5, 1.0, cost=3.0)}
    rows = compare_report.headline({"m1": {"extraversion": {"test": passing}}, "m2": {"power": {"test": failing}}})
    assert rows[0].startswith("| model | persona | prompt | CAA | LoRA | best mask alone | mask passes |")
    assert rows[2] == (
        "| m1 | extraversion | +1.00 [+0.50, +1.10] | +2.00 [+1.00, +2.10] (cost +0.90, over budget) | - | "
        "contrastive-sigmoid: +0.30 [+0.20, +0.40] | yes |"
    )
    # nothing passes: the largest switch within the budget (difference is larger but over it)
    assert rows[3] == "| m2 | power | - | - | - | wanda: +0.02 [-0.01, +0.12] | no |"
    assert compare_report.best_mask({"test": {"prompt": tested(1.0, 0.5)}}) is None
