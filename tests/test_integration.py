"""The patches of PEFT and transformers (``peft_persona.tuner.integration``): applied once, and invisible to models
without persona adapters."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import torch
from peft import mapping
from safetensors.torch import load_file
from transformers.integrations import peft as hf_peft

import peft_persona.tuner
from peft_persona.tuner import PERSONA_MASK, integration


def patched_objects() -> dict[str, object]:
    found = {table: getattr(mapping, table)[PERSONA_MASK] for table in integration.REGISTRY_TABLES}
    found["load_adapter"] = hf_peft.PeftAdapterMixin.load_adapter
    found["filters"] = tuple(logging.getLogger(integration.TRANSFORMERS_PEFT_LOGGER).filters)
    return found


def test_registering_again_or_reloading_patches_nothing_twice():
    before = patched_objects()
    assert before["PEFT_TYPE_TO_TUNER_MAPPING"] is peft_persona.tuner.PersonaMaskModel
    assert getattr(before["load_adapter"], "_persona_guarded", False)
    assert not getattr(before["load_adapter"].__wrapped__, "_persona_guarded", False)  # wrapped exactly once
    assert sum(getattr(f, "persona_report_filter", False) for f in before["filters"]) == 1
    integration.register()
    importlib.reload(integration)
    integration.register()
    importlib.reload(peft_persona.tuner)  # the package's import calls register() again
    after = patched_objects()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name] is value or after[name] == value, name
        if name == "filters":
            assert all(a is b for a, b in zip(after[name], value, strict=True))


LORA_SCRIPT = """
import json, sys
import torch
from safetensors.torch import save_file
if sys.argv[2] == "with":
    import peft_persona  # noqa: F401
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = get_peft_model(LlamaForCausalLM(config).eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(input_ids=tokens).logits
    generated = model.generate(input_ids=tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
model.save_pretrained(sys.argv[1] + "/adapter")
save_file({"logits": logits, "generated": generated}, sys.argv[1] + "/outputs.safetensors")
json.dump({"imported": "peft_persona" in sys.modules}, open(sys.argv[1] + "/imported.json", "w"))
"""


def _run_lora(folder, mode: str) -> dict:
    folder.mkdir()
    # PEFT writes target_modules from a set: a fixed hash seed gives both processes the same order
    env = dict(os.environ, PEFT_PERSONA_NO_AUTOLOAD="1" if mode == "without" else "0", PYTHONHASHSEED="0")
    script = textwrap.dedent(LORA_SCRIPT)
    result = subprocess.run([sys.executable, "-c", script, str(folder), mode], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = {p.name: p.read_bytes() for p in sorted((folder / "adapter").iterdir())}
    return {
        "imported": json.loads((folder / "imported.json").read_text())["imported"],
        "outputs": load_file(folder / "outputs.safetensors"),
        "files": files,
    }


def test_a_lora_model_is_the_same_with_and_without_the_package(tmp_path):
    """Logits, greedy generation and every file ``save_pretrained`` writes are identical whether or not the process
    imported ``peft_persona`` (the one without it never imports it, not even through the start-up hook)."""
    with_package = _run_lora(tmp_path / "with", "with")
    without = _run_lora(tmp_path / "without", "without")
    assert with_package["imported"] and not without["imported"]
    for name in ("logits", "generated"):
        assert torch.equal(with_package["outputs"][name], without["outputs"][name]), name
    assert sorted(with_package["files"]) == sorted(without["files"])
    assert "adapter_model.safetensors" in with_package["files"]
    for name, data in with_package["files"].items():
        assert data == without["files"][name], name
