# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Triton SLA backend (`ops/triton_fwd.py`, `ops/triton_bwd.py`, `ops/custom_ops.py`, `ops/autograd.py`) against
the PyTorch operator, forward and backward.

Without a GPU the real kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, float32 and float16, small
sizes). The interpreter must be chosen before Triton is imported, and other test modules import Triton without it, so
those cases run in one subprocess per test session (`interpreter_results`). On a CUDA machine the same cases, plus
bf16 ones and the golden files, run in-process (`@pytest.mark.gpu`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_sla.ops.selection import lut_to_block_map, select_blocks

from testing_utils import GOLDEN_DIR, HAS_TRITON, REPO_ROOT, golden_cases, rel_err, require_cuda, require_golden

# "o_no_grad": the inference path (no autograd), where the forward kernel stores nothing for a backward
GRAD_NAMES = ("o", "dq", "dk", "dv", "dW", "db", "o_no_grad")

# B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, linear_scope, dtype, strided[, scale in units of D**-0.5]
INTERPRETER_CASES = {
    "partial_blocks_lq_ne_lk_softmax_rest_fp32": (1, 2, 100, 130, 32, 32, 32, 0.4, "softmax", "rest", "float32", 0),
    "d24_padded_elu_all_fp32": (1, 1, 70, 200, 24, 32, 64, 0.3, "elu", "all", "float32", 0),
    "relu_rest_fp16_batch2": (2, 1, 128, 96, 64, 64, 32, 0.5, "relu", "rest", "float16", 0),
    "softmax_all_fp16": (1, 1, 100, 130, 32, 32, 32, 0.4, "softmax", "all", "float16", 0),
    "strided_inputs_elu_rest_fp32": (1, 2, 96, 160, 16, 32, 32, 0.25, "elu", "rest", "float32", 1),
    "block128_softmax_rest_fp32": (1, 1, 200, 300, 32, 128, 128, 0.5, "softmax", "rest", "float32", 0),
    "every_block_selected_rest_fp32": (1, 1, 64, 64, 32, 32, 32, 1.0, "softmax", "rest", "float32", 0),
    # the forward folds a positive scale into its exponent; zero and negative scales take the plain path
    "negative_scale_softmax_all_fp32": (1, 1, 100, 130, 32, 32, 32, 0.4, "softmax", "all", "float32", 0, -0.7),
    "zero_scale_relu_rest_fp32": (1, 1, 100, 130, 32, 32, 32, 0.4, "relu", "rest", "float32", 0, 0.0),
    # the sparse part alone: dW and db must be None on both sides (proj_l is not part of the operator)
    "sparse_only_none_strided_fp32": (1, 2, 100, 130, 32, 32, 32, 0.4, "softmax", "none", "float32", 1),
    "sparse_only_none_fp16_batch2": (2, 1, 128, 96, 64, 64, 32, 0.5, "elu", "none", "float16", 0),
}
# Query tiles smaller than a query block (a block split over several programs, or several dK/dV steps): the same
# checks with the launch-shape overrides `custom_ops._rows` reads.
TILE_OVERRIDE_CASES = {
    "split_query_tiles_softmax_rest_fp32": (
        (1, 2, 100, 130, 32, 64, 32, 0.4, "softmax", "rest", "float32", 0),
        {"DIFFUSERS_SLA_FWD_ROWS": "16", "DIFFUSERS_SLA_DKDV_ROWS": "32", "DIFFUSERS_SLA_DQ_ROWS": "16"}),
    "split_query_tiles_elu_all_fp16": (
        (1, 1, 200, 96, 32, 128, 32, 0.5, "elu", "all", "float16", 0),
        {"DIFFUSERS_SLA_FWD_ROWS": "64", "DIFFUSERS_SLA_DKDV_ROWS": "16", "DIFFUSERS_SLA_DQ_ROWS": "32"}),
}
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}

# Runs inside the subprocess and in-process on a GPU: one case, forward + backward, errors against the float64
# operator on the same block map. A gradient that is exactly zero in the reference must be exactly zero here, and
# one the reference does not give (None: proj_l under scope "none") must not be given here either.
CASE_CODE = textwrap.dedent('''
    import torch
    from diffusers_sla.ops.autograd import sla_triton, sla_triton_with_lut
    from diffusers_sla.ops.reference import sla_reference
    from diffusers_sla.ops.selection import select_blocks

    def run_case(B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, linear_scope, dtype, strided, scale_units=0.8,
                 device="cpu", seed=0):
        dtype = getattr(torch, dtype)
        g = torch.Generator().manual_seed(seed)

        def make(L):
            if strided:  # diffusers hands (B, L, H, D) tensors transposed to (B, H, L, D)
                return torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2)
            return torch.randn(B, H, L, D, generator=g).to(device, dtype)

        q, k, v = make(Lq), make(Lk), make(Lk)
        w = (torch.randn(D, D, generator=g) / D**0.5).to(device)
        b = torch.randn(D, generator=g).to(device)
        do = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        scale = scale_units * D**-0.5
        kw = dict(blkq=blkq, blkk=blkk, feature_map=feature_map, linear_scope=linear_scope, scale=scale)
        lut = select_blocks(q, k, topk, blkq, blkk)
        ours = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w, b)]
        o = sla_triton(*ours, topk=topk, **kw)
        o.backward(do)
        with torch.no_grad():
            o_no_grad = sla_triton(q, k, v, w, b, topk=topk, **kw)
        ref = [x.detach().double().requires_grad_(True) for x in (q, k, v, w, b)]
        r = sla_reference(*ref, topk=topk, lut=lut, **kw)
        r.backward(do.double())
        errors = []
        for out, expected in zip([o] + [x.grad for x in ours] + [o_no_grad], [r] + [x.grad for x in ref] + [r]):
            if out is None or expected is None:
                errors.append(0.0 if out is None and expected is None else float("inf"))
                continue
            finite = bool(torch.isfinite(out).all())
            if expected.norm() == 0:
                errors.append(0.0 if (finite and out.abs().max() == 0) else float("inf"))
            else:
                err = ((out.double() - expected).norm() / expected.norm()).item()
                errors.append(err if finite else float("inf"))
        # the output comes back in q's memory layout (diffusers' (B, L, H, D) viewed as (B, H, L, D) included)
        return {"errors": errors, "dtype": str(o.dtype), "shape": list(o.shape),
                "same_layout_as_q": list(o.stride()) == list(q.stride())}
''')


# A loop with a runtime bound, as every SLA kernel has: Triton 3.6's interpreter fails on it with numpy 2.4 ("only
# 0-dimensional arrays can be converted to Python scalars"), while Triton 3.9's runs it.
INTERPRETER_PROBE = textwrap.dedent('''
    import numpy, torch, triton, triton.language as tl

    @triton.jit
    def _sum(X, N, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, N, BLOCK):
            acc += tl.load(X + i + tl.arange(0, BLOCK))
        tl.store(X + tl.arange(0, BLOCK), acc)

    x = torch.ones(64)
    try:
        _sum[(1,)](x, 64, BLOCK=16)
    except Exception as exc:
        raise SystemExit(f"triton {triton.__version__} with numpy {numpy.__version__}: {exc!r}")
    assert x[0].item() == 4.0, x
''')


def _triton_usable_on_cpu() -> tuple[bool, str]:
    if not HAS_TRITON:
        return False, "Triton is not installed"
    probe = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], env={**os.environ, "TRITON_INTERPRET": "1"},
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return False, f"the Triton interpreter cannot run a kernel loop here: {probe.stderr.strip()[-300:]}"
    return True, ""


@pytest.fixture(scope="module")
def interpreter_results():
    usable, reason = _triton_usable_on_cpu()
    if not usable:
        pytest.skip(f"these cases run under the Triton interpreter, which is not usable here: {reason}")
    script = CASE_CODE + textwrap.dedent('''
        import json, os, sys
        cases = json.loads(sys.argv[1])
        results = {name: run_case(*args) for name, args in cases.items()}
        for name, (args, env) in json.loads(sys.argv[2]).items():
            os.environ.update(env)
            results[name] = run_case(*args)
            for key in env:
                del os.environ[key]
        print("RESULTS" + json.dumps(results))
    ''')
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT) + os.pathsep +
           os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(INTERPRETER_CASES),
                           json.dumps(TILE_OVERRIDE_CASES)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("name", sorted(INTERPRETER_CASES) + sorted(TILE_OVERRIDE_CASES))
def test_interpreter_matches_reference(interpreter_results, name):
    args = INTERPRETER_CASES[name] if name in INTERPRETER_CASES else TILE_OVERRIDE_CASES[name][0]
    result = interpreter_results[name]
    B, H, Lq, _, D = args[:5]
    assert result["shape"] == [B, H, Lq, D]
    assert result["dtype"] == f"torch.{args[10]}"
    assert result["same_layout_as_q"]
    tol = TOLERANCE[args[10]]
    for grad_name, err in zip(GRAD_NAMES, result["errors"]):
        assert err <= tol, f"{grad_name}: relative error {err:.2e} > {tol:.0e}"


COMPILE_SCRIPT = textwrap.dedent('''
    import torch
    from diffusers_sla.ops.autograd import sla_triton
    from diffusers_sla.ops import custom_ops
    from diffusers_sla.ops.selection import select_blocks

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 32) for _ in range(3))
    w, b = torch.randn(32, 32) / 32**0.5, torch.randn(32)
    do = torch.randn(1, 2, 96, 32)
    lut = select_blocks(q, k, 0.5, 32, 32)
    empty = q.new_empty(0)
    # "none": the ops get empty stand-ins for proj_l (what `autograd._run` passes) and return empty dW, db
    for scope, (pw, pb) in (("rest", (w, b)), ("none", (empty, empty))):
        kw = dict(topk=0.5, blkq=32, blkk=32, feature_map="elu", linear_scope=scope)

        def step(q, k, v, w, b):
            return sla_triton(q, k, v, w, b, **kw)

        grads = []
        for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
            ins = [x.clone().requires_grad_(True) for x in (q, k, v, w, b)]
            out = fn(*ins)
            out.backward(do)
            grads.append([out] + [x.grad for x in ins])
        for a, e in zip(*grads):
            if scope == "none" and (a is None or e is None):  # proj_l's gradients: None in both
                assert a is None and e is None
                continue
            assert ((a - e).norm() / e.norm()).item() < 1e-5, scope
        assert (grads[0][4] is None) == (scope == "none")
        args = (q, k, v, pw, pb, lut, 32**-0.5, "elu", scope, 32, 32, True, "ieee")
        torch.library.opcheck(torch.ops.diffusers_sla.sla_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        saved = torch.ops.diffusers_sla.sla_fwd(*args)
        bwd_args = (do, q, k, v, pw, pb, *saved, lut, 32**-0.5, "elu", scope, 32, 32, "ieee")
        torch.library.opcheck(torch.ops.diffusers_sla.sla_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        dw, db = torch.ops.diffusers_sla.sla_bwd(*bwd_args)[3:]
        assert (dw.shape, db.shape) == (((32, 32), (32,)) if scope == "rest" else ((0,), (0,))), scope
    print("COMPILE_OK")
''')


def test_torch_compile_fullgraph_and_fake_impls():
    """torch.compile(fullgraph=True) through the custom ops (no graph break), same values as eager, and opcheck of
    both ops' schemas and fake implementations, for scope "rest" and for "none" (no proj_l gradient)."""
    if torch.cuda.is_available():
        env = dict(os.environ)
    else:
        usable, reason = _triton_usable_on_cpu()
        if not usable:
            pytest.skip(f"neither CUDA nor the Triton interpreter is usable: {reason}")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = COMPILE_SCRIPT if not torch.cuda.is_available() else COMPILE_SCRIPT.replace(
        "torch.randn(1, 2, 96, 32)", "torch.randn(1, 2, 96, 32, device='cuda')").replace(
        "torch.randn(32, 32)", "torch.randn(32, 32, device='cuda')").replace(
        "torch.randn(32)", "torch.randn(32, device='cuda')")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "COMPILE_OK" in proc.stdout, proc.stderr[-3000:]


TOP_BLOCKS_SCRIPT = textwrap.dedent('''
    import torch
    from diffusers_sla.ops.custom_ops import top_blocks_triton
    from diffusers_sla.ops.selection import top_blocks

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # rows, key blocks, kept, distinct score values (few values: many ties)
    cases = ((6, 512, 25, 16), (6, 60, 3, 2), (4, 100, 100, 3), (4, 7, 1, 2), (3, 1000, 50, 999))
    for rows, n_k, kept, levels in cases:
        s = (torch.randint(0, levels, (rows, n_k), generator=g).float() - levels // 2) / 4
        s[0, :5] = -0.0  # signed zeros tie with +0.0, as in a float sort
        s[1, ::3] = float("-inf")
        s = s.to(device)
        ours, expected = top_blocks_triton(s, kept), top_blocks(s, kept)
        assert ours.dtype == torch.int32 and torch.equal(ours, expected), (rows, n_k, kept, ours, expected)
    s = torch.randn(1, 2, 3, 130, generator=g).to(device)
    assert torch.equal(top_blocks_triton(s, 13), top_blocks(s, 13))
    # 16-bit scores (what the fused selection's score product returns) rank as their float32 values: many ties
    # after rounding, values at the bfloat16 extremes, +-0 and -inf
    base = torch.randn(8, 256, generator=g) * torch.logspace(-30, 30, 8).unsqueeze(1)
    extremes = torch.tensor([3.3895e38, -3.3895e38, 1e-40, 0.0, -0.0, float("-inf"), 1.0, 1.0 + 2**-9] * 32)
    s = torch.cat([base, base + base.abs() * 2**-10, extremes.view(1, 256)], 0).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        for kept in (1, 7, 40):
            half = s.to(dtype)
            assert torch.equal(top_blocks_triton(half, kept), top_blocks(half.float(), kept)), (dtype, kept)
    print("TOP_BLOCKS_OK")
''')


def test_selection_kernels_match_selection_module():
    """The Triton top-k of the fast selection against `selection.top_blocks` (the rule both backends share): the same
    indices on tie-heavy rows, signed zeros and -inf included."""
    _run_kernel_script(TOP_BLOCKS_SCRIPT, "TOP_BLOCKS_OK")


def _run_kernel_script(script: str, marker: str) -> None:
    """Runs `script` in a fresh process, on the GPU or else under the Triton interpreter (which must be set before
    Triton is imported), and checks that it printed `marker`."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        usable, reason = _triton_usable_on_cpu()
        if not usable:
            pytest.skip(f"neither CUDA nor the Triton interpreter is usable: {reason}")
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-3000:]


GLUE_SCRIPT = textwrap.dedent('''
    import functools
    import torch
    from diffusers_sla.ops import custom_ops
    from diffusers_sla.ops.selection import mean_pool_blocks, num_blocks, select_blocks, top_blocks

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def make(B, H, L, D, dtype, strided):  # an offset, so that a wrong key mean shows in the pooled keys
        if strided:  # diffusers' (B, L, H, D) viewed as (B, H, L, D)
            return (torch.randn(B, L, H, D, generator=g) + 0.5).to(device, dtype).transpose(1, 2)
        return (torch.randn(B, H, L, D, generator=g) + 0.5).to(device, dtype)

    # key mean: row sums over ranges of rows (partial last range, ranges that are not whole tiles, strided input)
    for B, H, L, D, dtype, strided in ((1, 2, 300, 32, torch.float32, False), (2, 1, 130, 24, torch.float16, True),
                                       (1, 3, 1, 16, torch.float32, True)):
        x = make(B, H, L, D, dtype, strided)
        for chunk in (0, 1, 48, 64, 100, 1000):
            parts = custom_ops._row_sum_parts(x, chunk)
            expected = x.float().sum(2).reshape(B * H, D)
            assert parts.shape[1] == (num_blocks(L, chunk) if chunk else parts.shape[1]), (chunk, parts.shape)
            assert torch.allclose(parts.sum(1)[:, :D], expected, rtol=1e-5, atol=1e-4), (chunk, L)
            assert not parts[:, :, D:].any()  # padded head-dim columns stay 0

    # centred key pooling against the torch statement of `selection.block_scores`, with the few parts of the default
    # launch and with many (a partial last one, a non-power-of-two count)
    default_parts = custom_ops._row_sum_parts
    for chunk in (0, 48):
        custom_ops._row_sum_parts = functools.partial(default_parts, chunk=chunk) if chunk else default_parts
        for B, H, L, D, blk, dtype, strided in ((1, 1, 300, 32, 64, torch.float32, False),
                                                (1, 2, 200, 24, 32, torch.float16, True),
                                                (2, 1, 130, 16, 64, torch.float16, False)):
            x = make(B, H, L, D, dtype, strided)
            mu = x.mean(dim=2, keepdim=True, dtype=torch.float32).to(dtype)
            expected = mean_pool_blocks((x - mu).to(dtype), blk)
            rounded = dtype != torch.float32
            out = custom_ops.block_means(x, blk, center=True, round_to_input=rounded).float()
            if rounded:
                expected = expected.to(dtype).float()
            # one unit in the last place at most (the float32 sums run in another order)
            assert torch.allclose(out, expected, rtol=1e-3 if rounded else 1e-6, atol=1e-3 if rounded else 1e-6), \
                (chunk, L, dtype, (out - expected).abs().max())
    custom_ops._row_sum_parts = default_parts

    # the fused selection: the same LUT as `selection.select_blocks` (Lq != Lk, partial blocks, strided, fp16)
    for Lq, Lk, D, blkq, blkk, topk, dtype, strided in ((300, 450, 32, 64, 32, 0.3, torch.float32, False),
                                                        (200, 130, 24, 32, 64, 0.5, torch.float16, True),
                                                        (128, 1000, 16, 128, 32, 0.1, torch.float16, False)):
        q, k = make(2, 2, Lq, D, dtype, strided), make(2, 2, Lk, D, dtype, strided)
        assert torch.equal(custom_ops._fast_select_blocks(q, k, topk, blkq, blkk),
                           select_blocks(q, k, topk, blkq, blkk)), (Lq, Lk, dtype)

    # scope "rest": z_i = Z - the selected z_j against the float32 0/1 product over the unselected z_j
    for B, H, Lq, Lk, D, blkq, blkk, topk, fm, dtype in ((1, 1, 200, 300, 24, 32, 32, 0.3, "softmax", torch.float32),
                                                         (1, 2, 96, 160, 32, 32, 32, 0.25, "elu", torch.float16),
                                                         (2, 1, 64, 1100, 16, 64, 16, 0.6, "relu", torch.float32)):
        q, k, v = make(B, H, Lq, D, dtype, False), make(B, H, Lk, D, dtype, True), make(B, H, Lk, D, dtype, False)
        lut = select_blocks(q, k, topk, blkq, blkk)
        n_k, block_d = num_blocks(Lk, blkk), custom_ops._block_d(D)
        _, z_parts, _, zkb = custom_ops._linear_totals(k, v, blkk, block_d, fm, "ieee", store_blocks=True)
        assert z_parts.shape[0] == B * H and torch.allclose(z_parts.sum(1).view(B, H, -1), zkb.sum(2), rtol=1e-5)
        w, zi = custom_ops._rest_weights(lut, n_k, dtype, zkb, z_parts)
        w_bwd, w32 = custom_ops._rest_weights(lut, n_k, dtype)
        expected = torch.matmul(w32, zkb)
        assert torch.equal(w, w_bwd) and torch.equal(w.float(), w32) and zi.shape == expected.shape
        assert ((zi - expected).norm() / expected.norm()).item() < 1e-5, fm
        assert not zi[..., D:].any()
    # many splits and more selected blocks than one gather step (synthetic positive states)
    B, H, n_q, n_k, kept, block_d, n_split = 1, 2, 5, 90, 70, 32, 37
    lut = torch.stack([torch.randperm(n_k, generator=g)[:kept].sort().values for _ in range(B * H * n_q)])
    lut = lut.view(B, H, n_q, kept).to(device, torch.int32)
    zkb = torch.rand(B, H, n_k, block_d, generator=g).to(device)
    z_parts = torch.rand(B * H, n_split, block_d, generator=g).to(device)
    w, zi = custom_ops._rest_weights(lut, n_k, torch.float32, zkb, z_parts)
    selected = torch.gather(zkb, 2, lut.long()[..., None].expand(-1, -1, -1, -1, block_d).flatten(2, 3))
    expected = z_parts.sum(1).view(B, H, 1, block_d) - selected.view(B, H, n_q, kept, block_d).sum(3)
    assert torch.allclose(zi, expected, rtol=1e-5, atol=1e-5), (zi - expected).abs().max()
    assert int(w.sum()) == B * H * n_q * (n_k - kept)
    # the eager forward's top-k launch that also builds W and z_i: the same LUT, W and z_i, bit for bit, as the
    # top-k and `_rest_weights` apart (tied scores, and more splits and selected blocks than one unrolled step)
    for kept_fused, dtype in ((kept, torch.bfloat16), (3, torch.float16), (n_k, torch.float32)):
        scores = (torch.randint(0, 7, (B, H, n_q, n_k), generator=g).float() / 4).to(device, dtype)
        lut_f, w_f, zi_f = custom_ops.top_blocks_and_rest(scores, kept_fused, dtype, zkb, z_parts)
        lut_a = custom_ops.top_blocks_triton(scores, kept_fused)
        w_a, zi_a = custom_ops._rest_weights(lut_a, n_k, dtype, zkb, z_parts)
        assert torch.equal(lut_f, lut_a) and torch.equal(lut_a, top_blocks(scores.float(), kept_fused)), kept_fused
        assert w_f.dtype == dtype and torch.equal(w_f, w_a) and torch.equal(zi_f, zi_a), kept_fused
    print("GLUE_OK")
''')


def test_selection_and_rest_state_glue_kernels():
    """The key mean's row sums and the centred pooling that adds them (against the torch statement of
    `selection.block_scores`; the fused selection's LUT equal to `select_blocks`), and scope "rest"'s z_i formed as
    Z minus the selected z_j (against the float32 0/1 product it replaces)."""
    _run_kernel_script(GLUE_SCRIPT, "GLUE_OK")


GOLDEN_LUT_SCRIPT = textwrap.dedent('''
    import json
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from diffusers_sla.ops import custom_ops
    from diffusers_sla.ops.selection import lut_to_block_map

    GOLDEN = None  # set by the test
    golden = Path(GOLDEN)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, cfg in json.loads((golden / "index.json").read_text()).items():
        t = {key: val.to(device) for key, val in load_file(golden / f"{name}.safetensors").items()}
        # the bf16 inputs as they are: the interpreter's bf16 products do not enter the selection
        lut = custom_ops._fast_select_blocks(t["q"], t["k"], cfg["topk"], cfg["blkq"], cfg["blkk"])
        assert torch.equal(lut_to_block_map(lut, t["block_map"].shape[-1]), t["block_map"].bool()), name
    print("GOLDEN_LUT_OK")
''')


@require_golden
def test_fused_selection_picks_the_golden_block_maps():
    """The Triton block selection (`fast_select_blocks`: pooling and top-k kernels) picks exactly the public
    reference's block maps on the golden inputs (bf16), on the CPU too (the GPU tests check it through the outputs)."""
    _run_kernel_script(GOLDEN_LUT_SCRIPT.replace("GOLDEN = None", f"GOLDEN = {str(GOLDEN_DIR)!r}"), "GOLDEN_LUT_OK")


OVERLAP_SCRIPT = textwrap.dedent('''
    import torch
    from diffusers_sla.ops import autograd, custom_ops

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    precision = "tf32" if device == "cuda" else "ieee"
    # (B, H, Lq, Lk, D, blkq, blkk, topk): partial blocks and Lq != Lk; on the GPU also the Wan head size
    cases = [(1, 2, 200, 330, 32, 64, 32, 0.3), (2, 1, 96, 96, 24, 32, 64, 0.5)]
    if device == "cuda":
        cases.append((1, 3, 1500, 1500, 128, 128, 64, 0.2))
    for B, H, Lq, Lk, D, blkq, blkk, topk in cases:
        q = (torch.randn(B, H, Lq, D, generator=g) + 0.3).to(device, dtype)
        k = (torch.randn(B, Lk, H, D, generator=g) + 0.3).to(device, dtype).transpose(1, 2)  # strided, as diffusers
        v = torch.randn(B, H, Lk, D, generator=g).to(device, dtype)
        w, b = (torch.randn(D, D, generator=g) * 0.05).to(device), (torch.randn(D, generator=g) * 0.1).to(device)
        for scope in ("rest", "all"):
            args = (D**-0.5, "softmax", scope, blkq, blkk, True, precision)
            lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
            apart = (lut, *custom_ops.forward(q, k, v, w, b, lut, *args))
            for overlap in (True, False):
                custom_ops.OVERLAP = overlap
                lut2, outs = custom_ops.select_and_forward(q, k, q, k, v, w, b, topk, *args)
                for i, (ours, ref) in enumerate(zip((lut2, *outs), apart)):
                    assert torch.equal(ours, ref), (Lq, scope, overlap, i)
            custom_ops.OVERLAP = True
            # the autograd glue: `sla_triton` (selecting inside the Function) against the map passed in
            kw = dict(blkq=blkq, blkk=blkk, feature_map="softmax", linear_scope=scope)
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
            leaves_lut = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
            out = autograd.sla_triton(*leaves, topk=topk, **kw)
            out_lut = autograd.sla_triton_with_lut(*leaves_lut, lut, **kw)
            assert torch.equal(out, out_lut), (Lq, scope)
            grad = torch.randn(out.shape, generator=g).to(device, dtype)
            out.backward(grad)
            out_lut.backward(grad)
            for i, (x, y) in enumerate(zip(leaves, leaves_lut)):
                assert torch.equal(x.grad, y.grad), (Lq, scope, "grad", i)
    print("OVERLAP_OK")
''')


def test_selection_beside_the_linear_state_changes_nothing():
    """`custom_ops.select_and_forward` (the eager `sla_triton` path: the block selection queued beside the linear
    state, on a second stream on the GPU) gives the block map, the output and every side output bit for bit as
    `select_blocks_fused` then `forward`, with the overlap on and off; `sla_triton`'s output and gradients equal
    `sla_triton_with_lut`'s on the same map."""
    _run_kernel_script(OVERLAP_SCRIPT, "OVERLAP_OK")


def test_unaligned_inputs_are_copied_to_an_aligned_tensor():
    """A contiguous view at an offset that is not a multiple of 16 bytes cannot back a tensor descriptor: `_tma_ready`
    must hand the kernels a fresh (aligned) copy with the same values, not the view itself."""
    from diffusers_sla.ops.custom_ops import _tma_addressable, _tma_ready

    buffer = torch.randn(1 + 2 * 3 * 8 * 16).to(torch.bfloat16)
    view = buffer[1:].view(2, 3, 8, 16)
    assert view.is_contiguous() and not _tma_addressable(view)
    ready = _tma_ready(view)
    assert _tma_addressable(ready) and torch.equal(ready, view)


SPARSE_ONLY_SCRIPT = textwrap.dedent('''
    import torch
    from diffusers_sla.ops import autograd, custom_ops

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32, torch.float16)

    # scope "none" makes no linear state: the linear-state pass must not run at all
    linear_totals = custom_ops._linear_totals
    def no_linear_state(*args, **kwargs):
        raise AssertionError("scope 'none' ran the linear-state pass")

    for dtype in dtypes:
        B, H, Lq, Lk, D, blkq, blkk, topk = 2, 2, 160, 200, 32, 32, 64, 0.4
        q = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        k = torch.randn(B, Lk, H, D, generator=g).to(device, dtype).transpose(1, 2)  # strided, as diffusers
        v = torch.randn(B, H, Lk, D, generator=g).to(device, dtype)
        do = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        zero_w, zero_b = torch.zeros(D, D, device=device), torch.zeros(D, device=device)
        kw = dict(topk=topk, blkq=blkq, blkk=blkk, feature_map="softmax")

        rest_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, zero_w, zero_b)]
        rest = autograd.sla_triton(*rest_leaves, linear_scope="rest", **kw)
        rest.backward(do)
        custom_ops._linear_totals = no_linear_state
        try:
            for overlap in (True, False):  # the eager selection beside the (absent) linear state, and apart
                custom_ops.OVERLAP = overlap
                leaves = [x.clone().requires_grad_(True) for x in (q, k, v, zero_w, zero_b)]
                none = autograd.sla_triton(*leaves, linear_scope="none", **kw)
                # "none" is "rest" with proj_l at exact zero: the same output, bit for bit
                assert torch.equal(none, rest), (dtype, overlap, (none.float() - rest.float()).abs().max())
                none.backward(do)
                assert leaves[3].grad is None and leaves[4].grad is None, "proj_l got a gradient"
                for x, y in zip(leaves[:3], rest_leaves[:3]):  # dq, dk, dv: the sparse branch's alone
                    err = ((x.grad.double() - y.grad.double()).norm() / y.grad.double().norm()).item()
                    assert err < 1e-3, (dtype, err)
            custom_ops.OVERLAP = True
            # no projection at all (what `sparse_linear_attention` passes for "none" without one), and the ops'
            # own outputs: no linear side outputs, empty dW and db
            with torch.no_grad():
                assert torch.equal(autograd.sla_triton(q, k, v, None, None, linear_scope="none", **kw), rest)
            lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
            empty = q.new_empty(0, dtype=torch.float32)
            args = (q.new_empty(0, dtype=torch.float32), empty, lut, D**-0.5, "softmax", "none", blkq, blkk)
            outs = custom_ops.forward(q, k, v, *args, True, "ieee" if device == "cpu" else "tf32")
            assert all(x.numel() == 0 for x in outs[2:]), [tuple(x.shape) for x in outs]
            grads = custom_ops.backward(do, q, k, v, *args[:2], *outs, *args[2:],
                                        "ieee" if device == "cpu" else "tf32")
            assert grads[3].numel() == 0 and grads[4].numel() == 0
        finally:
            custom_ops._linear_totals = linear_totals
    print("SPARSE_ONLY_OK")
''')


def test_scope_none_is_rest_with_zero_projection_and_runs_no_linear_pass():
    """`linear_scope="none"` on the Triton kernels: the output of scope "rest" with proj_l at exact zero, bit for bit
    (selection beside the forward or apart), dq/dk/dv of the sparse branch, no gradient for proj_l, no linear-state
    pass and no linear side outputs; the ops return empty dW and db."""
    _run_kernel_script(SPARSE_ONLY_SCRIPT, "SPARSE_ONLY_OK")


# ----- pieces that need no kernel ------------------------------------------------------------------------------------


def test_column_lut_lists_exactly_the_query_blocks_that_selected_each_key_block():
    from diffusers_sla.ops.custom_ops import column_lut

    q, k = torch.randn(2, 3, 300, 16), torch.randn(2, 3, 450, 16)
    lut = select_blocks(q, k, 0.3, 32, 32)  # (2, 3, 10, 4) over 15 key blocks
    col_q, offsets, counts = column_lut(lut, 15)
    block_map = lut_to_block_map(lut, 15)  # (B, H, n_q, n_k)
    for bh in range(6):
        bmap = block_map.view(6, 10, 15)[bh]
        for j in range(15):
            start, n = offsets[bh, j].item(), counts[bh, j].item()
            listed = col_q[bh, start : start + n].tolist()
            assert listed == bmap[:, j].nonzero().squeeze(-1).tolist()
    assert counts.sum().item() == lut.numel()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blkq": 48}, "`blkq` must be one of \\[32, 64, 128\\]"),
        ({"blkk": 256}, "`blkk` must be one of \\[32, 64, 128\\]"),
        ({"feature_map": "hedgehog"}, "`feature_map` must be one of"),
        ({"linear_scope": "sparse"}, "`linear_scope` must be one of \\['rest', 'all', 'none'\\]"),
        ({"topk": 0.0}, "`topk` must be a number in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, message):
    from diffusers_sla.ops.autograd import sla_triton

    q = torch.randn(1, 1, 64, 16)
    args = dict(topk=0.5, blkq=32, blkk=32, feature_map="softmax", linear_scope="rest") | kwargs
    with pytest.raises(ValueError, match=message):
        sla_triton(q, q, q, torch.eye(16), torch.zeros(16), **args)


def test_fp32_compute_knob_rejects_unknown_modes():
    from diffusers_sla.ops.autograd import get_fp32_compute, set_fp32_compute

    with pytest.raises(ValueError, match="`mode` must be one of \\['bf16', 'tf32', 'ieee'\\]"):
        set_fp32_compute("fp8")
    assert get_fp32_compute() in ("bf16", "tf32", "ieee")


# ----- on the GPU ---------------------------------------------------------------------------------------------------


def _gpu_case_runner():
    namespace: dict = {}
    exec(CASE_CODE, namespace)
    return namespace["run_case"]


GPU_CASES = {
    **INTERPRETER_CASES,
    "wan_like_bf16_rest": (1, 2, 2000, 2000, 128, 128, 64, 0.1, "softmax", "rest", "bfloat16", 1),
    "d96_bf16_all": (2, 2, 700, 900, 96, 64, 128, 0.2, "elu", "all", "bfloat16", 0),
    "d64_bf16_relu_rest": (1, 3, 513, 400, 64, 64, 32, 0.3, "relu", "rest", "bfloat16", 0),
}


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_matches_reference(name):
    args = GPU_CASES[name]
    result = _gpu_case_runner()(*args, device="cuda")
    tol = max(TOLERANCE[args[10]], 1e-3)  # float32 inputs run in bf16 by default on the GPU
    if args[10] == "float32":
        tol = TOLERANCE["bfloat16"]
    for grad_name, err in zip(GRAD_NAMES, result["errors"]):
        assert err <= tol, f"{grad_name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.gpu
@require_cuda
@require_golden
@pytest.mark.parametrize("case", sorted(golden_cases()) or ["<no golden files>"])
def test_gpu_matches_golden(case):
    from safetensors.torch import load_file

    from diffusers_sla.ops.autograd import sla_triton

    config = golden_cases()[case]
    t = {key: val.cuda() for key, val in load_file(GOLDEN_DIR / f"{case}.safetensors").items()}
    ins = [t[n].clone().requires_grad_(True) for n in ("q", "k", "v", "proj_l.weight", "proj_l.bias")]
    scope = {"main": "all", "sla1": "rest"}[config["variant"]]
    out = sla_triton(*ins, topk=config["topk"], blkq=config["blkq"], blkk=config["blkk"],
                     feature_map=config["feature_map"], linear_scope=scope)
    out.backward(t["do"])
    assert torch.isfinite(out).all()
    assert rel_err(out, t["o"]) <= 2e-2
    with torch.no_grad():  # the inference path: the forward kernel stores nothing for a backward
        out_no_grad = sla_triton(*(x.detach() for x in ins), topk=config["topk"], blkq=config["blkq"],
                                 blkk=config["blkk"], feature_map=config["feature_map"], linear_scope=scope)
    assert rel_err(out_no_grad, t["o"]) <= 2e-2
    for name, x in zip(("dq", "dk", "dv", "d_proj_l.weight", "d_proj_l.bias"), ins):
        assert rel_err(x.grad, t[name]) <= 2e-2, name


@pytest.mark.gpu
@require_cuda
@require_golden
@pytest.mark.parametrize("case", sorted(golden_cases()) or ["<no golden files>"])
def test_gpu_scope_none_matches_the_sparse_part_of_golden(case):
    """The kernels under `linear_scope="none"` on the golden inputs against the golden outputs less their linear
    part (computed by the float64 operator, as `test_reference.test_scope_none_matches_the_sparse_part_of_golden`)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from diffusers_sla.ops.autograd import sla_triton
    from diffusers_sla.ops.reference import linear_attention_reference

    config = golden_cases()[case]
    blkq, blkk, topk, fm = config["blkq"], config["blkk"], config["topk"], config["feature_map"]
    scope = {"main": "all", "sla1": "rest"}[config["variant"]]
    t = {key: val.cuda() for key, val in load_file(GOLDEN_DIR / f"{case}.safetensors").items()}
    q64, k64, v64 = (t[name].double().requires_grad_(True) for name in "qkv")
    lut = select_blocks(t["q"], t["k"], topk, blkq, blkk)
    linear = F.linear(linear_attention_reference(q64, k64, v64, lut, blkq, blkk, fm, scope),
                      t["proj_l.weight"].double(), t["proj_l.bias"].double())
    linear_grads = torch.autograd.grad(linear, (q64, k64, v64), t["do"].double())
    ins = [t[n].clone().requires_grad_(True) for n in ("q", "k", "v", "proj_l.weight", "proj_l.bias")]
    out = sla_triton(*ins, topk=topk, blkq=blkq, blkk=blkk, feature_map=fm, linear_scope="none")
    out.backward(t["do"])
    assert rel_err(out, t["o"].double() - linear.detach()) <= 2e-2
    for name, x, linear_grad in zip(("dq", "dk", "dv"), ins, linear_grads):
        assert rel_err(x.grad, t[name].double() - linear_grad) <= 2e-2, name
    assert ins[3].grad is None and ins[4].grad is None


@pytest.mark.gpu
@require_cuda
def test_gpu_operator_replays_in_a_cuda_graph():
    """Below ~16K tokens the operator is host-bound (Python glue and launches); a CUDA graph removes that cost. Capture
    needs every step on the device with no host synchronisation and no allocation that outlives the capture: replays
    on new inputs must equal eager calls."""
    from diffusers_sla.ops.autograd import sla_triton
    from diffusers_sla.utils.cuda_graph import capture_cuda_graph

    torch.manual_seed(0)
    B, H, L, D = 1, 4, 1500, 128
    static = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    w, b = torch.randn(D, D, device="cuda") * 0.05, torch.randn(D, device="cuda") * 0.1
    call = lambda q, k, v: sla_triton(q, k, v, w, b, topk=0.2, blkq=128, blkk=64, feature_map="softmax",
                                      linear_scope="rest")
    with torch.no_grad():
        graph, out = capture_cuda_graph(lambda: call(*static))
        for seed in (1, 2):
            torch.manual_seed(seed)
            fresh = [torch.randn_like(x) for x in static]
            for x, y in zip(static, fresh):
                x.copy_(y)
            graph.replay()
            expected = call(*fresh)
            assert torch.equal(out, expected), f"replay {seed} differs from the eager call"


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("scope", ["rest", "all"])
def test_fast_launches_match_plain_launches(monkeypatch, scope):
    """`ops/launch.py` on the GPU: after the first call, the forward's launches skip `kernel[grid]`, and the outputs
    (block map, o, lse and the side outputs) are bit-identical to those of plain launches."""
    from diffusers_sla.ops import custom_ops, gluon_fwd, launch

    torch.manual_seed(0)
    B, H, L, D = 1, 3, 1500, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.randn(D, D, device="cuda") * 0.05, torch.randn(D, device="cuda") * 0.1

    def forward():
        lut = custom_ops.select_blocks_fused(q, k, 0.2, 128, 64)
        return (lut, *custom_ops.forward(q, k, v, w, b, lut, D**-0.5, "softmax", scope, 128, 64, True, "tf32"))

    monkeypatch.setattr(launch, "ENABLED", False)
    plain = forward()
    monkeypatch.setattr(launch, "ENABLED", True)
    launchers = [custom_ops._block_mean, custom_ops._top_blocks_kernel, custom_ops._linear_state]
    if gluon_fwd.GLUON_AVAILABLE:
        launchers.append(gluon_fwd._attn_fwd_hopper_launcher)
    before = [x.fast_calls for x in launchers]
    forward()
    fast = forward()
    assert all(x.fast_calls > n for x, n in zip(launchers, before)), "a launch did not take the shortcut"
    for i, (ours, ref) in enumerate(zip(fast, plain)):
        assert torch.equal(ours, ref), f"output {i} differs"
