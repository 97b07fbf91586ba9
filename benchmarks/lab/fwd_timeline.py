# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Where the Hopper forward kernel's time went, program by program: the reader of timeline rows.

    python -m benchmarks.lab.fwd_timeline ROWS.pt     # rows saved (torch.save) by an instrumented run

An instrumented build of `gluon_fwd._attn_fwd_hopper` had each program write its SM, the SM clock at entry, at its
first scores (the prologue: q and the first K/V tiles arrived), after its loop and at exit (the epilogue: the linear
branch, proj_l and the output store), and the global timer at entry and exit: one int64 row of 8 per program. From
those `phases` gives the mean prologue / loop / epilogue of one program, the kernel's span, and how the programs that
share an SM overlap: the share of SM time with two programs in their loops, one, or none.

The instrumentation (a TIMELINE constexpr and a `timeline=` argument of `gluon_fwd.launch`) is not in the shipped
kernel, since no user path needs it; to take new rows, check out the last commit that had it
(`git log -S TIMELINE -- diffusers_sla/ops`) and run this file's version there. Its readings are in
docs/kernel-design.md.
"""

from __future__ import annotations

import argparse

import torch


def phases(rows: torch.Tensor) -> dict:
    """rows: int64 (programs, 8) as the instrumented kernel wrote them -> per-program phases, per-SM overlap shares."""
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", help="a torch.save'd tensor of rows, or a dict of them (scope, topk) -> rows")
    args = parser.parse_args()
    saved = torch.load(args.rows)
    for key, rows in (saved.items() if isinstance(saved, dict) else [("rows", saved)]):
        report = phases(rows)
        print(f"== {key}: {report.pop('programs')} programs ==")
        for name, value in report.items():
            print(f"  {name:<42s} {value:9.3f}")


if __name__ == "__main__":
    main()
