# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Every launch shape, tuning constant and environment switch of the SLA kernels, in one place.

The launch shapes were measured at the Wan 2.1 layer shape (L=32760, D=128, bf16) on H100/H200 GPUs; the measurements
are in docs/kernel-design.md. Each constant says in one line why it has its value. Modules read them as
`tuning.NAME` at call time, so an experiment (`benchmarks/tile_sweep.py`, a test) can set another value on this
module. Only the switches a user needs come from the environment (README, "Environment switches"): the kernel family
per pass (`kernel_switch`, read at each call so that one process can compare both) and the float32 compute mode (read
once here).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# ===== Environment switches =====

KERNEL_CHOICES = ("auto", "portable", "hopper")
# the environment variable that picks each Hopper (Gluon) kernel's portable twin
KERNEL_ENV = {"forward": "DIFFUSERS_SLA_FWD_KERNEL", "backward": "DIFFUSERS_SLA_BWD_KERNEL"}


def kernel_switch(part: str) -> str:
    """The kernel family asked for one pass ("forward" or "backward"): `KERNEL_ENV[part]`, "auto" when unset."""
    env = KERNEL_ENV[part]
    choice = os.environ.get(env, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{env}={choice!r}: allowed values are {KERNEL_CHOICES}")
    return choice


FP32_COMPUTE_MODES = ("bf16", "tf32", "ieee")
FP32_COMPUTE_ENV = "DIFFUSERS_SLA_TRITON_FP32"
# how the Triton backend computes float32 inputs on the GPU (`autograd.set_fp32_compute` changes it later)
FP32_COMPUTE = os.environ.get(FP32_COMPUTE_ENV, "bf16")
if FP32_COMPUTE not in FP32_COMPUTE_MODES:
    raise ValueError(f"`{FP32_COMPUTE_ENV}` must be one of {list(FP32_COMPUTE_MODES)}, got {FP32_COMPUTE!r}.")

# Environment switches of earlier releases, now constants here: set, they would be ignored, so that is said once.
RETIRED_SWITCHES = tuple(f"DIFFUSERS_SLA_{name}" for name in (
    "SPLIT_TARGET", "BLOCKS_TARGET", "TOTALS_TARGET", "LS_WARPS", "LS_STAGES", "PROJ_GRAD_TARGET", "TOPK_WARPS",
    "ROW_SUMS_TARGET", "FWD_ROWS", "DKDV_ROWS", "DQ_ROWS", "WARPS", "STAGES", "BWD_WARPS", "BWD_STAGES", "BWD0_WARPS",
    "BWD0_STAGES", "BWD1_WARPS", "BWD1_STAGES", "AUTOTUNE", "DKDV_STAGES", "DQ_STAGES", "OVERLAP", "FAST_LAUNCH",
    "SELECT"))


def retired_switches_set(environ=os.environ) -> list[str]:
    """The retired switches set in `environ` (they have no effect)."""
    return [name for name in RETIRED_SWITCHES if name in environ]


if retired_switches_set():
    logger.warning("%s no longer read: the launch shapes and experiment switches are constants in "
                   "diffusers_sla/ops/tuning.py.", ", ".join(retired_switches_set()))

# ===== Eager-call shortcuts (same results either way; off only for an A/B of host time) =====

# later launches of a kernel go straight to the compiled kernel Triton picked (`launch.Launcher`): less host time
FAST_LAUNCH = True
# the selection's pooling on a second CUDA stream beside the linear state (`custom_ops.select_and_forward`)
OVERLAP = True
# "fused": the Triton pooling and top-k (`fused_selection`); "torch": `selection.select_blocks` (an A/B of the two)
SELECT = "fused"

# ===== Portable Triton attention (kernels/triton_fwd.py, kernels/triton_bwd.py) =====

# one config per launch chosen from the block shapes (`prune_configs`): a new shape costs one compile, not a benchmark
AUTOTUNE = False
# what autotuning (AUTOTUNE on) may pick from, on the GPU
FWD_AUTOTUNE_WARPS, FWD_AUTOTUNE_STAGES = (4, 8), (1, 2, 3, 4)
BWD_AUTOTUNE_WARPS, BWD_AUTOTUNE_STAGES = (4, 8), (2, 3)
# query rows per forward program (0: a whole query block): the full block shares its K/V tiles best
FWD_ROWS = 0
# query rows per step of both backward launches: 64-row tiles cut the dK/dV and dQ programs by a third and a quarter
DKDV_ROWS = 64
DQ_ROWS = 64
# warps / stages overrides (0: the heuristic of `prune_configs`) of the forward, both backward launches, or one of
# them (BWD0: dK/dV programs, BWD1: dQ programs); the per-launch ones win over BWD_*
FWD_WARPS = FWD_STAGES = 0
BWD_WARPS = BWD_STAGES = 0
BWD0_WARPS = BWD0_STAGES = 0
BWD1_WARPS = BWD1_STAGES = 0
# the backward preprocess with 128 x 128 tiles: 16 warps keep its D x D products in registers (10% faster than 8)
PREPROCESS_WIDE_WARPS = 16
# `proj_grad` programs, each summing dO^T o_l over a strided set of row tiles: one per H100 SM (fewer left SMs idle)
PROJ_GRAD_TARGET = 132

# ===== Linear state (kernels/linear_state.py) =====

# programs aimed for when a launch splits its key blocks over the GPU: two per H100 SM
SPLIT_TARGET = 264
# programs of the per-key-block states (scope "rest") and of the per-head totals ("all"): two waves of an H100 beat one
BLOCKS_TARGET = 264
TOTALS_TARGET = 264
# warps / stages (0: 8 warps for the per-block states of 128-key, 128-wide blocks, else 4; 2 stages): 4 and 8 warps
# measured the same elsewhere
LINEAR_STATE_WARPS = 0
LINEAR_STATE_STAGES = 0

# ===== Fusion "mass"'s rest estimate (kernels/rest_mass.py) =====

# tensor-core products: "tf32x3" keeps float32 accuracy (the PyTorch path's values to float32 rounding); "tf32" does a
# third of the products, at tf32's rounding (docs/kernel-design.md has both measured); "ieee" skips the tensor cores
REST_MASS_PRECISION = "tf32x3"
# key blocks per chunk: 64-row query tiles x 32 key blocks keep the tf32x3 forward in an H100's shared memory (sm_90
# offline compile: 192 KB with 2 stages; 64 blocks need 256 KB)
REST_MASS_BLOCK_N = 32
# query rows per program, at most (fewer where blkq is smaller: a tile lies inside one query block)
REST_MASS_ROWS = 64
# warps of the forward and of the two backward kernels at head dim 128 (4 below): the backward ones hold two float32
# accumulators beside the query tile, and spill least with 8
REST_MASS_WARPS = 4
REST_MASS_BWD_WARPS = 8

# ===== Block selection (kernels/selection.py) =====

# `top_blocks_kernel` warps (0: by row length): one warp per row of up to 512 scores keeps its reductions in shuffles
TOPK_WARPS = 0
# `row_sums` (the key mean's first pass): programs aimed for (528 beat 264 and 1056), rows per tile, warps, stages
ROW_SUMS_TARGET = 528
ROW_SUMS_ROWS = 64
ROW_SUMS_WARPS = 4
ROW_SUMS_STAGES = 2
# at most this many parts per head: `key_mean` holds a head's parts in registers
ROW_SUMS_MAX_PARTS = 64
# `block_mean` warps: 2 read a block faster than 4
BLOCK_MEAN_WARPS = 2

# ===== Hopper (Gluon) kernels (kernels/gluon_fwd.py, kernels/gluon_bwd.py) =====

# forward: key-block size -> (query rows per program, warps, pipeline stages); two 64-row programs share an SM
GLUON_FWD_LAUNCH = {64: (64, 4, 3), 128: (128, 8, 3)}
# the forward's 64-key loop keeps q in registers on Triton releases before this one (3.9's allocation spills there)
GLUON_Q_IN_REGISTERS_BEFORE = (3, 9)
# backward dK/dV and dQ: 2 stages keep a program at ~96 KB of shared memory, so two fit on an SM
GLUON_DKDV_LAUNCH = {64: (64, 4, 2)}
GLUON_DQ_LAUNCH = {64: (64, 4, 2)}
