"""The study package keeps its shape: no import cycle, no hidden (function-local) imports of our own
modules, no private names used across modules, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "optimizer" / "study"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.glob("*.py")):
        out["optimizer.study" if p.stem == "__init__" else f"optimizer.study.{p.stem}"] = p
    return out


def _imports(tree: ast.AST) -> list[tuple[ast.ImportFrom | ast.Import, bool]]:
    """(import node, at module level) for every import in ``tree``."""
    top = {id(n) for n in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, id(node) in top))
    return found


def _targets(node: ast.ImportFrom | ast.Import, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(our module, imported name) pairs of one import node."""
    out = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optimizer"):
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            out.append((sub, "") if sub in mods else (node.module, a.name))
    elif isinstance(node, ast.Import):
        out += [(a.name, "") for a in node.names if a.name.startswith("optimizer")]
    return out


def test_study_package_has_no_import_cycle_and_no_hidden_imports() -> None:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node, top in _imports(ast.parse(path.read_text())):
            for target, attr in _targets(node, mods):
                assert top, f"{path.name}:{node.lineno}: function-local import of {target}"
                assert not attr.startswith("_"), f"{path.name}:{node.lineno}: imports private {target}.{attr}"
                if target in mods and target != name:
                    edges[name].add(target)
    for name in mods:
        if name != "optimizer.study":
            assert "optimizer.study" not in edges[name], f"{name} imports the package __init__ (a cycle)"
    # depth-first search for a cycle among the submodules
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [])


def test_no_private_attribute_of_our_modules_is_used_across_modules() -> None:
    for path in sorted((ROOT / "optimizer").rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node, _ in _imports(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("optimizer") for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert not node.attr.startswith("_"), f"{path}:{node.lineno}: {node.value.id}.{node.attr}"


def test_no_study_module_is_over_the_size_limit() -> None:
    for path in _modules().values():
        n = len(path.read_text().splitlines())
        assert n <= MAX_LINES, f"{path.name} has {n} lines (limit {MAX_LINES})"
