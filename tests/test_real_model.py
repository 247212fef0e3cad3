"""Real-model test on the embedded SmolLM2-135M-Instruct (slow; never skipped: it fails if the model is unavailable)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import peft_persona as pp
from conftest import DATA_ROOT
from peft_persona.commands.extract import save_adapters
from peft_persona.tuner import mask_layers

EXTRAVERSION = DATA_ROOT / "anthropic-evals" / "persona" / "extraversion.jsonl"

pytestmark = pytest.mark.real_model


def test_smollm2_extraversion_pair_extract_save_reload_generate(smollm2, tmp_path):
    model, tokenizer = smollm2
    extractor = pp.PersonaExtractor(model, tokenizer, batch_size=16, max_length=64)
    peft_model = extractor.extract(
        {"extravert": f"{EXTRAVERSION}#yes", "introvert": f"{EXTRAVERSION}#no"}, method="contrastive", sparsity=0.5
    )
    try:
        summary = extractor.summary
        assert summary.n_texts == {"extravert": 500, "introvert": 500}
        assert summary.kept_fraction == pytest.approx(0.5, abs=1e-3)
        assert 0.0 < summary.overlap < 1.0
        layers = mask_layers(peft_model)
        assert len(layers) == 30 * 7  # every linear layer of the 30 decoder blocks, nothing else
        save_adapters(peft_model, ["extravert", "introvert"], tmp_path)

        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What do you like to do on a Friday night?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        outputs = {}
        with torch.no_grad():
            for name in ("extravert", "introvert"):
                peft_model.set_adapter(name)
                outputs[name] = peft_model(**inputs).logits[0, -1]
                generated = peft_model.generate(**inputs, max_new_tokens=12, do_sample=False)
                assert generated.shape[1] > inputs["input_ids"].shape[1]
        assert torch.isfinite(outputs["extravert"]).all()
        assert not torch.allclose(outputs["extravert"], outputs["introvert"])
    finally:
        base = peft_model.unload()  # the session model is shared: leave it as it was

    reloaded = PeftModel.from_pretrained(base, tmp_path / "introvert", adapter_name="introvert")
    try:
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits[0, -1], outputs["introvert"])
    finally:
        reloaded.unload()
