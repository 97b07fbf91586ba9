# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`torch.library` ops around the Triton kernels: `diffusers_sla::sla_fwd` and `diffusers_sla::sla_bwd`.

Opaque to `torch.compile` (no graph break), each with a `register_fake` twin that only allocates correctly shaped
outputs. Inputs are dense (B, H, L, D) tensors of one dtype (any strides); `lut` is the int32 (B, H, n_q, kept)
ascending block map from `selection.select_blocks`. Everything here runs on the device without host
synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import gluon_bwd, gluon_compat, gluon_fwd, triton_fwd
from .launch import Launcher
from .selection import force_scores, num_blocks, num_forced, num_kept_blocks
from .triton_bwd import _attn_bwd, _attn_bwd_preprocess, _proj_grad
from .triton_fwd import FEATURE_MAPS, LINEAR_EPS, _attn_fwd, is_cuda

# The selection's and the linear branch's kernels, launched with less host work per call (launch.py): an eager
# forward at the Wan shape can wait on its launches' host time. The backward's launches are hidden behind its GPU work.
_row_sums, _key_mean, _block_mean, _top_blocks_kernel, _linear_state, _rest_weights_kernel = (
    Launcher(kernel) for kernel in (triton_fwd._row_sums, triton_fwd._key_mean, triton_fwd._block_mean,
                                    triton_fwd._top_blocks_kernel, triton_fwd._linear_state,
                                    triton_fwd._rest_weights_kernel))

logger = logging.getLogger(__name__)

# the Triton element type of each input dtype (for roundings inside kernels that do not read the tensor itself)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}

# Debug switch for GPU validation: outputs start as NaN instead of uninitialised memory, so that an element no kernel
# wrote shows up in the result.
POISON_OUTPUTS = False

# Programs the linear-state kernel aims for (split of the key blocks of each head).
_SPLIT_TARGET = int(os.environ.get("DIFFUSERS_SLA_SPLIT_TARGET", "264"))
# `_linear_state` launch shape at the Wan shape (L=32760, D=128, bf16; benchmarks/NOTES.md v3, v5, v12): programs for
# the per-key-block states of scope "rest" / for the per-head totals of scope "all", and warps / stages (0: the
# defaults: 2 stages, 4 warps, 8 for the per-block states of 128-key blocks, not measured with 4; "all": 136 us on the
# H100 against 189 with v3's 132 programs, 8 warps, 3 stages; "rest": 138 us against 151 with 8 warps on the H200,
# same outputs).
_BLOCKS_TARGET = int(os.environ.get("DIFFUSERS_SLA_BLOCKS_TARGET", "264"))
_TOTALS_TARGET = int(os.environ.get("DIFFUSERS_SLA_TOTALS_TARGET", "264"))
_LS_WARPS = int(os.environ.get("DIFFUSERS_SLA_LS_WARPS", "0"))
_LS_STAGES = int(os.environ.get("DIFFUSERS_SLA_LS_STAGES", "0"))
# `_proj_grad` programs (each sums dO^T o_l over a strided set of row tiles): one per SM of the H100. It was 33 before
# v4, which took 0.31 ms at the Wan shape against 0.10 ms with 132 (NOTES.md).
_PROJ_GRAD_TARGET = int(os.environ.get("DIFFUSERS_SLA_PROJ_GRAD_TARGET", "132"))
# `_top_blocks_kernel` warps (0: by row length): one warp per row of up to 512 scores, whose reductions stay in
# registers and shuffles (with a sort per row: 34 us at the Wan shape on the H200 against 46 with 4 warps, NOTES.md v13)
_TOPK_WARPS = int(os.environ.get("DIFFUSERS_SLA_TOPK_WARPS", "0"))
# `_row_sums` (the key mean's first pass) launch shape, measured on the H100 at the Wan shape (NOTES.md, "Glue"):
# programs aimed for (528: 43 row ranges per head, 50 us; 264: 60 us; 1056: 53 us), rows per tile, warps, stages
# (2-4: same time). `_key_mean` then adds a head's parts once.
_ROW_SUMS_TARGET = int(os.environ.get("DIFFUSERS_SLA_ROW_SUMS_TARGET", "528"))
_ROW_SUMS_ROWS = 64
_ROW_SUMS_WARPS = 4
_ROW_SUMS_STAGES = 2
# at most this many parts per head: a head's `_key_mean` program holds all of them in registers, and few heads with
# long sequences would otherwise ask for hundreds (the Wan shape's 12 heads get 44)
_ROW_SUMS_MAX_PARTS = 64


def _rows(blkq: int, name: str, default: int) -> int:
    """Query rows per tile of one launch: blkq, or a power-of-two part of it (a query block then runs as several
    programs, or steps, that share its LUT row). `DIFFUSERS_SLA_<name>_ROWS` overrides the measured default."""
    rows = min(blkq, int(os.environ.get(f"DIFFUSERS_SLA_{name}_ROWS", "0")) or default)
    if rows < 16 or blkq % rows:
        raise ValueError(f"DIFFUSERS_SLA_{name}_ROWS={rows}: must divide blkq={blkq} and be at least 16")
    return rows


def _empty(*shape, device, dtype):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _empty_like_input(x: torch.Tensor) -> torch.Tensor:
    # the output in the caller's memory layout: diffusers hands (B, L, H, D) tensors viewed as (B, H, L, D), and an
    # output in that layout saves the copy its `transpose(1, 2).flatten(2)` would make (0.13 ms at the Wan shape)
    out = torch.empty_like(x)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _has_linear(linear_scope: str, kept: int, n_kblk: int) -> bool:
    # "rest" with every key block selected leaves the linear branch empty: o_l = 0 exactly (reference: 0 / eps);
    # "none" has none at all
    return linear_scope != "none" and not (linear_scope == "rest" and kept == n_kblk)


class _Geometry(NamedTuple):
    """Sizes every SLA launch derives from its inputs: one home, shared by `sla_fwd`, its fake and `sla_bwd`."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    n_qblk: int
    n_kblk: int
    kept: int
    block_d: int
    rest: bool
    has_linear: bool
    proj: bool  # proj_l is part of the operator (scope "rest" or "all"): its bias is added even to an empty o_l


def _geometry(q: torch.Tensor, k: torch.Tensor, lut: torch.Tensor | None, blkq: int, blkk: int,
              linear_scope: str, topk: float | None = None, forced: int = 0) -> _Geometry:
    """From the block map's shape, or (lut None) from the `topk` (and `forced` block count) the map will be selected
    with."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_qblk, n_kblk = num_blocks(Lq, blkq), num_blocks(Lk, blkk)
    kept = lut.shape[-1] if lut is not None else num_kept_blocks(topk, n_kblk, forced)
    return _Geometry(B, H, Lq, Lk, D, n_qblk, n_kblk, kept, _block_d(D), linear_scope == "rest",
                     _has_linear(linear_scope, kept, n_kblk), linear_scope != "none")


KERNEL_CHOICES = ("auto", "portable", "hopper")
# the environment variable that picks each Hopper (Gluon) kernel's portable twin
KERNEL_ENV = {"forward": "DIFFUSERS_SLA_FWD_KERNEL", "backward": "DIFFUSERS_SLA_BWD_KERNEL"}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _choose_kernel(part: str, q: torch.Tensor, hopper_reason) -> str:
    """"hopper" (Gluon, asynchronous tensor-core products) or "portable" (Triton) for one part of the operator.
    `KERNEL_ENV[part]`: "auto" (default: hopper wherever it can run, on a Triton release it was checked on with a GPU,
    `gluon_compat.GPU_CHECKED`), "portable", or "hopper" (an error where it cannot run, with the reason; on any Triton
    whose Gluon has the names the kernels use). Both compute the same function; they differ only in rounding order
    (the GPU checks in `benchmarks/kernel.py` and the GPU tests compare them). hopper_reason() -> None, or why Gluon
    cannot run it. On a Hopper GPU the choice and its reason are logged once."""
    env = KERNEL_ENV[part]
    choice = os.environ.get(env, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{env}={choice!r}: allowed values are {KERNEL_CHOICES}")
    if choice == "portable":
        return "portable"
    on_hopper = _on_hopper(q)
    reason = hopper_reason() if on_hopper else "needs a CUDA device of compute capability 9.0 (Hopper)"
    if reason is None:
        unchecked = gluon_compat.auto_reason()
        if choice == "hopper":
            _log_choice_once(part, "hopper", f"{env}=hopper" + (f"; note: {unchecked}" if unchecked else ""))
            return "hopper"
        if unchecked is None:
            _log_choice_once(part, "hopper", f"Triton {gluon_compat.version_text()} is GPU-checked for them")
            return "hopper"
        reason = unchecked
    elif choice == "hopper":
        raise ValueError(f"{env}=hopper cannot run this call: {reason}")
    if on_hopper:
        _log_choice_once(part, "portable", reason)
    return "portable"


def _on_hopper(q: torch.Tensor) -> bool:
    return is_cuda() and q.is_cuda and _capability(q.device.index) == (9, 0)


@functools.lru_cache(maxsize=None)
def _log_choice_once(part: str, kernel: str, reason: str) -> None:
    # said once per choice and reason, not per call: the portable kernel gives the same results, slower
    if kernel == "hopper":
        logger.info("SLA %s on this Hopper GPU runs the Hopper (Gluon) kernels (%s).", part, reason)
    else:
        logger.warning("SLA %s on a Hopper GPU runs the portable Triton kernel (%s).", part, reason)


def _forward_kernel(q: torch.Tensor, g: _Geometry, blkq: int, blkk: int, dot_precision: str) -> str:
    """The forward kernel: `gluon_fwd._attn_fwd_hopper` or `triton_fwd._attn_fwd` (`_choose_kernel`)."""
    return _choose_kernel("forward", q, lambda: gluon_fwd.supports(q.element_size(), blkq, blkk, g.block_d, g.D,
                                                                   g.kept, dot_precision))


def _backward_kernel(q: torch.Tensor, g: _Geometry, blkq: int, blkk: int, dot_precision: str) -> str:
    """The backward's dK/dV and dQ kernels: `gluon_bwd`'s two or the two program kinds of `triton_bwd._attn_bwd`
    (`_choose_kernel`). The preprocess and the proj_l gradients are Triton kernels on every device."""
    return _choose_kernel("backward", q, lambda: gluon_bwd.supports(q.element_size(), blkq, blkk, g.block_d, g.D,
                                                                    dot_precision))


def _proj_precision(dot_precision: str) -> str:
    # proj_l is float32; on the GPU its D x D product runs as tf32 unless full float32 ("ieee") was asked for.
    return "ieee" if (dot_precision == "ieee" or not is_cuda()) else "tf32"


def _split(n_items: int, programs_per_split: int, target: int | None = None) -> int:
    # enough programs to fill the GPU; few under the interpreter
    target = (target or _SPLIT_TARGET) if is_cuda() else 2
    return max(1, min(n_items, -(-target // max(1, programs_per_split))))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _use_descriptors():
    # kernels that build tensor descriptors on the device need a global-memory scratch allocator on the GPU
    if is_cuda():
        triton.set_allocator(_tma_alloc)


def _tma_addressable(x: torch.Tensor) -> bool:
    # unit last stride, 16-byte aligned base and row strides: what a tensor descriptor can address
    el = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((s * el) % 16 == 0 for s in x.stride()[:-1])


def _head_tiles(x: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """A host-built tensor descriptor over all of a (B, H, L, D) tensor, boxes of one head's `rows` x `block_d` (rows
    and columns past L and D read as zeros), for the backward kernels. Built once per call, as the Hopper forward's
    (`gluon_fwd._descriptor`), instead of in every program (H100, Wan shape: dQ -3%, dK/dV +1%; NOTES.md v9)."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d])


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when a tensor descriptor can address it (unit last stride, 16-byte aligned base and row strides),
    otherwise a copy that can (contiguous, head dim zero-padded to 16 bytes; the kernels only read HEAD_DIM columns).
    """
    if _tma_addressable(x):
        return x
    D = x.shape[-1]
    pad = -D % max(1, 16 // x.element_size())
    # a new allocation either way: a contiguous view at an unaligned offset would stay unaligned
    return torch.nn.functional.pad(x, (0, pad)) if pad else x.clone(memory_format=torch.contiguous_format)


def _side_shapes(q, n_qblk, block_d, store_bwd, rest, has_linear):
    """Shapes of den, o_l (stored for backward) and R_i, z_i ("rest": always computed, the forward kernel reads them).
    """
    B, H, Lq, D = q.shape
    rz = ((B, H, n_qblk, block_d, block_d), (B, H, n_qblk, block_d)) if (rest and has_linear) else ((0,), (0,))
    if not (store_bwd and has_linear):
        return (0,), (0,), *rz
    return (B, H, Lq), (B, H, Lq, D), *rz


def _linear_totals(k, v, blkk, block_d, feature_map, dot_precision, store_blocks=False):
    """Without `store_blocks` (scope "all"): per-head H = sum phi(k)^T v (B, H, BLOCK_D, BLOCK_D) and
    Z = sum phi(k) (B, H, BLOCK_D), float32. With `store_blocks` ("rest", where H is not used): each key block's h_j
    (B, H, n_k, BLOCK_D, BLOCK_D) in k's dtype and z_j (B, H, n_k, BLOCK_D) float32, an empty H, and in place of Z its
    float32 partial sums, one per split of the key blocks (B*H, splits, BLOCK_D), which `triton_fwd._z_rest` adds.
    -> H, Z, h_j, z_j."""
    B, H, Lk, D = k.shape
    n_kblk = num_blocks(Lk, blkk)
    _use_descriptors()
    kd, vd = _tma_ready(k), _tma_ready(v)
    if store_blocks:
        split = _split(n_kblk, B * H, _BLOCKS_TARGET)
        hs = k.new_empty(0, dtype=torch.float32)
        hb = _empty(B, H, n_kblk, block_d, block_d, device=k.device, dtype=k.dtype)
        zb = _empty(B, H, n_kblk, block_d, device=k.device, dtype=torch.float32)
    else:
        split = _split(n_kblk, B * H, _TOTALS_TARGET)
        hs = _empty(B * H, split, block_d, block_d, device=k.device, dtype=torch.float32)
        hb, zb = k.new_empty(0), k.new_empty(0, dtype=torch.float32)
    zs = _empty(B * H, split, block_d, device=k.device, dtype=torch.float32)
    _linear_state[(split, B * H)](
        kd, vd, hb, zb, hs, zs, *_strides(kd), *_strides(vd), H, Lk, n_kblk, split, B * H * n_kblk * block_d,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=blkk, FEATURE_MAP=FEATURE_MAPS[feature_map], STORE_BLOCKS=store_blocks,
        DOT_PREC=dot_precision, num_warps=_LS_WARPS or (8 if store_blocks and blkk > 64 and block_d > 64 else 4),
        num_stages=(_LS_STAGES or 2) if is_cuda() else 1,
    )
    if store_blocks:
        return hs, zs, hb, zb
    return hs.sum(1).view(B, H, block_d, block_d), zs.sum(1).view(B, H, block_d), hb, zb


def _rest_weights(lut: torch.Tensor, n_kblk: int, dtype: torch.dtype, z_blocks: torch.Tensor | None = None,
                  z_parts: torch.Tensor | None = None):
    """The (B, H, n_q, n_k) 0/1 matrix that is 1 where key block j feeds query block i's linear branch ("rest": not
    selected), in `dtype`, and in the same launch either the matrix in float32 (backward: dz_j = W^T dz_i) or, given
    the per-key-block z_j (B, H, n_k, BLOCK_D) and Z's per-split partials from `_linear_totals(store_blocks=True)`,
    z_i = Z - the z_j query block i selected (forward), (B, H, n_q, BLOCK_D) float32. -> (W, W32 or z_i).
    Eager forwards get both from the top-k's launch instead (`top_blocks_and_rest`), with the same bits."""
    B, H, n_qblk, kept = lut.shape
    w = torch.empty(B, H, n_qblk, n_kblk, device=lut.device, dtype=dtype)
    z_rest = z_blocks is not None
    if z_rest:
        block_d, n_split = z_blocks.shape[-1], z_parts.shape[1]
        second = _empty(B, H, n_qblk, block_d, device=lut.device, dtype=torch.float32)
        w32 = w.new_empty(0, dtype=torch.float32)
        zb, zs, zi = z_blocks, z_parts, second
    else:
        block_d, n_split = 16, 0
        second = w32 = torch.empty(B, H, n_qblk, n_kblk, device=lut.device, dtype=torch.float32)
        zb = zs = zi = w32.new_empty(0)
    lut = lut.contiguous()
    _rest_weights_kernel[(n_qblk, B * H)](lut, w, w32, zb, zs, zi, n_qblk, n_kblk, kept, n_split,
                                          KEPT_P2=triton.next_power_of_2(kept), BLOCK_J=128, BLOCK_D=block_d,
                                          STORE_W32=not z_rest, Z_REST=z_rest, num_warps=4)
    return w, second


def _row_sum_parts(x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """(B, H, L, D) -> (B*H, parts, BLOCK_D) float32 sums of x over consecutive ranges of `chunk` rows (`_row_sums`;
    0: sized to fill the GPU): the key mean's first pass, whose few parts `_block_mean` adds in a fixed order."""
    B, H, L, D = x.shape
    block_d, rows = _block_d(D), _ROW_SUMS_ROWS
    if not chunk:
        tiles = max(1, num_blocks(L, rows))
        chunk = num_blocks(tiles, min(_split(tiles, B * H, _ROW_SUMS_TARGET), _ROW_SUMS_MAX_PARTS)) * rows
    n_part = max(1, num_blocks(L, chunk))
    parts = torch.empty(B * H, n_part, block_d, device=x.device, dtype=torch.float32)
    _row_sums[(n_part, B * H)](x, parts, *_strides(x), H, L, chunk, n_part, HEAD_DIM=D, BLOCK_D=block_d,
                               BLOCK_M=rows, num_warps=_ROW_SUMS_WARPS, num_stages=_ROW_SUMS_STAGES)
    return parts


def block_means(x: torch.Tensor, block: int, center: bool, round_to_input: bool = False) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n, D) float32 block means of x (or of `x - mean(x)` rounded to x's dtype, as
    `selection.block_scores` centres keys), in one pass over x (two with `center`: the mean's row sums first, then
    one tiny launch adds them up per head). `round_to_input`: rounded to x's dtype and returned in it."""
    B, H, L, D = x.shape
    n, block_d = num_blocks(L, block), _block_d(D)
    mean = torch.empty(B * H if center else 0, block_d, device=x.device, dtype=torch.float32)
    if center:
        parts = _row_sum_parts(x)
        _key_mean[(B * H,)](parts, mean, parts.shape[1], L, BLOCK_D=block_d,
                            PART_P2=triton.next_power_of_2(parts.shape[1]), DTYPE=_TL_DTYPES[x.dtype], num_warps=2)
    out = torch.empty(B, H, n, D, device=x.device, dtype=x.dtype if round_to_input else torch.float32)
    # 2 warps: 49 us against 54 with 4 for the Wan shape's query pooling on the H100 (NOTES.md v5)
    _block_mean[(n, B * H)](x, mean, out, *_strides(x), H, L, n, HEAD_DIM=D, BLOCK_D=block_d, BLOCK=block,
                            CENTER=center, num_warps=2, num_stages=1)
    return out


def _fast_select_blocks(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int, blkk: int, force_start: int = 0,
                        force_end: int = 0) -> torch.Tensor:
    """`selection.select_blocks` with its pooling fused into one Triton pass per tensor (the PyTorch version makes
    float32 copies of q and k) and its top-k in one Triton launch (`top_blocks_triton`: the same indices as
    `selection.top_blocks`). Same roundings and the same scores; only the order of the float32 sums inside a block
    (and of the score products' float32 sums) differs. Key blocks [force_start, force_end) are in every row
    (`selection.force_scores`). -> int32 (B, H, n_q, kept), ascending rows."""
    return _rank_blocks(*_pooled_for_selection(q, k, blkq, blkk), topk, (force_start, force_end))


def _pooled_for_selection(q, k, blkq, blkk):
    # the selection's passes over q and k: q's block means and k's centred block means, rounded to the input dtype
    # inside the kernel and stored in it (float32/float64 inputs: float32)
    half = q.dtype in (torch.float16, torch.bfloat16)
    return (block_means(q, blkq, center=False, round_to_input=half),
            block_means(k, blkk, center=True, round_to_input=half))


def _block_scores(pooled_q, pooled_k):
    # 16-bit operands, float32 accumulation, scores rounded to the input dtype: what `selection.block_scores`
    # computes (its operands are those rounded values, its products exact in float32), on the tensor cores
    return pooled_q @ pooled_k.transpose(-1, -2)


def _rank_blocks(pooled_q, pooled_k, topk, forced_blocks=(0, 0)):
    scores = force_scores(_block_scores(pooled_q, pooled_k), forced_blocks)
    return top_blocks_triton(scores, num_kept_blocks(topk, scores.shape[-1], num_forced(forced_blocks)))


def top_blocks_triton(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """`selection.top_blocks` in one Triton launch (one program per row): the same indices, ties to the lower index.
    `scores` in any float dtype (ranked as their float32 values).
    -> int32 (..., kept), ascending rows."""
    return _top_blocks(scores, kept)[0]


def top_blocks_and_rest(scores: torch.Tensor, kept: int, dtype: torch.dtype, z_blocks: torch.Tensor,
                        z_parts: torch.Tensor):
    """`top_blocks_triton` and, from the same launch, what `_rest_weights(lut, n_k, dtype, z_blocks, z_parts)` returns
    (the 0/1 matrix W in `dtype` and z_i, bit for bit): scope "rest" in eager calls, where the linear state is ready
    before the top-k runs. scores: (B, H, n_q, n_k). -> (lut, W, z_i)."""
    return _top_blocks(scores, kept, (dtype, z_blocks, z_parts))


def _top_blocks(scores, kept, rest=None):
    n_k = scores.shape[-1]
    lut = torch.empty(*scores.shape[:-1], kept, device=scores.device, dtype=torch.int32)
    rows = lut.numel() // kept if kept else 0
    if rest is None:
        w = zi = zb = zs = lut.new_empty(0, dtype=torch.float32)
        n_qblk, n_split, block_d = 1, 0, 16
    else:
        dtype, zb, zs = rest
        B, H, n_qblk, _ = scores.shape
        n_split, block_d = zs.shape[1], zb.shape[-1]
        w = torch.empty(B, H, n_qblk, n_k, device=scores.device, dtype=dtype)
        zi = _empty(B, H, n_qblk, block_d, device=scores.device, dtype=torch.float32)
    if rows:
        n_k_p2 = triton.next_power_of_2(n_k)
        _top_blocks_kernel[(rows,)](scores.contiguous(), lut, w, zb, zs, zi, n_k, kept, n_qblk, n_split,
                                    N_K_P2=n_k_p2, REST=rest is not None, BLOCK_D=block_d,
                                    num_warps=_TOPK_WARPS or (1 if n_k_p2 <= 512 else 4 if n_k_p2 <= 1024 else 8))
    return lut, w, zi


fast_select_blocks = torch.library.custom_op("diffusers_sla::select_blocks", mutates_args=())(_fast_select_blocks)


@fast_select_blocks.register_fake
def _(q, k, topk, blkq, blkk, force_start=0, force_end=0):
    B, H, Lq, _ = q.shape
    n_kblk = num_blocks(k.shape[2], blkk)
    kept = num_kept_blocks(topk, n_kblk, num_forced((force_start, force_end)))
    return q.new_empty(B, H, num_blocks(Lq, blkq), kept, dtype=torch.int32)


def _sla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    lut: torch.Tensor, scale: float, feature_map: str, linear_scope: str, blkq: int, blkk: int, store_bwd: bool,
    dot_precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """-> o (B, H, Lq, D) in q's dtype and memory layout, lse (B, H, Lq) float32 in log2 units, and what backward
    needs: the linear denominator (B, H, Lq) float32, o_l before proj_l (B, H, Lq, D), R_i and z_i per query block
    ("rest"), the per-head totals H and Z (empty for "rest", which reads R_i, z_i). Unused side outputs are empty."""
    g = _geometry(q, k, lut, blkq, blkk, linear_scope)
    _use_descriptors()
    qd, kd, vd = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    state = _linear_state_of(kd, vd, g, blkk, feature_map, dot_precision)
    return _attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state, g, scale, feature_map, blkq, blkk, store_bwd,
                   dot_precision)


class _LinearState(NamedTuple):
    """What the linear branch needs from k and v alone (`_linear_totals`): the per-head totals H, Z (scope "all";
    empty for "rest"), and for "rest" each key block's h_j, z_j and Z's per-split partials (else empty / None)."""

    ht: torch.Tensor
    zt: torch.Tensor
    hb: torch.Tensor
    zkb: torch.Tensor
    z_parts: torch.Tensor | None


def _linear_state_of(kd, vd, g: _Geometry, blkk, feature_map, dot_precision) -> _LinearState:
    if not g.has_linear:  # no kernel reads a linear state ("none"; "rest" with every block selected): skip the pass
        ht, zt, hb, zkb = (kd.new_empty(0, dtype=torch.float32) for _ in range(4))  # distinct: ht, zt are op outputs
        return _LinearState(ht, zt, hb, zkb, None)
    ht, zt, hb, zkb = _linear_totals(kd, vd, blkk, g.block_d, feature_map, dot_precision,
                                     store_blocks=g.rest and g.has_linear)
    if g.rest and g.has_linear:  # zt holds Z's per-split partials, read by `_rest_weights` only
        return _LinearState(ht, zt.new_empty(0), hb, zkb, zt)
    return _LinearState(ht, zt, hb, zkb, None)


def _attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state: _LinearState, g: _Geometry, scale, feature_map,
            blkq, blkk, store_bwd, dot_precision, rest_weights=None):
    """The forward after the linear state: R_i, z_i ("rest"), then the attention kernel. -> `_sla_fwd`'s outputs.
    rest_weights: ("rest") the 0/1 matrix and z_i when the top-k already made them (`top_blocks_and_rest`)."""
    B, H, Lq, Lk, D, n_qblk, n_kblk, kept, block_d, rest, has_linear, proj = g
    ht, zt, hb, zkb, z_parts = state
    o = _empty_like_input(q)
    lse = _empty(B, H, Lq, device=q.device, dtype=torch.float32)
    s_den, s_ol, s_rb, _ = _side_shapes(q, n_qblk, block_d, store_bwd, rest, has_linear)
    den = _empty(s_den, device=q.device, dtype=torch.float32)
    o_l = _empty(s_ol, device=q.device, dtype=q.dtype)
    if rest and has_linear:
        # R_i = sum of h_j over the key blocks query block i did not select, a 0/1 matrix product; z_i = Z - the
        # selected z_j, formed in the matrix's launch (H100, Wan shape: 26-28 us for both against 16 + 28 us for the
        # matrices and the float32 product; NOTES.md, "Glue")
        weights, zb = rest_weights or _rest_weights(lut, n_kblk, q.dtype, zkb, z_parts)
        rb = torch.matmul(weights, hb.view(B, H, n_kblk, block_d * block_d)).view(s_rb)
    else:
        rb = q.new_empty(0)
        zb = zt.new_empty(0)
    if _forward_kernel(q, g, blkq, blkk, dot_precision) == "hopper":
        # R tiles in the input dtype: "rest" R_i per query block; "all" the per-head totals, rounded as
        # `_attn_fwd` rounds them before its product
        r_in, z_in = (rb, zb) if rest else (ht.to(q.dtype), zt)
        if not _tma_addressable(o):  # the output leaves by TMA: q's layout when it can, else contiguous
            o = _empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
        gluon_fwd.launch(qd, kd, vd, lut, o, lse, den, o_l, r_in, z_in, proj_weight, proj_bias, scale, n_qblk, kept,
                         block_d, blkq, blkk, rest, has_linear, FEATURE_MAPS[feature_map], store_bwd, LINEAR_EPS,
                         has_proj=proj)
        return o, lse, den, o_l, rb, zb, ht, zt
    rows = _rows(blkq, "FWD", blkq)
    _attn_fwd[(n_qblk * (blkq // rows), B * H)](
        qd, kd, vd, lut, o, lse, den, o_l, rb, zb, ht, zt, proj_weight, proj_bias,
        *_strides(qd), *_strides(kd), *_strides(vd), *_strides(o),
        scale, H, Lq, Lk, n_qblk, n_kblk, kept,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=rows, BLOCK_N=blkk, SPLIT=blkq // rows,
        REST=rest, HAS_LINEAR=has_linear, HAS_PROJ=proj, FEATURE_MAP=FEATURE_MAPS[feature_map], STORE_BWD=store_bwd,
        DOT_PREC=dot_precision, PROJ_PREC=_proj_precision(dot_precision), EPS=LINEAR_EPS,
        FOLD_SCALE=scale > 0,
    )
    return o, lse, den, o_l, rb, zb, ht, zt


sla_fwd = torch.library.custom_op("diffusers_sla::sla_fwd", mutates_args=())(_sla_fwd)


@sla_fwd.register_fake
def _(q, k, v, proj_weight, proj_bias, lut, scale, feature_map, linear_scope, blkq, blkk, store_bwd, dot_precision):
    g = _geometry(q, k, lut, blkq, blkk, linear_scope)
    B, H, Lq, block_d, has_linear = g.B, g.H, g.Lq, g.block_d, g.has_linear
    s_den, s_ol, s_rb, s_zb = _side_shapes(q, g.n_qblk, block_d, store_bwd, g.rest, has_linear)
    f32 = dict(device=q.device, dtype=torch.float32)
    # only "all" with a linear branch keeps the totals ("rest" reads R_i, z_i; no linear branch: no state at all)
    totals = linear_scope == "all" and has_linear
    return (torch.empty_like(q), torch.empty(B, H, Lq, **f32), torch.empty(s_den, **f32), q.new_empty(s_ol),
            q.new_empty(s_rb), torch.empty(s_zb, **f32),
            torch.empty((B, H, block_d, block_d) if totals else (0,), **f32),
            torch.empty((B, H, block_d) if totals else (0,), **f32))


def column_lut(lut: torch.Tensor, n_kblk: int):
    """For each key block, the query blocks that selected it: (col_q (B*H, n_q*kept), offsets and counts
    (B*H, n_kblk)), all int32, built with one stable sort on the device (no host synchronisation). The query blocks
    of key block j are col_q[bh, offsets[bh, j] : offsets[bh, j] + counts[bh, j]], ascending."""
    B, H, n_qblk, kept = lut.shape
    flat = lut.reshape(B * H, n_qblk * kept)
    # a stable sort by key block keeps each key block's entries in flat order, i.e. ascending query block
    sorted_kb, order = torch.sort(flat, dim=-1, stable=True)
    col_q = torch.div(order, kept, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(n_kblk + 1, device=lut.device, dtype=sorted_kb.dtype).expand(B * H, n_kblk + 1)
    edges = torch.searchsorted(sorted_kb.contiguous(), bounds.contiguous(), out_int32=True)
    return col_q.contiguous(), edges[:, :-1].contiguous(), (edges[:, 1:] - edges[:, :-1]).contiguous()


def _sla_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
    proj_bias: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, den: torch.Tensor, o_l: torch.Tensor,
    rb: torch.Tensor, zb: torch.Tensor, ht: torch.Tensor, zt: torch.Tensor, lut: torch.Tensor, scale: float,
    feature_map: str, linear_scope: str, blkq: int, blkk: int, dot_precision: str, dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (in q's dtype, contiguous), d proj_weight (D, D) and d proj_bias (D,) in float32 (both empty
    for scope "none", whose operator has no proj_l).

    dlse (B, H, Lq) float32, optional: the gradient reaching the natural-log mass of the selected blocks,
    ln Z_sel = lse * ln 2 (the fusions of `ops/fusion.py`). d ln Z_sel / d s_ij = P_ij, so it joins the sparse
    backward's dS = P (dP - delta) as delta - dlse."""
    g = _geometry(q, k, lut, blkq, blkk, linear_scope)
    B, H, Lq, Lk, D, n_qblk, n_kblk, kept, block_d, rest, has_linear, proj = g
    fm = FEATURE_MAPS[feature_map]
    dev = q.device
    warps = 4 if block_d <= 64 and blkq <= 64 else 8
    stages = 1 if not is_cuda() else 2

    # -- preprocess: delta, dN, dd, dR_i, dz_i ----
    delta = _empty(B, H, Lq, device=dev, dtype=torch.float32)
    # dN = g / d can be large where d is small: keep float32 unless the compute dtype has float32's range
    dn = _empty(B, H, Lq, D, device=dev, dtype=q.dtype if q.dtype == torch.bfloat16 else torch.float32) \
        if has_linear else _empty(0, device=dev, dtype=q.dtype)
    dd = _empty(B, H, Lq, device=dev, dtype=torch.float32) if has_linear else delta.new_empty(0)
    drb = _empty(B, H, n_qblk, block_d, block_d, device=dev, dtype=q.dtype) if has_linear \
        else q.new_empty(0)
    dzb = _empty(B, H, n_qblk, block_d, device=dev, dtype=torch.float32) if has_linear else delta.new_empty(0)
    _attn_bwd_preprocess[(n_qblk, B * H)](
        o, do, o_l, den, q, proj_weight, proj_bias, delta, dd, dn, drb, dzb,
        *_strides(o), *_strides(do), *_strides(q), H, Lq, n_qblk,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, HAS_LINEAR=has_linear, HAS_PROJ=proj, FEATURE_MAP=fm,
        DOT_PREC=dot_precision, PROJ_PREC=_proj_precision(dot_precision),
        num_warps=16 if block_d * blkq >= 128 * 128 else warps, num_stages=1,  # 16: -10% on the H100 (NOTES v4)
    )
    if dlse is not None:
        delta.sub_(dlse)

    # -- proj_l gradients: dW = sum dO^T o_l, db = sum dO ----
    if has_linear:
        split = _split(B * H * n_qblk, 1, _PROJ_GRAD_TARGET)
        dwp = _empty(split, block_d, block_d, device=dev, dtype=torch.float32)
        dbp = _empty(split, block_d, device=dev, dtype=torch.float32)
        _proj_grad[(split,)](
            do, o_l, dwp, dbp, *_strides(do), H, Lq, n_qblk, B * H * n_qblk, split,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, DOT_PREC=dot_precision,
            num_warps=warps, num_stages=stages,
        )
        dw = dwp.sum(0)[:D, :D].contiguous()
        db = dbp.sum(0)[:D].contiguous()
        # dh_j = sum of dR_i, dz_j of dz_i over the query blocks i that did not select key block j: 0/1 products.
        # dz_j stays a float32 product (not DZ minus the selecting dz_i, as the forward forms z_i): the dz_i have
        # both signs, and the product costs ~1% of the backward.
        if rest:
            weights, weights32 = _rest_weights(lut, n_kblk, q.dtype)
            dhb = torch.matmul(weights.transpose(-1, -2), drb.view(B, H, n_qblk, block_d * block_d))
            dzbk = torch.matmul(weights32.transpose(-1, -2), dzb)
            dht, dzt = ht, zt  # unused
        else:
            dht = drb.view(B * H, n_qblk, block_d, block_d).sum(1, dtype=torch.float32)
            dzt = dzb.view(B * H, n_qblk, block_d).sum(1)
            dhb, dzbk = drb, dzb  # unused
    else:
        if proj:  # an empty linear branch: proj_l's bias still reaches the output
            dw = torch.zeros(D, D, device=dev, dtype=torch.float32)
            db = do.sum(dim=(0, 1, 2), dtype=torch.float32)
        else:
            dw, db = delta.new_empty(0), delta.new_empty(0)
        dht, dzt, dhb, dzbk = ht, zt, drb, dzb  # unused

    # -- dK, dV over the column LUT, dQ over the LUT: two launches (Gluon kernels on Hopper) ----
    qd, kd, vd, dod = _tma_ready(q), _tma_ready(k), _tma_ready(v), _tma_ready(do)
    col_q, col_off, col_cnt = column_lut(lut, n_kblk)
    dq = _empty(B, H, Lq, D, device=dev, dtype=q.dtype)
    dk = _empty(B, H, Lk, D, device=dev, dtype=q.dtype)
    dv = _empty(B, H, Lk, D, device=dev, dtype=q.dtype)
    if _backward_kernel(q, g, blkq, blkk, dot_precision) == "hopper":
        # dh and R tiles in the input dtype: "rest" one per key block / query block; "all" the per-head totals,
        # rounded as `_attn_bwd` rounds them before its products
        dh_in, dz_in = (dhb, dzbk) if rest else (dht.to(q.dtype), dzt)
        r_in, z_in = (rb, zb) if rest else (ht.to(q.dtype), zt)
        gluon_bwd.launch_dkdv(qd, kd, vd, dod, dk, dv, lse, delta, col_q, col_off, col_cnt, dh_in, dz_in, scale,
                              n_qblk, n_kblk, kept, block_d, blkq, blkk, rest, has_linear, fm)
        gluon_bwd.launch_dq(qd, kd, vd, dod, dq, lut, lse, delta, dn, dd, r_in, z_in, scale, n_qblk, kept, block_d,
                            blkq, blkk, rest, has_linear, fm)
        return dq, dk, dv, dw, db
    # 64-row query tiles in both backward launches (H100, Wan shape, NOTES.md v5): dK/dV 2.91 -> 1.95 ms,
    # dQ 1.33 -> 1.01 ms
    dkdv_rows, dq_rows = _rows(blkq, "DKDV", 64), _rows(blkq, "DQ", 64)
    for program, n_prog, rows in ((0, n_kblk, dkdv_rows), (1, n_qblk * (blkq // dq_rows), dq_rows)):
        _attn_bwd[(n_prog, B * H)](
            qd, kd, vd, dod, _head_tiles(qd, rows, block_d), _head_tiles(kd, blkk, block_d),
            _head_tiles(vd, blkk, block_d), _head_tiles(dod, rows, block_d),
            lse, delta, dn, dd, lut, col_q, col_off, col_cnt,
            rb, zb, ht, zt, dhb, dzbk, dht, dzt,
            dq, dk, dv,
            *_strides(qd), *_strides(kd), *_strides(vd), *_strides(dod),
            scale, H, Lq, Lk, n_qblk, n_kblk, kept,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, BLOCK_N=blkk, STEP_M=rows,
            REST=rest, HAS_LINEAR=has_linear, FEATURE_MAP=fm, DOT_PREC=dot_precision, PROGRAM=program,
        )
    return dq, dk, dv, dw, db


sla_bwd = torch.library.custom_op("diffusers_sla::sla_bwd", mutates_args=())(_sla_bwd)


@sla_bwd.register_fake
def _(do, q, k, v, proj_weight, proj_bias, o, lse, den, o_l, rb, zb, ht, zt, lut, scale, feature_map, linear_scope,
      blkq, blkk, dot_precision, dlse=None):
    D = q.shape[-1]
    f32 = dict(device=q.device, dtype=torch.float32)
    proj = linear_scope != "none"
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape),
            torch.empty((D, D) if proj else (0,), **f32), torch.empty((D,) if proj else (0,), **f32))


def _eager_or_op(op, impl):
    """`op` while torch.compile traces (an opaque node, no graph break); `impl` itself in eager mode, which skips the
    torch.library dispatch: ~150 us of host time per call, as much as the GPU work of a short sequence
    (benchmarks/NOTES.md v7)."""

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        with torch.no_grad():
            return impl(*args)

    call.__name__ = call.__qualname__ = impl.__name__.lstrip("_")
    call.__doc__ = impl.__doc__
    return call


# What `autograd.py` calls.
select_blocks_fused = _eager_or_op(fast_select_blocks, _fast_select_blocks)
forward = _eager_or_op(sla_fwd, _sla_fwd)
backward = _eager_or_op(sla_bwd, _sla_bwd)

# The selection's passes over q and k (`_pooled_for_selection`) and the linear state (`_linear_state_of`, a pass over k
# and v) need nothing from each other. In eager calls on the GPU the pooling runs on a second stream while the linear
# state runs on the caller's (`select_and_forward`). The score product and top-k stay on the caller's stream: a cuBLAS
# call on another stream costs ~50 us more host time (measured on the H200, benchmarks/NOTES.md v14) for 4 us of GPU
# work. DIFFUSERS_SLA_OVERLAP=0: one after the other, `select_blocks_fused` then `forward`.
OVERLAP = os.environ.get("DIFFUSERS_SLA_OVERLAP", "1") != "0"


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def select_and_forward(q_sel, k_sel, q, k, v, proj_weight, proj_bias, topk, scale, feature_map, linear_scope, blkq,
                       blkk, store_bwd, dot_precision, forced_blocks=(0, 0)):
    """`select_blocks_fused(q_sel, k_sel, ...)` then `forward(q, k, v, ..., lut, ...)`, -> (lut, forward's outputs).

    With `OVERLAP`, outside torch.compile: the same kernels in another order: the linear state on the caller's
    stream and the pooling on a second stream when the tensors are on the GPU (one after the other elsewhere), joined
    before the scores and the top-k. Same outputs, bit for bit."""
    if not OVERLAP or torch.compiler.is_compiling():
        lut = select_blocks_fused(q_sel, k_sel, topk, blkq, blkk, *forced_blocks)
        return lut, forward(q, k, v, proj_weight, proj_bias, lut, scale, feature_map, linear_scope, blkq, blkk,
                            store_bwd, dot_precision)
    with torch.no_grad():
        g = _geometry(q, k, None, blkq, blkk, linear_scope, topk, num_forced(forced_blocks))
        side = None
        if q.is_cuda:
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device.index)
            side.wait_stream(main)  # for the producers of q_sel and k_sel, not for the linear state queued next
        _use_descriptors()
        qd, kd, vd = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        state = _linear_state_of(kd, vd, g, blkk, feature_map, dot_precision)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            pooled = _pooled_for_selection(q_sel, k_sel, blkq, blkk)
        if side is not None:
            main.wait_stream(side)
            for x in pooled:  # made on the side stream, read on the caller's: not reused before that read is done
                x.record_stream(main)
        rest_weights = None
        if g.rest and g.has_linear:  # the top-k's launch also builds the 0/1 matrix and z_i (one launch fewer)
            scores = force_scores(_block_scores(*pooled), forced_blocks)
            lut, *rest_weights = top_blocks_and_rest(scores, g.kept, q.dtype, state.zkb, state.z_parts)
        else:
            lut = _rank_blocks(*pooled, topk, forced_blocks)
        return lut, _attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state, g, scale, feature_map, blkq, blkk,
                            store_bwd, dot_precision, rest_weights)
