"""Structural rules of the package, checked on the source: no import circles inside model/ and moe/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unimoe"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every unimoe module ``path`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    found: set[str] = set()
    this = module_name(path)

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != this}


def import_cycles(prefixes: tuple[str, ...]) -> list[list[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    inside = {m for m in modules if m.startswith(prefixes)}
    graph = {m: imported_modules(modules[m], set(modules)) & inside for m in inside}
    cycles: set[tuple[str, ...]] = set()

    def walk(node: str, stack: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                cycle = stack[stack.index(dep):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            else:
                walk(dep, stack + [dep])

    for module in sorted(graph):
        walk(module, [module])
    return [list(c) for c in sorted(cycles)]


def test_no_import_circles_inside_model_and_moe():
    assert import_cycles(("unimoe.model", "unimoe.moe")) == []


def test_the_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    """A circle closed only by an import inside a function still counts (the checker is not blind)."""
    pkg = tmp_path / "unimoe" / "x"
    pkg.mkdir(parents=True)
    (tmp_path / "unimoe" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from unimoe.x.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from unimoe.x import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from unimoe.x import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "unimoe")
    assert import_cycles(("unimoe.x",)) == [["unimoe.x.a", "unimoe.x.b"]]
