# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""docs/: the package map (docs/figures/architecture.py drawing docs/figures/architecture.txt) names modules that
exist, its source format is checked, the documents' relative links resolve, and no document points to the kernel
work log's old home."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "figures" / "architecture.txt"


def _architecture_figure():
    # a script under docs/, not a module of the package: loaded from its file
    spec = importlib.util.spec_from_file_location("architecture_figure", ROOT / "docs" / "figures" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_architecture_map_names_existing_modules():
    figure = _architecture_figure()
    wings, _ = figure.parse(SPEC.read_text())
    paths = figure.module_paths(wings)
    assert "diffusers_sla/config.py" in paths and len(paths) > 20
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/figures/architecture.txt names modules that do not exist: {missing}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("config.py  SLAConfig\n", "line 1: a module line must follow a `wing` line"),
        ("wing ops | the operator\nselection.py  block map\n", "line 1: a `wing` line ends with"),
        ("wing ops | the operator | diffusers_sla/ops/\napi.py  public\n  x.py  inside\n", "line 3: an indented line"),
        ("# only a comment\n", "the spec has no `wing` line"),
    ],
)
def test_architecture_spec_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _architecture_figure().parse(text)


def test_architecture_figure_renders(tmp_path):
    figure = _architecture_figure()
    wings, sides = figure.parse(SPEC.read_text())
    out = tmp_path / "architecture.png"
    figure.draw(wings, sides, out)
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 1000 and image.height > 500


def test_relative_links_in_documents_resolve():
    broken = []
    for doc in _documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_no_document_points_to_the_old_kernel_log():
    # the work log moved to docs/history/kernel-journal.md (which names its old path) and its design to
    # docs/kernel-design.md
    old = "NOTES" + ".md"
    files = [*_documents(), *(ROOT / "diffusers_sla").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
             *(ROOT / "benchmarks").rglob("*.md"), *(ROOT / "tests").rglob("*.py")]
    hits = [str(f.relative_to(ROOT)) for f in files
            if "history" not in f.parts and old in f.read_text(encoding="utf-8")]
    assert not hits, f"still pointing to {old}: {hits}"
