"""Compare ways of moving a model toward a persona under one NLL budget, chosen on validation, reported on test.

Each *arm* (see :mod:`peft_persona.eval.arms`) is one method with a grid of settings: masks of a recipe, the persona
prompt, prompt plus mask, a CAA steering vector, a LoRA. Every setting (a *point*) has a persona side and an opposite
side. On the validation items a point is scored by

- ``switch``: the persona side's margin minus the opposite side's, balanced over the two answer halves of two-choice
  items (:func:`~peft_persona.eval.balance.balanced_mean`), so an answer bias cannot pass for a persona;
- ``shift``: the persona side's balanced margin minus the base model's, and ``moves_both``: whether it rose in both
  halves;
- ``cost``: general-ability NLL (nats/token on neutral text, no system prompt) of the worse side minus the base's.

An arm's best ``switch`` within the budget (:func:`~peft_persona.eval.budget.choose`) is then scored once on the
test items, in every format of the persona, with 95% CIs. Everything scored is written to a state file after each
point, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from .. import atomic, significance
from . import harness
from .balance import balanced, balanced_mean, half_shifts
from .budget import choose
from .items import Item, Persona, load_items, neutral_texts

Side = Callable[[], contextlib.AbstractContextManager[tuple[nn.Module, "str | None"]]]
Log = Callable[[str], None]


@dataclass
class Point:
    """One setting of an arm. ``sides()`` builds (if needed) and returns the persona and opposite sides."""

    arm: str
    knobs: dict[str, Any]
    sides: Callable[[], tuple[Side, Side]]
    extra: dict[str, Side] = field(default_factory=dict)  # controls scored beside it on test (masks: neutral)

    @property
    def key(self) -> str:
        return self.arm + "".join(f"/{k}={v:g}" if isinstance(v, float) else f"/{k}={v}" for k, v in self.knobs.items())


class Arm(Protocol):
    """A method and its grid. ``footprint()`` is ``{"bytes": ..., "seconds": ...}`` of the pair it makes."""

    name: str

    def points(self) -> Iterator[Point]: ...

    def point(self, knobs: dict[str, Any]) -> Point: ...

    def footprint(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Split:
    """The items (per format) and neutral passages one phase is scored on."""

    items: dict[str, list[Item]]
    passages: list[str]


def splits(
    persona: Persona, data_root: Path | None, n_validation: int | None, n_test: int | None, n_passages: int, seed: int
) -> tuple[Split, Split]:
    """Validation items in the persona's first format, test items in every format; disjoint neutral passages."""
    passages = neutral_texts(data_root, "eval", 2 * n_passages) if n_passages else []
    first = persona.formats[0]
    validation = Split({first: load_items(data_root, persona, first, n_validation, seed, "validation")}, passages[::2])
    test = Split({f: load_items(data_root, persona, f, n_test, seed, "test") for f in persona.formats}, passages[1::2])
    return validation, test


def measure(side: Side, tokenizer: Any, split: Split, batch_size: int) -> dict[str, Any]:
    """Per-item values of every format and the corpus NLL of the neutral passages (without the system prompt)."""
    with side() as (model, system):
        values = {
            fmt: harness.item_values(items, harness.score_items(model, tokenizer, items, system, batch_size))
            for fmt, items in split.items.items()
        }
        nll = harness.general_nll(model, tokenizer, split.passages, batch_size)["corpus_nll"] if split.passages else 0.0
    return {"values": values, "nll": nll}


def measure_pair(point: Point, tokenizer: Any, split: Split, batch_size: int) -> dict[str, dict[str, Any]]:
    """Both sides of a point, measured."""
    persona, opposite = point.sides()
    return {
        "persona": measure(persona, tokenizer, split, batch_size),
        "opposite": measure(opposite, tokenizer, split, batch_size),
    }


def _per_item(fmt: str, values: dict[str, list]) -> tuple[np.ndarray, list[int]]:
    """The per-item persona margin of a format and the labels it is balanced or grouped over."""
    if fmt == "statement":
        return np.asarray(values["logprob"], float), [int(t) for t in values["trait"]]
    return np.asarray(values["margin"], float), [int(m) for m in values["matching"]]


def difference(fmt: str, a: dict[str, list], b: dict[str, list], seed: int = 0) -> dict[str, float]:
    """How much more ``a`` favours the persona than ``b`` on the same items, with a 95% CI (nats/token).

    Two-choice formats: the balanced mean of the per-item margin differences. Statements: the log-likelihood
    difference of persona statements minus that of opposite statements (stratified bootstrap).
    """
    left, labels = _per_item(fmt, a)
    right, _ = _per_item(fmt, b)
    if fmt == "statement":
        result = significance.group_difference(left - right, labels, seed=seed)
        return {"mean": result["diff"], "ci_low": result["ci_low"], "ci_high": result["ci_high"]}
    return balanced_mean(left - right, labels, seed=seed)


def validation_score(point: dict[str, Any], base: dict[str, Any], fmt: str) -> dict[str, Any]:
    """``switch``, ``shift``, ``moves_both`` and ``cost`` of a point's two measured sides against the base."""
    persona, opposite = point["persona"]["values"][fmt], point["opposite"]["values"][fmt]
    result = {
        "switch": difference(fmt, persona, opposite)["mean"],
        "shift": difference(fmt, persona, base["values"][fmt])["mean"],
        "cost": max(point["persona"]["nll"], point["opposite"]["nll"]) - base["nll"],
    }
    if fmt != "statement":
        result["moves_both"] = half_shifts(persona, base["values"][fmt])["moves_both"]
        result["balanced_accuracy"] = balanced(persona)["balanced_accuracy"]
    return result


def test_report(
    persona: dict[str, Any], opposite: dict[str, Any], base: dict[str, Any], extra: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per format: switch, shift against the base and each extra control, with CIs; bias-aware two-choice scores."""
    formats: dict[str, Any] = {}
    for fmt, values in persona["values"].items():
        entry = {
            "switch": difference(fmt, values, opposite["values"][fmt]),
            "shift": difference(fmt, values, base["values"][fmt]),
            **{f"vs {name}": difference(fmt, values, side["values"][fmt]) for name, side in extra.items()},
        }
        if fmt != "statement":
            shifts = half_shifts(values, base["values"][fmt])
            entry.update(
                balanced_accuracy=balanced(values)["balanced_accuracy"],
                opposite_balanced_accuracy=balanced(opposite["values"][fmt])["balanced_accuracy"],
                base_balanced_accuracy=balanced(base["values"][fmt])["balanced_accuracy"],
                answer_bias_shift=shifts["answer_bias_shift"],
                moves_both=shifts["moves_both"],
            )
        formats[fmt] = entry
    return {"formats": formats, "cost": max(persona["nll"], opposite["nll"]) - base["nll"]}


class State:
    """The comparison's results so far, rewritten atomically after every scored point."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "validation": {}, "test": {}, "base": {}}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") != fingerprint:
                raise ValueError(f"{path} was written by a comparison with other settings; use another folder")
            self.data = old

    def save(self) -> None:
        atomic.write_json(self.path, self.data, indent=1)


@dataclass(frozen=True)
class Budget:
    """How the best point of an arm is chosen and tested."""

    nll_budget: float = 0.2
    batch_size: int = 8


def run_arms(
    arms: Sequence[Arm],
    base: Side,
    tokenizer: Any,
    data: tuple[Split, Split],
    state: State,
    budget: Budget,
    log: Log = harness.to_stderr,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every arm's grid on validation, then its chosen point on test; resumes from ``state``."""
    from tqdm.auto import tqdm

    validation, test = data
    for phase, split in (("validation", validation), ("test", test)):
        if phase not in state.data["base"]:
            state.data["base"][phase] = measure(base, tokenizer, split, budget.batch_size)
            state.save()
    for arm in arms:
        bar = tqdm(desc=arm.name, unit="point", disable=not progress)
        keys = []
        for point in arm.points():
            keys.append(point.key)
            if point.key not in state.data["validation"]:
                state.data["validation"][point.key] = _validate(arm, point, tokenizer, validation, state, budget)
                state.save()
                log(f"{point.key}: switch {state.data['validation'][point.key]['switch']:+.3f}")
            bar.update(1)
        bar.close()
        chosen, within = choose([state.data["validation"][k] for k in keys], "switch", budget.nll_budget)
        if state.data["test"].get(arm.name, {}).get("validation") != chosen:
            state.data["test"][arm.name] = _test_arm(arm, chosen, within, tokenizer, test, state, budget)
            state.save()
        arm.release()
    return state.data


def _validate(arm: Arm, point: Point, tokenizer: Any, validation: Split, state: State, budget: Budget) -> dict:
    """One point's validation scores."""
    measured = measure_pair(point, tokenizer, validation, budget.batch_size)
    fmt = next(iter(validation.items))
    return {"arm": arm.name, "knobs": point.knobs, **validation_score(measured, state.data["base"]["validation"], fmt)}


def _test_arm(
    arm: Arm, chosen: dict[str, Any], within: bool, tokenizer: Any, test: Split, state: State, budget: Budget
) -> dict[str, Any]:
    """The arm's chosen point (best validation switch within the budget) scored on the test split."""
    point = arm.point(chosen["knobs"])
    measured = measure_pair(point, tokenizer, test, budget.batch_size)
    extra = {name: measure(side, tokenizer, test, budget.batch_size) for name, side in point.extra.items()}
    report = test_report(measured["persona"], measured["opposite"], state.data["base"]["test"], extra)
    return {"knobs": chosen["knobs"], "within_budget": within, "validation": chosen, **report, **arm.footprint()}
