"""docs/index.md's quick start runs as pasted, in order, in one fresh folder: its Python blocks (extract, push to
``your-name/...``, load back with plain transformers) and its shell block (extract, inspect, push, inspect the Hub
copy). The Hub is the loopback one (tests/hub_server.py), seeded with ``HuggingFaceTB/SmolLM2-135M-Instruct`` as the
embedded model's float32 weights; the token is ``your-name``'s. Slow: SmolLM2 is extracted twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hub_server
from hub_server import running_hub
from peft_persona.merged import plain_checkpoint
from peft_persona.models import load_model

INDEX = Path(__file__).resolve().parents[1] / "docs" / "index.md"
QUICK_START = INDEX.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```", QUICK_START, flags=re.S | re.M)
TOKEN = "hf_your_name_token"

pytestmark = pytest.mark.real_model


def test_quick_start_has_python_and_shell_blocks():
    assert [kind for kind, _ in BLOCKS] == ["python", "python", "bash"]
    assert "your-name/smollm2-extraversion" in BLOCKS[0][1] and "sparsity=0.2" in BLOCKS[0][1]


@pytest.fixture(scope="module")
def seeded_hub(tmp_path_factory):
    """A loopback Hub holding the base model under its Hub id, and a write token for ``your-name``."""
    folder = tmp_path_factory.mktemp("base")
    model, tokenizer = load_model()
    plain_checkpoint(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub_server.TOKENS.setdefault(TOKEN, "your-name")
    with running_hub() as server:
        server.hub.seed("HuggingFaceTB/SmolLM2-135M-Instruct", files)
        yield server
    hub_server.TOKENS.pop(TOKEN, None)


def test_quick_start_runs_as_pasted(seeded_hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.pop("PEFT_PERSONA_NO_AUTOLOAD", None)  # the quick start relies on the installed start-up hook
    env.update(
        HF_ENDPOINT=seeded_hub.endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    outputs = []
    for index, (kind, code) in enumerate(BLOCKS):
        command = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"quick start block {index}:\n{code}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "your-name/smollm2-extraversion" in seeded_hub.hub.repos  # pushed by block 0, then again by the shell
    assert (tmp_path / "masks" / "extraversion" / "extravert" / "adapter_config.json").is_file()
    shell = outputs[2]  # `inspect` of the local folder, then of the pushed repo: both adapters, sparsity 0.2, twice
    for name in ("extravert", "introvert"):
        assert shell.count(f"adapter {name}  (") == 2, shell[-3000:]
    assert shell.count("sparsity:         0.2\n") == 4 and "your-name/smollm2-extraversion" in shell
