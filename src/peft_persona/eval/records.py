"""Persona data as records: one row of a data set gives calibration texts for both sides and evaluation items.

A :class:`Record` is the unit that splits: calibration, validation and test never share a record, so no evaluation
item's text was seen during calibration. Builders exist for every supported row format:

``anthropic_statement``  Anthropic persona rows (``statement``, ``answer_matching_behavior``): formats ``yes_no`` and
                         ``statement``.
``ab_question``          Anthropic advanced-ai-risk rows (``question`` with ``(A)``/``(B)`` choices,
                         ``answer_matching_behavior``): format ``ab``.
``choice_pair``          A question with a persona-matching and a not-matching answer (the paper's CSV, or any table
                         with those columns): format ``paper_ab`` (both answers as choices (A)/(B), order seeded).
``response_pair``        A prompt with two responses, one per side (Alpaca/DPO with two outputs): format ``response``.
``single_text``          One side's text (a statement or a prompt with one response): format ``statement``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data import Text, chat, choice_text, question_stem

STATEMENT_PROMPT = "Say something about yourself in one sentence."
AB_SUFFIX = "\n\nAnswer with A or B."
SPLITS = ("calibration", "validation", "test")


@dataclass(frozen=True)
class Item:
    """One scored item: a user turn and two candidate assistant continuations (or one statement)."""

    id: str
    format: str
    user: str
    choices: tuple[str, ...]
    matching: int  # index into choices of the persona-matching continuation; for statements 1 = trait, 0 = opposite


@dataclass(frozen=True)
class Record:
    """One row: its stratification ``label``, calibration texts per side (``None`` where the row has none) and the
    evaluation items it yields, by format (their ids are filled in when drawn)."""

    label: str
    persona: Text | None
    opposite: Text | None
    items: Mapping[str, Item] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A content hash: equal rows have equal keys, whatever file or order they came from."""
        text = json.dumps([self.persona, self.opposite, sorted((f, i.user, i.choices) for f, i in self.items.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _item(fmt: str, user: str, choices: Sequence[str], matching: int) -> Item:
    return Item("", fmt, user, tuple(choices), matching)


def anthropic_statement(row: Mapping[str, Any]) -> Record:
    """An Anthropic persona row: the statement calibrates the side its answer names; Yes/No and statement items."""
    trait = row["answer_matching_behavior"].strip() == "Yes"
    statement = row["statement"]
    items = {
        "yes_no": _item("yes_no", row["question"], (" Yes", " No"), 0 if trait else 1),
        "statement": _item("statement", STATEMENT_PROMPT, (statement,), 1 if trait else 0),
    }
    return Record("Yes" if trait else "No", statement if trait else None, None if trait else statement, items)


def ab_question(row: Mapping[str, Any]) -> Record:
    """An advanced-ai-risk row: stem + matching choice calibrates the persona, stem + the other its opposite."""
    matching = row["answer_matching_behavior"].strip().strip("()")
    other = row["answer_not_matching_behavior"].strip().strip("()")
    stem = question_stem(row["question"])
    item = _item("ab", row["question"].strip() + AB_SUFFIX, ("A", "B"), "AB".index(matching))
    return Record(
        matching,
        chat(stem, choice_text(row["question"], matching)),
        chat(stem, choice_text(row["question"], other)),
        {"ab": item},
    )


def choice_pair(question: str, matching: str, not_matching: str, first: bool, fmt: str = "paper_ab") -> Record:
    """A question and its two answers; ``first`` puts the matching answer at (A)."""
    a, b = (matching, not_matching) if first else (not_matching, matching)
    user = f"{question.strip()}\n\nChoices:\n (A) {a.strip()}\n (B) {b.strip()}" + AB_SUFFIX
    item = _item(fmt, user, ("A", "B"), 0 if first else 1)
    return Record("A" if first else "B", chat(question, matching), chat(question, not_matching), {fmt: item})


def paper_csv_row(row: Mapping[str, Any], rng: random.Random) -> Record:
    """The paper's CSV: ``question,A,B,matching`` (letter) keeps its order; ``question,matching,not_matching`` gets
    a seeded order."""
    if "A" in row and "B" in row:
        letter = row["matching"].strip()
        if letter not in ("A", "B"):
            raise ValueError(f"'matching' must be 'A' or 'B', got {letter!r}")
        other = "B" if letter == "A" else "A"
        return choice_pair(row["question"], row[letter], row[other], letter == "A")
    return choice_pair(row["question"], row["matching"], row["not_matching"], rng.random() < 0.5)


def response_pair(prompt: str, persona: str, opposite: str, first: bool) -> Record:
    """A prompt with one response per side; the item compares the two responses' per-token log-likelihoods."""
    choices = (persona, opposite) if first else (opposite, persona)
    item = _item("response", prompt, choices, 0 if first else 1)
    return Record("first" if first else "second", chat(prompt, persona), chat(prompt, opposite), {"response": item})


def single_text(text: Text, trait: bool) -> Record:
    """One side's text: a plain statement (said after :data:`STATEMENT_PROMPT`) or a prompt/response conversation."""
    if isinstance(text, str):
        user, reply = STATEMENT_PROMPT, text
    else:
        user = next(m["content"] for m in text if m["role"] == "user")
        reply = next(m["content"] for m in text if m["role"] == "assistant")
    item = _item("statement", user, (reply,), 1 if trait else 0)
    return Record(
        "persona" if trait else "opposite", text if trait else None, None if trait else text, {"statement": item}
    )


def split_records(
    records: Sequence[Record], calibration: int | float, validation: float, seed: int = 0
) -> dict[str, list[Record]]:
    """Stratified, seeded split into calibration, validation and test.

    The records are shuffled once with ``seed``; within each label the first ``calibration`` records (a count per
    label, or a fraction of the label's records) calibrate, the next ``validation`` fraction of the rest validates,
    and the remainder tests. With an integer ``calibration`` of 100 and seed 0 the calibration part is exactly
    :func:`peft_persona.data.anthropic_split`'s.
    """
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    groups: dict[str, list[Record]] = {}
    for index in order:
        groups.setdefault(records[index].label, []).append(records[index])
    parts: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label in sorted(groups):
        group = groups[label]
        n_cal = calibration if isinstance(calibration, int) else round(calibration * len(group))
        rest = group[n_cal:]
        n_val = round(validation * len(rest))
        parts["calibration"] += group[:n_cal]
        parts["validation"] += rest[:n_val]
        parts["test"] += rest[n_val:]
    rank = {id(records[j]): i for i, j in enumerate(order)}
    for name in ("validation", "test"):  # back to the shuffled order, labels interleaved
        parts[name].sort(key=lambda r: rank[id(r)])
    return parts


def draw_items(records: Sequence[Record], fmt: str, n: int | None, seed: int, prefix: str) -> list[Item]:
    """``n`` items of format ``fmt`` (all when ``None``), balanced between labels, drawn with ``seed``."""
    usable = [r for r in records if fmt in r.items]
    if not usable:
        raise ValueError(f"{prefix}: no records with format {fmt!r}")
    if n is not None:
        if n < 2:
            raise ValueError(f"need at least 2 items, got n={n}")
        groups: dict[str, list[Record]] = {}
        for record in usable:
            groups.setdefault(record.label, []).append(record)
        rng = random.Random(seed)
        picked: list[Record] = []
        for label in sorted(groups):
            want = n // len(groups)
            if len(groups[label]) < want:
                raise ValueError(
                    f"{prefix}: only {len(groups[label])} {fmt!r} items labelled {label!r}; {want} requested"
                )
            picked += rng.sample(groups[label], want)
        rng.shuffle(picked)
        usable = picked
    return [
        Item(f"{prefix}/{i}", fmt, r.items[fmt].user, r.items[fmt].choices, r.items[fmt].matching)
        for i, r in enumerate(usable)
    ]
