# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The fusions "mass" and "ratio" on the Triton backend (`ops/autograd.py`: the row's gate first, then the attention
kernels mix the branches in their epilogue) against the PyTorch operator, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from diffusers_sla import sparse_linear_attention
from diffusers_sla.ops import autograd
from diffusers_sla.ops import fusion as fusion_ops
from diffusers_sla.ops.autograd import sla_triton_with_lut
from diffusers_sla.ops.reference import sla_reference
from diffusers_sla.ops.selection import select_blocks

from testing_utils import rel_err, require_cuda


def fused_case(fusion, device, dtype, Lq=96, Lk=80, D=16, blk=32, topk=0.4):
    """The Triton path against the PyTorch operator on one block map: {name: [rel err, |reference|]}, with None for
    a gradient both sides leave out ("mass" has no gate)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, L, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
    weight = (torch.randn(D, D, generator=g) / D**0.5).to(device)
    bias = (torch.randn(D, generator=g) * 0.1).to(device)
    u, c = (torch.randn(D, generator=g) * 0.3).to(device), torch.tensor([0.5], device=device)
    lut = select_blocks(q, k, topk, blk, blk)
    kw = dict(blkq=blk, blkk=blk, feature_map="softmax", linear_scope="rest", fusion=fusion)
    do = torch.linspace(-1, 1, q.numel(), device=device).view_as(q)
    results = []
    for run in ("triton", "torch"):
        leaves = [(x if run == "triton" else x.float()).detach().clone().requires_grad_()
                  for x in (q, k, v, weight, bias, u, c)]
        if run == "triton":
            out = sla_triton_with_lut(*leaves[:5], lut, ratio_weight=leaves[5], ratio_bias=leaves[6], **kw)
        else:
            out = sla_reference(*leaves[:5], topk=topk, lut=lut, ratio_weight=leaves[5], ratio_bias=leaves[6], **kw)
        out.backward(do.to(out.dtype))
        results.append([out.detach().float()] + [None if x.grad is None else x.grad.float() for x in leaves])
    errors = {}
    for name, a, b in zip(("o", "q", "k", "v", "proj_weight", "proj_bias", "u", "c"), *results):
        errors[name] = (None if a is None else "given") if b is None else [
            float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm()), float(b.abs().sum())]
    return errors


def _check_case(errors: dict, fusion: str, tol: float, zero=()) -> None:
    """Each output within `tol` of the reference, which must be nonzero except for the names in `zero`, which both
    sides must give as exactly zero."""
    for name, value in errors.items():
        if fusion == "mass" and name in ("u", "c"):
            assert value is None, name  # no gate: no gradient on either side
            continue
        err, magnitude = value
        if name in zero:
            assert magnitude == 0 and err == 0, f"{fusion} {name}: {value}"
            continue
        assert magnitude > 0, name
        assert err <= tol, f"{fusion} {name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_triton_fusion_matches_the_torch_operator(fusion, device):
    """Forward and every gradient (q, k, v, proj_l, the gate) against the PyTorch operator, float32 (ieee products
    under the interpreter; bf16 by default on the GPU). "mass" checks the kernels' d ln Z_sel path (delta - d gate)."""
    _check_case(fused_case(fusion, device, torch.float32), fusion, 1e-4 if device == "cpu" else 2e-2)


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_triton_fusion_with_nothing_left(fusion, device):
    """Every key block selected (short key sequences, cross-attention): the linear branch is empty, so "mass" is
    the sparse part alone and "ratio" mixes it with proj_l's bias; the kernels keep an empty linear branch for that."""
    errors = fused_case(fusion, device, torch.float32, Lk=50, topk=1.0)
    # o_l = 0: proj_l's weight gets no gradient; with "mass" (w = 1) neither does its bias
    zero = ("proj_weight", "proj_bias") if fusion == "mass" else ("proj_weight",)
    _check_case(errors, fusion, 1e-4 if device == "cpu" else 2e-2, zero=zero)


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_triton_fusion_float16(fusion, device):
    """float16 inputs run the kernels in float16 (the interpreter too): bf16-noise agreement with float32."""
    _check_case(fused_case(fusion, device, torch.float16, D=32, blk=16, topk=0.3), fusion, 1e-2)


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("fusion", ["mass", "ratio"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fusion_matches_the_torch_operator(fusion, dtype):
    errors = fused_case(fusion, "cuda", dtype, Lq=1000, Lk=777, D=128, blk=64, topk=0.2)
    _check_case(errors, fusion, 2e-2)


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
@pytest.mark.parametrize("forced", [None, (0, 20)])
def test_public_triton_backend_runs_the_requested_fusion(fusion, forced, device):
    """`sparse_linear_attention(..., fusion=f, backend="triton")` equals the torch operator's fusion, with and without
    protected key blocks, and differs from SLA's sum (so a path that ignored `fusion` would fail)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g).to(device) for _ in range(3))
    w, b = (torch.randn(16, 16, generator=g) / 4).to(device), (torch.randn(16, generator=g) * 0.1).to(device)
    u, c = (torch.randn(16, generator=g) * 0.3).to(device), torch.tensor([0.5], device=device)
    gate = dict(ratio_weight=u, ratio_bias=c) if fusion == "ratio" else {}
    out = {be: sparse_linear_attention(q, k, v, w, b, topk=0.4, blkq=32, blkk=32, fusion=fusion, forced_keys=forced,
                                       backend=be, **gate) for be in ("triton", "torch")}
    sla = sparse_linear_attention(q, k, v, w, b, topk=0.4, blkq=32, blkk=32, forced_keys=forced, backend="torch")
    assert rel_err(out["triton"], out["torch"]) <= (1e-4 if device == "cpu" else 2e-2)
    assert rel_err(sla, out["torch"]) > 1e-2, "the fusion equals SLA's sum"


def test_default_fusion_runs_the_sla_kernels(device, monkeypatch):
    """fusion "sla" never takes the fused path (`autograd._fused`), so its kernels get no gate."""
    def refuse(*args, **kwargs):
        raise AssertionError("fusion 'sla' took the fused path")

    monkeypatch.setattr(autograd, "_fused", refuse)
    x = torch.randn(1, 1, 64, 16, device=device)
    out = sparse_linear_attention(x, x, x, torch.eye(16, device=device), torch.zeros(16, device=device), topk=0.5,
                                  blkq=32, blkk=32, backend="triton")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_fusion_compiles_to_one_graph(fusion, device):
    """torch.compile(fullgraph=True) through the fused path: the rest-mass kernels and the attention kernels are
    opaque ops (no graph break), with eager's output and gradients; opcheck of the rest-mass ops' fakes."""
    from diffusers_sla.ops import rest_mass

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g).to(device) for _ in range(3))
    w, b = (torch.randn(16, 16, generator=g) / 4).to(device), (torch.randn(16, generator=g) * 0.1).to(device)
    u, c = (torch.randn(16, generator=g) * 0.3).to(device), torch.tensor([0.5], device=device)
    gate = dict(ratio_weight=u, ratio_bias=c) if fusion == "ratio" else {}

    def layer(q, k, v, w, b):
        return autograd.sla_triton(q, k, v, w, b, topk=0.4, blkq=32, blkk=32, feature_map="softmax",
                                   linear_scope="rest", fusion=fusion, **gate)

    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append([out] + [x.grad for x in leaves])
    for name, a, e in zip(("o", "q", "k", "v", "w", "b"), *results):
        assert rel_err(a, e) <= 1e-5, f"{name}: {rel_err(a, e):.2e}"
    if fusion == "mass":
        mean, var, log_count = fusion_ops.key_block_moments(k, 32)
        rest = fusion_ops.rest_blocks(select_blocks(q, k, 0.4, 32, 32), mean.shape[2])
        args = (q, mean, var, log_count, rest, 0.25, 32, 32, "ieee")
        torch.library.opcheck(torch.ops.diffusers_sla.rest_mass_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        log_rest = rest_mass.forward(*args)
        bwd_args = (torch.randn_like(log_rest), q, mean, var, log_count, rest, log_rest, *args[5:], True, True)
        torch.library.opcheck(torch.ops.diffusers_sla.rest_mass_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_gpu_fusion_under_torch_compile(fusion):
    """torch.compile of a fused layer (what `transformer.compile()` does) gives eager's output and gradients."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 2, 1000, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.randn(64, 64, generator=g, device="cuda") / 8, torch.randn(64, generator=g, device="cuda") * 0.1
    gate = dict(ratio_weight=torch.randn(64, generator=g, device="cuda") / 8, ratio_bias=torch.ones(1, device="cuda"))

    def layer(q, k, v, w, b):
        return sparse_linear_attention(q, k, v, w, b, topk=0.2, blkq=64, blkk=64, fusion=fusion,
                                       **(gate if fusion == "ratio" else {}))

    results = []
    for fn in (layer, torch.compile(layer)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        results.append([out.float()] + [x.grad.float() for x in leaves])
    for name, a, e in zip(("o", "q", "k", "v", "w", "b"), *results):
        assert rel_err(a, e) <= 1e-2, f"{name}: {rel_err(a, e):.2e}"
