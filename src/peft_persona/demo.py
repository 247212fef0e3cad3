"""A browser demo: one prompt, the base model's reply beside a persona adapter's, a persona picker and a strength
slider (``peft-persona demo``).

The model work is in plain functions (:func:`generate_reply`, :func:`replies`, :func:`switch_persona`,
:func:`apply_strength`, :func:`adapter_facts`), testable without a browser; :func:`build_app` wires them into a
``gradio.Blocks`` app. Gradio is imported only there, so the rest of the package never needs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .adapter_files import adapter_dirs, read_config
from .tuner import set_strength

PathLike = str | os.PathLike

# The elem_id of each component a browser test reads or drives.
ELEMENT_IDS = {
    "prompt": "prompt",
    "submit": "submit",
    "base": "base-reply",
    "persona": "persona-reply",
    "picker": "persona-picker",
    "strength": "strength",
    "active": "active-persona",
    "facts": "persona-facts",
}


def find_adapters(folders: Sequence[PathLike]) -> dict[str, Path]:
    """Every persona adapter in ``folders`` (each as :func:`~peft_persona.adapter_files.adapter_dirs` reads it), by
    name; a name found twice raises a ``ValueError`` naming both folders."""
    found: dict[str, Path] = {}
    for folder in folders:
        for name, path in adapter_dirs(folder).items():
            if name in found:
                raise ValueError(f"two adapters are named {name!r} ({found[name]} and {path})")
            found[name] = path
    return found


def load_adapters(model: nn.Module, adapters: Mapping[str, PathLike]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """``(peft_model, configs)``: ``model`` wrapped by PEFT with every adapter of ``adapters`` (name to folder)
    loaded, the first one active, and each adapter's ``adapter_config.json`` as a dict, by name."""
    from peft import PeftModel

    configs = {name: read_config(folder) for name, folder in adapters.items()}
    (first, folder), *rest = adapters.items()
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=first)
    for name, path in rest:
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.set_adapter(first)
    peft_model.eval()
    return peft_model, configs


def generate_reply(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """``model``'s greedy reply to ``prompt`` (as a user turn of the chat template, if the tokenizer has one), at most
    ``max_new_tokens`` tokens, without the prompt and special tokens."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def base_reply(peft_model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The base model's reply: :func:`generate_reply` inside ``peft_model.disable_adapter()``."""
    with peft_model.disable_adapter():
        return generate_reply(peft_model, tokenizer, prompt, max_new_tokens)


def replies(peft_model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """``(base reply, reply of the active persona)`` to ``prompt``."""
    return (
        base_reply(peft_model, tokenizer, prompt, max_new_tokens),
        generate_reply(peft_model, tokenizer, prompt, max_new_tokens),
    )


def active_persona(peft_model: Any) -> str:
    """The name of ``peft_model``'s active adapter."""
    active = peft_model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def strength_of(peft_model: Any, name: str) -> float:
    """Adapter ``name``'s current strength, as its config records it."""
    return float(peft_model.peft_config[name].strength)


def switch_persona(peft_model: Any, name: str) -> str:
    """Make adapter ``name`` the active one (``set_adapter``); returns its name. An unknown name raises a
    ``KeyError`` listing the adapters."""
    if name not in peft_model.peft_config:
        raise KeyError(f"no adapter {name!r}; loaded: {sorted(peft_model.peft_config)}")
    peft_model.set_adapter(name)
    return name


def apply_strength(peft_model: Any, name: str, value: float) -> float:
    """Set adapter ``name``'s strength to ``value`` in [0, 1] at once (:func:`peft_persona.tuner.set_strength`);
    returns it."""
    set_strength(peft_model, name, float(value))
    return strength_of(peft_model, name)


def adapter_facts(name: str, config: Mapping[str, Any]) -> str:
    """Markdown facts of adapter ``name`` from its saved config: persona, opposite, method, sparsity, saved strength,
    save format and calibration size and source. A value cannot break out of its table cell (backticks, pipes and
    newlines are neutralised): a downloaded config is untrusted text."""
    calibration = config.get("calibration") or {}
    size = ", ".join(
        f"{calibration[key]} {label}"
        for key, label in (("n_texts", "texts"), ("n_tokens", "tokens"))
        if key in calibration
    )
    rows = [
        ("persona", config.get("persona") or name),
        ("opposite persona", config.get("opposite_persona") or "none"),
        ("method", config.get("method") or "unrecorded"),
        ("sparsity", config.get("sparsity", "unrecorded")),
        ("saved strength", config.get("strength", 1.0)),
        ("save format", config.get("save_format", "bits")),
        ("calibration", size or "unrecorded"),
        ("calibration source", calibration.get("source", "unrecorded")),
    ]
    cells = [(key, str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ")) for key, value in rows]
    return "\n".join(["| fact | value |", "|---|---|"] + [f"| {key} | `{value}` |" for key, value in cells])


class DemoSession:
    """One loaded model, its tokenizer and adapters, behind a lock so that concurrent browser events take turns."""

    def __init__(
        self, peft_model: Any, tokenizer: Any, configs: Mapping[str, Mapping[str, Any]], max_new_tokens: int = 32
    ) -> None:
        self.model, self.tokenizer, self.configs = peft_model, tokenizer, dict(configs)
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def ask(self, prompt: str) -> tuple[str, str]:
        """Base and persona replies to ``prompt`` (two empty strings for an empty prompt)."""
        if not prompt.strip():
            return "", ""
        with self.lock:
            return replies(self.model, self.tokenizer, prompt, self.max_new_tokens)

    def persona_only(self, prompt: str) -> str:
        """The active persona's reply to ``prompt``, or ``""`` for an empty prompt."""
        if not prompt.strip():
            return ""
        with self.lock:
            return generate_reply(self.model, self.tokenizer, prompt, self.max_new_tokens)

    def switch(self, name: str, prompt: str) -> tuple[str, str, float, str]:
        """Activate persona ``name``: its name, facts, strength, and its reply to ``prompt``."""
        with self.lock:
            switch_persona(self.model, name)
            strength = strength_of(self.model, name)
        return name, adapter_facts(name, self.configs[name]), strength, self.persona_only(prompt)

    def strength(self, value: float, prompt: str) -> str:
        """Set the active persona's strength to ``value``; its reply to ``prompt`` at that strength."""
        with self.lock:
            apply_strength(self.model, active_persona(self.model), value)
        return self.persona_only(prompt)


def build_app(session: DemoSession, title: str = "peft-persona demo") -> Any:
    """The ``gradio.Blocks`` app of ``session``, analytics off: prompt, base and persona replies side by side, persona
    picker, strength slider, the active persona's name and its facts."""
    import gradio as gr

    ids, names = ELEMENT_IDS, list(session.configs)
    first = active_persona(session.model)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nGreedy replies, at most {session.max_new_tokens} new tokens.")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", lines=2, elem_id=ids["prompt"], scale=4)
            submit = gr.Button("Generate", variant="primary", elem_id=ids["submit"], scale=1)
        with gr.Row():
            base = gr.Textbox(label="base model", lines=4, interactive=False, elem_id=ids["base"])
            persona = gr.Textbox(label="persona adapter", lines=4, interactive=False, elem_id=ids["persona"])
        with gr.Row():
            picker = gr.Radio(names, value=first, label="persona", elem_id=ids["picker"])
            strength = gr.Slider(
                0.0, 1.0, value=strength_of(session.model, first), step=0.05, label="strength", elem_id=ids["strength"]
            )
            active = gr.Textbox(value=first, label="active persona", interactive=False, elem_id=ids["active"])
        facts = gr.Markdown(adapter_facts(first, session.configs[first]), elem_id=ids["facts"])
        for event in (submit.click, prompt.submit):
            event(session.ask, inputs=prompt, outputs=[base, persona])
        picker.input(session.switch, inputs=[picker, prompt], outputs=[active, facts, strength, persona])
        strength.input(session.strength, inputs=[strength, prompt], outputs=persona, trigger_mode="always_last")
    return app
