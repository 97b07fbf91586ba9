# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Untuned fusions against full attention on synthetic video-like keys (CPU, about a minute; docs/fusion.md).

Keys are drawn around block centres that drift along the sequence (local structure, as video tokens have), queries
near their keys, values independent. For each spread and topk: the softmax mass outside the selected blocks, the
error of the rest-mass estimate in log space, and ||out - full|| / ||full|| for SLA at zero proj_l (= the sparse part
alone) and for fusion "mass" at zero proj_l. The trained comparison is the quality study's.

    python -m benchmarks.lab.fusion_probe
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    from diffusers_sla.ops import fusion
    from diffusers_sla.ops.reference import sla_reference
    from diffusers_sla.ops.selection import lut_to_block_map, select_blocks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--topks", type=float, nargs="+", default=[0.03, 0.05, 0.10])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.5, 1.0])
    args = parser.parse_args(argv)
    L, D, blk = args.length, args.head_dim, args.block
    scale = D**-0.5
    print("| key spread | topk | mass outside | mean abs error of log Z_rest | rel err SLA (proj_l 0) | "
          "rel err mass (proj_l 0) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spread in args.spreads:
        g = torch.Generator().manual_seed(1)
        centres = torch.cumsum(0.35 * torch.randn(1, 2, L // blk, 1, D, generator=g), dim=2)
        k = (centres + spread * torch.randn(1, 2, L // blk, blk, D, generator=g)).reshape(1, 2, L, D)
        q = k + spread * torch.randn(1, 2, L, D, generator=g)
        v = torch.randn(1, 2, L, D, generator=g)
        scores = (q @ k.transpose(-1, -2)) * scale
        full = torch.softmax(scores, dim=-1) @ v
        zero_w, zero_b = torch.zeros(D, D), torch.zeros(D)
        for topk in args.topks:
            lut = select_blocks(q, k, topk, blk, blk)
            kw = dict(topk=topk, blkq=blk, blkk=blk, feature_map="softmax", linear_scope="rest", lut=lut, scale=scale)
            sla = sla_reference(q, k, v, zero_w, zero_b, **kw)
            mass = sla_reference(q, k, v, zero_w, zero_b, fusion="mass", **kw)
            selected = lut_to_block_map(lut, L // blk)[:, :, torch.arange(L) // blk][:, :, :, torch.arange(L) // blk]
            true_rest = scores.masked_fill(selected, float("-inf")).logsumexp(-1)
            estimate = fusion.rest_log_mass(q, k, lut, blk, blk, scale)
            outside = float((true_rest - scores.logsumexp(-1)).exp().mean())
            err = float((estimate - true_rest).abs().mean())
            rel = [float((x - full).norm() / full.norm()) for x in (sla, mass)]
            print(f"| {spread} | {topk:.2f} | {outside:.3f} | {err:.3f} | {rel[0]:.3f} | {rel[1]:.3f} |")


if __name__ == "__main__":
    main()
