# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Runs `tests/kernels` (the Triton kernels' own tests) under the Triton interpreter when this session cannot.

The interpreter must be chosen before Triton is imported, and the other test modules import Triton without it, so on
a machine without a GPU that folder runs as one pytest process of its own, with TRITON_INTERPRET=1. On a GPU, or in
a session started with TRITON_INTERPRET=1, this session collects it itself (`tests/kernels/conftest.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from testing_utils import HAS_TRITON, REPO_ROOT

KERNEL_TESTS = REPO_ROOT / "tests" / "kernels"

# A loop with a runtime bound, as every SLA kernel has: Triton 3.6's interpreter fails on it with numpy 2.4 ("only
# 0-dimensional arrays can be converted to Python scalars"), while Triton 3.9's runs it.
INTERPRETER_PROBE = textwrap.dedent('''
    import numpy, torch, triton, triton.language as tl

    @triton.jit
    def _sum(X, N, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, N, BLOCK):
            acc += tl.load(X + i + tl.arange(0, BLOCK))
        tl.store(X + tl.arange(0, BLOCK), acc)

    x = torch.ones(64)
    try:
        _sum[(1,)](x, 64, BLOCK=16)
    except Exception as exc:
        raise SystemExit(f"triton {triton.__version__} with numpy {numpy.__version__}: {exc!r}")
    assert x[0].item() == 4.0, x
''')


def _interpreter_usable() -> tuple[bool, str]:
    if not HAS_TRITON:
        return False, "Triton is not installed"
    probe = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], env={**os.environ, "TRITON_INTERPRET": "1"},
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return False, f"the Triton interpreter cannot run a kernel loop here: {probe.stderr.strip()[-300:]}"
    return True, ""


def test_kernel_tests_pass_under_the_triton_interpreter():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this session runs tests/kernels itself")
    usable, reason = _interpreter_usable()
    if not usable:
        pytest.skip(f"the kernel tests run under the Triton interpreter, which is not usable here: {reason}")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3000)
    summary = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    # rc 5: nothing collected, which would hide every kernel test
    assert proc.returncode == 0, f"tests/kernels under TRITON_INTERPRET=1: {summary[0]}\n{proc.stdout[-6000:]}" \
                                 f"\n{proc.stderr[-2000:]}"
