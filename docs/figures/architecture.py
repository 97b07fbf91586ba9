# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Draw the package map of docs/architecture.md from its plain-text source.

    python docs/figures/architecture.py [--spec docs/figures/architecture.txt] [--out docs/figures/architecture.png]

The source's format is described at its top: columns ("wings") left to right in import order, their modules, and
boxes for the code outside the package. Only matplotlib is needed."""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
WING_COLORS = ["#e8eef7", "#fdf1dc", "#e5f3e6", "#f6e4ec", "#ece8f6", "#eeeeee"]
SIDE_COLOR = "#f7f7f2"


def parse(text: str) -> tuple[list[dict], list[dict]]:
    """-> (wings, sides); a wing is {"title", "caption", "folder", "rows": [(nested, names, note)]}."""
    wings, sides, current = [], [], None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        if kind in ("wing", "side") and not raw.startswith(" "):
            title, caption, folder = ([part.strip() for part in rest.split("|")] + ["", ""])[:3]
            if kind == "wing" and not folder.endswith("/"):
                raise ValueError(f"line {n}: a `wing` line ends with `| <folder>/`, got {raw!r}")
            current = {"title": title, "caption": caption, "folder": folder, "rows": []}
            (wings if kind == "wing" else sides).append(current)
            continue
        if current is None or current in sides:
            raise ValueError(f"line {n}: a module line must follow a `wing` line, got {raw!r}")
        nested = line != line.lstrip()
        parents = [names for is_nested, names, _ in current["rows"] if not is_nested]
        if nested and not (parents and parents[-1].endswith("/")):
            raise ValueError(f"line {n}: an indented line needs a folder line (`name/`) above it, got {raw!r}")
        name, sep, note = line.strip().partition("  ")
        current["rows"].append((nested, name, note.strip() if sep else ""))
    if not wings:
        raise ValueError("the spec has no `wing` line")
    return wings, sides


def module_paths(wings: list[dict]) -> list[str]:
    """Every path the wings name, relative to the repository root (`tests/test_docs.py` checks that they exist)."""
    paths = []
    for wing in wings:
        inner = wing["folder"]  # where indented lines live: the last unindented folder line
        for nested, names, _ in wing["rows"]:
            for name in (part.strip() for part in names.split(",")):
                paths.append((inner if nested else wing["folder"]) + name)
            if not nested:
                inner = wing["folder"] + names
    return paths


def draw(wings: list[dict], sides: list[dict], out: Path) -> None:
    col_w, gap, row_h, head_h = 3.05, 0.55, 0.36, 0.75
    n_rows = max(len(w["rows"]) for w in wings)
    col_h = head_h + n_rows * row_h + 0.2
    side_h, side_gap = 0.55, 0.25
    width = len(wings) * col_w + (len(wings) - 1) * gap
    height = col_h + 0.9 + len(sides) * (side_h + side_gap)
    fig = plt.figure(figsize=(width + 0.4, height + 0.4), dpi=110)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-0.2, height + 0.2)
    ax.axis("off")

    top = height - 0.55
    ax.text(width / 2, height - 0.15, "diffusers_sla: imports point one way, right to left", ha="center",
            va="center", fontsize=13, weight="bold")
    for i, wing in enumerate(wings):
        x = i * (col_w + gap)
        h = head_h + len(wing["rows"]) * row_h + 0.2  # each column as tall as its modules, tops aligned
        ax.add_patch(FancyBboxPatch((x, top - h), col_w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=WING_COLORS[i % len(WING_COLORS)], ec="#555555", lw=1.2))
        ax.text(x + col_w / 2, top - 0.25, wing["title"], ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + col_w / 2, top - 0.52, f'{wing["caption"]}   {wing["folder"]}', ha="center", va="center",
                fontsize=8.5, style="italic", color="#444444")
        for r, (nested, name, note) in enumerate(wing["rows"]):
            y = top - head_h - (r + 0.5) * row_h
            dx = 0.32 if nested else 0.12
            ax.text(x + dx, y + 0.07, name, ha="left", va="center", fontsize=8.6, family="monospace",
                    weight="bold")
            ax.text(x + dx + 0.05, y - 0.1, note, ha="left", va="center", fontsize=7.6, color="#444444")
        if i:  # this wing imports from the one on its left
            y = top - head_h - 0.3
            ax.add_patch(FancyArrowPatch((x - 0.04, y), (x - gap + 0.04, y), arrowstyle="-|>", mutation_scale=18,
                                         lw=1.6, color="#333333"))
            ax.text(x - gap / 2, y + 0.22, "imports", ha="center", va="bottom", fontsize=7.5, color="#333333")
    y = top - col_h - 0.35
    for side in sides:
        ax.add_patch(FancyBboxPatch((0, y - side_h), width, side_h, boxstyle="round,pad=0.02,rounding_size=0.1",
                                    fc=SIDE_COLOR, ec="#888888", lw=1.0, ls="--"))
        ax.text(0.15, y - side_h / 2, side["title"], ha="left", va="center", fontsize=10.5, weight="bold",
                family="monospace")
        ax.text(1.6, y - side_h / 2, side["caption"], ha="left", va="center", fontsize=9.5, color="#333333")
        y -= side_h + side_gap
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=HERE / "architecture.txt")
    parser.add_argument("--out", type=Path, default=HERE / "architecture.png")
    args = parser.parse_args()
    wings, sides = parse(args.spec.read_text())
    draw(wings, sides, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
