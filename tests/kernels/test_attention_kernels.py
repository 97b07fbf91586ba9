# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Triton SLA backend (`ops/forward.py`, `ops/backward.py`, `ops/custom_ops.py`, `ops/autograd.py` on the kernels
of `ops/kernels/`) against the PyTorch operator, forward and backward.

On the CPU the real kernels run under the Triton interpreter (float32 and float16, small sizes); on a CUDA machine the
same cases, plus bf16 ones and the golden files, run on the GPU (`conftest.py` says where this folder runs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_sla.ops import autograd, custom_ops, linear_state, tuning
from diffusers_sla.ops.autograd import sla_triton, sla_triton_with_lut
from diffusers_sla.ops.reference import linear_attention_reference, sla_reference
from diffusers_sla.ops.selection import select_blocks

from testing_utils import GOLDEN_DIR, golden_cases, rel_err, require_cuda, require_golden

# "o_no_grad": the inference path (no autograd), where the forward kernel stores nothing for a backward
GRAD_NAMES = ("o", "dq", "dk", "dv", "dW", "db", "o_no_grad")

# B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, linear_scope, dtype, strided[, scale in units of D**-0.5]
CASES = {
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
# bf16 and the Wan head size: on the GPU only (the interpreter's bf16 products are wrong)
GPU_CASES = {
    "wan_like_bf16_rest": (1, 2, 2000, 2000, 128, 128, 64, 0.1, "softmax", "rest", "bfloat16", 1),
    "d96_bf16_all": (2, 2, 700, 900, 96, 64, 128, 0.2, "elu", "all", "bfloat16", 0),
    "d64_bf16_relu_rest": (1, 3, 513, 400, 64, 64, 32, 0.3, "relu", "rest", "bfloat16", 0),
}
# Query tiles smaller than a query block (a block split over several programs, or several dK/dV steps): the same
# checks with other `tuning` row counts.
TILE_CASES = {
    "split_query_tiles_softmax_rest_fp32": (
        (1, 2, 100, 130, 32, 64, 32, 0.4, "softmax", "rest", "float32", 0),
        {"FWD_ROWS": 16, "DKDV_ROWS": 32, "DQ_ROWS": 16}),
    "split_query_tiles_elu_all_fp16": (
        (1, 1, 200, 96, 32, 128, 32, 0.5, "elu", "all", "float16", 0),
        {"FWD_ROWS": 64, "DKDV_ROWS": 16, "DQ_ROWS": 32}),
}
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}


def run_case(B, H, Lq, Lk, D, blkq, blkk, topk, feature_map, linear_scope, dtype, strided, scale_units=0.8,
             device="cpu", seed=0):
    """One case, forward + backward, errors against the float64 operator on the same block map. A gradient that is
    exactly zero in the reference must be exactly zero here, and one the reference does not give (None: proj_l under
    scope "none") must not be given here either."""
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
    assert list(o.shape) == [B, H, Lq, D] and o.dtype == dtype
    assert o.stride() == q.stride()
    return errors


def _check(args, device):
    errors = run_case(*args, device=device)
    tol = TOLERANCE[args[10]]
    if device == "cuda":  # float32 inputs run in bf16 by default on the GPU
        tol = TOLERANCE["bfloat16"] if args[10] == "float32" else max(tol, 1e-3)
    for grad_name, err in zip(GRAD_NAMES, errors):
        assert err <= tol, f"{grad_name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_reference(name, device):
    _check(CASES[name], device)


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_bf16_matches_reference(name, device):
    _check(GPU_CASES[name], device)


@pytest.mark.parametrize("name", sorted(TILE_CASES))
def test_split_query_tiles_match_reference(name, device, monkeypatch):
    args, rows = TILE_CASES[name]
    for constant, value in rows.items():
        monkeypatch.setattr(tuning, constant, value)
    _check(args, device)


def test_bad_query_tile_names_the_constant(monkeypatch, device):
    monkeypatch.setattr(tuning, "FWD_ROWS", 24)
    q = torch.randn(1, 1, 64, 16, device=device)
    with pytest.raises(ValueError, match="tuning.FWD_ROWS=24: must divide blkq=32 and be at least 16"):
        sla_triton(q, q, q, torch.eye(16, device=device), torch.zeros(16, device=device), topk=0.5, blkq=32,
                   blkk=32, feature_map="softmax", linear_scope="rest")


@pytest.mark.parametrize("scope", ["rest", "none"])
def test_torch_compile_fullgraph_and_fake_impls(scope, device):
    """torch.compile(fullgraph=True) through the custom ops (no graph break), same values as eager, and opcheck of
    both ops' schemas and fake implementations, for scope "rest" and for "none" (no proj_l gradient)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 32, device=device) for _ in range(3))
    w, b = torch.randn(32, 32, device=device) / 32**0.5, torch.randn(32, device=device)
    do = torch.randn(1, 2, 96, 32, device=device)
    lut = select_blocks(q, k, 0.5, 32, 32)
    empty = q.new_empty(0)
    # "none": the ops get empty stand-ins for proj_l (what `autograd._run` passes) and return empty dW, db
    pw, pb = (w, b) if scope == "rest" else (empty, empty)
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
        assert ((a - e).norm() / e.norm()).item() < 1e-5
    assert (grads[0][4] is None) == (scope == "none")
    args = (q, k, v, pw, pb, lut, 32**-0.5, "elu", scope, 32, 32, True, "ieee")
    torch.library.opcheck(torch.ops.diffusers_sla.sla_fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    saved = torch.ops.diffusers_sla.sla_fwd(*args)
    bwd_args = (do, q, k, v, pw, pb, *saved, lut, 32**-0.5, "elu", scope, 32, 32, "ieee")
    torch.library.opcheck(torch.ops.diffusers_sla.sla_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    dw, db, dgate = torch.ops.diffusers_sla.sla_bwd(*bwd_args)[3:]
    assert (dw.shape, db.shape) == (((32, 32), (32,)) if scope == "rest" else ((0,), (0,)))
    assert dgate.shape == (0,)
    if scope == "rest":  # a fusion's mix: the gate is one more input, d gate one more output
        gate = torch.randn(q.shape[:3], dtype=torch.float32, device=q.device)
        torch.library.opcheck(torch.ops.diffusers_sla.sla_fwd.default, (*args, gate, True),
                              test_utils=("test_schema", "test_faketensor"))
        saved = torch.ops.diffusers_sla.sla_fwd(*args, gate, True)
        bwd_args = (do, q, k, v, pw, pb, *saved, lut, 32**-0.5, "elu", scope, 32, 32, "ieee", gate, True)
        torch.library.opcheck(torch.ops.diffusers_sla.sla_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        assert torch.ops.diffusers_sla.sla_bwd(*bwd_args)[5].shape == gate.shape


def test_selection_beside_the_linear_state_changes_nothing(device, monkeypatch):
    """`custom_ops.select_and_forward` (the eager `sla_triton` path: the block selection queued beside the linear
    state, on a second stream on the GPU) gives the block map, the output and every side output bit for bit as
    `select_blocks_fused` then `forward`, with the overlap on and off; `sla_triton`'s output and gradients equal
    `sla_triton_with_lut`'s on the same map."""
    g = torch.Generator().manual_seed(0)
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
                monkeypatch.setattr(tuning, "OVERLAP", overlap)
                lut2, outs = custom_ops.select_and_forward(q, k, q, k, v, w, b, topk, *args)
                for i, (ours, ref) in enumerate(zip((lut2, *outs), apart)):
                    assert torch.equal(ours, ref), (Lq, scope, overlap, i)
            monkeypatch.setattr(tuning, "OVERLAP", True)
            # the autograd glue: `sla_triton` (selecting inside the Function) against the map passed in
            kw = dict(blkq=blkq, blkk=blkk, feature_map="softmax", linear_scope=scope)
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
            leaves_lut = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
            out = sla_triton(*leaves, topk=topk, **kw)
            out_lut = sla_triton_with_lut(*leaves_lut, lut, **kw)
            assert torch.equal(out, out_lut), (Lq, scope)
            grad = torch.randn(out.shape, generator=g).to(device, dtype)
            out.backward(grad)
            out_lut.backward(grad)
            for i, (x, y) in enumerate(zip(leaves, leaves_lut)):
                assert torch.equal(x.grad, y.grad), (Lq, scope, "grad", i)


def test_scope_none_is_rest_with_zero_projection_and_runs_no_linear_pass(device, monkeypatch):
    """`linear_scope="none"` on the Triton kernels: the output of scope "rest" with proj_l at exact zero, bit for bit
    (selection beside the forward or apart), dq/dk/dv of the sparse branch, no gradient for proj_l, no linear-state
    pass and no linear side outputs; the ops return empty dW and db."""
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32, torch.float16)
    precision = "ieee" if device == "cpu" else "tf32"

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
        with monkeypatch.context() as patch:
            patch.setattr(linear_state, "linear_totals", no_linear_state)
            for overlap in (True, False):  # the eager selection beside the (absent) linear state, and apart
                patch.setattr(tuning, "OVERLAP", overlap)
                leaves = [x.clone().requires_grad_(True) for x in (q, k, v, zero_w, zero_b)]
                none = autograd.sla_triton(*leaves, linear_scope="none", **kw)
                # "none" is "rest" with proj_l at exact zero: the same output, bit for bit
                assert torch.equal(none, rest), (dtype, overlap, (none.float() - rest.float()).abs().max())
                none.backward(do)
                assert leaves[3].grad is None and leaves[4].grad is None, "proj_l got a gradient"
                for x, y in zip(leaves[:3], rest_leaves[:3]):  # dq, dk, dv: the sparse branch's alone
                    assert rel_err(x.grad, y.grad) < 1e-3, dtype
            patch.setattr(tuning, "OVERLAP", True)
            # no projection at all (what `sparse_linear_attention` passes for "none" without one), and the ops'
            # own outputs: no linear side outputs, empty dW and db
            with torch.no_grad():
                assert torch.equal(autograd.sla_triton(q, k, v, None, None, linear_scope="none", **kw), rest)
            lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
            empty = q.new_empty(0, dtype=torch.float32)
            args = (q.new_empty(0, dtype=torch.float32), empty, lut, D**-0.5, "softmax", "none", blkq, blkk)
            outs = custom_ops.forward(q, k, v, *args, True, precision)
            assert all(x.numel() == 0 for x in outs[2:]), [tuple(x.shape) for x in outs]
            grads = custom_ops.backward(do, q, k, v, *args[:2], *outs, *args[2:], precision)
            assert grads[3].numel() == 0 and grads[4].numel() == 0


# ----- on the GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@require_cuda
@require_golden
@pytest.mark.parametrize("case", sorted(golden_cases()) or ["<no golden files>"])
def test_gpu_matches_golden(case):
    from safetensors.torch import load_file

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
    from safetensors.torch import load_file

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
    from diffusers_sla.utils.cuda_graph import capture_cuda_graph

    torch.manual_seed(0)
    B, H, L, D = 1, 4, 1500, 128
    static = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    w, b = torch.randn(D, D, device="cuda") * 0.05, torch.randn(D, device="cuda") * 0.1

    def call(q, k, v):
        return sla_triton(q, k, v, w, b, topk=0.2, blkq=128, blkk=64, feature_map="softmax", linear_scope="rest")

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
    from diffusers_sla.ops import fused_selection
    from diffusers_sla.ops.kernels import gluon_fwd

    torch.manual_seed(0)
    B, H, L, D = 1, 3, 1500, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.randn(D, D, device="cuda") * 0.05, torch.randn(D, device="cuda") * 0.1

    def forward():
        lut = custom_ops.select_blocks_fused(q, k, 0.2, 128, 64)
        return (lut, *custom_ops.forward(q, k, v, w, b, lut, D**-0.5, "softmax", scope, 128, 64, True, "tf32"))

    monkeypatch.setattr(tuning, "FAST_LAUNCH", False)
    plain = forward()
    monkeypatch.setattr(tuning, "FAST_LAUNCH", True)
    launchers = [fused_selection.BLOCK_MEAN, fused_selection.TOP_BLOCKS, linear_state.LINEAR_STATE]
    if gluon_fwd.GLUON_AVAILABLE:
        launchers.append(gluon_fwd.LAUNCHER)
    before = [x.fast_calls for x in launchers]
    forward()
    fast = forward()
    assert all(x.fast_calls > n for x, n in zip(launchers, before)), "a launch did not take the shortcut"
    for i, (ours, ref) in enumerate(zip(fast, plain)):
        assert torch.equal(ours, ref), f"output {i} differs"
