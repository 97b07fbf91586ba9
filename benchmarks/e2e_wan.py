# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""End-to-end speed of a real-size Wan2.1-T2V-1.3B transformer with dense attention and with SLA (GPU).

Builds `WanTransformer3DModel` from the Wan2.1-T2V-1.3B configuration with random bf16 weights (no download), feeds
latents for 81 frames at 480x832 (21 x 60 x 104 latents -> 32,760 tokens), and times, in one run:

* transformer forward (inference): dense SDPA with the flash and the cuDNN backends, SLA at each `--topk`;
* one training step (forward + backward, gradient checkpointing on for every variant so that 30 layers of
  activations fit): the same variants.

It also times the self-attention core alone (dense backends and SLA, same shape) to report the fraction of the dense
forward spent in attention and the speed-up bound that fraction implies (Amdahl: 1 / (1 - fraction)).

    python benchmarks/e2e_wan.py                  # the full table
    python benchmarks/e2e_wan.py --frames 21 --topk 0.05 0.1 --skip-train
    python benchmarks/e2e_wan.py --compile        # also the forward with torch.compile, every variant
    python benchmarks/e2e_wan.py --frames 3 --cuda-graph --skip-train   # a short sequence, replayed from a CUDA graph

`--compile` adds a second table (forward and train step) in which each of the 30 transformer blocks runs through
`torch.compile` (diffusers' `compile_repeated_blocks`: one compiled graph shared by all blocks), for the dense
backends and for SLA alike: what a served model runs. Compilation is redone for every variant (fresh dynamo caches);
the dense rows set diffusers' "_native_flash" / "_native_cudnn" attention backends, whose SDPA backend choice the
compiled graph keeps, and every row prints the attention kernels it ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Wan2.1-T2V-1.3B's transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json).
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
DENSE_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def cuda_time_ms(fn, warmup: int, repeat: int) -> float:
    """Median of `repeat` timed calls (CUDA events) after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_kernels(fn) -> str:
    """The names of the attention kernels one call of `fn` runs on the GPU (torch.profiler), shortened."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    keys = ("attn", "attention", "fmha", "flash", "cudnn", "sm90_xmma_fprop")
    names = sorted({evt.name for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA
                    and any(key in evt.name.lower() for key in keys)})
    return ", ".join(name[:60] for name in names) or "none found"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--blkq", type=int, default=128)
    parser.add_argument("--blkk", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true", help="time inference only")
    parser.add_argument("--compile", action="store_true",
                        help="also time the forward with every transformer block compiled (torch.compile)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the forward captured whole in one CUDA graph (no host time: short sequences)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode for --compile (reduce-overhead: CUDA graphs, for short sequences)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e_wan.py needs a CUDA GPU.")
    from diffusers import WanTransformer3DModel

    from diffusers_sla import SLAConfig, disable_sla, enable_sla, sla_summary
    from diffusers_sla.ops import sparse_linear_attention
    from diffusers_sla.utils.cuda_graph import capture_cuda_graph

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = WanTransformer3DModel(**WAN_1_3B).to(device, dtype)
    latents = torch.randn(1, 16, args.frames, args.height, args.width, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    heads, head_dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | tokens {tokens} | "
          f"params {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B | bf16", flush=True)

    def forward():
        with torch.no_grad():
            model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, return_dict=False)

    def train_step():
        out = model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    rows = []  # (name, forward ms, train ms)
    for name, backend in DENSE_BACKENDS.items():
        with sdpa_kernel(backend):
            fwd = cuda_time_ms(forward, args.warmup, args.repeat)
            model.enable_gradient_checkpointing()
            train = None if args.skip_train else cuda_time_ms(train_step, 1, max(2, args.repeat // 2))
            model.disable_gradient_checkpointing()
            kernels = attention_kernels(forward)
        rows.append((name, fwd, train))
        print(f"  {name}: forward {fwd:.1f} ms" + (f", train step {train:.1f} ms" if train else "") +
              f"; attention kernels: {kernels}", flush=True)

    densities = {}
    for topk in args.topk:
        config = SLAConfig(topk=topk, blkq=args.blkq, blkk=args.blkk)
        enable_sla(model, config)
        fwd = cuda_time_ms(forward, args.warmup, args.repeat)
        model.enable_gradient_checkpointing()
        train = None if args.skip_train else cuda_time_ms(train_step, 1, max(2, args.repeat // 2))
        model.disable_gradient_checkpointing()
        summary = sla_summary(model)
        densities[topk] = summary
        kernels = attention_kernels(forward)
        disable_sla(model)
        rows.append((f"SLA topk={topk}", fwd, train))
        print(f"  SLA topk={topk}: forward {fwd:.1f} ms" + (f", train step {train:.1f} ms" if train else "") +
              f"; attention kernels: {kernels}", flush=True)

    graphed = {}  # name -> forward ms replayed from one CUDA graph
    if args.cuda_graph:
        def graphed_forward_ms(label):
            def forward_out():
                with torch.no_grad():
                    return model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                                 return_dict=False)[0]

            eager_out = forward_out()
            graph, out = capture_cuda_graph(forward_out)  # `out`: the tensor every replay writes
            ms = cuda_time_ms(graph.replay, args.warmup, args.repeat)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(out, eager_out)
            print(f"  {label} (one CUDA graph): forward {ms:.1f} ms; replay equals eager: {same}", flush=True)
            return ms

        for name, backend in DENSE_BACKENDS.items():
            with sdpa_kernel(backend):
                graphed[name] = graphed_forward_ms(name)
        for topk in args.topk:
            enable_sla(model, SLAConfig(topk=topk, blkq=args.blkq, blkk=args.blkk))
            graphed[f"SLA topk={topk}"] = graphed_forward_ms(f"SLA topk={topk}")
            disable_sla(model)

    compiled = {}  # name -> (forward ms, train step ms or None) with compiled blocks
    if args.compile:
        def compiled_forward_ms(label):
            torch._dynamo.reset()
            model.compile_repeated_blocks(mode=args.compile_mode)
            try:
                forward()  # compiles (untimed)
                ms = cuda_time_ms(forward, args.warmup, args.repeat)
                print(f"  {label} (compiled): forward {ms:.1f} ms; attention kernels: {attention_kernels(forward)}",
                      flush=True)
                train = None
                if not args.skip_train:
                    model.enable_gradient_checkpointing()
                    try:
                        train = cuda_time_ms(train_step, 1, max(2, args.repeat // 2))  # the first call compiles
                        print(f"  {label} (compiled): train step {train:.1f} ms", flush=True)
                    except Exception as exc:  # report it in the table's place and go on
                        print(f"  {label} (compiled): train step failed: {exc!r}"[:400], flush=True)
                    finally:
                        model.disable_gradient_checkpointing()
                return ms, train
            finally:
                for block in model.blocks:  # back to eager for the next variant
                    block._compiled_call_impl = None

        # A `sdpa_kernel` context around compiled code does not reach the graph (both dense runs got the same
        # kernel when tried): diffusers' "_native_flash" / "_native_cudnn" backends enter it inside each attention
        # call, where torch.compile honours it. The kernel names printed above show what ran.
        for name, diffusers_backend in (("sdpa-flash", "_native_flash"), ("sdpa-cudnn", "_native_cudnn")):
            model.set_attention_backend(diffusers_backend)
            compiled[name] = compiled_forward_ms(name)
            model.reset_attention_backend()
        for topk in args.topk:
            enable_sla(model, SLAConfig(topk=topk, blkq=args.blkq, blkk=args.blkk))
            compiled[f"SLA topk={topk}"] = compiled_forward_ms(f"SLA topk={topk}")
            disable_sla(model)

    # The attention core alone, same shape as one self-attention call, times the 30 layers.
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    core = {}
    for name, backend in DENSE_BACKENDS.items():
        with sdpa_kernel(backend):
            core[name] = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 3, 10)
    weight, bias = torch.zeros(head_dim, head_dim, device=device), torch.zeros(head_dim, device=device)
    for topk in args.topk:
        core[f"SLA topk={topk}"] = cuda_time_ms(
            lambda: sparse_linear_attention(q, k, v, weight, bias, topk=topk, blkq=args.blkq, blkk=args.blkk), 3, 10)

    layers = WAN_1_3B["num_layers"]
    fastest_dense_fwd = min(fwd for name, fwd, _ in rows if name in DENSE_BACKENDS)
    train_times = [train for name, _, train in rows if name in DENSE_BACKENDS and train]
    fastest_dense_train = min(train_times) if train_times else None
    print()
    print(f"Wan2.1-T2V-1.3B transformer, {tokens} tokens, bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, blocks {args.blkq}x{args.blkk}")
    print("| attention | forward ms | forward speed-up | train step ms | train speed-up | self-attn core ms x 30 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, fwd, train in rows:
        train_cells = (f"{train:.1f} | {fastest_dense_train / train:.2f}x" if train and fastest_dense_train
                       else "- | -")
        print(f"| {name} | {fwd:.1f} | {fastest_dense_fwd / fwd:.2f}x | {train_cells} | {core[name] * layers:.1f} |")
    for name in DENSE_BACKENDS:
        fraction = min(core[name] * layers / next(f for n, f, _ in rows if n == name), 0.999)
        print(f"{name}: self-attention is {fraction:.0%} of the forward; infinitely fast attention would bound the "
              f"end-to-end forward speed-up at {1 / (1 - fraction):.2f}x")
    if graphed:
        fastest = min(ms for name, ms in graphed.items() if name in DENSE_BACKENDS)
        print()
        print("Forward captured whole in one CUDA graph (torch.cuda.CUDAGraph: no host time), same run:")
        print("| attention | graph replay ms | graph speed-up | eager forward ms |")
        print("| --- | --- | --- | --- |")
        for name, fwd, _ in rows:
            print(f"| {name} | {graphed[name]:.1f} | {fastest / graphed[name]:.2f}x | {fwd:.1f} |")
    if compiled:
        fastest = min(fwd for name, (fwd, _) in compiled.items() if name in DENSE_BACKENDS)
        dense_trains = [train for name, (_, train) in compiled.items() if name in DENSE_BACKENDS and train]
        fastest_train = min(dense_trains) if dense_trains else None
        print()
        print(f"Forward with every transformer block compiled (torch.compile, mode {args.compile_mode}), and a train "
              "step, same run:")
        print("| attention | compiled forward ms | compiled speed-up | compiled train step ms | train speed-up |")
        print("| --- | --- | --- | --- | --- |")
        for name, _, _ in rows:
            fwd, train = compiled[name]
            train_cells = (f"{train:.1f} | {fastest_train / train:.2f}x" if train and fastest_train else "- | -")
            print(f"| {name} | {fwd:.1f} | {fastest / fwd:.2f}x | {train_cells} |")
        for name in DENSE_BACKENDS:
            fraction = min(core[name] * layers / compiled[name][0], 0.999)
            print(f"{name} (compiled): self-attention is {fraction:.0%} of the forward; "
                  f"bound {1 / (1 - fraction):.2f}x")
    for topk, summary in densities.items():
        print(f"SLA topk={topk}: measured density {summary.mean_density:.3f} over the self-attention layers")


if __name__ == "__main__":
    main()
