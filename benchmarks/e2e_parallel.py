# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""NOT YET RUN (written without a multi-GPU machine; expect fixes at its first run).

Wan2.1-T2V-1.3B (random bf16 weights, no download) on 1 GPU and on 2 GPUs with diffusers' Ulysses context
parallelism (`enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`), dense cuDNN attention against
SLA at each `--topk`, forward and one training step (gradient checkpointing on for every variant), at 81 frames
480p (21 x 60 x 104 latents, 32,760 tokens) and 720p (21 x 90 x 160, 75,600 tokens), ratios side by side in one run:

    torchrun --nproc-per-node 2 -m benchmarks.e2e_parallel --out LOGDIR

Rank 0 runs the 1-GPU rows while rank 1 waits; then both run the 2-GPU rows. Every 2-GPU output is compared with the
1-GPU output of the same variant (relative error, bf16). The table is printed and written to LOGDIR/e2e_parallel.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.e2e_wan import WAN_1_3B, add_variant_arguments, cuda_time_ms

RESOLUTIONS = {"480p": (60, 104), "720p": (90, 160)}  # latent height, width for 81 frames


def build_model(device, dtype, backend: str):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # the same weights on every rank and in every phase
    model = WanTransformer3DModel(**WAN_1_3B).to(device, dtype)
    model.set_attention_backend(backend)
    return model


def run_variant(model, inputs, args, label):
    """(forward ms, train step ms or None, forward output or None); a failure is reported in the row's place."""
    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def train_step():
        out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    try:
        out = forward()
        fwd = cuda_time_ms(forward, args.warmup, args.repeat)
        train = None
        if not args.skip_train:
            model.enable_gradient_checkpointing()
            train = cuda_time_ms(train_step, 1, max(2, args.repeat // 2))
            model.disable_gradient_checkpointing()
        return fwd, train, out
    except (RuntimeError, NotImplementedError) as exc:  # OOM at 720p, or SLA refusing context parallelism
        print(f"  {label}: failed: {exc!r}"[:400], flush=True)
        torch.cuda.empty_cache()
        return None, None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the table (e2e_parallel.md)")
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    add_variant_arguments(parser)
    args = parser.parse_args()

    from diffusers import ContextParallelConfig

    from diffusers_sla import SLAConfig, enable_sla

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device, dtype = torch.device("cuda"), torch.bfloat16
    variants = [("dense cuDNN", "_native_cudnn", None)] + [
        (f"SLA topk={t}", "native", SLAConfig(topk=t, blkq=args.blkq, blkk=args.blkk)) for t in args.topk]
    lines = [f"GPU: {torch.cuda.get_device_name()} x{world} | torch {torch.__version__} | bf16 | Wan2.1-1.3B random",
             "", "| resolution | variant | 1 GPU fwd ms | 2 GPU fwd ms | fwd scaling | 1 GPU train ms | 2 GPU train ms "
             "| train scaling | 2-GPU vs 1-GPU output (rel) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = ["", "Forward speed-up of SLA over dense cuDNN (dense ms / SLA ms):"]
    for res in args.resolutions:
        height, width = RESOLUTIONS[res]
        gen = torch.Generator(device).manual_seed(1)
        inputs = dict(
            hidden_states=torch.randn(1, 16, args.frames, height, width, device=device, dtype=dtype, generator=gen),
            encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=dtype, generator=gen),
            timestep=torch.tensor([500], device=device),
        )
        one, two = {}, {}
        if rank == 0:  # 1 GPU
            for name, backend, config in variants:
                model = build_model(device, dtype, backend)
                if config is not None:
                    enable_sla(model, config)
                one[name] = run_variant(model, inputs, args, f"{res} 1 GPU {name}")
                print(f"  {res} 1 GPU {name}: {one[name][:2]}", flush=True)
                del model
                torch.cuda.empty_cache()
        dist.barrier()
        for name, backend, config in variants:  # 2 GPUs, Ulysses
            model = build_model(device, dtype, backend)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            try:
                if config is not None:
                    enable_sla(model, config)
                dist.barrier()
                two[name] = run_variant(model, inputs, args, f"{res} 2 GPUs {name}")
            except NotImplementedError as exc:
                print(f"  {res} 2 GPUs {name}: refused: {exc}"[:400], flush=True)
                two[name] = (None, None, None)
            del model
            torch.cuda.empty_cache()
            dist.barrier()
        if rank == 0:
            def ms(x):
                return f"{x:.1f}" if x is not None else "n/a"

            def ratio(a, b):
                return f"{a / b:.2f}x" if a is not None and b is not None else "n/a"

            for name, _, _ in variants:
                f1, t1, o1 = one[name]
                f2, t2, o2 = two[name]
                rel = "n/a" if o1 is None or o2 is None else \
                    f"{((o2.float() - o1.float()).norm() / o1.float().norm()).item():.2e}"
                lines.append(f"| {res} | {name} | {ms(f1)} | {ms(f2)} | {ratio(f1, f2)} | {ms(t1)} | {ms(t2)} | "
                             f"{ratio(t1, t2)} | {rel} |")
            dense2 = two["dense cuDNN"][0]
            for name, _, config in variants:
                if config is not None:
                    notes.append(f"* {res} {name}: 2-GPU SLA forward vs 2-GPU dense cuDNN: "
                                 f"{ratio(dense2, two[name][0])}; 1-GPU: {ratio(one['dense cuDNN'][0], one[name][0])}")
    if rank == 0:
        text = "\n".join(lines + notes)
        print(text, flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "e2e_parallel.md").write_text(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
