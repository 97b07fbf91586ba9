# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Compile the Hopper (Gluon) kernels for sm_90 on a machine without a GPU, and say what ptxas made of them.

    python -m benchmarks.lab.offline_compile            # forward, dK/dV and dQ kernels at the Wan layer shape
    python -m benchmarks.lab.offline_compile fwd --scope all --store-bwd
    python -m benchmarks.lab.offline_compile fwd pre --mix      # fusion "mass"'s epilogue mix and its backward
    python -m benchmarks.lab.offline_compile --scope none  # the sparse part alone: no linear epilogue, no bias
    python -m benchmarks.lab.offline_compile --triton-version 3.6.0 3.7.1 3.8.0 3.9.0   # one table, each release
    python -m benchmarks.lab.offline_compile rest       # fusion "mass"'s rest-mass kernels (Triton, not Gluon)

For each kernel: registers, spill bytes, shared memory, and whether ptxas kept the wgmma products asynchronous.
ptxas serialises every wgmma of a kernel (one `WARPGROUP.DEPBAR` per product instead of a handful) when a non-wgmma
instruction reads an in-flight product's accumulator (advisory C7514) or when registers run out (C7511); such a
kernel compiles, runs correctly and is slow. Catching that here costs no device time (docs/kernel-design.md,
"How to measure a change"). Nothing runs: correctness and speed still need the GPU tests and `kernel.py`.

How: a stand-in Triton driver whose target is sm_90, and `JITFunction.run` made to compile only (Triton's warmup
path), so the real launch functions (`gluon_fwd.launch`, `gluon_bwd.launch_dkdv`, `gluon_bwd.launch_dq`) build
their descriptors and arguments from CPU tensors of the right shapes. ptxas and cuobjdump are Triton's own copies
(the ptxas Triton runs for sm_90: `ptxas-blackwell` from 3.9). `--triton-version` runs this in a child process per
release, with that release installed (`pip install --no-deps --target`) into a folder of its own and put first on
the child's PYTHONPATH, so the running environment's Triton is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# the kernels this compiles, by the name the command line takes; without names, the Hopper ones (DEFAULT)
KERNELS = {"fwd": "forward", "dkdv": "backward dK/dV", "dq": "backward dQ", "rest": "fusion mass rest estimate",
           "pre": "backward preprocess (portable, every GPU)"}
DEFAULT = ("fwd", "dkdv", "dq")
# ptxas's advisory when it serialises a kernel's wgmma products; the code (C7511, C7514, ...) names the reason
_SERIALISED = re.compile(r"\((C\d+)\) Potential Performance Loss: wgmma\.mma_async instructions are serialized")


class PtxasReport:
    """What `ptxas -v` and the SASS say about one kernel."""

    def __init__(self, ptxas_log: str, sass: str, shared_bytes: int):
        regs = re.search(r"Used (\d+) registers", ptxas_log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
        self.registers = int(regs.group(1)) if regs else None
        self.spill_stores, self.spill_loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
        self.advisories = sorted(set(_SERIALISED.findall(ptxas_log)))
        self.products = sass.count("HGMMA")
        self.depbars = sass.count("WARPGROUP.DEPBAR")
        self.shared_bytes = shared_bytes

    @property
    def serialised(self) -> bool:
        return bool(self.advisories)

    def line(self, name: str) -> str:
        state = f"SERIALISED ({', '.join(self.advisories)})" if self.serialised else "asynchronous"
        return (f"{name:<40s} {self.registers} registers, spills {self.spill_stores}/{self.spill_loads} B, "
                f"shared {self.shared_bytes} B, {self.products} wgmma / {self.depbars} waits: {state}")


def _fake_driver():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class Sm90Driver(DriverBase):
        # what JITFunction.run asks of a driver before it compiles; nothing here touches a GPU
        def is_active(self):
            return True

        def map_python_to_cpp_type(self, ty):
            return "void*"

        def get_current_target(self):
            return GPUTarget("cuda", 90, 128)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError

        def clear_cache(self, cache):
            pass

    return Sm90Driver()


def compile_only(launch, *args, **kwargs):
    """Calls a launch function with every kernel launch turned into a compile: -> the compiled kernels."""
    from triton.runtime.jit import JITFunction

    from diffusers_sla.ops import tuning

    compiled, functions, run, fast = [], set(), JITFunction.run, tuning.FAST_LAUNCH

    def warmup_run(self, *a, grid, warmup, **kw):
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        compiled.append((self.fn.__name__, kernel))
        functions.add(self)
        return kernel

    JITFunction.run = warmup_run
    tuning.FAST_LAUNCH = False  # every launch through `kernel[grid]`: no Launcher remembers a stand-in kernel
    try:
        launch(*args, **kwargs)
    finally:
        JITFunction.run = run
        tuning.FAST_LAUNCH = fast
        for fn in functions:  # compiled for the stand-in driver: a real launch later compiles afresh
            fn.device_caches.clear()
    return compiled


def ptxas_path() -> str:
    """The ptxas Triton itself runs for sm_90: from 3.9 its `ptxas-blackwell`, as its own `ptxas` rejects the PTX ISA
    9.4 that 3.9 emits."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def inspect(kernel) -> PtxasReport:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([ptxas_path(), "-v", "-arch=sm_90a", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True)
        if log.returncode:
            raise RuntimeError(f"ptxas failed on {kernel.name}:\n{log.stderr.strip()}")
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True)
    return PtxasReport(log.stdout + log.stderr, sass.stdout, kernel.metadata.shared)


def wan_launches(scope: str, store_bwd: bool, L: int = 32760, kept: int = 25, mix: bool = False):
    """{KERNELS key: (launch function, args, kwargs)} for the Hopper kernels at the Wan layer shape, on CPU tensors.
    mix: the forward mixes the branches by a gate (fusion "mass", `forward.sla_fwd`)."""
    import torch

    from diffusers_sla.ops.kernels import gluon_bwd, gluon_fwd
    from diffusers_sla.config import LINEAR_EPS

    B, H, D, blkq, blkk = 1, 12, 128, 128, 64
    n_q, n_k = -(-L // blkq), -(-L // blkk)
    rest = scope == "rest"
    bf16, f32, i32 = torch.bfloat16, torch.float32, torch.int32

    def t(*shape, dtype=bf16):
        return torch.empty(*shape, dtype=dtype)

    q, k, v, o, do, dq, dk, dv = (t(B, H, L, D) for _ in range(8))
    lut = t(B, H, n_q, kept, dtype=i32)
    lse, delta, den = t(B, H, L, dtype=f32), t(B, H, L, dtype=f32), t(B, H, L, dtype=f32)
    dn, dd = t(B, H, L, D), t(B, H, L, dtype=f32)  # the backward's linear-branch terms, read by the dQ programs
    o_l = t(B, H, L, D) if store_bwd else t(0)
    r = t(B * H * (n_q if rest else 1), D, D)
    z = t(B * H * (n_q if rest else 1), D, dtype=f32)
    dh, dz = t(B * H * (n_k if rest else 1), D, D), t(B * H * (n_k if rest else 1), D, dtype=f32)
    # scope "none": no linear branch, and proj_l's empty stand-ins (what `autograd._run` passes)
    linear = scope != "none"
    w, b = (t(D, D, dtype=f32), t(D, dtype=f32)) if linear else (t(0, dtype=f32), t(0, dtype=f32))
    col_q, col_off, col_cnt = t(B * H * n_q * kept, dtype=i32), t(B * H * n_k, dtype=i32), t(B * H * n_k, dtype=i32)
    scale = D**-0.5
    # fusion "mass": the rest estimate's forward and both backward kernels, on the float32 q the fused path passes
    moments = (t(B, H, L, D, dtype=f32), t(B, H, n_k, D, dtype=f32), t(B, H, n_k, D, dtype=f32), t(n_k, dtype=f32),
               t(B, H, n_q, n_k, dtype=torch.bool))
    common = dict(block_d=D, blkq=blkq, blkk=blkk, rest=rest, has_linear=linear, feature_map=0)
    return {
        "fwd": (gluon_fwd.launch,
                (q, k, v, lut, o, lse, den if store_bwd else t(0, dtype=f32), o_l, r, z, w, b, scale, n_q, kept),
                dict(common, store_bwd=store_bwd, eps=LINEAR_EPS, has_proj=linear,
                     gate=t(B, H, L, dtype=f32) if mix else None, gate_lse=mix)),
        "dkdv": (gluon_bwd.launch_dkdv,
                 (q, k, v, do, dk, dv, lse, delta, col_q, col_off, col_cnt, dh, dz, scale, n_q, n_k, kept), common),
        "dq": (gluon_bwd.launch_dq, (q, k, v, do, dq, lut, lse, delta, dn, dd, r, z, scale, n_q, kept), common),
        "rest": (_rest_mass_launches, (*moments, lse, delta, scale, blkq), {}),
        "pre": (_preprocess_launch, (o, do, o_l if store_bwd else t(B, H, L, D), den, q, w, b, delta, dd, dn, r, z,
                                     lse, t(B, H, L, dtype=f32), t(B, H, L, D), t(B, H, L, dtype=f32)),
                dict(n_q=n_q, blkq=blkq, linear=linear, mix=mix)),
    }


def _preprocess_launch(o, do, o_l, den, q, w, b, delta, dd, dn, drb, dzb, lse, gate, dos, dgate, n_q, blkq, linear,
                       mix):
    from diffusers_sla.ops.backward import launch_preprocess

    launch_preprocess(o, do, o_l, den, q, w, b, lse, delta, dd, dn, drb, dzb, n_qblk=n_q, blkq=blkq,
                      block_d=q.shape[-1], has_linear=linear, proj=linear, fm=0, dot_precision="tf32",
                      gate=gate if mix else None, gate_lse=mix, dos=dos, dgate=dgate)


def _rest_mass_launches(q, mean, var, log_count, rest, log_rest, g, scale, blkq):
    from diffusers_sla.ops import rest_mass

    rest_mass.forward(q, mean, var, log_count, rest, scale, blkq)
    rest_mass.backward(g, q, mean, var, log_count, rest, log_rest, scale, blkq)


@contextlib.contextmanager
def sm90_target():
    """Inside: Triton compiles for the stand-in sm_90 driver, into a throwaway kernel cache; both undone after."""
    from triton.runtime import driver

    with tempfile.TemporaryDirectory(prefix="sla-offline-") as cache:
        saved_cache = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache  # kernels built for the stand-in driver stay out of the real cache
        previous = driver._active  # None until something asked for the real driver: leave it so afterwards
        driver.set_active(_fake_driver())
        try:
            yield
        finally:
            driver._active = previous
            if saved_cache is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache


def compile_offline(launch, *args, **kwargs):
    """`compile_only` for the stand-in sm_90 driver: -> [(kernel name, compiled kernel)]."""
    with sm90_target():
        return compile_only(launch, *args, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", help=f"any of {', '.join(KERNELS)} (default: {', '.join(DEFAULT)})")
    parser.add_argument("--scope", choices=["rest", "all", "none"], default="rest")
    parser.add_argument("--store-bwd", action="store_true", help="the training forward (stores o_l, den)")
    parser.add_argument("--mix", action="store_true", help="the forward mixes by a gate (fusion 'mass')")
    parser.add_argument("--triton-version", nargs="+", metavar="VERSION",
                        help="compile with each of these Triton releases (e.g. 3.6.0 3.7.1 3.8.0 3.9.0), each "
                        "installed from PyPI into its own folder under --envs and put first on PYTHONPATH of a "
                        "child process; prints one table and fails on spills beyond the first release's")
    parser.add_argument("--envs", default=os.path.join(tempfile.gettempdir(), "sla-triton-envs"),
                        help="where --triton-version installs each release (kept for the next run)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON line a kernel (children)
    args = parser.parse_args(argv)
    args.which = args.which or list(DEFAULT)
    unknown = sorted(set(args.which) - set(KERNELS))
    if unknown:
        parser.error(f"kernels must be among {', '.join(KERNELS)} (got {', '.join(unknown)})")
    if args.triton_version:
        return _across_versions(args)

    from diffusers_sla.ops.kernels import gluon_fwd

    if not gluon_fwd.GLUON_AVAILABLE:
        print(json.dumps({"error": gluon_fwd.gluon_unavailable_reason()}) if args.json else
              f"cannot compile the Hopper kernels here: {gluon_fwd.gluon_unavailable_reason()}")
        return 2
    with sm90_target():
        return _report(args)


def _report(args) -> int:
    import triton

    if not args.json:
        print(f"Triton {triton.__version__}, target sm_90a, Wan layer shape, scope {args.scope}"
              f"{', training forward' if args.store_bwd else ''}{', mixed (fusion mass)' if args.mix else ''}")
    worst = 0
    launches = wan_launches(args.scope, args.store_bwd, mix=args.mix)
    for key in KERNELS:
        if key not in args.which:
            continue
        launch, largs, kwargs = launches[key]
        for kernel_name, kernel in compile_only(launch, *largs, **kwargs):
            report = inspect(kernel)
            if args.json:
                print(json.dumps(dict(vars(report), triton=triton.__version__, kernel=kernel_name,
                                      serialised=report.serialised)), flush=True)
            else:
                print(report.line(f"{KERNELS[key]} ({kernel_name})"))
            worst = max(worst, 1 if report.serialised else 0)
    return worst


def _triton_env(version: str, envs: str) -> str | None:
    """The folder holding Triton `version` (pip --target, installed if missing), or None for the running one."""
    import triton

    if triton.__version__ == version:
        return None
    folder = Path(envs, f"triton-{version}")
    if not (folder / "triton" / "__init__.py").is_file():
        print(f"installing triton=={version} into {folder} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                        f"triton=={version}"], check=True)
    return str(folder)


def _across_versions(args) -> int:
    rows, failed = [], False
    child_args = [*args.which, "--scope", args.scope, "--json"] + (["--store-bwd"] if args.store_bwd else []) + \
        (["--mix"] if args.mix else [])
    for version in args.triton_version:
        folder = _triton_env(version, args.envs)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [p for p in (folder, str(REPO), os.environ.get("PYTHONPATH")) if p]))
        child = subprocess.run([sys.executable, __file__, *child_args], env=env, capture_output=True, text=True)
        got = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        if not got or any("error" in r for r in got) or child.returncode not in (0, 1):
            tail = [r["error"] for r in got if "error" in r] or child.stderr.strip().splitlines()[-3:]
            rows.append({"triton": version, "error": " / ".join(tail)})
            failed = True
        rows.extend(r for r in got if "error" not in r)
    base = {r["kernel"]: r for r in rows if "error" not in r and r["triton"] == rows[0]["triton"]}
    print(f"Hopper kernels for sm_90a, Wan layer shape, scope {args.scope}"
          f"{', training forward' if args.store_bwd else ''}{', mixed (fusion mass)' if args.mix else ''}; spills "
          f"against Triton {rows[0]['triton']}\n")
    print("| Triton | kernel | registers | spills (stores / loads, B) | shared memory (B) | wgmma / waits | "
          "products |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['triton']} | does not compile | | | | | {r['error'][:200]} |")
            continue
        ref = base.get(r["kernel"])
        more = ref is not None and max(r["spill_stores"], r["spill_loads"]) > max(ref["spill_stores"],
                                                                                  ref["spill_loads"])
        failed |= more or r["serialised"]
        state = f"SERIALISED ({', '.join(r['advisories'])})" if r["serialised"] else "asynchronous"
        print(f"| {r['triton']} | {r['kernel']} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']}"
              f"{' (more than ' + rows[0]['triton'] + ')' if more else ''} | {r['shared_bytes']} | "
              f"{r['products']} / {r['depbars']} | {state} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
