# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The package's import rules, read from the source: imports run one way (config <- ops <- integration <- weights <-
hooks <- cli / demo / __init__), no module of the glue imports another's private names, and none imports inside a
function to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_sla"
# Each wing may import the wings before it. (`__version__` comes from the package's __init__, which sets it before
# it imports anything.)
WINGS = ("config", "utils", "ops", "integration", "weights", "hooks")
TOP = ("__init__", "__main__", "cli", "demo", "tiny", "converters")
# The glue's modules (the operator's kernels live under other rules).
GLUE = ("config", "integration", "weights", "hooks")
# Imports inside functions that are not about a cycle: the reason is in a comment beside each.
LAZY_ALLOWED = {("integration/parallel.py", "torch.distributed")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, ast.parse(path.read_text(encoding="utf-8"))


def _wing(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _targets(rel: Path, node: ast.ImportFrom) -> list[str]:
    """The package-relative module each name of a `from ... import` comes from ("" for the package itself)."""
    if node.level:
        base = list(rel.parent.parts)[: len(rel.parent.parts) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == "diffusers_sla" or node.module.startswith("diffusers_sla.")):
        module = node.module[len("diffusers_sla."):] if node.module != "diffusers_sla" else ""
    else:
        return []
    return [module if module else alias.name for alias in node.names]


def _imports():
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in _targets(rel, node):
                    yield rel, node, target


def test_imports_run_one_way():
    order = {wing: index for index, wing in enumerate(WINGS)}
    wrong = []
    for rel, node, target in _imports():
        wing, imported = _wing(rel), target.split(".")[0]
        if imported == "__version__" or wing in TOP:
            continue
        if imported in TOP or order[imported] > order[wing]:
            wrong.append(f"{rel}:{node.lineno} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_glue_imports_no_private_names():
    wrong = [f"{rel}:{node.lineno} imports {alias.name} from {node.module}"
             for rel, node, _ in _imports() if _wing(rel) in GLUE
             for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("wing", GLUE)
def test_glue_imports_at_module_level(wing):
    lazy = []
    for rel, tree in _modules():
        if _wing(rel) != wing:
            continue
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if (rel.as_posix(), module) not in LAZY_ALLOWED:
                        lazy.append(f"{rel}:{node.lineno} imports {module} inside {function.name}")
    assert not lazy, "\n".join(lazy)
