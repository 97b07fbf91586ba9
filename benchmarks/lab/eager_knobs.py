# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""A/B of the two eager-call knobs of the Triton backend, in one process, variants alternating:

* `tuning.OVERLAP`: the block selection on a second stream, beside the linear state;
* `tuning.FAST_LAUNCH`: launches straight to the compiled kernel Triton picked.

    python -m benchmarks.lab.eager_knobs            # Wan layer shape, both scopes

For each variant: the whole eager forward (no autograd) as a caller sees it (CUDA events, `kernel.bench_ms`), its
host time alone (`kernel.host_ms`), one call on an idle GPU (host and GPU time in series, as `e2e_wan.py`'s
attention-core column measures it), and forward + backward. Outputs are compared with the all-off variant: every knob
must leave them bit-identical.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from benchmarks.e2e_wan import cuda_time_ms
from benchmarks.kernel import bench_ms, host_ms, wan_inputs
from diffusers_sla.ops import tuning
from diffusers_sla.ops.autograd import sla_triton


def set_knobs(overlap: bool, fast_launch: bool) -> None:
    tuning.OVERLAP = overlap
    tuning.FAST_LAUNCH = fast_launch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scopes", nargs="+", default=["rest", "all"])
    args = parser.parse_args()
    (q, k, v, w, b), do = wan_inputs(1, 12, args.length, 128)
    variants = list(itertools.product((True, False), repeat=2))  # (overlap, fast_launch)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; L={args.length} topk={args.topk}, "
          f"{args.rounds} rounds, variants alternating; medians of the rounds' medians")
    for scope in args.scopes:
        kw = dict(topk=args.topk, blkq=128, blkk=64, feature_map="softmax", linear_scope=scope)
        fwd = lambda: sla_triton(q, k, v, w, b, **kw)  # noqa: E731

        def train():
            out = sla_triton(q, k, v, w, b, **kw)
            return torch.autograd.grad(out, (q, k, v, w, b), do)

        times = {var: {"fwd": [], "host": [], "single": [], "fwd+bwd": []} for var in variants}
        with torch.no_grad():
            set_knobs(False, False)
            expected = fwd()
        expected_grads = train()
        for _ in range(args.rounds):
            for var in variants:
                set_knobs(*var)
                with torch.no_grad():
                    assert torch.equal(fwd(), expected), f"{scope} {var}: the output changed"
                    times[var]["fwd"].append(bench_ms(fwd))
                    times[var]["host"].append(host_ms(fwd))
                    torch.cuda.synchronize()  # one call on an idle GPU: it waits for each launch not yet made
                    times[var]["single"].append(cuda_time_ms(fwd, warmup=0, repeat=20))
                times[var]["fwd+bwd"].append(bench_ms(train, warmup=5, rep=50))
        for var in variants:
            set_knobs(*var)
            grads = train()
            assert all(torch.equal(x, y) for x, y in zip(grads, expected_grads)), f"{scope} {var}: a gradient changed"
        base = {key: statistics.median(vals) for key, vals in times[(False, False)].items()}
        print(f"scope {scope!r}: {'overlap':>7s} {'fast':>5s} {'fwd ms':>8s} {'host ms':>8s} {'single':>8s} "
              f"{'fwd+bwd':>8s} {'fwd/base':>8s}")
        for var in variants:
            med = {key: statistics.median(vals) for key, vals in times[var].items()}
            print(f"{'':12s} {str(var[0]):>7s} {str(var[1]):>5s} {med['fwd']:8.3f} {med['host']:8.3f} "
                  f"{med['single']:8.3f} "
                  f"{med['fwd+bwd']:8.3f} {med['fwd'] / base['fwd']:8.3f}")
    set_knobs(True, True)
    print("outputs and gradients bit-identical across variants")


if __name__ == "__main__":
    main()
