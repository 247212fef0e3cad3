"""Choosing under an NLL budget: the Pareto front of effect against cost, and the best point within the budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Points no other point beats on both cost (lower) and ``objective`` (higher), by increasing cost."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p["cost"], -p[objective])):
        if point[objective] > best:
            front.append(point)
            best = point[objective]
    return front


def choose(points: Sequence[dict[str, Any]], objective: str, budget: float) -> tuple[dict[str, Any], bool]:
    """The best ``objective`` among points whose cost is within ``budget`` (ties: the cheaper), and ``True``; or,
    when none is, the cheapest point and ``False``."""
    within = [p for p in points if p["cost"] <= budget]
    if within:
        return max(within, key=lambda p: (p[objective], -p["cost"])), True
    return min(points, key=lambda p: p["cost"]), False
