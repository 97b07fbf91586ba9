# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Run a script or module as if the installed Triton were GPU-checked for the Hopper kernels.

    python -m benchmarks.lab.as_checked -m benchmarks.kernel bench --out DIR
    python -m benchmarks.lab.as_checked -m pytest -q -m gpu tests/test_gluon_fwd.py

For checking a Triton release on a GPU before it joins `gluon_compat.GPU_CHECKED`: "auto" then takes the Hopper
kernels exactly as it will once the release is listed, so the GPU tests, `kernel.py check` and `kernel.py bench`
exercise what users will run. Nothing else changes; the package itself never reads anything this sets.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    from diffusers_sla.ops import gluon_compat

    if gluon_compat.TRITON_VERSION not in gluon_compat.GPU_CHECKED:
        gluon_compat.GPU_CHECKED = (*gluon_compat.GPU_CHECKED, gluon_compat.TRITON_VERSION)
    print(f"[as_checked] Triton {gluon_compat.version_text()} treated as GPU-checked; Gluon names "
          f"{'resolved' if gluon_compat.AVAILABLE else 'MISSING: ' + str(gluon_compat.IMPORT_ERROR)}", flush=True)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
