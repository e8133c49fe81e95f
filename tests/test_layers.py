"""The layers of ``optimize`` (docs/design.md): each module imports only its own layer or those below, no method imports
another, no module imports one of the project's inside a function, every command has a module, and the earlier flat
module names are the same objects as the layered ones."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import optimize
from optimize.base import methods
from optimize.commands import method_module

ROOT = Path(optimize.__file__).parent
RANK = {"base": 0, "data": 1, "evaluation": 2, "training": 3, "methods": 4, "recipes": 5, "commands": 6, "usage": 6,
        "cli": 7, "__main__": 8}


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out.append((name, ast.parse(path.read_text())))
    return out


def _project_imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "optimize":
                names += [f"optimize.{a.name}" for a in node.names]
            elif node.module.startswith(("optimize.", "samplers")):
                names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.append("relative")
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] in ("optimize", "samplers")]
    return names


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "optimize" and len(parts) > 1 else None


def test_every_module_sits_in_a_known_layer() -> None:
    for name, _ in _modules():
        assert name == "optimize" or _layer(name) in RANK, f"{name} is in no layer of docs/design.md"


def test_imports_run_down_the_layers_only() -> None:
    wrong = []
    for name, tree in _modules():
        here = _layer(name)
        for target in _project_imports(tree):
            assert target != "relative", f"{name} uses a relative import; the layer of each import is spelled out"
            there = _layer(target)
            if here is None or there is None:
                continue
            if RANK[there] > RANK[here] or (here == there == "methods" and target != name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that run up a layer or across methods: " + ", ".join(wrong)


def test_no_project_import_inside_a_function() -> None:
    inside = []
    for name, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{name}.{fn.name} -> {t}" for t in _project_imports(fn) if t != "relative"]
    assert not inside, "function-level imports of the project's modules: " + ", ".join(inside)


@pytest.mark.parametrize("name", methods())
def test_every_command_has_a_module_with_run(name: str) -> None:
    module = method_module(name)
    assert callable(getattr(module, "run", None)), f"{module.__name__} has no run(cfg)"
    assert module.__name__.split(".")[1] in ("methods", "recipes", "evaluation")


@pytest.mark.parametrize("flat,home", sorted(optimize.FLAT_NAMES.items()))
def test_flat_names_are_the_layered_modules(flat: str, home: str) -> None:
    assert importlib.import_module(f"optimize.{flat}") is importlib.import_module(f"optimize.{home}")


def test_flat_name_attribute_access_after_import() -> None:
    import optimize.iia  # noqa: F401 - the earlier spelling users may have
    from optimize import results
    from optimize.methods import iia

    assert optimize.iia.fit is iia.fit and results.paired is importlib.import_module("optimize.evaluation.results").paired
