# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`ops/gluon_compat.py`: the Gluon names resolved for the installed Triton, and which kernel "auto" takes on which
Triton release (and says so once).

The small kernel below is compiled for sm_90a against `benchmarks/lab/offline_compile.py`'s stand-in driver (no GPU):
it uses every name the compatibility module resolves, in the shapes the Hopper kernels use them.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from testing_utils import HAS_TRITON, require_triton

pytestmark = require_triton


class _Owner:
    """A Gluon module whose old name survives as a stub (Triton 3.9 keeps `async_copy_global_to_shared` so)."""

    async_load = "new"
    async_copy_global_to_shared = "old stub"


def test_the_newest_name_wins_and_a_missing_one_falls_back():
    from diffusers_sla.ops import gluon_compat

    assert gluon_compat._first(_Owner, "async_load", "async_copy_global_to_shared") == "new"
    assert gluon_compat._first(_Owner, "barrier", "async_copy_global_to_shared") == "old stub"
    assert gluon_compat._first(_Owner, "barrier", "thread_barrier") is None


def test_names_resolve_to_callables_that_do_not_raise_on_this_triton():
    from diffusers_sla.ops import gluon_compat as gc

    if not gc.AVAILABLE:
        pytest.skip(f"this Triton's Gluon lacks the names: {gc.IMPORT_ERROR}")
    for fn in (gc.barrier, gc.async_load, gc.async_store):
        assert getattr(fn, "__triton_builtin__", False), fn
        # Triton 3.9 keeps the old TMA names as stubs that raise: never pick one
        old_tma = fn.__name__ in ("async_copy_global_to_shared", "async_copy_shared_to_global")
        assert not old_tma or gc.TRITON_VERSION < (3, 8), fn.__name__


def test_auto_takes_the_hopper_kernels_only_where_they_were_checked_on_a_gpu(monkeypatch):
    from diffusers_sla.ops import gluon_compat

    monkeypatch.setattr(gluon_compat, "GPU_CHECKED", ((3, 6),))
    monkeypatch.setattr(gluon_compat, "COMPILE_CHECKED", ((3, 6), (3, 7)))
    assert gluon_compat.auto_reason((3, 6)) is None
    compiled = gluon_compat.auto_reason((3, 7))
    assert "compile for sm_90a on it but have not yet passed the GPU checks on Triton 3.7" in compiled
    assert "DIFFUSERS_SLA_FWD_KERNEL=hopper" in compiled and "DIFFUSERS_SLA_BWD_KERNEL=hopper" in compiled
    assert "have not been checked on it on Triton 4.0" in gluon_compat.auto_reason((4, 0))


@pytest.fixture
def hopper_here(monkeypatch):
    """kernel_choice as on a Hopper GPU whose launch the Hopper kernels can run; its log cleared."""
    from diffusers_sla.ops import kernel_choice

    monkeypatch.setattr(kernel_choice, "on_hopper", lambda q: True)
    monkeypatch.delenv("DIFFUSERS_SLA_FWD_KERNEL", raising=False)
    kernel_choice.log_choice_once.cache_clear()
    yield kernel_choice
    kernel_choice.log_choice_once.cache_clear()


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "diffusers_sla.ops.kernel_choice"]


def test_auto_says_once_which_kernel_it_took_and_why(hopper_here, monkeypatch, caplog):
    from diffusers_sla.ops import gluon_compat

    kernel_choice = hopper_here
    q = torch.zeros(1)
    version = gluon_compat.TRITON_VERSION
    with caplog.at_level(logging.INFO, logger="diffusers_sla"):
        monkeypatch.setattr(gluon_compat, "GPU_CHECKED", (version,))
        assert kernel_choice.choose_kernel("forward", q, lambda: None) == "hopper"
        assert kernel_choice.choose_kernel("forward", q, lambda: None) == "hopper"
        monkeypatch.setattr(gluon_compat, "GPU_CHECKED", ())
        assert kernel_choice.choose_kernel("forward", q, lambda: None) == "portable"
        assert kernel_choice.choose_kernel("forward", q, lambda: None) == "portable"
    lines = _messages(caplog)
    assert len(lines) == 2, lines  # once per choice, not per call
    assert "runs the Hopper (Gluon) kernels" in lines[0] and "GPU-checked" in lines[0]
    assert "runs the portable Triton kernel" in lines[1] and "DIFFUSERS_SLA_FWD_KERNEL=hopper" in lines[1]


def test_an_unchecked_triton_runs_the_hopper_kernels_when_asked_for(hopper_here, monkeypatch, caplog):
    from diffusers_sla.ops import gluon_compat

    kernel_choice = hopper_here
    monkeypatch.setattr(gluon_compat, "GPU_CHECKED", ())
    monkeypatch.setenv("DIFFUSERS_SLA_FWD_KERNEL", "hopper")
    with caplog.at_level(logging.INFO, logger="diffusers_sla"):
        assert kernel_choice.choose_kernel("forward", torch.zeros(1), lambda: None) == "hopper"
    (line,) = _messages(caplog)
    assert "DIFFUSERS_SLA_FWD_KERNEL=hopper; note: the Hopper kernels" in line
    # a launch the kernels cannot run is still an error when forced
    with pytest.raises(ValueError, match="cannot run this call: blkk must be"):
        kernel_choice.choose_kernel("forward", torch.zeros(1), lambda: "blkk must be one of [64, 128] (got 32)")


# -- the names in a kernel, compiled for sm_90a without a GPU ----------------------------------------------------

if HAS_TRITON:
    from diffusers_sla.ops import gluon_compat as gc

    if gc.AVAILABLE:
        gl = gc.gl

        @gc.gluon.jit
        def _ring_copy(desc_in, desc_out, WHOLE: gl.constexpr):
            # a 2-slot ring of 32 x 64 tiles read back as one 64 x 64 tile: as a view of the whole ring (every
            # release), or of slot 0 (only before Triton 3.8, which wants views of the same size)
            layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
            ring = gl.allocate_shared_memory(gl.float16, [2, 32, 64], layout)
            bar = gl.allocate_shared_memory(gl.int64, [1], gc.mbarrier.MBarrierLayout())
            gc.mbarrier.init(bar, count=1)
            if WHOLE:
                tile = gc.reinterpret(ring, gl.float16, [1, 64, 64], desc_in.layout).index(0)
            else:
                tile = gc.reinterpret(ring.index(0), gl.float16, [64, 64], desc_in.layout)
            gc.mbarrier.expect(bar, 64 * 64 * 2)
            gc.async_load(desc_in, [0, 0], bar, tile)
            gc.mbarrier.wait(bar, 0)
            gc.barrier()
            gc.async_store(desc_out, [0, 0], tile)
            gc.tma.store_wait(0)
            gc.mbarrier.invalidate(bar)


def _compile_ring_copy(whole: bool):
    from benchmarks.lab import offline_compile
    from diffusers_sla.ops.kernels import gluon_fwd

    def launch():
        x = torch.empty(64, 64, dtype=torch.float16)
        _ring_copy[(1,)](gluon_fwd.descriptor(x, [64, 64]), gluon_fwd.descriptor(x, [64, 64]), WHOLE=whole,
                         num_warps=4)

    return offline_compile.compile_offline(launch)


@pytest.mark.skipif(not HAS_TRITON or not __import__("diffusers_sla.ops.gluon_compat").ops.gluon_compat
                    .AVAILABLE, reason="this Triton's Gluon lacks the names the kernels use")
def test_the_resolved_names_compile_into_a_kernel_for_sm90(capfd):
    compiled = _compile_ring_copy(whole=True)
    assert [name for name, _ in compiled] == ["_ring_copy"]
    ptx = compiled[0][1].asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx  # the TMA copies
    from diffusers_sla.ops import gluon_compat as gc

    if gc.TRITON_VERSION >= (3, 8):  # the storage-size rule the kernels' epilogues are written around
        capfd.readouterr()
        with pytest.raises(Exception):
            _compile_ring_copy(whole=False)
        # (3.8: "same logical storage size"; 3.9: "footprint ... exceeds the source view"), printed by MLIR
        assert re.search(r"same logical storage size|exceeds the source view", capfd.readouterr().err)
