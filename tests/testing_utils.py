# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Shared test helpers: markers for optional hardware and software, the golden-data location, error metrics, the
Hopper cases."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch

from diffusers_sla.utils.import_utils import is_triton_available

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with the team's `shared/` folder beside it; users' clones have no such folder.
GOLDEN_DIR = Path(os.environ.get("DIFFUSERS_SLA_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))

# |out - dense| allowed where SLA must equal dense attention (topk=1.0, float32): summation order only
EXACT_ATOL = 1e-4

require_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HAS_TRITON = is_triton_available()
# the one skip for tests that need Triton (on a CPU its interpreter runs the kernels; Triton is Linux-only)
require_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton, which is not installed")


def require_golden(fn):
    return pytest.mark.skipif(
        not (GOLDEN_DIR / "index.json").is_file(),
        reason=f"golden files from the SLA reference not found at {GOLDEN_DIR} (they live in the team's shared/ "
        "folder beside the repo; set DIFFUSERS_SLA_GOLDEN_DIR to point elsewhere)",
    )(fn)


def golden_cases() -> dict:
    index = GOLDEN_DIR / "index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def is_hopper_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


require_hopper = pytest.mark.skipif(not is_hopper_gpu(),
                                    reason="the Hopper kernels need a CUDA device of compute capability 9.0")

# Launches on which a Hopper (Gluon) kernel runs against its portable Triton twin:
# B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, linear_scope, dtype, (B, L, H, D) view
HOPPER_CASES = {
    "wan_like_rest_bf16_view": (1, 2, 2000, 2000, 128, 128, 64, 0.1, "softmax", "rest", torch.bfloat16, True),
    "partial_blocks_all_fp16": (2, 2, 1000, 777, 128, 128, 64, 0.2, "elu", "all", torch.float16, False),
    "d72_padded_relu_rest": (1, 3, 700, 900, 72, 64, 64, 0.3, "relu", "rest", torch.bfloat16, False),
    "blocks128_d64_rest": (1, 2, 640, 900, 64, 128, 128, 0.4, "softmax", "rest", torch.bfloat16, True),
    "every_block_selected": (1, 1, 256, 256, 128, 128, 64, 1.0, "softmax", "rest", torch.bfloat16, False),
    # 2 of 32 key blocks per query block: most key blocks are selected by no query block
    "unselected_key_blocks": (1, 2, 256, 2048, 128, 128, 64, 0.05, "elu", "rest", torch.bfloat16, False),
    # 2 key blocks per query block, fewer than the forward's ring slots: the prologue issues TMA loads for only
    # part of the ring, and the epilogue reuses a ring that never filled
    "two_blocks_selected": (1, 2, 384, 600, 128, 128, 64, 0.2, "softmax", "rest", torch.bfloat16, False),
    # no linear branch at all: the epilogue adds no bias, the backward preprocess subtracts none
    "sparse_only_none_view": (1, 2, 2000, 2000, 128, 128, 64, 0.1, "softmax", "none", torch.bfloat16, True),
}


def hopper_case_inputs(name: str, seed: int = 3):
    """q, k, v (in the case's memory layout), proj_l's weight and bias, and an output gradient, on the GPU."""
    B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, view = HOPPER_CASES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(L):
        shape = (B, L, H, D) if view else (B, H, L, D)
        x = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
        return x.transpose(1, 2) if view else x

    q, k, v, do = make(Lq), make(Lk), make(Lk), make(Lq)
    w = torch.randn(D, D, generator=g, device="cuda") * D**-0.5
    b = torch.randn(D, generator=g, device="cuda")
    return q, k, v, w, b, do


def free_port() -> int:
    """A TCP port free on this machine now, for a test's `torch.distributed` rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_without_teardown(worker):
    """A `torch.multiprocessing.spawn` worker that leaves its process with `os._exit`, without running the destructors
    of its process group: freeing a gloo process group (it goes with DDP's reducer when the worker returns) while the
    group's thread is still dropping a finished allreduce deadlocks on the GIL (the destructor, holding it, joins the
    thread, which waits for it), which hung about one run in seven of the two-process tests on a 2-core machine. An
    exception is printed and exits with status 1, which `spawn` reports as `ProcessExitedException`."""

    @functools.wraps(worker)  # spawn pickles the worker by its module-level name, which this keeps
    def run(*args):
        status = 0
        try:
            worker(*args)
        except BaseException:  # noqa: BLE001 - whatever it was, the parent must see a failed worker
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    return run
