# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Block selection: which key blocks each query block attends to exactly.

Shared by every backend, so that the PyTorch operator and the Triton kernels always agree on the block map.
Everything here stays on the device: no `.item()`, no host synchronisation.

    pooled_q[i] = mean of the real rows of query block i                       (B, H, n_q, D)
    pooled_k[j] = mean of the real rows of key block j of (k - k.mean(seq))     (B, H, n_k, D)
    score[i, j] = pooled_q[i] . pooled_k[j]
    lut[i]      = indices of the `num_kept_blocks` largest scores of row i (ties: lower index), ascending

Forced key blocks (`forced_blocks=(start, end)`, a range of key block indices, e.g. the blocks holding a joint
attention's text tokens) are in every row: their scores are set to +inf before the top-k. `topk` then applies to the
other blocks, and the forced ones come on top: `num_kept_blocks(topk, n, forced)` = forced + `int(topk * (n -
forced))` (at least 1 of the others while there are any).
"""

from __future__ import annotations

import torch


def num_kept_blocks(topk: float, n_key_blocks: int, forced: int = 0) -> int:
    """Key blocks kept per query block: `int(topk * n)`, but never 0 (the reference returns NaN there) and never
    more than all blocks. With `forced` blocks always kept: those, plus that count over the other blocks."""
    if forced:
        rest = n_key_blocks - forced
        return forced + (num_kept_blocks(topk, rest) if rest > 0 else 0)
    return min(n_key_blocks, max(1, int(topk * n_key_blocks)))


def forced_block_range(start: int, end: int, blkk: int) -> tuple[int, int]:
    """The key blocks that hold key tokens [start, end): (first block, last block + 1); (0, 0) when empty."""
    if end <= start:
        return (0, 0)
    return (start // blkk, num_blocks(end, blkk))


def force_scores(scores: torch.Tensor, forced_blocks: tuple[int, int] | None) -> torch.Tensor:
    """`scores` with the forced key blocks' columns at +inf, so that every top-k row holds them."""
    if forced_blocks is None or forced_blocks[1] <= forced_blocks[0]:
        return scores
    scores = scores.clone()
    scores[..., forced_blocks[0]:forced_blocks[1]] = float("inf")
    return scores


def num_forced(forced_blocks: tuple[int, int] | None) -> int:
    return 0 if forced_blocks is None else max(0, forced_blocks[1] - forced_blocks[0])


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D) in float32: the mean over each block's real rows (the last block
    may be partial)."""
    B, H, L, D = x.shape
    n = num_blocks(L, block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - L))
    sums = padded.view(B, H, n, block, D).sum(dim=3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = L - (n - 1) * block
    return sums / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, blkq: int, blkk: int) -> torch.Tensor:
    """Pooled query blocks against pooled, centred key blocks: (B, H, n_q, n_k) float32.

    The public reference pools and multiplies in the input precision (bf16). We round the pooled vectors and the
    scores to the input's dtype in the same places, so that near-ties break the same way and block maps match it
    exactly; for float32/float64 inputs this rounding is a no-op."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    k_centred = (k - k.mean(dim=2, keepdim=True, dtype=torch.float32).to(k.dtype)).to(k.dtype)
    pooled_q = mean_pool_blocks(q, blkq).to(dtype).float()
    pooled_k = mean_pool_blocks(k_centred, blkk).to(dtype).float()
    return (pooled_q @ pooled_k.transpose(-1, -2)).to(dtype).float()


def top_blocks(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Indices of the `kept` largest scores of each row, ascending, int32. Equal scores go to the lower index, as
    `torch.topk` breaks ties on CUDA (checked on the H100 by `benchmarks/kernel.py check`); a stable sort makes that
    rule hold on every device, and on the GPU it is ~5x faster than `torch.topk` for rows of a few hundred blocks."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :kept]
    return order.sort(dim=-1).values.to(torch.int32)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int, blkk: int,
                  forced_blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Look-up table of selected key blocks: int32 (B, H, n_q, kept), ascending within each row; every row holds
    the `forced_blocks` range (see the module docstring)."""
    scores = force_scores(block_scores(q, k, blkq, blkk), forced_blocks)
    return top_blocks(scores, num_kept_blocks(topk, scores.shape[-1], num_forced(forced_blocks)))


def lut_to_block_map(lut: torch.Tensor, n_key_blocks: int) -> torch.Tensor:
    """(B, H, n_q, kept) look-up table -> (B, H, n_q, n_k) bool block map (True = exact attention)."""
    block_map = torch.zeros(*lut.shape[:-1], n_key_blocks, dtype=torch.bool, device=lut.device)
    return block_map.scatter_(-1, lut.long(), True)
