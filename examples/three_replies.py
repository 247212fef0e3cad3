"""Three greedy replies to one question: the base model, the extravert mask and the introvert mask.

    python examples/three_replies.py                 # print the Markdown block shown in README.md
    python examples/three_replies.py --check README.md   # exit 1 if README.md shows other replies

The settings are the ones ``peft-persona tune`` chose for extraversion on SmolLM2-135M-Instruct (all decoder
linears, sparsity 0.2, strength 0.5; docs/results/tune/smollm2-135m-instruct/extraversion): they cost +0.03
nats/token on neutral text, so the model stays fluent. One torch thread, greedy decoding: the replies are
reproducible on a CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

QUESTION = "Do you prefer big parties or quiet evenings at home? Answer in one sentence."
SETTINGS = {"method": "contrastive", "sparsity": 0.2, "strength": 0.5, "target": "all"}
MARKERS = ("<!-- three-replies -->", "<!-- /three-replies -->")


def replies(max_new_tokens: int = 40) -> dict[str, str]:
    """``{"base", "extravert", "introvert"}`` -> greedy reply to :data:`QUESTION`."""
    from peft_persona import PersonaExtractor
    from peft_persona.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    extractor = PersonaExtractor(model, tokenizer, target=SETTINGS["target"], max_length=64, batch_size=16)
    pair = {"extravert": "builtin:extraversion#yes", "introvert": "builtin:extraversion#no"}
    peft_model = extractor.extract(
        pair, method=SETTINGS["method"], sparsity=SETTINGS["sparsity"], strength=SETTINGS["strength"]
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    result = {}
    for name in ("base", *pair):
        with torch.no_grad():
            if name == "base":
                with peft_model.disable_adapter():
                    out = peft_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                peft_model.set_adapter(name)
                out = peft_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        result[name] = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return result


def markdown(answers: dict[str, str]) -> str:
    """The README block: the question, then one line per model."""
    lines = [f"> **User:** {QUESTION}"]
    for name, text in answers.items():
        lines += [">", f"> **{name}:** {' '.join(text.split())}"]
    return "\n".join(lines)


def readme_block(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    match = re.search(re.escape(MARKERS[0]) + r"\n(.*?)\n" + re.escape(MARKERS[1]), text, re.S)
    if match is None:
        raise SystemExit(f"{path} has no block between {MARKERS[0]} and {MARKERS[1]}")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, default=None, help="compare with the block in this README")
    parser.add_argument("--summary-json", type=Path, default=None, help="also write the replies as JSON here")
    args = parser.parse_args(argv)
    block = markdown(replies())
    print(block)
    if args.summary_json:
        args.summary_json.write_text(json.dumps({"block": block, "settings": SETTINGS}))
    if args.check is not None and readme_block(args.check) != block:
        print(f"{args.check} shows other replies:\n{readme_block(args.check)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
