# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Where the time of one SLA call goes, on the GPU and on the host.

    python -m benchmarks.lab.profile_ops            # Wan layer shape: per-kernel GPU times, eager vs CUDA-graph replay
    python -m benchmarks.lab.profile_ops --once     # one forward + backward per scope, nothing else (for ncu)
    python -m benchmarks.lab.profile_ops --host-profile --scopes rest   # and where the forward's host time goes

`kernel.py` times the whole operator the way a caller sees it (eager, CUDA events around each call). This script
says how much of that is GPU work (the torch.profiler kernel table, and the same call replayed from a CUDA graph,
which has no host overhead) and how much is host time (Python, launches) that the GPU waits for.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernel import bench_ms, queue_gpu_spin, wan_inputs
from diffusers_sla.ops.autograd import sla_triton
from diffusers_sla.utils.cuda_graph import capture_cuda_graph


def kernel_table(fn, calls=10):
    """-> [(kernel name, GPU us per call)] from torch.profiler, largest first, and host us per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for evt in sorted(prof.events(), key=lambda e: e.time_range.start):
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            times.setdefault(evt.name, []).append(evt.device_time)
    rows = {}
    for name, ts in times.items():
        per_call = max(1, len(ts) // calls)  # a kernel launched n times per call: one row per launch, in order
        for i in range(per_call):
            label = name if per_call == 1 else f"{name} #{i + 1}"
            rows[label] = sum(ts[i::per_call]) / calls
    return sorted(rows.items(), key=lambda kv: -kv[1])


def host_profile(fn, calls=20, top=25):
    """cProfile of `calls` eager calls of fn with the GPU kept busy (no call waits for it): where the host time goes,
    by cumulative time, then by time spent in each function itself."""
    import cProfile
    import pstats

    queue_gpu_spin(fn)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def graph_ms(fn):
    """Median ms of `fn` replayed from a CUDA graph (no host overhead), or None when it cannot be captured."""
    try:
        graph, _ = capture_cuda_graph(fn, warmup=3)
        return bench_ms(graph.replay)
    except Exception as exc:  # report and go on: capture is a diagnostic here
        print(f"  graph capture failed: {exc!r}"[:300])
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--L", type=int, default=32760)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--scopes", nargs="+", default=["rest", "all"])
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    parser.add_argument("--top", type=int, default=40, help="kernels listed per table")
    parser.add_argument("--host-profile", action="store_true", help="cProfile of the eager forward's host time")
    args = parser.parse_args()
    B, H, L, D, blkq, blkk = 1, 12, args.L, 128, 128, 64
    (q, k, v, w, b), do = wan_inputs(B, H, L, D)
    for scope in args.scopes:
        def fwd():
            return sla_triton(q, k, v, w, b, topk=args.topk, blkq=blkq, blkk=blkk, feature_map="softmax",
                              linear_scope=scope)

        if args.once:
            fwd().backward(do)
            torch.cuda.synchronize()
            continue
        with torch.no_grad():
            if args.host_profile:
                print(f"== host profile, forward, scope {scope}: 20 calls ==")
                host_profile(fwd)
            eager = bench_ms(fwd)
            replay = None if args.no_graph else graph_ms(fwd)
            table = kernel_table(fwd)
        out = fwd()

        def bwd(out=out):
            return torch.autograd.grad(out, (q, k, v, w, b), do, retain_graph=True)

        eager_b = bench_ms(bwd)
        replay_b = None if args.no_graph else graph_ms(bwd)
        table_b = kernel_table(bwd)
        del out
        print(f"== scope {scope}: L={L} topk={args.topk} ==")
        for name, e, r, t in (("fwd", eager, replay, table), ("bwd", eager_b, replay_b, table_b)):
            gpu = sum(us for _, us in t) / 1e3
            print(f"{name}: eager {e:.3f} ms, graph replay {r if r is None else round(r, 3)} ms, "
                  f"sum of kernels {gpu:.3f} ms")
            for kname, us in t[:args.top]:
                print(f"   {us:8.1f} us  {kname[:110]}")


if __name__ == "__main__":
    main()
