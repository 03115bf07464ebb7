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


# ---------------------------------------------------------------------- one registration path
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def declared_entry_points() -> dict[str, dict[str, str]]:
    """``unimoe.*`` entry-point groups of pyproject.toml: group -> name -> ``module:object``."""
    import tomllib

    groups = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]
    return {g: dict(eps) for g, eps in groups.items() if g.startswith("unimoe.")}


def test_in_tree_code_never_registers_by_side_effect():
    """Components are declared as entry points only; no module registers itself when imported."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.isupper()):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"declare these as entry points in pyproject.toml instead: {offenders}"
    assert not (PACKAGE / "components.py").exists()


def test_every_declared_component_resolves_to_its_kind_and_the_install_is_current():
    from importlib import metadata

    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    from lightning.pytorch.strategies import Strategy

    from unimoe.codecs.base import AudioCodec
    from unimoe.evaluation.backends.base import MetricBackend
    from unimoe.evaluation.scorers import Scorer
    from unimoe.model.tasks import TaskBuilder
    from unimoe.model.text_tokenizer import TextTokenizer
    from unimoe.model.vision import VisionEncoder
    from unimoe.moe.experts import ExpertGroup
    from unimoe.moe.routers import Router
    from unimoe.registry import ALL_REGISTRIES

    kinds = {"routers": Router, "experts": ExpertGroup, "codecs": AudioCodec, "tasks": TaskBuilder,
             "vision_encoders": VisionEncoder, "text_tokenizers": TextTokenizer, "metrics": MetricBackend,
             "eval_scorers": Scorer, "stages": LightningModule, "data_modules": LightningDataModule,
             "callbacks": Callback, "strategies": Strategy, "generation_presets": None}
    declared = declared_entry_points()
    assert set(declared) == {r.entry_point_group for r in ALL_REGISTRIES} == {f"unimoe.{k}" for k in kinds}
    installed = {(ep.group, ep.name, ep.value) for ep in metadata.distribution("unimoe").entry_points
                 if ep.group.startswith("unimoe.")}
    in_pyproject = {(g, n, v) for g, eps in declared.items() for n, v in eps.items()}
    assert installed == in_pyproject, "the installed metadata is stale: run `pip install -e .` (scripts/setup.sh)"
    for registry in ALL_REGISTRIES:
        for name in declared[registry.entry_point_group]:
            obj = registry.get(name)
            if registry.name == "generation_presets":  # functions returning GenerationSettings fields
                from unimoe.generation.settings import GenerationSettings

                GenerationSettings.from_options(obj())
                continue
            assert isinstance(obj, type) and issubclass(obj, kinds[registry.name]), (registry.name, name, obj)
            if registry.name in ("stages", "data_modules", "callbacks"):
                assert obj.__name__ == name  # LightningCLI resolves YAML's short class_path by class name
