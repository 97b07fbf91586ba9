# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""End-to-end speed of a real-size Wan2.1-T2V-1.3B transformer with dense attention and with SLA (GPU).

Builds `WanTransformer3DModel` from the Wan2.1-T2V-1.3B configuration with random bf16 weights (no download), feeds
latents for 81 frames at 480x832 (21 x 60 x 104 latents -> 32,760 tokens), and times, in one run:

* transformer forward (inference): dense SDPA with the flash and the cuDNN backends, SLA at each `--topk`;
* one training step (forward + backward, gradient checkpointing on for every variant so that 30 layers of
  activations fit): the same variants.

Where the time goes inside the model: one forward per variant under torch.profiler, every GPU kernel's time summed
and split into self-attention (the attention core only: the SDPA kernels, or everything the SLA operator runs),
cross-attention and the rest of the model. The dense forward's self-attention share gives the speed-up that free
self-attention would bound the forward at (Amdahl: total / (total - self-attention)), in GPU time, host time excluded.
(Timing the attention core alone in a loop instead overstates its share: that time includes host work the model
hides behind its GPU work.)

    python -m benchmarks.e2e_wan                  # the full table
    python -m benchmarks.e2e_wan --frames 21 --topk 0.05 0.1 --skip-train
    python -m benchmarks.e2e_wan --compile        # also the forward with torch.compile, every variant
    python -m benchmarks.e2e_wan --topk 0.05 --fusion sla mass    # SLA's sum and fusion "mass" (docs/fusion.md)
    python -m benchmarks.e2e_wan --frames 3 --cuda-graph --skip-train   # a short sequence, replayed from a CUDA graph

`--compile` adds a second table (forward and train step) in which each of the 30 transformer blocks runs through
`torch.compile` (diffusers' `compile_repeated_blocks`: one compiled graph shared by all blocks), for the dense
backends and for SLA alike: what a served model runs. Compilation is redone for every variant (fresh dynamo caches);
the dense rows set diffusers' "_native_flash" / "_native_cudnn" attention backends, whose SDPA backend choice the
compiled graph keeps, and every row prints the attention kernels it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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


ATTENTION_MARKS = {"self": "e2e::self_attention", "cross": "e2e::cross_attention"}


@contextlib.contextmanager
def marked_sla_layers():
    """Every SLA layer's forward runs in a profiler range named as self-attention: in eager mode its Triton launches
    have no torch op of their own to be attributed by (the eager path calls the kernels directly). Eager models only:
    a compiled graph keeps the function it was traced with (there the custom ops `diffusers_sla::*` name them)."""
    from torch.profiler import record_function

    from diffusers_sla import SparseLinearAttention

    inner = SparseLinearAttention.forward

    def marked(self, *args, **kwargs):
        with record_function(ATTENTION_MARKS["self"]):
            return inner(self, *args, **kwargs)

    SparseLinearAttention.forward = marked
    try:
        yield
    finally:
        SparseLinearAttention.forward = inner


def _attention_kind(event) -> str | None:
    """"self", "cross" or None (the rest of the model) for the CPU op that launched a kernel: its innermost ancestor
    that says so. A marked range (`marked_sla_layers`), an SLA op (`diffusers_sla::*`: self-attention), or an SDPA op,
    self-attention when its query and key lengths agree."""
    marks = {name: kind for kind, name in ATTENTION_MARKS.items()}
    while event is not None:
        name = event.name
        if name in marks:
            return marks[name]
        if name.startswith("diffusers_sla::"):
            return "self"
        shapes = getattr(event, "input_shapes", None) or []
        if "scaled_dot_product" in name and len(shapes) >= 2 and len(shapes[0]) >= 2 and len(shapes[1]) >= 2:
            return "self" if shapes[0][-2] == shapes[1][-2] else "cross"
        event = event.cpu_parent
    return None


# CUDA runtime stalls the profiler records as CPU events that list, again, kernels an op already owns
RUNTIME_ANNOTATIONS = frozenset({"Command Buffer Full", "Activity Buffer Request"})


def gpu_time_split(events) -> dict:
    """{"total", "self", "cross", "rest", "unattributed"} in ms: the GPU time of the kernels of one profiled forward,
    by the CPU op that launched each (`_attention_kind`); "unattributed": kernels on the GPU timeline that no op
    claims (counted in "total" and "rest")."""
    split = {"self": 0.0, "cross": 0.0, "rest": 0.0}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        if event.name in RUNTIME_ANNOTATIONS:  # its kernels are its op's too: counting them would count them twice
            continue
        split[_attention_kind(event) or "rest"] += sum(k.duration for k in event.kernels) / 1e3
    claimed = sum(split.values())
    on_gpu = sum(e.device_time for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)) / 1e3
    split["unattributed"] = max(on_gpu - claimed, 0.0)
    split["rest"] += split["unattributed"]
    split["total"] = claimed + split["unattributed"]
    return split


def profile_gpu_time(fn, mark_sla: bool = True) -> dict:
    """`gpu_time_split` of one call of `fn` (after a warm call), with the SLA layers marked (`marked_sla_layers`)."""
    from torch.profiler import ProfilerActivity, profile

    with marked_sla_layers() if mark_sla else contextlib.nullcontext():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            fn()
            torch.cuda.synchronize()
    return gpu_time_split(prof.events())


def self_ms(split: dict | None) -> str:
    return "-" if split is None else f"{split['self']:.1f}"


def safe_profile(fn, label: str, mark_sla: bool = True) -> dict | None:
    """`profile_gpu_time`, or None with the error printed: a profiler failure costs the in-model columns, not the
    timings of the run."""
    try:
        return profile_gpu_time(fn, mark_sla=mark_sla)
    except Exception as exc:
        print(f"  {label}: in-model profile failed: {exc!r}"[:400], flush=True)
        return None


def inmodel_lines(split: dict, label: str = "") -> list[str]:
    """The in-model table and, per dense backend, the bound free self-attention implies and where SLA stands."""
    split = {name: t for name, t in split.items() if t is not None}
    lines = [f"In-model GPU time{label} (torch.profiler, one forward each: the kernels' time on the GPU, host time "
             "excluded; self/cross-attention = the attention core's kernels)",
             "| attention | GPU kernels ms | self-attention ms | cross-attention ms | rest of the model ms | "
             "self-attention share |", "| --- | --- | --- | --- | --- | --- |"]
    for name, t in split.items():
        lines.append(f"| {name} | {t['total']:.1f} | {t['self']:.1f} | {t['cross']:.1f} | {t['rest']:.1f} | "
                     f"{t['self'] / t['total']:.0%} |")
    sla = {name: t for name, t in split.items() if name.startswith("SLA")}
    for name in DENSE_BACKENDS:
        if name not in split:
            continue
        t = split[name]
        share = t["self"] / t["total"]
        stands = "; ".join(f"{n} stands at {t['total'] / s['total']:.2f}x" for n, s in sla.items())
        lines.append(f"{name}{label} in model: self-attention is {share:.0%} of the forward's GPU time; free "
                     f"self-attention bounds the forward at {1 / (1 - min(share, 0.999)):.2f}x"
                     + (f" (GPU time; {stands})" if stands else ""))
    return lines


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """The SLA settings and timing options this script and `e2e_parallel` share."""
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--blkq", type=int, default=128)
    parser.add_argument("--blkk", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true", help="time inference only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    add_variant_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="also time the forward with every transformer block compiled (torch.compile)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the forward captured whole in one CUDA graph (no host time: short sequences)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode for --compile (reduce-overhead: CUDA graphs, for short sequences)")
    parser.add_argument("--fusion", nargs="+", default=["sla"], choices=["sla", "mass", "ratio"],
                        help="SLAConfig.fusion of the SLA rows: one row per topk and fusion")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e_wan.py needs a CUDA GPU.")
    from diffusers import WanTransformer3DModel

    from diffusers_sla import SLAConfig, disable_sla, enable_sla, sla_summary
    from diffusers_sla.utils.cuda_graph import capture_cuda_graph

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = WanTransformer3DModel(**WAN_1_3B).to(device, dtype)
    latents = torch.randn(1, 16, args.frames, args.height, args.width, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
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
    inmodel = {}  # name -> `gpu_time_split` of one eager forward
    for name, backend in DENSE_BACKENDS.items():
        with sdpa_kernel(backend):
            fwd = cuda_time_ms(forward, args.warmup, args.repeat)
            model.enable_gradient_checkpointing()
            train = None if args.skip_train else cuda_time_ms(train_step, 1, max(2, args.repeat // 2))
            model.disable_gradient_checkpointing()
            kernels = attention_kernels(forward)
            inmodel[name] = safe_profile(forward, name)
        rows.append((name, fwd, train))
        print(f"  {name}: forward {fwd:.1f} ms" + (f", train step {train:.1f} ms" if train else "") +
              f"; attention kernels: {kernels}", flush=True)

    # (row label, config): one SLA row per topk and fusion; SLA's own sum keeps its label
    variants = [(f"SLA topk={topk}" + ("" if fusion == "sla" else f" fusion={fusion}"),
                 SLAConfig(topk=topk, blkq=args.blkq, blkk=args.blkk, fusion=fusion))
                for topk in args.topk for fusion in args.fusion]
    densities = {}
    for label, config in variants:
        enable_sla(model, config)
        fwd = cuda_time_ms(forward, args.warmup, args.repeat)
        model.enable_gradient_checkpointing()
        train = None if args.skip_train else cuda_time_ms(train_step, 1, max(2, args.repeat // 2))
        model.disable_gradient_checkpointing()
        summary = sla_summary(model)
        densities[label] = summary
        kernels = attention_kernels(forward)
        inmodel[label] = safe_profile(forward, label)
        disable_sla(model)
        rows.append((label, fwd, train))
        print(f"  {label}: forward {fwd:.1f} ms" + (f", train step {train:.1f} ms" if train else "") +
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
        for label, config in variants:
            enable_sla(model, config)
            graphed[label] = graphed_forward_ms(label)
            disable_sla(model)

    compiled = {}  # name -> (forward ms, train step ms or None) with compiled blocks
    compiled_inmodel = {}  # name -> `gpu_time_split` of one compiled forward
    if args.compile:
        def compiled_forward_ms(label):
            torch._dynamo.reset()
            model.compile_repeated_blocks(mode=args.compile_mode)
            try:
                forward()  # compiles (untimed)
                ms = cuda_time_ms(forward, args.warmup, args.repeat)
                print(f"  {label} (compiled): forward {ms:.1f} ms; attention kernels: {attention_kernels(forward)}",
                      flush=True)
                compiled_inmodel[label] = safe_profile(forward, label, mark_sla=False)
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
        for label, config in variants:
            enable_sla(model, config)
            compiled[label] = compiled_forward_ms(label)
            disable_sla(model)

    fastest_dense_fwd = min(fwd for name, fwd, _ in rows if name in DENSE_BACKENDS)
    train_times = [train for name, _, train in rows if name in DENSE_BACKENDS and train]
    fastest_dense_train = min(train_times) if train_times else None
    print()
    print(f"Wan2.1-T2V-1.3B transformer, {tokens} tokens, bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, blocks {args.blkq}x{args.blkk}")
    print("| attention | forward ms | forward speed-up | train step ms | train speed-up | self-attn GPU ms in model |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, fwd, train in rows:
        train_cells = (f"{train:.1f} | {fastest_dense_train / train:.2f}x" if train and fastest_dense_train
                       else "- | -")
        print(f"| {name} | {fwd:.1f} | {fastest_dense_fwd / fwd:.2f}x | {train_cells} | {self_ms(inmodel.get(name))} |")
    print()
    print("\n".join(inmodel_lines(inmodel)))
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
        print()
        print("\n".join(inmodel_lines(compiled_inmodel, " (compiled)")))
    for label, summary in densities.items():
        print(f"{label}: measured density {summary.mean_density:.3f} over the self-attention layers")


if __name__ == "__main__":
    main()
