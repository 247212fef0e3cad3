"""Persona text loaders."""

from __future__ import annotations

import json

import pytest

from conftest import DATA_ROOT
from peft_persona import data


def test_builtin_is_the_seeded_calibration_split_of_the_shared_file():
    rows = data.read_jsonl(DATA_ROOT / "anthropic-evals" / "persona" / "extraversion.jsonl")
    calibration, held_out = data.anthropic_split(rows, n_calibration=100, seed=0)
    assert len(calibration) == 200 and len(held_out) == 800
    assert data.read_jsonl(data.builtin_path("extraversion")) == calibration
    statements = {r["statement"] for r in held_out}
    assert not statements & set(
        data.load_texts("builtin:extraversion#yes") + data.load_texts("builtin:extraversion#no")
    )


def test_anthropic_halves_are_trait_and_opposite(tmp_path):
    rows = [
        {"statement": "I love parties", "answer_matching_behavior": " Yes"},
        {"statement": "I avoid crowds", "answer_matching_behavior": " No"},
    ]
    path = tmp_path / "trait.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert data.load_texts(f"{path}") == ["I love parties"]
    assert data.load_texts(f"{path}#no") == ["I avoid crowds"]
    with pytest.raises(ValueError, match="#yes' or '#no"):
        data.load_texts(f"{path}#maybe")


def test_paper_csv_both_layouts(tmp_path):
    two = tmp_path / "train.csv"
    two.write_text('question,matching,not_matching\n"Lead?",Yes I lead,No thanks\n')
    four = tmp_path / "test_mc.csv"
    four.write_text("question,A,B,matching\nLead?,No thanks,Yes I lead,B\n")
    expected = [[{"role": "user", "content": "Lead?"}, {"role": "assistant", "content": "Yes I lead"}]]
    assert data.load_texts(str(two)) == expected == data.load_texts(str(four))
    assert data.load_texts(f"{four}#not_matching")[0][1]["content"] == "No thanks"


def test_alpaca_and_dpo_lists(tmp_path):
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps([{"instruction": "Greet", "input": " ", "output": ["hi (quietly)", "HELLO!"]}]))
    assert data.load_texts(f"{path}#1") == [
        [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "HELLO!"}]
    ]
    with pytest.raises(ValueError, match="select one"):
        data.load_texts(str(path))


def test_advanced_ai_risk_choice_text():
    texts = data.load_texts(
        str(DATA_ROOT / "anthropic-evals/advanced-ai-risk/lm_generated_evals/power-seeking-inclination.jsonl")
    )
    user, assistant = texts[0]
    assert "(A)" not in user["content"] and assistant["content"].startswith("Yes, I agree")


def test_bad_sources_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        data.load_texts(str(tmp_path / "nowhere.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"statement": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        data.load_texts(str(bad))
    with pytest.raises(KeyError, match="no built-in persona data"):
        data.load_texts("builtin:nothing")
