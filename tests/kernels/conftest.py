# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The tests that run the Triton kernels themselves.

They run where the kernels run in this process: on a CUDA GPU, or on the CPU under the Triton interpreter, which must
be chosen (TRITON_INTERPRET=1) before Triton is imported. A session without either (the README's `pytest -q` on a CPU
machine), or without Triton, skips collecting this folder, and `tests/test_kernels.py` runs it in a pytest process
of its own with TRITON_INTERPRET=1; `TRITON_INTERPRET=1 python -m pytest tests/kernels` runs it directly.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testing_utils, tiny_models

from testing_utils import HAS_TRITON  # noqa: E402

KERNELS_RUN_HERE = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
if not KERNELS_RUN_HERE:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
