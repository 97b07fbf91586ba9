# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Tile-shape experiments on the GPU: the whole operator at the Wan layer shape under launch-shape overrides.

    python -m benchmarks.lab.tile_sweep                           # the variants below
    python -m benchmarks.lab.tile_sweep FWD_ROWS=64 FWD_WARPS=4   # one variant: constants of ops/tuning.py
    python -m benchmarks.lab.tile_sweep --fwd-only FWD_STAGES=2 / FWD_ROWS=64 FWD_WARPS=4   # variants apart by "/"

Each variant runs in its own process (the launch shapes are chosen when a kernel is first compiled) with the named
`tuning` constants set before the first call, times
forward and backward (scope "rest" and "all"), lists the largest kernels, and compares o, dq, dk, dv with the first
variant's (the defaults), so that a faster shape that computes something else shows up at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# the defaults against the shapes they replaced or beat
VARIANTS = [
    {},
    {"FWD_ROWS": "64"},
    {"FWD_ROWS": "64", "FWD_STAGES": "2"},
    {"DKDV_ROWS": "128", "BWD0_STAGES": "3"},
    {"DKDV_ROWS": "32"},
    {"BWD0_STAGES": "3"},
    {"DQ_ROWS": "128"},
]

CHILD = r'''
import json, sys, torch
from benchmarks.kernel import bench_ms, wan_inputs
from benchmarks.lab.profile_ops import kernel_table
from diffusers_sla.ops import tuning
from diffusers_sla.ops.autograd import sla_triton

out_dir, first, fwd_only = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
for name, value in json.loads(sys.argv[4]).items():
    if not hasattr(tuning, name):
        raise SystemExit(f"diffusers_sla.ops.tuning has no constant {name}")
    setattr(tuning, name, int(value))
(q, k, v, w, b), do = wan_inputs(1, 12, 32760, 128)
res = {}
for scope in ("rest", "all"):
    def fwd():
        return sla_triton(q, k, v, w, b, topk=0.05, blkq=128, blkk=64, feature_map="softmax", linear_scope=scope)
    with torch.no_grad():
        f_ms = bench_ms(fwd)
        f_tab = kernel_table(fwd)[:9]
    out = fwd()
    def bwd(out=out):
        return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    tensors = {"o": out.detach()}
    b_ms, b_tab = float("nan"), []
    if not fwd_only:
        b_ms = bench_ms(bwd)
        b_tab = kernel_table(bwd)[:5]
        grads = bwd()
        tensors.update(dq=grads[0], dk=grads[1], dv=grads[2])
    path = f"{out_dir}/{scope}.pt"
    if first:
        torch.save({n: t.cpu() for n, t in tensors.items()}, path)
        errs = {}
    else:
        base = torch.load(path)
        errs = {n: ((t.float().cpu() - base[n].float()).norm() / base[n].float().norm()).item()
                for n, t in tensors.items()}
    res[scope] = {"fwd": f_ms, "bwd": b_ms, "fwd_kernels": f_tab, "bwd_kernels": b_tab, "errors": errs}
print("RESULT" + json.dumps(res))
'''


def run(variant: dict, out_dir: str, first: bool, fwd_only: bool = False) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", CHILD, out_dir, "1" if first else "0",
                           "1" if fwd_only else "0", json.dumps(variant)], cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        print(f"  failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}")
        return None
    return json.loads(lines[-1][len("RESULT"):])


def main():
    args = sys.argv[1:]
    fwd_only = "--fwd-only" in args
    args = [a for a in args if a != "--fwd-only"]
    variants = VARIANTS
    if args:
        variants = [{}] + [dict(a.split("=", 1) for a in group.split()) for group in " ".join(args).split("/")]
    with tempfile.TemporaryDirectory() as out_dir:
        for i, variant in enumerate(variants):
            label = " ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
            print(f"== {label}", flush=True)
            res = run(variant, out_dir, first=i == 0, fwd_only=fwd_only)
            if res is None:
                continue
            for scope, r in res.items():
                errs = " ".join(f"{n} {e:.1e}" for n, e in r["errors"].items())
                print(f"  {scope}: fwd {r['fwd']:.3f} ms  bwd {r['bwd']:.3f} ms  {errs}")
                for name, us in r["fwd_kernels"] + r["bwd_kernels"]:
                    print(f"      {us:8.1f} us  {name[:90]}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
