"""The docs build with mkdocs in strict mode, and the reference pages name every option, field and public function."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import peft_persona as pp
from peft_persona import hub, inspection
from peft_persona.commands import compare as compare_command
from peft_persona.commands import demo as demo_command
from peft_persona.commands import eval as eval_command
from peft_persona.commands import extract as extract_command
from peft_persona.commands import inspect as inspect_command
from peft_persona.commands import merge as merge_command
from peft_persona.commands import push as push_command
from peft_persona.commands import tune as tune_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_builds_strict(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "file-format" / "index.html").is_file()


@pytest.mark.parametrize(
    "command",
    [
        push_command,
        inspect_command,
        extract_command,
        eval_command,
        tune_command,
        compare_command,
        merge_command,
        demo_command,
    ],
)
def test_cli_reference_names_every_option(command):
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = (DOCS / "cli.md").read_text()
    for action in next(iter(sub.choices.values()))._actions:
        names = action.option_strings or [action.metavar]
        if "-h" in names:
            continue
        assert any(f"`{n}`" in text for n in names), names


def test_file_format_names_every_config_field():
    text = (DOCS / "file-format.md").read_text()
    for field in dataclasses.fields(pp.PersonaMaskConfig):
        assert f"`{field.name}`" in text, field.name


def test_api_reference_names_every_public_function():
    text = (DOCS / "api.md").read_text()
    public = list(pp.__all__) + [
        "push_to_hub",
        "export_repo",
        "stage_adapters",
        "build_model_card",
        "usage_snippet",
        "adapter_dirs",
        "template_path",
        "PersonaAdapterError",
        "inspect_adapters",
        "format_summaries",
        "summarize_files",
        "count_ones",
    ]
    for name in public:
        assert name in text, name
    assert hasattr(hub, "push_to_hub") and hasattr(inspection, "inspect_adapters")
