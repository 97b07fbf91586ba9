# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Fusion "mass"'s rest-mass kernels (`ops/rest_mass.py` on `ops/kernels/rest_mass.py`) against the PyTorch path of
`fusion.rest_log_mass` in float64: the value, the gradients to q and the key blocks' moments, and through them to k;
then the "mass" operator on the Triton backend with the kernels in place."""

from __future__ import annotations

import pytest
import torch
from testing_utils import rel_err, require_cuda

from diffusers_sla.ops import fusion, rest_mass
from diffusers_sla.ops.autograd import sla_triton_with_lut
from diffusers_sla.ops.branches import pad_to_blocks
from diffusers_sla.ops.reference import sla_reference
from diffusers_sla.ops.selection import num_blocks, select_blocks


def _inputs(device, dtype, B, H, Lq, Lk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset and unequal scales per dimension: moments and terms far from zero and from each other
    q = torch.randn(B, H, Lq, D, generator=g) * 1.5 + 0.3
    k = torch.randn(B, H, Lk, D, generator=g) * torch.linspace(0.5, 2.0, D) - 0.2
    return q.to(device, dtype), k.to(device, dtype)


def _log_rest_and_grads(q, k, lut, blkq, blkk, use_kernels, **kw):
    """log_rest and the gradients to q and k of sum(w * log_rest), w a fixed non-uniform weight (non-zero on _NO_MASS
    rows too: their gradient must still come out zero), and on the kernels the moments' gradients."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    moments = (None, None)
    if use_kernels:
        mean, var, log_count = fusion.key_block_moments(k, blkk)
        mean.retain_grad(), var.retain_grad()
        rest = fusion.rest_blocks(lut, mean.shape[2])
        out = rest_mass.rest_log_mass(q, mean, var, log_count, rest, q.shape[-1] ** -0.5, blkq, **kw)
        moments = (mean, var)
    else:
        out = fusion.rest_log_mass(q, k, lut, blkq, blkk, q.shape[-1] ** -0.5, use_kernels=False)
    weight = torch.linspace(-1.0, 2.0, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, tuple(None if x is None else x.grad for x in moments)


@pytest.mark.parametrize("B, H, Lq, Lk, D, blkq, blkk, topk, dtype, block_n", [
    (1, 2, 150, 130, 32, 32, 32, 0.4, torch.float32, 16),  # ragged both sides, several chunks
    (2, 1, 200, 190, 16, 64, 32, 0.25, torch.float32, 16),  # query tiles of 64 rows, some chunks all selected
    (1, 3, 100, 200, 24, 32, 64, 0.5, torch.float16, 64),  # head dim not a power of two, float16 q and k
    (2, 2, 130, 97, 16, 64, 64, 0.6, torch.float32, 64),  # one chunk holding every key block
])
def test_log_rest_and_gradients_match_pytorch_in_float64(device, B, H, Lq, Lk, D, blkq, blkk, topk, dtype, block_n):
    q, k = _inputs(device, dtype, B, H, Lq, Lk, D)
    lut = select_blocks(q, k, topk, blkq, blkk)
    out, dq, dk, _ = _log_rest_and_grads(q, k, lut, blkq, blkk, True, block_n=block_n)
    ref, dq_ref, dk_ref, _ = _log_rest_and_grads(q.double(), k.double(), lut, blkq, blkk, False)
    assert out.dtype == torch.float32 and out.shape == (B, H, Lq) and torch.isfinite(out).all()
    assert (ref > -1e29).all() and ref.std() > 0.1  # every row has rest blocks here, and not all the same mass
    assert rel_err(out, ref) < 1e-6
    tol = 2e-3 if dtype == torch.float16 else 1e-5  # float16 gradients are rounded to float16 at the end
    assert dq.dtype == dk.dtype == dtype and rel_err(dq, dq_ref) < tol and rel_err(dk, dk_ref) < tol


@pytest.mark.gpu
@require_cuda
@pytest.mark.parametrize("dot_precision, tol", [("tf32x3", 1e-5), ("tf32", 3e-2)])
def test_gpu_products_match_pytorch_in_float64(dot_precision, tol):
    """On the GPU the products run on the tensor cores: tf32x3 (the default) stays at float32 accuracy; plain tf32
    (a faster choice the benchmark measures) within its 10-bit mantissa. The Wan layer's head dim and blocks."""
    B, H, Lq, Lk, D, blkq, blkk = 1, 2, 1000, 1500, 128, 128, 64
    q, k = _inputs("cuda", torch.float32, B, H, Lq, Lk, D, seed=4)
    lut = select_blocks(q, k, 0.1, blkq, blkk)
    out, dq, dk, _ = _log_rest_and_grads(q, k, lut, blkq, blkk, True, dot_precision=dot_precision)
    ref, dq_ref, dk_ref, _ = _log_rest_and_grads(q.double(), k.double(), lut, blkq, blkk, False)
    assert rel_err(out, ref) < tol / 10
    assert rel_err(dq, dq_ref) < tol and rel_err(dk, dk_ref) < tol


def test_moment_gradients_match_autograd_of_the_pytorch_terms(device):
    """dmean, dvar straight from the kernels (several splits and chunks) against autograd through the PyTorch
    path's own formula, float64, on the same moments; q a (B, L, H, D) layout seen as (B, H, L, D) (strided)."""
    B, H, Lq, Lk, D, blkq, blkk = 1, 2, 180, 150, 32, 32, 32
    q, k = _inputs(device, torch.float32, B, H, Lq, Lk, D, seed=1)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    lut = select_blocks(q, k, 0.3, blkq, blkk)
    mean, var, log_count = fusion.key_block_moments(k, blkk)
    rest = fusion.rest_blocks(lut, mean.shape[2])
    scale = D**-0.5
    grads = []
    for run in ("kernel", "torch"):
        leaves = [x.detach().to(torch.float32 if run == "kernel" else torch.float64).requires_grad_()
                  for x in (q, mean, var)]
        if run == "kernel":
            assert not leaves[0].is_contiguous()
            out = rest_mass.rest_log_mass(*leaves, log_count, rest, scale, blkq, block_n=16)
        else:
            q_blocks = pad_to_blocks(leaves[0], blkq)
            out = fusion._rest_log_mass_chunk(q_blocks, leaves[1], leaves[2], log_count.double(), rest, scale)
            out = out.reshape(B, H, -1)[:, :, :Lq]
        weight = torch.cos(torch.arange(out.numel(), device=out.device, dtype=out.dtype)).view_as(out)
        (out * weight).sum().backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(("q", "mean", "var"), *grads):
        assert b.abs().sum() > 0, name
        assert rel_err(a, b) < 1e-5, name


def test_query_blocks_with_nothing_left_give_no_mass_and_zero_gradients(device):
    """topk 1.0 (every key block selected): every row is _NO_MASS exactly, as on the PyTorch path, and every gradient
    is finite and zero. Then mixed rows: one query block selects every key block, another (with repeated LUT entries)
    leaves two; the first's rows stay _NO_MASS with zero dq while the second's match PyTorch."""
    B, H, Lq, Lk, D, blk = 1, 2, 100, 120, 16, 32
    q, k = _inputs(device, torch.float32, B, H, Lq, Lk, D, seed=2)
    lut = select_blocks(q, k, 1.0, blk, blk)
    out, dq, dk, (dmean, dvar) = _log_rest_and_grads(q, k, lut, blk, blk, True, block_n=16)
    ref = fusion.rest_log_mass(q, k, lut, blk, blk, D**-0.5, use_kernels=False)
    assert torch.equal(out, ref) and (out == fusion._NO_MASS).all()
    for grad in (dq, dk, dmean, dvar):
        assert torch.isfinite(grad).all() and not grad.any()
    # mixed: 4 query blocks, 4 key blocks; blocks 0 and 2 select all, 1 and 3 keep only 0 and 1 (rest = {2, 3})
    n_q, n_k = num_blocks(Lq, blk), num_blocks(Lk, blk)
    rows = [list(range(n_k)), [0, 0, 1, 1]] * (n_q // 2)
    lut = torch.tensor(rows, dtype=torch.int32, device=device).expand(B, H, n_q, n_k).contiguous()
    out, dq, dk, _ = _log_rest_and_grads(q, k, lut, blk, blk, True, block_n=16)
    ref, dq_ref, dk_ref, _ = _log_rest_and_grads(q.double(), k.double(), lut, blk, blk, False)
    none_left = (torch.arange(Lq, device=device) // blk) % 2 == 0
    assert (out[:, :, none_left] == fusion._NO_MASS).all() and (out[:, :, ~none_left] > -1e29).all()
    assert not dq[:, :, none_left].any() and dq[:, :, ~none_left].abs().sum() > 0
    assert rel_err(out[:, :, ~none_left], ref[:, :, ~none_left]) < 1e-6
    assert rel_err(dq, dq_ref) < 1e-5 and rel_err(dk, dk_ref) < 1e-5


def test_rest_log_mass_dispatches_to_the_kernels_here(device, monkeypatch):
    """Where the kernels run (this folder's sessions), `fusion.rest_log_mass` takes them for float32 and float16, and
    keeps float64 on the PyTorch path."""
    calls = []
    launch = rest_mass.run_forward
    monkeypatch.setattr(rest_mass, "run_forward", lambda *a, **kw: calls.append(a[0].dtype) or launch(*a, **kw))
    q, k = _inputs(device, torch.float32, 1, 1, 64, 64, 16)
    lut = select_blocks(q, k, 0.5, 32, 32)
    for dtype in (torch.float32, torch.float16, torch.float64):
        out = fusion.rest_log_mass(q.to(dtype), k.to(dtype), lut, 32, 32, 0.25)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert calls == [torch.float32, torch.float16]


def test_bad_arguments_are_named(device):
    q, k = _inputs(device, torch.float32, 1, 1, 64, 64, 16)
    mean, var, log_count = fusion.key_block_moments(k, 32)
    rest = fusion.rest_blocks(select_blocks(q, k, 0.5, 32, 32), 2)
    with pytest.raises(ValueError, match="`blkq` must be a multiple of 16"):
        rest_mass.rest_log_mass(q, mean, var, log_count, rest, 0.25, 8)
    with pytest.raises(ValueError, match="`rest` must be bool"):
        rest_mass.rest_log_mass(q, mean, var, log_count, rest.float(), 0.25, 32)
    with pytest.raises(ValueError, match="`mean` must be float32"):
        rest_mass.rest_log_mass(q, mean.double(), var, log_count, rest, 0.25, 32)
    with pytest.raises(ValueError, match="`block_n` must be a power of two"):
        rest_mass.rest_log_mass(q, mean, var, log_count, rest, 0.25, 32, block_n=24)
    with pytest.raises(ValueError, match="`dot_precision` must be one of"):
        rest_mass.rest_log_mass(q, mean, var, log_count, rest, 0.25, 32, dot_precision="fp8")
    wide = torch.randn(1, 1, 64, 256, device=device)
    with pytest.raises(ValueError, match="`q` must have head_dim <= 128"):
        rest_mass.rest_log_mass(wide, *fusion.key_block_moments(wide, 32), rest, 0.25, 32)


def test_mass_operator_on_triton_matches_float64_pytorch_with_the_kernels(device, monkeypatch):
    """`sla_triton_with_lut(..., fusion="mass")` in float32, its rest mass on the kernels (counted), against the
    PyTorch operator in float64 (whose rest mass stays on the PyTorch path): output and the q, k, v gradients."""
    calls = []
    launch = rest_mass.run_forward
    monkeypatch.setattr(rest_mass, "run_forward", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    g = torch.Generator().manual_seed(5)
    D, blk, topk = 16, 32, 0.3
    q, k, v = (torch.randn(1, 2, L, D, generator=g).to(device) for L in (130, 110, 110))
    weight, bias = (torch.randn(D, D, generator=g) / D**0.5).to(device), (torch.randn(D, generator=g) * 0.1).to(device)
    lut = select_blocks(q, k, topk, blk, blk)
    do = torch.linspace(-1, 1, q.numel(), device=device).view_as(q)
    kw = dict(blkq=blk, blkk=blk, feature_map="softmax", linear_scope="rest", fusion="mass")
    results = []
    for run in ("triton", "torch"):
        leaves = [x.detach().clone().to(torch.float32 if run == "triton" else torch.float64).requires_grad_()
                  for x in (q, k, v)]
        if run == "triton":
            out = sla_triton_with_lut(*leaves, weight, bias, lut, **kw)
        else:
            out = sla_reference(*leaves, weight.double(), bias.double(), topk=topk, lut=lut, **kw)
        out.backward(do.to(out.dtype))
        results.append([out.detach()] + [x.grad for x in leaves])
    assert calls == [1]
    for name, a, b in zip(("o", "q", "k", "v"), *results):
        assert b.abs().sum() > 0, name
        assert rel_err(a, b) < (1e-4 if device == "cpu" else 2e-2), name
