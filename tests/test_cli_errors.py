"""The CLI fails fast: every argument is checked before a model loads, and every error is one line that names the
offending option, file or item, exits with status 2, and shows a traceback only with ``--debug``."""

from __future__ import annotations

import json
import os

import pytest

from conftest import DATA_ROOT, tiny_llama, tiny_tokenizer
from peft_persona import cli, models
from peft_persona.commands import preflight

PERSONA_FILE = DATA_ROOT / "anthropic-evals" / "persona" / "agreeableness.jsonl"


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the errors must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def extract_argv(out, *extra: str, model: str = "smollm2-135m-instruct") -> list[str]:
    return [
        "extract",
        "--model",
        model,
        "--persona",
        "extro=builtin:extraversion#yes",
        "--persona",
        "intro=builtin:extraversion#no",
        "--out",
        str(out),
        *extra,
    ]


def error_line(capsys, argv) -> str:
    """The one line the CLI prints for ``argv``, which must exit with status 2."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"peft-persona {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--strength", "2"], "--strength"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-length", "-1"], "--max-length"),
        (["--cache-gb", "-1"], "--cache-gb"),
        (["--layers", "8-x"], "--layers 8-x"),
    ],
)
def test_out_of_range_options_are_named_before_loading(tmp_path, capsys, no_model, extra, named):
    assert named in error_line(capsys, extract_argv(tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused_before_loading(tmp_path, capsys, no_model):
    target = tmp_path / "taken"
    target.write_text("keep me")
    message = error_line(capsys, extract_argv(target))
    assert f"--out {target}: is a file" in message
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_out_under_a_file_is_refused(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("")
    assert "--out" in error_line(capsys, extract_argv(tmp_path / "file" / "sub"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys, no_model):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    assert "not writable" in error_line(capsys, extract_argv(folder / "out"))


@pytest.mark.parametrize("model", ["/nope/model", "./missing", "not a hub id", "a/b/c"])
def test_a_model_that_is_neither_a_folder_nor_a_hub_id_names_model(tmp_path, capsys, no_model, model):
    message = error_line(capsys, extract_argv(tmp_path / "out", model=model))
    assert f"--model {model}: no such local folder" in message


def test_a_model_that_cannot_be_loaded_is_one_line_naming_model(tmp_path, capsys):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    message = error_line(capsys, extract_argv(tmp_path / "out", model=str(folder)))
    assert message.endswith(f"--model {folder}: the folder has no config.json (for a GGUF file, add --gguf-file)")
    (folder / "config.json").write_text("{}")  # passes the check; transformers then raises a long error
    message = error_line(capsys, extract_argv(tmp_path / "out", model=str(folder)))
    assert message.startswith(f"peft-persona extract: error: --model {folder}: ")
    assert not (tmp_path / "out").exists()


def test_empty_and_missing_calibration_files_are_named(tmp_path, capsys, no_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = extract_argv(tmp_path / "out")
    argv[argv.index("extro=builtin:extraversion#yes")] = f"extro={empty}"
    message = error_line(capsys, argv)
    assert f"--persona extro={empty}" in message and "is empty" in message
    argv[argv.index(f"extro={empty}")] = f"extro={tmp_path / 'absent.jsonl'}"
    assert "absent.jsonl" in error_line(capsys, argv)


def test_messages_carry_no_stray_quotes():
    assert preflight.one_line(KeyError("no built-in persona data 'x'")) == "no built-in persona data 'x'"
    assert preflight.one_line(OSError("first\n\nsecond")) == "first (--debug shows the rest)"


def test_debug_shows_the_traceback(tmp_path, capsys, no_model):
    with pytest.raises(ValueError, match="--sparsity"):
        cli.main([*extract_argv(tmp_path / "out", "--sparsity", "1.5"), "--debug"])
    with pytest.raises(ValueError, match="--sparsity"):
        cli.main(["--debug", *extract_argv(tmp_path / "out", "--sparsity", "1.5")])


def test_preflight_checks_name_their_option(tmp_path):
    with pytest.raises(ValueError, match="^--data .*no such file"):
        preflight.check_data_file(tmp_path / "x.jsonl", "--data")
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ValueError, match="^--data .*is empty"):
        preflight.check_data_file(tmp_path / "x.jsonl", "--data")
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert preflight.check_data_file(tmp_path / "x.jsonl", "--data") == tmp_path / "x.jsonl"
    preflight.check_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a well-formed Hub id passes
    preflight.check_model("gpt2")
    with pytest.raises(ValueError, match="^--gguf-file x.gguf"):
        preflight.check_model(str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(ValueError, match="^--threads 0"):
        preflight.check_positive(0, "--threads")


def test_tune_with_too_few_items_names_n_validation(tmp_path, capsys, no_model):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line + "\n" for line in PERSONA_FILE.read_text().splitlines()[:30]))
    argv = ["tune", "--data", str(small), "--name", "kind", "--n-validation", "40", "--out", str(tmp_path / "t")]
    message = error_line(capsys, argv)
    assert "--n-validation 40" in message
    assert not (tmp_path / "t").exists()


def test_extract_runs_and_writes_summary_atomically(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cli.main(extract_argv(out, "--max-length", "16", model=str(model_dir))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"] == 0.2 and set(summary["adapters"]) == {"extro", "intro"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no staging left beside --out


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_an_unsafe_persona_name_is_refused_by_option(tmp_path, capsys, no_model, command):
    data = tmp_path / "mine.txt"
    data.write_text("I love parties.\nI talk to everyone.\n")
    argv = [command, "--data", str(data), "--name", "../../evil", "--out", str(tmp_path / "out")]
    message = error_line(capsys, argv)
    assert "--name '../../evil'" in message
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil").exists()
