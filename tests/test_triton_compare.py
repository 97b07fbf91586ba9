# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/lab/triton_compare.py`: the per-row comparison of two Triton releases' `kernel bench` logs."""

from __future__ import annotations

from benchmarks.lab import triton_compare

HEADER = "GPU NVIDIA H100 80GB HBM3 (132 SMs), torch 2.11.0+cu130, triton {v}, CUDA 13.0, cuDNN 91900\n"
TABLE = ("provider                       fwd ms   bwd ms  fwd+bwd cuDNN/x fwd cuDNN/x bwd\n"
         "SDPA cuDNN                     12.000   30.000   42.000        1.00        1.00\n"
         "SLA ours (rest)                 {rest_f}    {rest_b}    4.000        9.00       10.00\n"
         "SLA ours (all)                  1.100    2.800    3.900       11.00       11.00\n")


def _write(folder, which, version, rest_f, rest_b, flat):
    path = folder / f"{which}-bench.txt" if flat else folder / which / "bench.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER.format(v=version) + TABLE.format(rest_f=rest_f, rest_b=rest_b))


def test_rows_are_compared_per_pair_and_a_slower_row_of_ours_fails(tmp_path):
    same, slower = tmp_path / "same", tmp_path / "slower"
    _write(same, "base", "3.6.0", "1.200", "2.800", flat=True)
    _write(same, "new", "3.7.1", "1.212", "2.856", flat=True)  # +1 %, +2 %
    _write(slower, "base", "3.6.0", "1.200", "2.800", flat=False)  # the layout `triton_gpu.sh run` writes
    _write(slower, "new", "3.7.1", "1.200", "3.080", flat=False)  # backward +10 %
    lines, within = triton_compare.compare([same], tolerance=0.05)
    assert within and "| SLA ours (rest) | 1.200 | 1.212 | 1.010 | 2.800 | 2.856 | 1.020 |" in lines
    assert lines[0].startswith("same: Triton 3.6.0 (base) against 3.7.1 (new)")
    lines, within = triton_compare.compare([same, slower], tolerance=0.05)
    assert not within and "slower SLA ours (rest) bwd 1.10" in lines[-2]
