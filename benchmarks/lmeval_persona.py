"""lm-evaluation-harness's accuracy on two persona tasks (extraversion, agreeableness) for the embedded
SmolLM2-135M-Instruct: base, persona prompt, persona mask and opposite mask, plain and with the chat template, beside
our harness's figure for the same held-out items; with the share of " Yes" answers and balanced accuracy.

    python benchmarks/lmeval_persona.py --threads 1

The harness's ``persona_*`` tasks read ``EleutherAI/persona`` from the Hub (all 1000 rows, calibration rows
included). Here a local task per persona copies the harness's own template (``model_written_evals/persona/
_template_yaml`` of the installed ``lm_eval``) over ``--n-items`` (default 200) of the test rows our harness scores:
``load_items(..., "yes_no", n, seed=1, split="test")``, half matching " Yes" and half " No", exactly the items
``peft-persona eval`` draws. The model is the embedded GGUF build (``--model_args pretrained=DIR,gguf_file=NAME,
dtype=float32[,peft=ADAPTER]``), through ``lm_eval.simple_evaluate`` with ``log_samples=True``; the prompt condition
is ``system_instruction=``. The masks are extracted as README's main command does (contrastive, sparsity 0.2,
strength 0.5) on each persona's calibration split (``builtin:extraversion`` for extraversion; the same split of
agreeableness.jsonl, written beside the adapters), cached under ~/.cache/peft-persona/lmeval-adapters and reused.

Writes ``--out``/smollm2.json (every figure, per-item log-likelihoods, the exact contexts of one item per run) and
``--out``/smollm2.md (the table, also printed; ``--render-only`` rewrites it from the JSON). Reads the data from
--data-root (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from _common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import peft_persona  # noqa: E402, F401  (registers PERSONA_MASK with peft before lm_eval loads an adapter)
from peft_persona import data  # noqa: E402
from peft_persona.eval.conditions import render  # noqa: E402
from peft_persona.eval.harness import score_items  # noqa: E402
from peft_persona.eval.items import PERSONAS, Item, load_items  # noqa: E402
from peft_persona.models import cache_dir, embedded_gguf, load_model  # noqa: E402

# persona -> (mask name, opposite mask name); the extraversion pair is README's main command's
MASKS = {"extraversion": ("extravert", "introvert"), "agreeableness": ("agreeable", "disagreeable")}
EXTRACT = ["--method", "contrastive", "--sparsity", "0.2", "--strength", "0.5"]
CONDITIONS = ("base", "persona prompt", "persona mask", "opposite mask")
ITEM_SEED = 1  # peft-persona eval's default item seed


@dataclass(frozen=True)
class Run:
    persona: str
    condition: str
    chat: bool


def adapters(persona: str, data_root: Path, threads: int) -> tuple[Path, list[str]]:
    """The persona's mask pair (extracted once into the cache) and the command that made it."""
    folder = cache_dir() / "lmeval-adapters" / persona
    if persona == "extraversion":
        source = "builtin:extraversion"
    else:
        rows = data.read_jsonl(data_root / PERSONAS[persona].test_file)
        calibration, _ = data.anthropic_split(rows)  # the calibration split peft-persona eval extracts from
        source = str(folder / f"{persona}_calibration.jsonl")
    name, opposite = MASKS[persona]
    command = ["peft-persona", "extract", "--persona", f"{name}={source}#yes", "--persona", f"{opposite}={source}#no"]
    command += [*EXTRACT, "--out", str(folder)]
    if all((folder / n / "adapter_config.json").is_file() for n in (name, opposite)):
        return folder, command
    folder.mkdir(parents=True, exist_ok=True)
    if persona != "extraversion":
        (folder / f"{persona}_calibration.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calibration))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    tick = time.time()
    subprocess.run([sys.executable, "-m", "peft_persona.cli", *command[1:]], check=True, env=env)
    print(f"extracted {persona} masks in {time.time() - tick:.0f}s", file=sys.stderr, flush=True)
    return folder, command


def harness_template() -> dict:
    """The harness's own persona task template, as installed."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks/model_written_evals/persona/_template_yaml"
    template = yaml.safe_load(path.read_text())
    expected = {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "target_delimiter": ""}
    if any(template.get(k) != v for k, v in expected.items()) or template.get("doc_to_target") != 0:
        raise RuntimeError(f"{path} changed; this script assumes {expected} and doc_to_target 0, got {template}")
    return template


def write_task(folder: Path, persona: str, items: list[Item]) -> str:
    """A local task over ``items`` with the harness's persona template; its name."""
    rows = [
        {
            "question": item.user,
            "answer_matching_behavior": item.choices[item.matching],
            "answer_not_matching_behavior": item.choices[1 - item.matching],
        }
        for item in items
    ]
    (folder / f"{persona}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {k: v for k, v in harness_template().items() if k not in ("tag", "dataset_path", "dataset_name")}
    name = f"persona_heldout_{persona}"
    task.update(
        task=name, dataset_path="json", dataset_kwargs={"data_files": {"validation": str(folder / f"{persona}.jsonl")}}
    )
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return name


def home_relative(text: str) -> str:
    """``text`` with the home folder written as ``~``: the recorded commands carry no user's absolute paths."""
    return text.replace(str(Path.home()), "~")


def figures(ll_matching: list[float], ll_other: list[float], matching_yes: list[bool]) -> dict:
    """Accuracy (the harness's argmax: a tie goes to the first choice, the matching answer), the share of items
    answered " Yes", accuracy on the items whose matching answer is " Yes" and on those where it is " No", and
    their mean (balanced accuracy)."""
    correct = [m >= o for m, o in zip(ll_matching, ll_other, strict=True)]
    says_yes = [c == y for c, y in zip(correct, matching_yes, strict=True)]
    on_yes = [c for c, y in zip(correct, matching_yes, strict=True) if y]
    on_no = [c for c, y in zip(correct, matching_yes, strict=True) if not y]
    acc_yes, acc_no = sum(on_yes) / len(on_yes), sum(on_no) / len(on_no)
    return {
        "acc": sum(correct) / len(correct),
        "yes_share": sum(says_yes) / len(says_yes),
        "acc_on_yes_items": acc_yes,
        "acc_on_no_items": acc_no,
        "balanced_acc": (acc_yes + acc_no) / 2,
        "n": len(correct),
    }


def run_lmeval(run: Run, task: str, task_manager: object, adapter: Path | None, args: argparse.Namespace) -> dict:
    """One ``simple_evaluate`` call: the harness's acc, our figures from its logged log-likelihoods, one context."""
    import lm_eval

    gguf = embedded_gguf()
    model_args = {"pretrained": str(gguf.parent), "gguf_file": gguf.name, "dtype": "float32"}
    if adapter is not None:
        model_args["peft"] = str(adapter)
    persona = PERSONAS[run.persona]
    system = persona.prompt if run.condition == "persona prompt" else None
    tick = time.time()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[task],
        task_manager=task_manager,
        batch_size=args.batch_size,
        device="cpu",
        log_samples=True,
        system_instruction=system,
        apply_chat_template=run.chat,
    )
    seconds = time.time() - tick
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    ll_matching = [float(s["resps"][0][0][0]) for s in samples]
    ll_other = [float(s["resps"][1][0][0]) for s in samples]
    matching_yes = [s["doc"]["answer_matching_behavior"] == " Yes" for s in samples]
    for s in samples:  # (context, continuation) per choice: the matching answer first
        choices = [s["doc"]["answer_matching_behavior"], s["doc"]["answer_not_matching_behavior"]]
        if [a[1] for a in s["arguments"]] != choices:
            raise RuntimeError(f"{run}: doc {s['doc_id']} was scored on {s['arguments']}, not {choices}")
    result = figures(ll_matching, ll_other, matching_yes)
    harness_acc = out["results"][task]["acc,none"]
    if abs(harness_acc - result["acc"]) > 1e-12:
        raise RuntimeError(f"{run}: the harness's acc {harness_acc} is not the {result['acc']} its samples give")
    context, continuation = samples[0]["arguments"][0]
    return {
        **result,
        "harness_acc": harness_acc,
        "harness_acc_stderr": out["results"][task].get("acc_stderr,none"),
        "model_args": home_relative(",".join(f"{k}={v}" for k, v in model_args.items())),
        "system_instruction": system,
        "apply_chat_template": run.chat,
        "example_context": context,
        "example_continuation": continuation,
        "ll_matching": ll_matching,
        "ll_not_matching": ll_other,
        "seconds": seconds,
    }


def run_ours(persona: str, items: list[Item], folder: Path, args: argparse.Namespace) -> dict:
    """Our harness (``score_items``, the yes_no format: the chat template, " Yes" against " No") on the same items
    under the same four conditions."""
    from peft import PeftModel

    from peft_persona.eval.conditions import active

    model, tokenizer = load_model()
    name, opposite = MASKS[persona]
    model = PeftModel.from_pretrained(model, str(folder / name), adapter_name=name)
    model.load_adapter(str(folder / opposite), adapter_name=opposite)
    model.eval()
    spec = PERSONAS[persona]
    results = {}
    for condition in CONDITIONS:
        adapter = {"persona mask": name, "opposite mask": opposite}.get(condition)
        system = spec.prompt if condition == "persona prompt" else None
        tick = time.time()
        with active(model, adapter) as scored:
            scores = score_items(scored, tokenizer, items, system, args.batch_size)
        ll_matching = [s[item.matching].logprob for item, s in zip(items, scores, strict=True)]
        ll_other = [s[1 - item.matching].logprob for item, s in zip(items, scores, strict=True)]
        results[condition] = {
            **figures(ll_matching, ll_other, [item.matching == 0 for item in items]),
            "system_prompt": system,
            "adapter": adapter,
            "example_context": render(tokenizer, items[0].user, system),
            "ll_matching": ll_matching,
            "ll_not_matching": ll_other,
            "seconds": time.time() - tick,
        }
    return results


def agreement(ours: dict, theirs: dict) -> float:
    """Largest |difference| of the matching-minus-other log-likelihood between our scorer and the harness."""
    mine = [a - b for a, b in zip(ours["ll_matching"], ours["ll_not_matching"], strict=True)]
    harness = [a - b for a, b in zip(theirs["ll_matching"], theirs["ll_not_matching"], strict=True)]
    return max(abs(a - b) for a, b in zip(mine, harness, strict=True))


def table(results: dict) -> str:
    header = ["persona", "condition"]
    for where in ("lm-eval plain", "lm-eval chat", "ours (chat)"):
        header += [f"{where}: acc", "acc Yes / No half", "Yes share"]
    rows = []
    for persona, block in results["personas"].items():
        for condition in CONDITIONS:
            row: list[object] = [persona, condition]
            for part in (block["lmeval"]["plain"], block["lmeval"]["chat"], block["ours"]):
                value = part[condition]
                halves = f"{value['acc_on_yes_items']:.2f} / {value['acc_on_no_items']:.2f}"
                row += [f"{value['acc']:.3f}", halves, f"{value['yes_share']:.2f}"]
            rows.append(row)
    return markdown_table(header, rows)


def write_page(results: dict, out: Path) -> str:
    """``out``/smollm2.md: the command, the table and what its columns mean; returns the table."""
    text = table(results)
    n = ", ".join(f"{len(b['items'])} {p}" for p, b in results["personas"].items())
    checks = ", ".join(
        f"{p} {max(b['ours_vs_lmeval_chat_max_abs_diff'].values()):.1e}" for p, b in results["personas"].items()
    )
    (out / "smollm2.md").write_text(
        "# lm-evaluation-harness on SmolLM2-135M-Instruct\n\n"
        f"```bash\n{results['command']}\n```\n\n"
        f"lm-eval {results['lm_eval_version']}; {results['model']}; held-out test items: {n} (half with "
        f'the matching answer " Yes", half " No"); {results["threads"]} torch thread(s); '
        f"{results['runtime_s'] / 60:.0f} min including mask extraction. Every number and per-item log-likelihood: "
        "[smollm2.json](smollm2.json).\n\n"
        f"{text}\n\n"
        "- *acc*: the harness's `acc` (checked equal to the accuracy of its logged log-likelihoods); *acc Yes / No "
        'half*: the accuracy on the items whose matching answer is " Yes" and on those where it is " No" (their mean '
        "is the balanced accuracy, equal to acc here since the halves are equal); *Yes share*: the share of items "
        'where " Yes" scores higher.\n'
        "- *lm-eval plain*: the question as raw text (the persona prompt, with `system_instruction=`, is glued before "
        "it); *lm-eval chat*: `apply_chat_template=True`; *ours (chat)*: `peft_persona.eval.harness.score_items` "
        "on the `yes_no` format, which always renders the chat template. Its contexts are the same strings as "
        "lm-eval chat's and its per-item margins agree to a largest difference of "
        f"{checks} nats.\n"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--personas", default="extraversion,agreeableness")
    parser.add_argument("--n-items", type=int, default=200, help="held-out test items per persona (half each answer)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lmeval")
    parser.add_argument("--render-only", action="store_true", help="only rewrite smollm2.md from smollm2.json")
    args = parser.parse_args()
    if args.render_only:
        print(write_page(json.loads((args.out / "smollm2.json").read_text()), args.out))
        return
    torch.set_num_threads(args.threads)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.time()
    personas = [p.strip() for p in args.personas.split(",") if p.strip()]
    results: dict = {
        "command": "python benchmarks/lmeval_persona.py " + shlex.join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct, embedded GGUF (Q4_1) dequantised to float32",
        "lm_eval_version": __import__("lm_eval").__version__,
        "item_seed": ITEM_SEED,
        "threads": args.threads,
        "personas": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        from lm_eval.tasks import TaskManager

        task_dir = Path(tmp)
        items_by_persona = {
            p: load_items(args.data_root, PERSONAS[p], "yes_no", args.n_items, ITEM_SEED, "test") for p in personas
        }
        tasks = {p: write_task(task_dir, p, items) for p, items in items_by_persona.items()}
        task_manager = TaskManager(include_path=str(task_dir))  # indexes every task once
        for persona in personas:
            items, task = items_by_persona[persona], tasks[persona]
            folder, extract_command = adapters(persona, args.data_root, args.threads)
            name, opposite = MASKS[persona]
            block: dict = {
                "items": [i.id for i in items],
                "n_matching_yes": sum(i.matching == 0 for i in items),
                "extract_command": home_relative(shlex.join(extract_command)),
                "prompt": PERSONAS[persona].prompt,
                "lmeval": {"plain": {}, "chat": {}},
            }
            results["personas"][persona] = block
            for chat in (False, True):
                for condition in CONDITIONS:
                    adapter = {"persona mask": folder / name, "opposite mask": folder / opposite}.get(condition)
                    value = run_lmeval(Run(persona, condition, chat), task, task_manager, adapter, args)
                    block["lmeval"]["chat" if chat else "plain"][condition] = value
                    print(
                        f"{persona} / lm-eval {'chat' if chat else 'plain'} / {condition}: acc {value['acc']:.3f} "
                        f"Yes {value['yes_share']:.2f} ({value['seconds']:.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
            block["ours"] = run_ours(persona, items, folder, args)
            block["ours_vs_lmeval_chat_max_abs_diff"] = {
                c: agreement(block["ours"][c], block["lmeval"]["chat"][c]) for c in CONDITIONS
            }
            block["same_context_as_lmeval_chat"] = {
                c: block["ours"][c]["example_context"] == block["lmeval"]["chat"][c]["example_context"]
                for c in CONDITIONS
            }
    results["runtime_s"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2.json").write_text(json.dumps(results, indent=1) + "\n")
    print(write_page(results, args.out))


if __name__ == "__main__":
    main()
