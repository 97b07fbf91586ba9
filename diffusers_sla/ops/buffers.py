# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""What every SLA launch derives from its inputs: sizes (`Geometry`), output buffers, strides and tensor descriptors.

Output buffers come from `empty` / `empty_like_input` (uninitialised memory: every element is written by a kernel);
the GPU tests replace these two functions with NaN-filled twins, so that an element no kernel wrote shows up. Callers
use them as `buffers.empty(...)` for that reason.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .kernels.common import is_cuda
from .selection import num_blocks, num_kept_blocks


def empty(*shape, device, dtype) -> torch.Tensor:
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
    return torch.empty(shape, device=device, dtype=dtype)


def empty_like_input(x: torch.Tensor) -> torch.Tensor:
    # the output in the caller's memory layout: diffusers hands (B, L, H, D) tensors viewed as (B, H, L, D), and an
    # output in that layout saves the copy its `transpose(1, 2).flatten(2)` would make
    return torch.empty_like(x)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def has_linear(linear_scope: str, kept: int, n_kblk: int) -> bool:
    # "rest" with every key block selected leaves the linear branch empty: o_l = 0 exactly (reference: 0 / eps);
    # "none" has none at all
    return linear_scope != "none" and not (linear_scope == "rest" and kept == n_kblk)


class Geometry(NamedTuple):
    """Sizes every SLA launch derives from its inputs: one home, shared by the forward, its fake and the backward."""

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


def geometry(q: torch.Tensor, k: torch.Tensor, lut: torch.Tensor | None, blkq: int, blkk: int,
             linear_scope: str, topk: float | None = None, forced: int = 0, mixed: bool = False) -> Geometry:
    """From the block map's shape, or (lut None) from the `topk` (and `forced` block count) the map will be selected
    with. mixed (a fusion's gate, scope "rest"): the linear branch is kept even where nothing is left (its o_l = 0
    then), so that the mix still weighs in proj_l's bias."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_qblk, n_kblk = num_blocks(Lq, blkq), num_blocks(Lk, blkk)
    kept = lut.shape[-1] if lut is not None else num_kept_blocks(topk, n_kblk, forced)
    return Geometry(B, H, Lq, Lk, D, n_qblk, n_kblk, kept, block_d(D), linear_scope == "rest",
                    has_linear(linear_scope, kept, n_kblk) or (mixed and linear_scope == "rest"),
                    linear_scope != "none")


def side_shapes(q, n_qblk, block_d, store_bwd, rest, has_linear):
    """Shapes of den, o_l (stored for backward) and R_i, z_i ("rest": always computed, the forward kernel reads them).
    """
    B, H, Lq, D = q.shape
    rz = ((B, H, n_qblk, block_d, block_d), (B, H, n_qblk, block_d)) if (rest and has_linear) else ((0,), (0,))
    if not (store_bwd and has_linear):
        return (0,), (0,), *rz
    return (B, H, Lq), (B, H, Lq, D), *rz


def query_rows(blkq: int, name: str) -> int:
    """Query rows per tile of one launch (`tuning.<name>_ROWS`, 0: blkq): blkq, or a power-of-two part of it (a query
    block then runs as several programs, or steps, that share its LUT row)."""
    rows = min(blkq, getattr(tuning, f"{name}_ROWS") or blkq)
    if rows < 16 or blkq % rows:
        raise ValueError(f"tuning.{name}_ROWS={rows}: must divide blkq={blkq} and be at least 16")
    return rows


def split(n_items: int, programs_per_split: int, target: int | None = None) -> int:
    # enough programs to fill the GPU; few under the interpreter
    target = (target or tuning.SPLIT_TARGET) if is_cuda() else 2
    return max(1, min(n_items, -(-target // max(1, programs_per_split))))


def proj_precision(dot_precision: str) -> str:
    # proj_l is float32; on the GPU its D x D product runs as tf32 unless full float32 ("ieee") was asked for.
    return "ieee" if (dot_precision == "ieee" or not is_cuda()) else "tf32"


def strides(x):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def use_descriptors():
    # kernels that build tensor descriptors on the device need a global-memory scratch allocator on the GPU
    if is_cuda():
        triton.set_allocator(_tma_alloc)


def tma_addressable(x: torch.Tensor) -> bool:
    # unit last stride, 16-byte aligned base and row strides: what a tensor descriptor can address
    el = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((s * el) % 16 == 0 for s in x.stride()[:-1])


def head_tiles(x: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """A host-built tensor descriptor over all of a (B, H, L, D) tensor, boxes of one head's `rows` x `block_d` (rows
    and columns past L and D read as zeros), for the backward kernels. Built once per call, as the Hopper forward's
    (`gluon_fwd.descriptor`), instead of in every program."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d])


def tma_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when a tensor descriptor can address it (unit last stride, 16-byte aligned base and row strides),
    otherwise a copy that can (contiguous, head dim zero-padded to 16 bytes; the kernels only read HEAD_DIM columns).
    """
    if tma_addressable(x):
        return x
    D = x.shape[-1]
    pad = -D % max(1, 16 // x.element_size())
    # a new allocation either way: a contiguous view at an unaligned offset would stay unaligned
    return torch.nn.functional.pad(x, (0, pad)) if pad else x.clone(memory_format=torch.contiguous_format)
