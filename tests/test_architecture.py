"""The package's layout holds: dependencies between subpackages point one way (the pipeline
decompose -> layers -> compression -> modeling -> {distill, evaluation, export, tasks, cli}), imports
sit at module top (only optional dependencies are imported inside functions), and no private name
crosses a module boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kronlm"

# Each subpackage may import only subpackages of a lower rank.
RANKS = {
    "utils": 0,
    "decompose": 1,
    "data": 1,
    "layers": 2,
    "compression": 3,
    "modeling": 4,
    "evaluation": 5,
    "export": 5,
    "bench": 5,
    "distill": 6,
    "glue": 7,
    "tasks": 7,
    "cli": 8,
}
OPTIONAL_DEPENDENCIES = {"onnx", "onnxruntime", "onnxscript", "peft", "lm_eval", "matplotlib"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        package = rel.parts[0] if len(rel.parts) > 1 else None  # None: the root kronlm/__init__.py etc.
        yield path, package, ast.parse(path.read_text(encoding="utf-8"))


def _kronlm_targets(node: ast.AST) -> list[tuple[str | None, list[str]]]:
    """(subpackage imported, names imported from it) of an import statement; None = the root."""
    out = []
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        parts = node.module.split(".")
        if parts[0] == "kronlm":
            out.append((parts[1] if len(parts) > 1 else None, [a.name for a in node.names]))
    elif isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "kronlm":
                out.append((parts[1] if len(parts) > 1 else None, []))
    return out


def _edges():
    edges = {}
    for path, package, tree in _modules():
        if package is None:
            continue
        for node in ast.walk(tree):
            for target, _ in _kronlm_targets(node):
                if target != package:
                    edges.setdefault((package, target), path.relative_to(SRC))
    return edges


def test_every_subpackage_has_a_rank():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(RANKS), f"give {sorted(packages - set(RANKS))} a rank in RANKS"


def test_subpackage_imports_point_down_the_pipeline():
    wrong = {
        f"{a} -> {b or 'kronlm'} ({where})"
        for (a, b), where in _edges().items()
        if b is None or RANKS[b] >= RANKS[a]
    }
    assert not wrong, "imports against the layering: " + "; ".join(sorted(wrong))


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b or "kronlm")
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail + [node, nxt]))
            if state.get(nxt) is None:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in list(graph):
        if state.get(node) is None:
            visit(node, [])


def test_imports_inside_functions_are_only_optional_dependencies():
    found = []
    for path, _, tree in _modules():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {(node.module or "").split(".")[0]}
                else:
                    continue
                if roots - OPTIONAL_DEPENDENCIES:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, "imports inside functions: " + ", ".join(found)


def test_no_private_name_is_imported_from_another_kronlm_module():
    found = []
    for path, _, tree in _modules():
        for node in ast.walk(tree):
            for _, names in _kronlm_targets(node):
                found += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n.startswith("_")]
    assert not found, "private names imported: " + ", ".join(found)
