"""The package's shape, read from its source with ``ast``: a one-way import graph, short functions, no private imports.

Every module has a rank (docs/architecture.md draws them). An import, lazy ones inside functions included, must go
from a higher rank to a strictly lower one; modules of equal rank in one folder may import each other, but no cycle
may form anywhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peft_persona"
MAX_FUNCTION_LINES = 60

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_CLASS_LINES, MAX_MODULE_LINES = 300, 400


def documented_ranks() -> dict[str, int]:
    """Module to rank, read from the module table of docs/architecture.md (``peft_persona`` is ``__init__``)."""
    rows = re.findall(r"^\| (-?\d+) \| `([\w.]+)` \|", ARCHITECTURE.read_text(), flags=re.M)
    return {("" if name == "peft_persona" else name): int(rank) for rank, name in rows}


# Lower ranks never import higher ones. A module missing from the page fails the test, so a new module must be placed.
RANKS: dict[str, int] = documented_ranks()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(name: str, path: Path) -> list[str]:
    parts = name.split(".") if name else []
    return parts if path.name == "__init__.py" else parts[:-1]


def resolve(node: ast.ImportFrom, name: str, path: Path) -> list[str]:
    """Package-relative names of the modules an ``import from`` statement reads."""
    if node.level == 0:
        if not (node.module or "").startswith("peft_persona"):
            return []
        base = node.module.split(".")[1:]
    else:
        package = package_of(name, path)
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    found = []
    for alias in node.names:
        candidate = ".".join(base + [alias.name])
        found.append(candidate if candidate in modules() else ".".join(base))
    return found


def imports_of(path: Path) -> set[str]:
    name = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            found.update(resolve(node, name, path))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".", 1)[1] if "." in a.name else ""
                for a in node.names
                if a.name.split(".")[0] == "peft_persona"
            )
    found.discard(name)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path) for name, path in modules().items()}


def test_every_module_has_a_rank_and_every_rank_a_module():
    assert sorted(set(modules()) - set(RANKS)) == []  # missing from docs/architecture.md
    assert sorted(set(RANKS) - set(modules())) == []  # listed there, but gone from the package


def test_imports_only_go_down():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            same_folder = (name.rsplit(".", 1)[0] == target.rsplit(".", 1)[0] and "." in name) or (
                target.startswith(name + ".")  # a package's __init__ gathering its own modules
            )
            if RANKS[target] > RANKS[name] or (RANKS[target] == RANKS[name] and not same_folder and target != ""):
                upward.append(f"{name} (rank {RANKS[name]}) -> {target} (rank {RANKS[target]})")
    assert upward == []


def test_import_graph_has_no_cycle():
    edges = graph()
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        for target in sorted(edges.get(node, set())):
            if target in trail:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target) :] + [target]))
            if target not in done:
                visit(target, trail + [target])
        done.add(node)

    for name in sorted(edges):
        visit(name, [name])


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []


def test_no_class_or_module_is_too_long():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"module {name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"class {name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_no_private_name_is_imported_across_modules():
    private = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and resolve(node, name, path):
                private += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_the_package_names_no_issue_numbers_or_shared_folder():
    offending = []
    for name, path in modules().items():
        text = path.read_text()
        for marker in ("../shared", "(issue ", "issue #"):
            if marker in text:
                offending.append(f"{name}: {marker}")
    assert offending == []
