# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/lab/offline_compile.py`: what it reads out of ptxas and the SASS, and how it refuses a Triton whose
Gluon API the Hopper kernels are not written for."""

import json
import os
import re
import subprocess

import pytest

from benchmarks.lab import offline_compile
from diffusers_sla.ops.kernels import gluon_fwd

# the shape of `ptxas -v` output for an sm_90a kernel, as ptxas 12.x prints it
ASYNC_LOG = """ptxas info    : Compiling entry function '_attn_fwd_hopper' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_hopper
    24 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size
"""
SERIAL_LOG = ASYNC_LOG.replace("24 bytes spill stores, 20", "0 bytes spill stores, 0") + (
    "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
    "wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in "
    "the function '_attn_fwd_hopper'\n")


# spill bytes (stores or loads, the larger) of each Hopper kernel at the Wan shape on Triton 3.6, the release they
# were tuned on: no other release may spill more (`gluon_fwd.Q_IN_REGISTERS` is how 3.9 keeps to it)
SPILL_CEILING = {"_attn_fwd_hopper": 24, "_attn_bwd_dkdv_hopper": 36, "_attn_bwd_dq_hopper": 0}


def _sass(products: int, waits: int) -> str:
    return "\n".join(["HGMMA.64x64x16.F32.BF16 R24, R244, gdesc[UR16], RZ, !UPT, gsb0 ;"] * products
                     + ["WARPGROUP.DEPBAR.LE gsb0, 0x0 ;"] * waits)


def test_report_reads_registers_spills_and_asynchronous_products():
    report = offline_compile.PtxasReport(ASYNC_LOG, _sass(68, 6), 114760)
    assert (report.registers, report.spill_stores, report.spill_loads) == (255, 24, 20)
    assert (report.products, report.depbars, report.shared_bytes) == (68, 6, 114760)
    assert not report.serialised
    assert "asynchronous" in report.line("forward")


def test_report_flags_serialised_products_with_the_advisory():
    report = offline_compile.PtxasReport(SERIAL_LOG, _sass(80, 80), 114760)
    assert report.serialised and report.advisories == ["C7514"]
    assert (report.spill_stores, report.spill_loads) == (0, 0)
    assert "SERIALISED (C7514)" in report.line("forward")


@pytest.mark.skipif(gluon_fwd.GLUON_AVAILABLE, reason="this Triton's Gluon has the names the kernels use")
def test_refuses_a_triton_without_the_kernels_gluon_api(capsys):
    assert offline_compile.main([]) == 2
    assert "Gluon lacks what the Hopper kernels use" in capsys.readouterr().out


def _child_lines(version, fwd_spills, serialised=False):
    rows = []
    for kernel, spills in (("_attn_fwd_hopper", fwd_spills), ("_attn_bwd_dq_hopper", 0)):
        rows.append(dict(triton=version, kernel=kernel, registers=255, spill_stores=spills, spill_loads=spills,
                         shared_bytes=114760, products=68, depbars=6, advisories=["C7514"] if serialised else [],
                         serialised=serialised))
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_one_table_across_releases_flags_more_spills_than_the_first_and_a_failed_compile(monkeypatch, capsys):
    children = {"3.6.0": (0, _child_lines("3.6.0", 24)), "3.7.1": (0, _child_lines("3.7.1", 0)),
                "3.9.0": (0, _child_lines("3.9.0", 308)),
                "3.8.0": (1, '{"error": "Triton 3.8.0\'s Gluon lacks what the Hopper kernels use"}\n')}
    seen = []

    def fake_run(cmd, env, capture_output, text):  # the child process of each release, as its JSON lines
        version = env["PYTHONPATH"].split(os.pathsep)[0].rsplit("-", 1)[-1]
        seen.append((version, cmd[2:]))
        rc, out = children[version]
        return subprocess.CompletedProcess(cmd, 2 if "error" in out else rc, out, "")

    monkeypatch.setattr(offline_compile, "_triton_env", lambda version, envs: f"/envs/triton-{version}")
    monkeypatch.setattr(offline_compile.subprocess, "run", fake_run)
    assert offline_compile.main(["fwd", "dq", "--triton-version", "3.6.0", "3.7.1", "3.8.0", "3.9.0"]) == 1
    assert [v for v, _ in seen] == ["3.6.0", "3.7.1", "3.8.0", "3.9.0"]
    assert seen[0][1] == ["fwd", "dq", "--scope", "rest", "--json"]
    out = capsys.readouterr().out
    assert "| 3.9.0 | _attn_fwd_hopper | 255 | 308 / 308 (more than 3.6.0) |" in out
    assert "| 3.7.1 | _attn_fwd_hopper | 255 | 0 / 0 |" in out  # fewer spills: not flagged
    assert "| 3.8.0 | does not compile |" in out and "Gluon lacks" in out
    del children["3.9.0"], children["3.8.0"]
    seen.clear()
    assert offline_compile.main(["--triton-version", "3.6.0", "3.7.1"]) == 0


def test_names_the_kernels_it_knows_when_given_another():
    with pytest.raises(SystemExit):
        offline_compile.main(["fwd", "attention"])


@pytest.mark.slow
@pytest.mark.skipif(not gluon_fwd.GLUON_AVAILABLE, reason="this Triton's Gluon lacks the names the kernels use")
def test_compiles_the_three_hopper_kernels_with_asynchronous_products(capsys, monkeypatch):
    from triton.runtime import driver

    from diffusers_sla.ops import launch, tuning

    # as on a GPU machine, where the Launcher would take its shortcut (it must not, for a compile-only run)
    monkeypatch.setattr(launch, "is_cuda", lambda: True)
    before, fast_launches = driver._active, tuning.FAST_LAUNCH
    assert offline_compile.main([]) == 0
    assert driver._active is before  # the stand-in driver is gone again
    assert tuning.FAST_LAUNCH == fast_launches
    out = capsys.readouterr().out
    for kernel, ceiling in SPILL_CEILING.items():
        assert kernel in out and "SERIALISED" not in out
        stores, loads = map(int, re.search(rf"\({kernel}\) .* spills (\d+)/(\d+) B", out).groups())
        assert max(stores, loads) <= ceiling, f"{kernel} spills {stores}/{loads} B, Triton 3.6: {ceiling} B"


# the most shared memory one block may use on an H100 (227 KB): a kernel above it compiles but cannot launch
H100_SHARED_LIMIT = 232448


@pytest.mark.slow
@pytest.mark.skipif(not gluon_fwd.GLUON_AVAILABLE, reason="this Triton's Gluon lacks the names the kernels use")
def test_compiles_the_rest_mass_kernels_within_the_shared_memory_of_an_h100(capsys, monkeypatch):
    """Fusion "mass"'s three rest-mass kernels at the Wan shape (tf32x3 products): they compile for sm_90, their
    products stay asynchronous, and each fits one block's shared memory (the forward's tiles are sized for it)."""
    from diffusers_sla.ops import rest_mass

    # as on a GPU machine (an earlier test may have cached "no driver"): GPU precision and stages
    monkeypatch.setattr(rest_mass, "is_cuda", lambda: True)
    assert offline_compile.main(["rest"]) == 0
    out = capsys.readouterr().out
    for kernel in ("rest_mass_fwd", "rest_mass_dq", "rest_mass_dmoments"):
        line = re.search(rf"\({kernel}\) .*", out).group(0)
        assert "asynchronous" in line and " 0 wgmma" not in line and int(re.search(r"shared (\d+) B", line).group(1)) <= H100_SHARED_LIMIT, line
