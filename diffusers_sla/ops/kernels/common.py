# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""What every Triton kernel file shares: which Triton backend runs the kernels, the grid and head-offset helpers, the
feature maps of the linear branch and their constants, and the one-config-per-shape choice of warps and stages.

Feature maps are constexpr ids: 0 = softmax over head_dim, 1 = elu + 1, 2 = relu. Head dims that are not a power of
two run in a padded BLOCK_D with masked columns (padded columns are 0 after every feature map).
"""

import functools
import os

import triton
import triton.language as tl

from .. import tuning

FEATURE_MAPS = {"softmax": 0, "elu": 1, "relu": 2}


@functools.cache
def _driver_backend():
    # asked once per process: the forward consults it for several launches, and each query costs host time
    try:
        return triton.runtime.driver.active.get_current_target().backend
    except RuntimeError:  # no GPU driver on this machine (CPU-only CI without the interpreter)
        return None


def _backend():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return _driver_backend()


def is_hip():
    return _backend() == "hip"


def is_cuda():
    return _backend() == "cuda"


@triton.jit
def program_ids(H):
    # the grid of every SLA kernel is (work items of one head, batch * heads): this program's item, its row of the
    # second axis, and that row's batch and head
    off_hz = tl.program_id(1)
    return tl.program_id(0), off_hz, off_hz // H, off_hz % H


@triton.jit
def head_base(X, off_z, off_h, stride_z, stride_h):
    # the start of one (batch, head) slice of a (B, H, L, D) tensor, in 64-bit offsets (large tensors overflow int32)
    return X + off_z.to(tl.int64) * stride_z + off_h.to(tl.int64) * stride_h


@triton.jit
def feature_map(x, d_ok, FEATURE_MAP: tl.constexpr):
    # x: fp32 (rows, BLOCK_D); d_ok: (BLOCK_D,) real head-dim columns. Padded columns come out as 0.
    if FEATURE_MAP == 0:
        x = tl.where(d_ok[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi = e / tl.sum(e, 1)[:, None]
    elif FEATURE_MAP == 1:
        phi = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
        phi = tl.where(d_ok[None, :], phi, 0.0)
    else:
        phi = tl.maximum(x, 0.0)
    return phi


@triton.jit
def feature_map_bwd(x, phi, dphi, FEATURE_MAP: tl.constexpr):
    # d phi / d x applied to dphi; phi is the fp32 feature value of x (0 on padded columns).
    if FEATURE_MAP == 0:
        dx = phi * (dphi - tl.sum(dphi * phi, 1)[:, None])
    elif FEATURE_MAP == 1:
        dx = tl.where(x > 0, dphi, dphi * phi)
    else:
        dx = tl.where(x > 0, dphi, 0.0)
    return dx



def autotune_configs(warps, stages) -> list:
    """The configs `triton.autotune` may pick from: `warps` x `stages` on the GPU, one under the interpreter."""
    if not is_cuda():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def heuristic_warps(block_m, block_n, block_d):
    # a 128-row tile (or a 128 x 128 linear accumulator) needs 8 warps to stay in registers
    return 8 if max(block_m, block_n) * block_d >= 128 * 128 else 4


def prune_configs(configs, named_args, **kwargs):
    """Autotuning is off unless `tuning.AUTOTUNE`: one config chosen from the block shapes, so that a new shape costs
    one compile, not a benchmark of every config. `tuning.FWD_*`, `BWD_*`, `BWD0_*` (dK/dV programs) and `BWD1_*`
    (dQ programs) WARPS / STAGES override the choice."""
    if len(configs) == 1 or tuning.AUTOTUNE:
        return configs
    args = {**named_args, **kwargs}
    kind = "BWD_" if "PROGRAM" in args else "FWD_"
    if kind == "BWD_":
        per = f"BWD{args['PROGRAM']}_"
        if getattr(tuning, f"{per}WARPS") or getattr(tuning, f"{per}STAGES"):
            kind = per
    rows = args.get("STEP_M", args["BLOCK_M"])  # query rows per tile (backward programs: STEP_M)
    warps = getattr(tuning, f"{kind}WARPS") or heuristic_warps(rows, args.get("BLOCK_N", 0), args["BLOCK_D"])
    # 3 stages where the tiles leave shared memory for it: the forward's 64 x 128 16-bit K/V tiles and the dK/dV
    # programs' 128 x 128 q/dO tiles with 64-row key blocks; 2 for larger tiles, for dQ and for 64-row dK/dV steps
    el = args["Q"].element_size()
    if kind == "FWD_":
        deep = args["BLOCK_N"] * args["BLOCK_D"] * el <= 64 * 128 * 2
    else:
        q_tile = rows * args["BLOCK_D"] * el
        deep = args["PROGRAM"] == 0 and args["BLOCK_N"] <= 64 and rows >= 128 and q_tile <= 128 * 128 * 2
    stages = getattr(tuning, f"{kind}STAGES") or (3 if deep else 2)
    picked = [c for c in configs if c.num_warps == warps and c.num_stages == stages]
    return picked[:1] or configs[:1]
