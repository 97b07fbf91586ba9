# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Gluon names the Hopper kernels use, resolved once at import for the installed Triton.

Gluon is Triton's experimental explicit-layout dialect and its names move between releases. What the kernels need,
by release (from the Gluon sources of each wheel):

    what                        3.6                               3.7          3.8               3.9
    CTA-wide barrier            gl.thread_barrier                 gl.barrier   gl.barrier        gl.barrier
    TMA load, global -> shared  tma.async_copy_global_to_shared   (same)       tma.async_load    tma.async_load
    TMA store, shared -> global tma.async_copy_shared_to_global   (same)       tma.async_store   tma.async_store
    shared-memory view          ._reinterpret                     (same)       (same)            .reinterpret

(3.8 keeps the old TMA names as aliases, 3.9 as stubs that raise.) From 3.8 a reinterpreted view may not cover more
bytes than the view it comes from (3.8: exactly as many), so the kernels reinterpret whole allocations (and index the
result) or one slot as a tile of the same size, never one slot as a larger tile.

The kernels call `barrier`, `async_load`, `async_store` and `reinterpret` from here. `GPU_CHECKED` lists the releases
on which the Hopper kernels passed the GPU tests and golden checks; `COMPILE_CHECKED` those for which they compile for
sm_90a with asynchronous wgmma products and no more spills than on 3.6 (`benchmarks/offline_compile.py
--triton-version`). `kernel_choice` takes the Hopper kernels by default ("auto") on GPU-checked releases only; on
any other release where the names resolve they run when asked for (`tuning.KERNEL_ENV` set to "hopper").
"""

from __future__ import annotations

import triton

from . import tuning

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# `auto` takes the Hopper kernels only on releases where they passed the GPU tests and `kernel.py check` and timed
# like 3.6 (3.7: checked with 3.7.1, H100; benchmarks/runs/triton-3.7-h100)
GPU_CHECKED = ((3, 6), (3, 7))
# they compile for sm_90a on these, asynchronous and within 3.6's spills (`offline_compile.py --triton-version`)
COMPILE_CHECKED = ((3, 6), (3, 7), (3, 8), (3, 9))

IMPORT_ERROR: str | None = None
try:
    from triton.experimental import gluon  # noqa: F401 - re-exported for the kernel modules
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,  # noqa: F401
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    from triton.language.core import builtin
except ImportError as exc:  # pragma: no cover - depends on the installed Triton
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _first(owner, *names):
    """The first of `names` that `owner` has (newest name first: an older name may remain as a stub that raises)."""
    for name in names:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return None


if IMPORT_ERROR is None:
    barrier = _first(gl, "barrier", "thread_barrier")
    async_load = _first(tma, "async_load", "async_copy_global_to_shared")
    async_store = _first(tma, "async_store", "async_copy_shared_to_global")
    _REINTERPRET = _first(gl.shared_memory_descriptor, "reinterpret", "_reinterpret")
    _missing = [name for name, value in (("barrier", barrier), ("TMA load", async_load), ("TMA store", async_store),
                                         ("reinterpret", _REINTERPRET)) if value is None]
    if _missing:  # pragma: no cover - a Triton whose Gluon renamed these again
        IMPORT_ERROR = f"this Gluon has no {', '.join(_missing)} under any name the kernels know"
    else:
        _REINTERPRET_NAME = _REINTERPRET.__name__

        @builtin
        def reinterpret(tile, dtype, shape, layout, _semantic=None):
            """`tile` seen as another dtype, shape and shared layout (the same bytes): `_reinterpret` before 3.9,
            `reinterpret` from 3.9."""
            return getattr(tile, _REINTERPRET_NAME)(dtype, shape, layout, _semantic=_semantic)

AVAILABLE = IMPORT_ERROR is None


def version_text(version=TRITON_VERSION) -> str:
    return ".".join(map(str, version))


def unavailable_reason() -> str:
    """Why the Hopper kernels cannot be built on this Triton (only meaningful when not AVAILABLE)."""
    return f"Triton {triton.__version__}'s Gluon lacks what the Hopper kernels use ({IMPORT_ERROR})"


def auto_reason(version=TRITON_VERSION) -> str | None:
    """None where "auto" may take the Hopper kernels on this Triton, else why it takes the portable ones."""
    if version in GPU_CHECKED:
        return None
    checked = ", ".join(map(version_text, GPU_CHECKED))
    if version in COMPILE_CHECKED:
        state = "compile for sm_90a on it but have not yet passed the GPU checks"
    else:
        state = "have not been checked on it"
    forward, backward = tuning.KERNEL_ENV["forward"], tuning.KERNEL_ENV["backward"]
    return (f"the Hopper kernels {state} on Triton {version_text(version)} (GPU-checked: Triton {checked}); set "
            f"{forward}=hopper and {backward}=hopper to use them")
