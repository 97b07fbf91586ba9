# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Where the Hopper forward kernel's time goes, program by program (no hardware counters needed).

    python -m benchmarks.lab.fwd_timeline                   # Wan layer shape, scopes rest and all, topk 0.05 and 0.1
    python -m benchmarks.lab.fwd_timeline --topk 0.05 --scope rest

Each program of `gluon_fwd._attn_fwd_hopper` (launched with `timeline=`) writes its SM, the SM clock at entry, at its
first scores (the prologue: q and the first K/V tiles arrived), after its loop and at exit (the epilogue: the linear
branch, proj_l and the output store), and the global timer at entry and exit. From those this prints the mean
prologue / loop / epilogue of one program, the kernel's span, and how the programs that share an SM overlap: the
share of SM time with two programs in their loops, one, or none (an SM whose programs are all in prologue or
epilogue does no attention work). The kernel is launched exactly as the operator launches it (same arguments,
captured from one forward call).

First reading (H200, Wan shape, rest, topk 0.05; benchmarks/NOTES.md v16): prologue 2.0 us, loop 24.9 us, epilogue
5.3 us per program; an SM's two programs are out of phase by themselves (entries a third of a program apart), so
an SM holds no loop only 3.6% of the time. Starting the first wave's second programs later (to force the offset)
took that to 1.2% and made the kernel slower (0.864 -> 0.868 / 0.875 ms): the epilogue already runs beside the other
program's loop, and what it costs is the loop running alone meanwhile.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernel import wan_inputs
from diffusers_sla.ops.kernels import gluon_fwd
from diffusers_sla.ops.autograd import sla_triton


def captured_launch(fwd):
    """The positional and keyword arguments of the forward's `gluon_fwd.launch` call."""
    seen = []
    real = gluon_fwd.launch

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    gluon_fwd.launch = spy
    try:
        fwd()
        torch.cuda.synchronize()
    finally:
        gluon_fwd.launch = real
    if not seen:
        raise SystemExit("the forward did not run the Hopper kernel (needs an sm_90 GPU and Triton 3.6)")
    return seen[-1]


def phases(rows: torch.Tensor) -> dict:
    """rows: int64 (programs, 8) as `_timeline` writes them -> per-program phases and per-SM overlap shares."""
    t = rows.cpu().double()
    sm = rows[:, 1].cpu()
    entry, first, loop_end, exit_ = t[:, 0], t[:, 2], t[:, 3], t[:, 4]
    ns = (t[:, 6] - t[:, 5]).clamp(min=1)
    cycles_per_ns = ((exit_ - entry) / ns).median().item()
    out = {
        "programs": rows.shape[0],
        "clock GHz": cycles_per_ns,
        "span us": (t[:, 6].max() - t[:, 5].min()).item() / 1e3,
        "prologue us": ((first - entry) / cycles_per_ns).mean().item() / 1e3,
        "loop us": ((loop_end - first) / cycles_per_ns).mean().item() / 1e3,
        "epilogue us": ((exit_ - loop_end) / cycles_per_ns).mean().item() / 1e3,
    }
    # overlap on each SM: sweep the (time, +1/-1) events of "resident" and "in loop"
    share = {"loop 2": 0.0, "loop 1": 0.0, "loop 0 resident": 0.0, "empty": 0.0}
    total = 0.0
    starts = []
    for s in sm.unique().tolist():
        pick = sm == s
        e, f, le, x = entry[pick], first[pick], loop_end[pick], exit_[pick]
        events = sorted([(v, 0, +1) for v in e.tolist()] + [(v, 0, -1) for v in x.tolist()] +
                        [(v, 1, +1) for v in f.tolist()] + [(v, 1, -1) for v in le.tolist()])
        t0, t_end = e.min().item(), x.max().item()
        resident = looping = 0
        last = t0
        for when, kind, delta in events:
            span = when - last
            if looping >= 2:
                share["loop 2"] += span
            elif looping == 1:
                share["loop 1"] += span
            elif resident:
                share["loop 0 resident"] += span
            else:
                share["empty"] += span
            last = when
            if kind == 0:
                resident += delta
            else:
                looping += delta
        total += t_end - t0
        order = e.sort().values
        starts.append(order)
    out.update({f"SM time, {k}": v / total for k, v in share.items()})
    # phase: offset between the entries of an SM's programs, as a share of one program's time (0 = in lockstep)
    lengths = (exit_ - entry).median().item()
    offsets = []
    for order in starts:
        if order.numel() >= 4:
            gaps = (order[1::2][: order.numel() // 2] - order[0::2][: order.numel() // 2]).abs()
            offsets.append((gaps / lengths).median().item())
    out["entry offset of SM pairs / program time"] = sum(offsets) / max(1, len(offsets))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--L", type=int, default=32760)
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--scope", nargs="+", default=["rest", "all"])
    parser.add_argument("--out", help="save the raw rows (torch.save) here")
    args = parser.parse_args()
    B, H, L, D, blkq, blkk = 1, 12, args.L, 128, 128, 64
    (q, k, v, w, b), _ = wan_inputs(B, H, L, D)
    raw = {}
    for scope in args.scope:
        for topk in args.topk:
            def fwd():
                with torch.no_grad():
                    return sla_triton(q, k, v, w, b, topk=topk, blkq=blkq, blkk=blkk, feature_map="softmax",
                                      linear_scope=scope)

            largs, kwargs = captured_launch(fwd)
            lut = largs[3]
            programs, batch_heads = gluon_fwd.launch_grid(lut.shape[2], blkq, blkk, lut.shape[0] * lut.shape[1])
            rows = torch.full((programs * batch_heads, 8), -1, dtype=torch.int64, device="cuda")
            for _ in range(3):  # warm: compile the TIMELINE variant, settle the clocks
                gluon_fwd.launch(*largs, **kwargs, timeline=rows)
            torch.cuda.synchronize()
            report = phases(rows)
            raw[(scope, topk)] = rows.cpu()
            print(f"== scope {scope}, topk {topk}, kept {lut.shape[-1]}: {report.pop('programs')} programs ==")
            for key, value in report.items():
                print(f"  {key:<42s} {value:9.3f}")
    if args.out:
        torch.save(raw, args.out)


if __name__ == "__main__":
    main()
