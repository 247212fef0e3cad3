"""A SIGKILL at any point of `peft-persona extract` leaves only complete adapters in --out, and a re-run cleans up.

The CLI runs in a child process that kills itself with SIGKILL at one of three points: during calibration, between
two adapter writes, and in the middle of writing an adapter's weights file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from peft import PeftModel

from conftest import tiny_llama, tiny_tokenizer
from peft_persona.adapter_files import validate_weights
from peft_persona.atomic import STAGING_MARK

KILLERS = {
    # the second persona's calibration is cut short
    "calibration": """
        import peft_persona.extractor as target
        original = target.PersonaExtractor.calibrate
        calls = []
        def patched(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        target.PersonaExtractor.calibrate = patched
    """,
    # the first adapter is in place, the second is not yet
    "between adapters": """
        import peft_persona.atomic as target
        original = target.move_into_place
        calls = []
        def patched(*args, **kwargs):
            original(*args, **kwargs)
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        target.move_into_place = patched
    """,
    # half of a weights file is on disk
    "during a write": """
        import safetensors.torch as target
        original = target.save_file
        def patched(tensors, filename, metadata=None):
            original(tensors, filename, metadata=metadata)
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        target.save_file = patched
    """,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tiny_llama().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def run_extract(model_dir, out, killer: str = "") -> subprocess.CompletedProcess:
    args = [
        "extract",
        "--model",
        str(model_dir),
        "--persona",
        "extro=builtin:extraversion#yes",
        "--persona",
        "intro=builtin:extraversion#no",
        "--method",
        "contrastive",
        "--out",
        str(out),
    ]
    script = (
        "import os, signal\n"
        + textwrap.dedent(killer)
        + f"\nfrom peft_persona.cli import main\nraise SystemExit(main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def complete_adapters(out) -> set[str]:
    """Names of the adapters in ``out``; fails if anything else than complete adapters and summary files is there."""
    names = set()
    for entry in out.iterdir() if out.exists() else []:
        if entry.is_file():
            assert entry.name == "summary.json", entry
            continue
        assert sorted(p.name for p in entry.iterdir()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ] or sorted(p.name for p in entry.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"], entry
        validate_weights(entry / "adapter_model.safetensors")
        PeftModel.from_pretrained(tiny_llama(), entry)  # loads completely
        names.add(entry.name)
    return names


@pytest.mark.parametrize("point", sorted(KILLERS))
def test_sigkill_leaves_only_complete_adapters_and_rerun_cleans_up(model_dir, tmp_path, point):
    out = tmp_path / "masks"
    killed = run_extract(model_dir, out, KILLERS[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert complete_adapters(out) <= {"extro", "intro"}
    if point == "between adapters":
        assert complete_adapters(out) == {"extro"}
    stale = list(tmp_path.glob(f".masks{STAGING_MARK}*"))
    assert point == "calibration" or stale  # the killed run's staging folder is left beside --out, not inside it

    rerun = run_extract(model_dir, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert complete_adapters(out) == {"extro", "intro"}
    assert list(tmp_path.glob(f".masks{STAGING_MARK}*")) == []
