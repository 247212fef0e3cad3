"""Real-model test on the embedded Qwen2.5-Coder-0.5B-Instruct (a Qwen2 layout: q/k/v biases, grouped KV heads).

Slow (the GGUF is about 490 MB and dequantises on load); never skipped: it fails if the model is unavailable.
"""

from __future__ import annotations

import pytest
import torch

import peft_persona as pp
from peft_persona.data import load_texts
from peft_persona.models import QWEN_MODEL, load_model
from peft_persona.tuner import mask_layers

pytestmark = pytest.mark.real_model


def test_qwen_extract_save_load_generate(tmp_path):
    model, tokenizer = load_model(QWEN_MODEL)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.model.layers[0].self_attn.q_proj.bias is not None
    personas = {
        "extravert": load_texts("builtin:extraversion#yes")[:24],
        "introvert": load_texts("builtin:extraversion#no")[:24],
    }
    extractor = pp.PersonaExtractor(model, tokenizer, batch_size=8, max_length=48)
    peft_model = extractor.extract(personas, method="contrastive", sparsity=0.2)
    assert len(mask_layers(peft_model)) == 24 * 7 and extractor.summary.kept_fraction == pytest.approx(0.8, abs=1e-3)
    saved = {name: pp.get_masks(peft_model, name) for name in personas}
    peft_model.save_pretrained(tmp_path)
    base = peft_model.unload()

    base.load_adapter(str(tmp_path / "extravert"), adapter_name="extravert")  # plain transformers, as a user would
    base.load_adapter(str(tmp_path / "introvert"), adapter_name="introvert")
    for name in personas:
        loaded = pp.get_masks(base, name)
        assert all(torch.equal(loaded[k], saved[name][k]) for k in saved[name])

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What do you do on a Friday night?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    replies = {}
    with torch.no_grad():
        for name in personas:
            base.set_adapter(name)
            generated = base.generate(**inputs, max_new_tokens=8, do_sample=False)
            replies[name] = generated[0, inputs["input_ids"].shape[1] :]
            assert replies[name].numel() > 0
        base.set_adapter("extravert")
        extravert_logits = base(**inputs).logits[0, -1]
        base.set_adapter("introvert")
        introvert_logits = base(**inputs).logits[0, -1]
    assert torch.isfinite(extravert_logits).all() and not torch.equal(extravert_logits, introvert_logits)
