# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""What text protection (`SLAConfig.protect_text`) costs on the Flux geometry: the transformer's eager forward, dense
(cuDNN SDPA) against SLA with and without protection, at several resolutions, in one process.

FLUX.1-dev dimensions (hidden 3072, 24 heads of 128, T5 width 4096, 512 text tokens), random bf16 weights, fewer
blocks (4 double-stream + 8 single-stream by default). Writes `protect_text_flux.json` and `protect_text_flux.log` to
--out.

    python -m benchmarks.protect_text_flux --out runs/protect_text --sizes 1024 2048
    python -m benchmarks.protect_text_flux --out /tmp/pt --tiny     # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    if args.tiny:
        dims = dict(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, pooled_projection_dim=32,
                    axes_dims_rope=(8, 12, 12), in_channels=16)
    else:
        dims = dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096,
                    pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), in_channels=64)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, num_layers=args.double, num_single_layers=args.single,
                                   guidance_embeds=True, **dims)
    return model.to(device, dtype).eval(), dims


def inputs_for(size: int, dims: dict, text: int, device, dtype):
    side = size // 16  # VAE /8, then 2x2 packing
    g = torch.Generator().manual_seed(size)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, dims["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text, dims["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, dims["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device),
    )


def timed(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU (checks the script runs)")
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.text, args.warmup, args.iters = [256], 32, 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers_sla import disable_sla, enable_sla, reset_sla_stats, sla_summary

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, dims = build(args, device, dtype)
    log, results = [], {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "double": args.double, "single": args.single, "text": args.text, "topk": args.topk,
                        "sizes": {}}

    def say(line):
        print(line, flush=True)
        log.append(line)

    for size in args.sizes:
        inputs = inputs_for(size, dims, args.text, device, dtype)
        row = {}
        with torch.no_grad():
            disable_sla(model)
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    row["dense_cudnn_ms"] = timed(lambda: model(**inputs), args.warmup, args.iters, device)
            else:
                row["dense_cudnn_ms"] = timed(lambda: model(**inputs), args.warmup, args.iters, device)
            for protect in (False, True):
                enable_sla(model, topk=args.topk, protect_text=protect,
                           **({"blkq": 32, "blkk": 32, "min_kv_blocks": 2} if args.tiny else {}))
                reset_sla_stats(model)
                model(**inputs)
                density = sla_summary(model).mean_density
                key = "sla_protected" if protect else "sla_unprotected"
                row[f"{key}_ms"] = timed(lambda: model(**inputs), args.warmup, args.iters, device)
                row[f"{key}_density"] = density
        row["speedup_unprotected"] = row["dense_cudnn_ms"] / row["sla_unprotected_ms"]
        row["speedup_protected"] = row["dense_cudnn_ms"] / row["sla_protected_ms"]
        row["protection_cost"] = row["sla_protected_ms"] / row["sla_unprotected_ms"] - 1
        results["sizes"][str(size)] = row
        say(f"{size}x{size} ({(size // 16) ** 2} image + {args.text} text tokens): dense {row['dense_cudnn_ms']:.2f} ms"
            f" | SLA {row['sla_unprotected_ms']:.2f} ms ({row['speedup_unprotected']:.2f}x, density "
            f"{row['sla_unprotected_density']:.3f}) | protected {row['sla_protected_ms']:.2f} ms "
            f"({row['speedup_protected']:.2f}x, density {row['sla_protected_density']:.3f}) | protection "
            f"{100 * row['protection_cost']:+.1f}%")
    (args.out / "protect_text_flux.json").write_text(json.dumps(results, indent=2))
    (args.out / "protect_text_flux.log").write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
