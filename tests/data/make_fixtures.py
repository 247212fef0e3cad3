"""Write the test fixtures in this folder from the full data sets (run by hand; the tests never run it).

    python tests/data/make_fixtures.py [SOURCE]    # SOURCE: the data folder (default ../shared/data beside the repo)

Whole files where a test checks a split of the whole file (the Anthropic persona files, the paper's power test
file); otherwise the first rows of a file, or a seeded sample (Machine-Mindset). The selection is deterministic, so
re-running it reproduces the committed files byte for byte. See LICENSE.md for sources and licences.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHOLE = [
    "anthropic-evals/persona/extraversion.jsonl",
    "anthropic-evals/persona/agreeableness.jsonl",
    "anthropic-evals/persona/desire-for-acquiring-power.jsonl",
    "paper-persona/test_mc.csv",
]
FIRST_LINES = {  # file: number of data lines kept after the header (jsonl: lines)
    "anthropic-evals/advanced-ai-risk/lm_generated_evals/power-seeking-inclination.jsonl": 40,
    "paper-persona/wealth_train.csv": 60,
    "paper-persona/wealth_test_infer.csv": 60,
    "paper-persona/h_train.csv": 60,
    "paper-persona/h_test_infer.csv": 60,
}
MINDSET = "machine-mindset/en_energy_extraversion.json"
MINDSET_ROWS = 600


def first_lines(source: Path, target: Path, n: int) -> None:
    """The first ``n`` records: jsonl lines, or csv rows (which may span lines) under their header."""
    if source.suffix != ".csv":
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        target.write_text("".join(lines[:n]), encoding="utf-8")
        return
    import csv

    with open(source, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader)[:n], reader.fieldnames
    with open(target, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def power_train(source: Path, target: Path) -> None:
    """The paper's power train rows: the one question it shares with the test file, and the first 59 others."""
    import csv

    with open(source / "paper-persona/test_mc.csv", encoding="utf-8", newline="") as handle:
        test = {row["question"].strip() for row in csv.DictReader(handle)}
    with open(source / "paper-persona/train.csv", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        fields = reader.fieldnames
    shared = [r for r in rows if r["question"].strip() in test]
    kept = shared + [r for r in rows if r["question"].strip() not in test][:59]
    with open(target, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


def main(source: Path) -> None:
    for name in WHOLE:
        (HERE / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, HERE / name)
    for name, n in FIRST_LINES.items():
        (HERE / name).parent.mkdir(parents=True, exist_ok=True)
        first_lines(source / name, HERE / name, n)
    power_train(source, HERE / "paper-persona/train.csv")
    rows = json.loads((source / MINDSET).read_text(encoding="utf-8"))
    one_line = [i for i, row in enumerate(rows) if "\n" not in row["instruction"].strip()]
    picked = sorted(random.Random(0).sample(one_line, MINDSET_ROWS))
    (HERE / MINDSET).parent.mkdir(parents=True, exist_ok=True)
    (HERE / MINDSET).write_text(
        json.dumps([rows[i] for i in picked], ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
