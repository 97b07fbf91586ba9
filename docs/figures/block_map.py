# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Draw the README's picture: which key blocks each query block sends to exact attention (critical) and which to
the linear branch (rest), for one head of real attention inputs.

    python docs/figures/block_map.py [--golden ../shared/golden/sla1__d128_l1000_top20_elu_q128.safetensors]

Without the golden file it uses queries and keys with a local (diagonal) structure, as video tokens have."""

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffusers_sla.ops import lut_to_block_map, select_blocks

CRITICAL, REST, GRID = (214, 69, 65), (240, 222, 160), (255, 255, 255)


def structured_inputs(L=1024, D=64, seed=0):
    # Tokens on a line whose content drifts slowly: nearby tokens are similar, so attention is mostly local.
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(L, D, generator=g).cumsum(0) / L**0.5
    q = drift + 0.3 * torch.randn(L, D, generator=g)
    k = drift + 0.3 * torch.randn(L, D, generator=g)
    return q[None, None], k[None, None]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--golden", type=Path, default=None)
    parser.add_argument("--topk", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("block_map.png"))
    args = parser.parse_args()
    if args.golden:
        from safetensors.torch import load_file

        t = load_file(args.golden)
        q, k = t["q"][:1, :1].float(), t["k"][:1, :1].float()
    else:
        q, k = structured_inputs()
    block_map = lut_to_block_map(select_blocks(q, k, args.topk, 64, 64), -(-k.shape[2] // 64))[0, 0]
    n_q, n_k = block_map.shape
    cell, margin = 22, 40
    image = Image.new("RGB", (max(margin + n_k * cell + 10, 600), margin + n_q * cell + 40), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n_q):
        for j in range(n_k):
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=CRITICAL if block_map[i, j] else REST)
    draw.text((margin, 12), "key blocks ->", fill="black")
    draw.text((4, margin), "query\nblocks", fill="black")
    legend_y = margin + n_q * cell + 10
    draw.rectangle([margin, legend_y, margin + 14, legend_y + 14], fill=CRITICAL)
    draw.text((margin + 20, legend_y), f"critical: exact softmax attention (top {args.topk:.0%})", fill="black")
    draw.rectangle([margin + 290, legend_y, margin + 304, legend_y + 14], fill=REST)
    draw.text((margin + 310, legend_y), "rest: linear attention + proj_l", fill="black")
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
