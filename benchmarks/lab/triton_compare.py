# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Compare `benchmarks.kernel bench` logs of two Triton releases taken in one GPU lease, row by row.

    python -m benchmarks.lab.triton_compare DIR [DIR ...]   # each DIR: base-bench.txt, new-bench.txt (or base/bench.txt...)

`benchmarks/lab/triton_gpu.sh` writes such pairs (the machine's Triton, "base", and a carried newer one, "new"). For
each provider row of the Wan layer table it prints both times and new/base, per pair (a pair = one back-to-back run
of both), and whether every row of ours stays within --tolerance of the base release.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROW = re.compile(r"^(SDPA \S+|SLA ours \(\w+\))\s+([\d.]+)\s+([\d.]+)")
VERSION = re.compile(r"triton ([\d.]+)")


def read_bench(path: Path) -> tuple[str, dict[str, tuple[float, float]]]:
    """(Triton version, {provider: (fwd ms, bwd ms)}) of one `kernel bench` log."""
    text = path.read_text()
    version = VERSION.search(text)
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in map(ROW.match, text.splitlines()) if m}
    if not rows:
        raise SystemExit(f"{path}: no provider rows (is it a `benchmarks.kernel bench` log?)")
    return (version.group(1) if version else "?"), rows


def bench_log(folder: Path, which: str) -> Path:
    """`which`-bench.txt, or which/bench.txt as `triton_gpu.sh run` writes it."""
    flat = folder / f"{which}-bench.txt"
    return flat if flat.exists() else folder / which / "bench.txt"


def compare(folders: list[Path], tolerance: float) -> tuple[list[str], bool]:
    lines, within, outside = [], True, []
    for folder in folders:
        base_version, base = read_bench(bench_log(folder, "base"))
        new_version, new = read_bench(bench_log(folder, "new"))
        lines += [f"{folder.name}: Triton {base_version} (base) against {new_version} (new), same machine",
                  f"| provider | fwd ms {base_version} | fwd ms {new_version} | new/base | "
                  f"bwd ms {base_version} | bwd ms {new_version} | new/base |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, (bf, bb) in base.items():
            if name not in new:
                continue
            nf, nb = new[name]
            lines.append(f"| {name} | {bf:.3f} | {nf:.3f} | {nf / bf:.3f} | {bb:.3f} | {nb:.3f} | {nb / bb:.3f} |")
            if name.startswith("SLA ours") and max(nf / bf, nb / bb) > 1 + tolerance:
                within = False
            for pass_name, ratio in (("fwd", nf / bf), ("bwd", nb / bb)):
                if abs(ratio - 1) > tolerance:
                    outside.append(f"{folder.name} {name} {pass_name} {ratio:.2f}")
        lines.append("")
    lines.append(f"rows more than {tolerance:.0%} apart (either way): {', '.join(outside) or 'none'}")
    lines.append(f"every row of ours within {tolerance:.0%} of the base release in every pair: {within}")
    return lines, within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed slowdown of new over base")
    args = parser.parse_args()
    lines, _ = compare(args.folders, args.tolerance)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
