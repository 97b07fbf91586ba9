# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/lab/fwd_timeline.py`: what it reads out of the timeline rows an instrumented Hopper forward wrote
(the instrumentation is not in the shipped kernel; rows are made up here, with known phases and overlaps)."""

import pytest
import torch

from benchmarks.lab.fwd_timeline import phases


def _rows(offset_of_second: int) -> torch.Tensor:
    """Two SMs, three waves of two programs each: entry at e, first scores at e + 10, loop end at e + 90, exit at
    e + 100 cycles, the clock at 2 cycles per ns. On SM 0 both programs run in lockstep; on SM 1 the second program
    starts `offset_of_second` cycles after the first."""
    rows = []
    for sm in (0, 1):
        for wave in range(3):
            for slot in range(2):
                e = wave * 100 + (slot * offset_of_second if sm == 1 else 0)
                rows.append([e, sm, e + 10, e + 90, e + 100, e // 2, (e + 100) // 2, 0])
    return torch.tensor(rows, dtype=torch.int64)


def test_phases_of_one_program_and_the_clock():
    report = phases(_rows(0))
    assert report["programs"] == 12
    assert report["clock GHz"] == pytest.approx(2.0)
    # cycles / 2 GHz: 10 cycles = 5 ns
    assert report["prologue us"] == pytest.approx(0.005)
    assert report["loop us"] == pytest.approx(0.040)
    assert report["epilogue us"] == pytest.approx(0.005)
    assert report["span us"] == pytest.approx(0.150)


def test_lockstep_programs_leave_the_sm_without_attention_work_between_loops():
    # in lockstep, both loops run 80 of every 100 cycles and nothing runs a loop for the other 20
    report = phases(_rows(0))
    assert report["SM time, loop 2"] == pytest.approx(0.8)
    assert report["SM time, loop 1"] == pytest.approx(0.0)
    assert report["SM time, loop 0 resident"] == pytest.approx(0.2)
    assert report["entry offset of SM pairs / program time"] == pytest.approx(0.0)


def test_programs_out_of_phase_keep_a_loop_running():
    # SM 1's second program half a program behind: one loop always runs there, except in the first and last 10
    # cycles of its 350
    lock, shifted = phases(_rows(0)), phases(_rows(50))
    assert shifted["SM time, loop 0 resident"] < lock["SM time, loop 0 resident"]
    assert shifted["SM time, loop 1"] > 0
    assert shifted["entry offset of SM pairs / program time"] == pytest.approx(0.25)  # SM 0: 0, SM 1: 0.5
    shares = [value for key, value in shifted.items() if key.startswith("SM time")]
    assert sum(shares) == pytest.approx(1.0)
