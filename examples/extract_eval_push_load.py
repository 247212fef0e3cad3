"""Extract an extravert/introvert pair, evaluate it, push it to the Hub, load it back and switch personas.

    python examples/extract_eval_push_load.py --repo-id your-name/smollm2-extraversion   # push (needs HF_TOKEN)
    python examples/extract_eval_push_load.py --out out/extraversion-repo                # no Hub: the local repo only

Runs offline on the embedded SmolLM2-135M-Instruct. The Hub is the one ``HF_ENDPOINT`` names (the tests point it at
a loopback server). Loading back uses plain transformers calls on the base model: ``load_adapter`` and
``set_adapter``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import EXTRAVERT_STATEMENTS, INTROVERT_STATEMENTS, extract_pair, load_embedded, reply, write_json

from peft_persona.eval.likelihood import score_continuations
from peft_persona.hub import export_repo, push_to_hub
from peft_persona.metrics import persona_alignment, persona_margin

PROMPT = "What are you doing this weekend?"


def evaluate(peft_model, tokenizer) -> dict:
    """Per condition (each persona mask, and no mask): how extraverted the model answers, with 95% CIs.

    The package's harness scores " Yes" against " No" after each held-out statement of ``_common``; the package's
    metrics turn the scores into an accuracy (Wilson CI) and a per-token margin (bootstrap CI). The full harness,
    with controls and the data sets, is ``peft-persona eval`` (docs/evaluation.md).
    """
    statements = EXTRAVERT_STATEMENTS + INTROVERT_STATEMENTS
    contexts = [
        tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f'Is the following statement something you would say?\n"{s}"\nAnswer Yes or No.',
                }
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        for s in statements
    ]
    extravert_answer = ["Yes"] * len(EXTRAVERT_STATEMENTS) + ["No"] * len(INTROVERT_STATEMENTS)
    other_answer = ["No" if a == "Yes" else "Yes" for a in extravert_answer]
    results = []
    for name in ("extravert", "introvert", None):
        with peft_model.disable_adapter() if name is None else contextlib.nullcontext():
            if name is not None:
                peft_model.set_adapter(name)
            match = score_continuations(peft_model, tokenizer, contexts, extravert_answer)
            other = score_continuations(peft_model, tokenizer, contexts, other_answer)
        choices = [0 if m.logprob > o.logprob else 1 for m, o in zip(match, other, strict=True)]
        results.append(
            {
                "adapter": name or "(base model)",
                "extravert_answers": persona_alignment(choices, [0] * len(choices)),
                "extraversion_margin": persona_margin([m.mean for m in match], [o.mean for o in other]),
            }
        )
    return {
        "description": f"Yes/No on {len(statements)} held-out statements (examples/_common.py).",
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="contrastive")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.2,
        help="fraction of each row removed (default 0.2: a 135M model stays fluent)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=0.5,
        help="persona strength saved with the masks (default 0.5: with sparsity 0.2, tune's choice)",
    )
    parser.add_argument("--repo-id", default=None, help="Hub repo to push to (default: write the repo locally only)")
    parser.add_argument("--out", default="out/extraversion-repo", help="new folder for the repo's content")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--summary-json", default=None, help="also write the summary printed at the end here")
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded(args.model)
    started = time.perf_counter()
    peft_model = extract_pair(model, tokenizer, args.method, args.sparsity, strength=args.strength)
    print(f"extracted extravert and introvert in {time.perf_counter() - started:.1f}s")

    report = evaluate(peft_model, tokenizer)
    tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = {}
    with torch.no_grad():
        for name in ("extravert", "introvert"):
            peft_model.set_adapter(name)
            expected[name] = peft_model(tokens).logits

    # The repo's content (one folder per persona, README.md card) is written locally first, then pushed as is.
    if Path(args.out, "README.md").is_file():
        shutil.rmtree(args.out)  # the output of an earlier run of this example
    export_repo(peft_model, args.out, args.repo_id or "your-name/smollm2-extraversion", eval_report=report)
    print(f"adapters and model card written to {args.out}")
    source = args.out
    if args.repo_id:
        commit = push_to_hub(args.out, args.repo_id, private=args.private, eval_report=report)
        print(f"pushed to {commit.commit_url}")
        source = args.repo_id

    # The consumer side: the plain base model (adapters removed) loads the masks with transformers' own API.
    base = peft_model.unload()
    for name in ("extravert", "introvert"):
        if args.repo_id:
            base.load_adapter(source, adapter_name=name, adapter_kwargs={"subfolder": name})
        else:
            base.load_adapter(f"{source}/{name}", adapter_name=name)
    summary = {"source": source, "evaluation": report["results"], "round_trip_exact": {}, "replies": {}}
    with torch.no_grad():
        for name in ("extravert", "introvert"):
            base.set_adapter(name)
            summary["round_trip_exact"][name] = bool(torch.equal(base(tokens).logits, expected[name]))
            summary["replies"][name] = reply(base, tokenizer, PROMPT)
    write_json(args.summary_json, summary)
    return summary


if __name__ == "__main__":
    main()
