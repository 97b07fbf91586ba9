# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""GPU validation and benchmark of the Triton SLA backend (`diffusers_sla.ops.autograd.sla_triton`).

    python -m benchmarks.kernel check            # bf16 vs a float32 restatement and the golden files, poisoned outputs
    python -m benchmarks.kernel bench            # Wan2.1-1.3B layer: SDPA flash / cuDNN, ours, public reference
    python -m benchmarks.kernel sweep            # L in 4K..64K x topk in {0.05, 0.1, 0.2}
    python -m benchmarks.kernel all --out DIR    # all three; logs and JSON under DIR

The public SLA reference (thu-ml/SLA) is optional: it is imported from $SLA_REFERENCE_PATH or `.device/sla_ref` when
present. Timings are medians of `triton.testing.do_bench` (CUDA events) after warm-up; "bwd" is the backward alone
(the graph is kept between repetitions), "fwd" runs without autograd (inference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_sla.ops import (
    buffers,
    custom_ops,
    fused_selection,
    fusion,
    kernel_choice,
    linear_state,
    rest_mass,
    tuning,
)
from diffusers_sla.ops.autograd import sla_triton, sla_triton_with_lut
from diffusers_sla.ops.backward import column_lut
from diffusers_sla.ops.reference import sla_reference
from diffusers_sla.ops.selection import lut_to_block_map, select_blocks, top_blocks

REPO = Path(__file__).resolve().parents[1]
LOG = []


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def kernels(name):
    """Force `kernel_choice`'s choice of forward and backward kernels ("portable" or "hopper") inside the block."""
    old = {env: os.environ.get(env) for env in tuning.KERNEL_ENV.values()}
    os.environ.update({env: name for env in old})
    try:
        yield
    finally:
        for env, value in old.items():
            if value is None:
                del os.environ[env]
            else:
                os.environ[env] = value


@contextlib.contextmanager
def poisoned_outputs():
    """Output buffers start as NaN instead of uninitialised memory inside the block, so that an element no kernel
    wrote shows up in the result (`buffers.empty` / `empty_like_input` replaced for the block)."""
    real = buffers.empty, buffers.empty_like_input

    def empty(*shape, device, dtype):
        return real[0](*shape, device=device, dtype=dtype).fill_(float("nan"))

    buffers.empty, buffers.empty_like_input = empty, lambda x: real[1](x).fill_(float("nan"))
    try:
        yield
    finally:
        buffers.empty, buffers.empty_like_input = real


def auto_kernels(q, k, topk, blkq, blkk, scope):
    """The forward and backward kernels "auto" picks for these inputs (float32 inputs run in bfloat16)."""
    qc = q if q.dtype != torch.float32 else q.to(torch.bfloat16)
    lut = custom_ops.fast_select_blocks(qc, k.to(qc.dtype), topk, blkq, blkk)
    g = buffers.geometry(qc, k, lut, blkq, blkk, scope)
    fwd = kernel_choice.forward_kernel(qc, g, blkq, blkk, "tf32")
    bwd = kernel_choice.backward_kernel(qc, g, blkq, blkk, "tf32")
    return fwd if fwd == bwd else f"forward {fwd}, backward {bwd}"


def load_public_reference():
    path = os.environ.get("SLA_REFERENCE_PATH", str(REPO / ".device" / "sla_ref"))
    if not Path(path, "sparse_linear_attention").is_dir():
        return None
    sys.path.insert(0, path)
    try:
        from sparse_linear_attention import SparseLinearAttention as PublicSLA
    except Exception as exc:  # optional comparison only
        log(f"public reference not importable: {exc!r}")
        return None
    return PublicSLA


def env_line():
    import triton

    p = torch.cuda.get_device_properties(0)
    return (f"GPU {p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


# ===== Correctness =====


def _inputs(B, H, Lq, Lk, D, dtype, seed, transposed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(L):
        if transposed:  # diffusers' (B, L, H, D) viewed as (B, H, L, D)
            return torch.randn(B, L, H, D, generator=g, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=g, device="cuda").to(dtype)

    q, k, v = make(Lq), make(Lk), make(Lk)
    w = torch.randn(D, D, generator=g, device="cuda") / D**0.5
    b = torch.randn(D, generator=g, device="cuda")
    do = torch.randn(B, H, Lq, D, generator=g, device="cuda").to(dtype)
    return q, k, v, w, b, do


def _run_ours(q, k, v, w, b, do, lut=None, **kw):
    ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w, b)]
    if lut is None:
        def run():
            return sla_triton(*ins, **kw)
    else:
        kw = {key: val for key, val in kw.items() if key != "topk"}

        def run():
            return sla_triton_with_lut(*ins, lut, **kw)
    o = run()
    o.backward(do)
    with torch.no_grad():  # the inference path: the forward kernel stores nothing for a backward
        o_no_grad = run()
    return [o.detach()] + [x.grad for x in ins] + [o_no_grad]


def check(args):
    with poisoned_outputs():
        return _check(args)


def _check(args):
    names = ["o", "dq", "dk", "dv", "dW", "db", "o_no_grad"]
    failures = 0
    cases = [
        # B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, scope, dtype, transposed
        (2, 3, 1000, 777, 128, 128, 64, 0.2, "softmax", "rest", torch.bfloat16, False),
        (1, 2, 513, 513, 64, 64, 32, 0.3, "elu", "all", torch.bfloat16, False),
        (1, 2, 300, 450, 96, 32, 128, 0.25, "relu", "rest", torch.bfloat16, False),
        (1, 4, 700, 700, 72, 64, 64, 0.15, "softmax", "all", torch.bfloat16, True),
        (1, 2, 640, 900, 112, 128, 128, 0.4, "elu", "rest", torch.float16, False),
        (1, 2, 4096, 4096, 128, 128, 64, 0.05, "softmax", "rest", torch.bfloat16, True),
        (1, 2, 333, 333, 128, 128, 64, 0.5, "softmax", "rest", torch.float32, False),  # fp32 computed in bf16
        (1, 1, 256, 256, 64, 64, 64, 1.0, "softmax", "rest", torch.bfloat16, False),  # empty linear branch
        (1, 2, 4096, 4096, 128, 128, 64, 0.05, "softmax", "none", torch.bfloat16, True),  # no linear branch
        # fusions (docs/fusion.md): the gate first, then the kernels mix the branches in their epilogue
        (1, 2, 1000, 777, 128, 128, 64, 0.2, "softmax", "rest", torch.bfloat16, False, "mass"),
        (1, 2, 4096, 4096, 128, 128, 64, 0.05, "softmax", "rest", torch.bfloat16, True, "mass"),
        (1, 2, 700, 700, 64, 64, 64, 0.15, "elu", "rest", torch.bfloat16, False, "ratio"),
    ]
    for i, (B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, tr, *fusion) in enumerate(cases):
        q, k, v, w, b, do = _inputs(B, H, Lq, Lk, D, dtype, seed=100 + i, transposed=tr)
        kw = dict(topk=topk, blkq=blkq, blkk=blkk, feature_map=fm, linear_scope=scope, scale=0.9 * D**-0.5)
        label = f"{scope} fusion={fusion[0]}" if fusion else scope  # for the log line
        if fusion:
            kw.update(fusion_kwargs(fusion[0], D))
        ours = _run_ours(q, k, v, w, b, do, **kw)
        again = _run_ours(q, k, v, w, b, do, **kw)
        lut = select_blocks(q, k, topk, blkq, blkk)
        same_lut = torch.equal(lut, custom_ops.fast_select_blocks(q, k, topk, blkq, blkk))
        ref = _run_ref(q, k, v, w, b, do, lut, **kw)
        ref = ref + [ref[0]]  # the no-grad output against the same reference output
        errs = []
        ok = True
        for name, a, r in zip(names, ours, ref):
            if a is None or r is None:  # proj_l's gradients under scope "none": None on both sides
                errs.append(f"{name}={'None' if a is None else 'given'}")
                ok &= a is None and r is None
                continue
            finite = bool(torch.isfinite(a).all())
            e = rel_err(a, r) if r.norm() > 0 else float(a.abs().max())
            errs.append(f"{name}={e:.1e}")
            ok &= finite and e <= 2e-2
        same = all(a is c is None or torch.equal(a, c) for a, c in zip(ours, again))
        ok &= same and same_lut
        kernel = auto_kernels(q, k, topk, blkq, blkk, scope)
        if kernel != "portable":  # the Hopper kernels against the portable ones (same function, other rounding order)
            with kernels("portable"):
                portable = _run_ours(q, k, v, w, b, do, **kw)
            vs = [0.0 if r is None else rel_err(a, r) if r.norm() > 0 else float(a.abs().max())
                  for a, r in zip(ours, portable)]
            ok &= max(vs) <= 1e-2
            kernel += f" (vs portable: o={vs[0]:.1e} dq={vs[1]:.1e} dk={vs[2]:.1e} dv={vs[3]:.1e} dW={vs[4]:.1e})"
        failures += not ok
        log(f"[check {'ok' if ok else 'FAIL'}] B{B} H{H} Lq{Lq} Lk{Lk} D{D} {blkq}x{blkk} top{topk} {fm} {label} "
            f"{str(dtype)[6:]}{' strided' if tr else ''}: {' '.join(errs)} deterministic={same} lut_equal={same_lut} "
            f"kernels={kernel}")

    # top_blocks' tie rule (lower index first) against torch.topk on this GPU, on scores with many ties
    g = torch.Generator(device="cuda").manual_seed(7)
    same_ties = True
    for n_k, kept, levels in ((512, 25, 16), (512, 51, 4), (256, 12, 64), (1024, 102, 8), (60, 3, 2)):
        scores = torch.randint(0, levels, (3072, n_k), generator=g, device="cuda").float()
        expected = torch.topk(scores, kept, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
        same_ties &= torch.equal(top_blocks(scores, kept), expected)
        same_ties &= torch.equal(fused_selection.top_blocks_triton(scores, kept), expected)
    failures += not same_ties
    log(f"[check {'ok' if same_ties else 'FAIL'}] top_blocks and top_blocks_triton equal torch.topk on tied scores: "
        f"{same_ties}")

    golden = Path(os.environ.get("DIFFUSERS_SLA_GOLDEN_DIR", REPO / ".device" / "golden"))
    if (golden / "index.json").is_file():
        from safetensors.torch import load_file

        for case, cfg in sorted(json.loads((golden / "index.json").read_text()).items()):
            t = {key: val.cuda() for key, val in load_file(golden / f"{case}.safetensors").items()}
            scope = {"main": "all", "sla1": "rest"}[cfg["variant"]]
            kw = dict(topk=cfg["topk"], blkq=cfg["blkq"], blkk=cfg["blkk"], feature_map=cfg["feature_map"],
                      linear_scope=scope)
            lut = custom_ops.fast_select_blocks(t["q"], t["k"], cfg["topk"], cfg["blkq"], cfg["blkk"])
            same_map = torch.equal(lut_to_block_map(lut, t["block_map"].shape[-1]), t["block_map"].bool())
            ours = _run_ours(t["q"], t["k"], t["v"], t["proj_l.weight"], t["proj_l.bias"], t["do"], **kw)
            errs, ok = [], same_map
            for name, a, key in zip(names, ours, ["o", "dq", "dk", "dv", "d_proj_l.weight", "d_proj_l.bias", "o"]):
                e = rel_err(a, t[key])
                errs.append(f"{name}={e:.1e}")
                ok &= bool(torch.isfinite(a).all()) and e <= 2e-2
            failures += not ok
            log(f"[golden {'ok' if ok else 'FAIL'}] {case}: block_map_equal={same_map} {' '.join(errs)}")
    else:
        log(f"[golden skipped] no golden files at {golden}")
    log(f"check: {failures} failure(s)")
    return failures


def fusion_kwargs(fusion: str, D: int) -> dict:
    """The keywords of fusion "mass" / "ratio" (a non-trivial gate for "ratio": per-query weights vary)."""
    if fusion == "ratio":
        g = torch.Generator(device="cuda").manual_seed(7)
        return dict(fusion="ratio", ratio_weight=torch.randn(D, generator=g, device="cuda") * D**-0.5,
                    ratio_bias=torch.ones(1, device="cuda"))
    return dict(fusion=fusion)


def _run_ref(q, k, v, w, b, do, lut, **kw):
    ins = [x.detach().float().requires_grad_(True) for x in (q, k, v, w, b)]
    o = sla_reference(*ins, lut=lut, **kw)
    o.backward(do.float())
    return [o.detach()] + [x.grad for x in ins]


# ===== Timing =====


def bench_ms(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def queue_gpu_spin(fn):
    """Warms fn up, then queues ~0.5 s of GPU spinning, so that the host calls that follow never wait for the GPU:
    what they take is host time alone (`host_ms`, `profile_ops.host_profile`)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)


def host_ms(fn, calls=20):
    """Host time per call of fn (Python, launches): what an eager call costs even when its kernels take no time."""
    queue_gpu_spin(fn)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def time_provider(make_fwd, inputs, do):
    """-> (fwd ms without autograd, bwd ms alone). The backward returns its gradients instead of accumulating them
    into `.grad`, so that no provider pays for extra additions."""
    with torch.no_grad():
        fwd = bench_ms(lambda: make_fwd(*inputs))
    out = make_fwd(*inputs)
    bwd = bench_ms(lambda: torch.autograd.grad(out, inputs, do, retain_graph=True, allow_unused=True))
    return fwd, bwd


def providers(D, topk, blkq, blkk, feature_map, PublicSLA):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fn(q, k, v, w, b):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    def ours(scope, fusion="sla"):
        extra = {} if fusion == "sla" else fusion_kwargs(fusion, D)

        def fn(q, k, v, w, b):
            return sla_triton(q, k, v, w, b, topk=topk, blkq=blkq, blkk=blkk, feature_map=feature_map,
                              linear_scope=scope, **extra)
        return fn

    # "none": the sparse part alone (no linear branch, no proj_l), what the linear branch costs on top of it
    rows = [("SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION)), ("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION)),
            ("SLA ours (rest)", ours("rest")), ("SLA ours (all)", ours("all")), ("SLA ours (none)", ours("none")),
            ("SLA ours (mass)", ours("rest", "mass")), ("SLA ours (ratio)", ours("rest", "ratio"))]
    if PublicSLA is not None:
        module = PublicSLA(head_dim=D, topk=topk, feature_map=feature_map, BLKQ=blkq, BLKK=blkk).cuda()
        with torch.no_grad():  # non-zero proj_l so that its cost is the trained one
            module.proj_l.weight.normal_(0, D**-0.5)

        def public(q, k, v, w, b):
            return module(q, k, v)
        rows.append(("SLA public reference (all)", public))
    return rows


def wan_inputs(B, H, L, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    w = (torch.randn(D, D, generator=g, device="cuda") * D**-0.5).requires_grad_(True)
    b = torch.randn(D, generator=g, device="cuda").requires_grad_(True)
    do = torch.randn(B, H, L, D, generator=g, device="cuda", dtype=torch.bfloat16)
    return (q, k, v, w, b), do


def breakdown(B, H, L, D, topk, blkq, blkk, feature_map, scope):
    (q, k, v, w, b), do = wan_inputs(B, H, L, D, seed=1)
    lut = select_blocks(q, k, topk, blkq, blkk)
    scale = D**-0.5
    ops = torch.ops.diffusers_sla
    parts = {"select_blocks (torch)": bench_ms(lambda: select_blocks(q, k, topk, blkq, blkk)),
             "fast_select_blocks (fused)": bench_ms(lambda: custom_ops.fast_select_blocks(q, k, topk, blkq, blkk))}
    log(f"  fused vs torch selection: LUT entries that differ: "
        f"{(custom_ops.fast_select_blocks(q, k, topk, blkq, blkk) != lut).float().mean().item():.2e}")
    n_k = -(-L // blkk)
    parts["selection: q pooling"] = bench_ms(lambda: fused_selection.block_means(q, blkq, center=False))
    parts["selection: k mean (row sums)"] = bench_ms(lambda: fused_selection.row_sum_parts(k))
    parts["selection: k pooling"] = bench_ms(lambda: fused_selection.block_means(k, blkk, center=True))
    parts["linear totals H,Z"] = bench_ms(
        lambda: linear_state.linear_totals(k, v, blkk, 128, feature_map, "tf32", store_blocks=scope == "rest"))
    if scope == "rest":
        _, z_parts, hb, zkb = linear_state.linear_totals(k, v, blkk, 128, feature_map, "tf32", store_blocks=True)
        parts["rest weights, z_i (gather)"] = bench_ms(
            lambda: linear_state.rest_weights(lut, n_k, q.dtype, zkb, z_parts))

        def rest_state():
            weights, _ = linear_state.rest_weights(lut, n_k, q.dtype, zkb, z_parts)
            torch.matmul(weights, hb.view(B, H, n_k, -1))
        parts["R_i, z_i (0/1 product)"] = bench_ms(rest_state)
        del hb, zkb, z_parts
    if scope == "rest":
        parts.update(rest_mass_parts(q, k, lut, blkq, blkk, scale))
    parts["sla_fwd (inference)"] = bench_ms(
        lambda: ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, False, "tf32"))
    kw = dict(blkq=blkq, blkk=blkk, feature_map=feature_map, linear_scope=scope)
    with torch.no_grad():
        parts["whole forward"] = bench_ms(lambda: sla_triton(q, k, v, w, b, topk=topk, **kw))
        parts["whole forward: host time"] = host_ms(lambda: sla_triton(q, k, v, w, b, topk=topk, **kw))
    with kernels("portable"):
        parts["sla_fwd (inference, portable)"] = bench_ms(
            lambda: ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, False, "tf32"))
    saved = ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, True, "tf32")
    parts["sla_fwd (training, stores)"] = bench_ms(
        lambda: ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, True, "tf32"))
    if scope == "rest":  # fusion "mass": the same kernels mixing by a gate (`forward.sla_fwd(gate=...)`)
        gate = -fusion.rest_log_mass(q.detach(), k.detach(), lut, blkq, blkk, scale)
        parts["sla_fwd (inference, mixed)"] = bench_ms(
            lambda: ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, False, "tf32", gate, True))
        mixed = ops.sla_fwd(q, k, v, w, b, lut, scale, feature_map, scope, blkq, blkk, True, "tf32", gate, True)
        parts["sla_bwd (mixed)"] = bench_ms(
            lambda: ops.sla_bwd(do, q, k, v, w, b, *mixed, lut, scale, feature_map, scope, blkq, blkk, "tf32", gate,
                                True))
        del mixed
    parts["column LUT"] = bench_ms(lambda: column_lut(lut, n_k))
    parts["sla_bwd (all kernels)"] = bench_ms(
        lambda: ops.sla_bwd(do, q, k, v, w, b, *saved, lut, scale, feature_map, scope, blkq, blkk, "tf32"))
    with kernels("portable"):
        parts["sla_bwd (portable kernels)"] = bench_ms(
            lambda: ops.sla_bwd(do, q, k, v, w, b, *saved, lut, scale, feature_map, scope, blkq, blkk, "tf32"))
    for name, ms in parts.items():
        log(f"  {name:<28s} {ms:8.3f} ms")
    return parts


def rest_mass_parts(q, k, lut, blkq, blkk, scale):
    """Fusion "mass"'s rest estimate (`fusion.rest_log_mass`) on the q, k the fused path passes (the compute dtype):
    the PyTorch path against the kernels (tf32x3 products, the default, and plain tf32), forward alone and forward +
    backward (gradients to q and k), with the kernels' relative errors against the PyTorch path."""
    qf, kf = (x.detach().clone().requires_grad_() for x in (q, k))
    g = torch.randn(qf.shape[:3], device=q.device, generator=torch.Generator(device=q.device).manual_seed(2))

    def run(path):
        if path == "torch":
            return fusion.rest_log_mass(qf, kf, lut, blkq, blkk, scale, use_kernels=False)
        mean, var, log_count = fusion.key_block_moments(kf, blkk)
        rest = fusion.rest_blocks(lut, mean.shape[2])
        return rest_mass.rest_log_mass(qf, mean, var, log_count, rest, scale, blkq, dot_precision=path)

    def fwd_bwd(path):
        return torch.autograd.grad(run(path), (qf, kf), g)

    parts, ref = {}, None
    for path in ("torch", "tf32x3", "tf32"):
        with torch.no_grad():
            parts[f"rest mass fwd ({path})"] = bench_ms(lambda path=path: run(path))
        parts[f"rest mass fwd+bwd ({path})"] = bench_ms(lambda path=path: fwd_bwd(path))
        out = run(path)
        got = (out.detach(), *fwd_bwd(path))
        if ref is None:
            ref = got
            continue
        kept = ref[0] > -1e29  # rows with rest blocks (the others are the -1e30 stand-in on both sides)
        log(f"  rest mass ({path}) vs torch: log_rest {rel_err(got[0][kept], ref[0][kept]):.2e}, "
            f"dq {rel_err(got[1], ref[1]):.2e}, dk {rel_err(got[2], ref[2]):.2e}")
    return parts


def bench(args, PublicSLA):
    B, H, L, D, topk, blkq, blkk, fm = 1, 12, 32760, 128, 0.05, 128, 64, "softmax"
    log(f"== Wan2.1-1.3B self-attention layer: B={B} H={H} L={L} D={D} bf16 topk={topk} blocks {blkq}x{blkk} "
        f"feature_map={fm} ==")
    inputs, do = wan_inputs(B, H, L, D)
    results = {}
    for name, fn in providers(D, topk, blkq, blkk, fm, PublicSLA):
        try:
            results[name] = time_provider(fn, inputs, do)
        except Exception as exc:  # a backend missing on this build: report, go on
            log(f"{name}: failed: {exc!r}"[:300])
    ours = results.get("SLA ours (rest)")
    cudnn = results.get("SDPA cuDNN")
    public = results.get("SLA public reference (all)")
    ours_all = results.get("SLA ours (all)")
    log(f"{'provider':<28s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'cuDNN/x fwd':>11s} {'cuDNN/x bwd':>11s}")
    for name, (f, bw) in results.items():
        rf = cudnn[0] / f if cudnn else float("nan")
        rb = cudnn[1] / bw if cudnn else float("nan")
        log(f"{name:<28s} {f:8.3f} {bw:8.3f} {f + bw:8.3f} {rf:11.2f} {rb:11.2f}")
    if public and ours:
        log(f"public reference / ours(rest): fwd {public[0] / ours[0]:.2f}x, bwd {public[1] / ours[1]:.2f}x")
    if public and ours_all:
        log(f"public reference / ours(all):  fwd {public[0] / ours_all[0]:.2f}x, bwd {public[1] / ours_all[1]:.2f}x")
    ours_none = results.get("SLA ours (none)")
    if ours and ours_none:
        log(f"linear branch (ours(rest) - ours(none)): fwd {ours[0] - ours_none[0]:.3f} ms, "
            f"bwd {ours[1] - ours_none[1]:.3f} ms")
    log(f"kernels ('auto'): {auto_kernels(inputs[0], inputs[1], topk, blkq, blkk, 'rest')}")
    del inputs, do
    torch.cuda.empty_cache()
    log("breakdown, ours (rest):")
    parts = breakdown(B, H, L, D, topk, blkq, blkk, fm, "rest")
    log("breakdown, ours (all):")
    parts_all = breakdown(B, H, L, D, topk, blkq, blkk, fm, "all")
    configs = {}
    from diffusers_sla.ops.kernels.triton_bwd import attn_bwd
    from diffusers_sla.ops.kernels.triton_fwd import attn_fwd

    for kernel in (attn_fwd, attn_bwd):
        best = getattr(kernel, "best_config", None)
        configs[kernel.fn.__name__] = str(best)
        log(f"config {kernel.fn.__name__}: {best}")
    return {"results": results, "breakdown_rest": parts, "breakdown_all": parts_all, "configs": configs}


def log_registers(tag=""):
    """Registers and spills of every compiled variant of the SLA kernels (from Triton's kernel cache)."""
    from diffusers_sla.ops.kernels import linear_state as linear_state_kernels
    from diffusers_sla.ops.kernels import selection as selection_kernels
    from diffusers_sla.ops.kernels import triton_bwd, triton_fwd

    for mod in (triton_fwd, triton_bwd, selection_kernels, linear_state_kernels):
        for name in dir(mod):
            fn = getattr(mod, name)
            jit = getattr(fn, "fn", fn)
            caches = getattr(jit, "device_caches", None)
            if caches is None:
                continue
            try:
                for dev_cache in caches.values():
                    for compiled in dev_cache[0].values():
                        md = compiled.metadata
                        log(f"[regs {tag}] {name}: regs={compiled.n_regs} spills={compiled.n_spills} "
                            f"warps={md.num_warps} stages={md.num_stages} smem={md.shared}")
            except (AttributeError, KeyError, TypeError, IndexError) as exc:  # Triton internals differ by version
                log(f"[regs] {name}: {exc!r}"[:200])


def quick(args, PublicSLA):
    """Wan shape only: the breakdown for both scopes and ours vs the public reference (no SDPA); for variants."""
    B, H, L, D, topk, blkq, blkk, fm = 1, 12, 32760, 128, 0.05, 128, 64, "softmax"
    tag = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("DIFFUSERS_SLA_"))
    inputs, do = wan_inputs(B, H, L, D)
    res = {name: time_provider(fn, inputs, do) for name, fn in providers(D, topk, blkq, blkk, fm, PublicSLA)[2:]}
    del inputs, do
    parts = {"rest": breakdown(B, H, L, D, topk, blkq, blkk, fm, "rest"),
             "all": breakdown(B, H, L, D, topk, blkq, blkk, fm, "all")}
    pub = res.get("SLA public reference (all)", (float("nan"),) * 2)
    for name, (f, b) in res.items():
        log(f"[quick {tag}] {name:<28s} fwd {f:6.3f} bwd {b:6.3f}  "
            f"pub/ours fwd {pub[0] / f:5.2f} bwd {pub[1] / b:5.2f}")
    for scope, p in parts.items():
        log(f"[quick {tag}] {scope}: " + " ".join(f"{k.replace(' ', '_')}={v:.3f}" for k, v in p.items()))
    log_registers(tag)
    return {"results": res, "parts": parts}


def sweep(args, PublicSLA):
    B, H, D, blkq, blkk, fm = 1, 12, 128, 128, 64, "softmax"
    rows = []
    log(f"== sweep: B={B} H={H} D={D} bf16 blocks {blkq}x{blkk} {fm}; ms (fwd / bwd) and cuDNN/ours ==")
    log(f"{'L':>6s} {'topk':>5s} {'cuDNN fwd':>9s} {'cuDNN bwd':>9s} {'ours fwd':>8s} {'ours bwd':>8s} "
        f"{'x fwd':>6s} {'x bwd':>6s} {'pub fwd':>8s} {'pub bwd':>8s} {'pub/ours f':>10s} {'pub/ours b':>10s}")
    for L in args.lengths:
        inputs, do = wan_inputs(B, H, L, D, seed=L)
        sdpa_rows = providers(D, 0.05, blkq, blkk, fm, None)
        cudnn = time_provider(sdpa_rows[1][1], inputs, do)
        for topk in args.topks:
            provs = dict(providers(D, topk, blkq, blkk, fm, PublicSLA))
            ours = time_provider(provs["SLA ours (rest)"], inputs, do)
            pub = time_provider(provs["SLA public reference (all)"], inputs, do) if PublicSLA else (float("nan"),) * 2
            rows.append(dict(L=L, topk=topk, cudnn=cudnn, ours=ours, public=pub))
            log(f"{L:6d} {topk:5.2f} {cudnn[0]:9.3f} {cudnn[1]:9.3f} {ours[0]:8.3f} {ours[1]:8.3f} "
                f"{cudnn[0] / ours[0]:6.1f} {cudnn[1] / ours[1]:6.1f} {pub[0]:8.3f} {pub[1]:8.3f} "
                f"{pub[0] / ours[0]:10.2f} {pub[1] / ours[1]:10.2f}")
        del inputs, do
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "bench", "sweep", "all", "quick"])
    parser.add_argument("--out", default=None, help="folder for log.txt and results.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32760, 65536])
    parser.add_argument("--topks", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU.")
    log(env_line())
    PublicSLA = load_public_reference()
    log(f"public SLA reference: {'found' if PublicSLA else 'not installed'}")
    out = {}
    t0 = time.time()
    failures = 0
    if args.what in ("check", "all"):
        failures = check(args)
    if args.what in ("bench", "all"):
        out["bench"] = bench(args, PublicSLA)
    if args.what == "quick":
        out["quick"] = quick(args, PublicSLA)
    if args.what in ("sweep", "all"):
        out["sweep"] = sweep(args, PublicSLA)
    log(f"total {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "log.txt").write_text("\n".join(LOG) + "\n")
        Path(args.out, "results.json").write_text(json.dumps(out, indent=1, default=str))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
