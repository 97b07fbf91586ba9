# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The functional entry point `sparse_linear_attention` (`ops/api.py`): checks, backends, key padding masks."""

import pytest
import torch

from diffusers_sla import SLAConfig, sparse_linear_attention
from diffusers_sla.ops import resolve_backend, sla_reference

from testing_utils import rel_err, require_triton


def make(B=2, H=2, Lq=160, Lk=160, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk)]


def test_defaults_use_identity_projection_and_config_overrides():
    q, k, v = make()
    out = sparse_linear_attention(q, k, v, config=SLAConfig(blkq=32, blkk=32), topk=0.5)
    expected = sla_reference(q, k, v, torch.eye(32), torch.zeros(32), topk=0.5, blkq=32, blkk=32,
                             feature_map="softmax", linear_scope="rest")
    assert torch.equal(out, expected)


def test_accepts_non_contiguous_inputs():
    # diffusers hands attention (B, L, H, D) tensors transposed to (B, H, L, D)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make())
    assert not q.is_contiguous()
    out = sparse_linear_attention(q, k, v, blkq=32, blkk=32)
    assert rel_err(out, sparse_linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), blkq=32,
                                                blkk=32)) == 0


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (lambda q, k, v: (q[0], k, v), {}, "`q` must have 4 dims"),
        (lambda q, k, v: (q, k, v[..., :16]), {}, "`k` and `v` must have the same shape"),
        (lambda q, k, v: (q[:, :1], k, v), {}, "must agree in batch, heads and head_dim"),
        (lambda q, k, v: (q.double(), k, v), {}, "must share one dtype"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}, "`k` and `v` must hold at least one key"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), {}, "head_dim must be positive, got 0"),
        (lambda q, k, v: (q, k, v, torch.zeros(32, 32, device="meta")), {},
         "`proj_weight` must be on q's device \\(cpu\\), got meta"),
        (lambda q, k, v: (q, k, v, None, torch.zeros(32, device="meta")), {},
         "`proj_bias` must be on q's device \\(cpu\\), got meta"),
        (lambda q, k, v: (q, k, v, torch.zeros(32, 32, dtype=torch.int64)), {},
         "`proj_weight` must be a floating-point tensor, got torch.int64"),
        (lambda q, k, v: (q, k, v, None, torch.zeros(32, dtype=torch.bool)), {},
         "`proj_bias` must be a floating-point tensor, got torch.bool"),
        (lambda q, k, v: (q, k, v, [[0.0] * 32] * 32), {}, "`proj_weight` must be a torch.Tensor or None, got list"),
        (lambda q, k, v: (q, k, v), {"scale": "0.5"}, "`scale` must be a positive finite number or None .*got '0.5'"),
        (lambda q, k, v: (q, k, v), {"scale": float("nan")}, "`scale` must be a positive finite number"),
        (lambda q, k, v: (q, k, v), {"scale": 0}, "`scale` must be a positive finite number"),
        (lambda q, k, v: (q, k, v, torch.zeros(16, 16)), {}, "`proj_weight` must have shape \\(32, 32\\)"),
        (lambda q, k, v: (q, k, v), {"backend": "cuda"}, "`backend` must be one of \\['auto', 'torch', 'triton'\\]"),
        (lambda q, k, v: (q, k, v), {"topk": 2}, "`topk` must be in \\(0, 1\\]"),
        (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.ones(2, 160)}, "`key_padding_mask` must be a bool"),
    ],
)
def test_bad_input_names_the_parameter(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparse_linear_attention(*args(*make()), **kwargs)


@pytest.mark.parametrize("B, H, Lq", [(0, 2, 64), (2, 0, 64), (2, 2, 0), (0, 0, 0)])
def test_empty_inputs_give_empty_outputs_and_gradients(B, H, Lq):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, 64, 32, generator=g, requires_grad=True) for _ in range(2))
    w, b = torch.randn(32, 32, generator=g, requires_grad=True), torch.randn(32, generator=g, requires_grad=True)
    mask = torch.ones(B, 64, dtype=torch.bool)
    for kwargs in ({}, {"key_padding_mask": mask}):
        out = sparse_linear_attention(q, k, v, w, b, blkq=32, blkk=32, **kwargs)
        assert out.shape == (B, H, Lq, 32) and out.dtype == q.dtype
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and w.grad.shape == w.shape
        assert not w.grad.any() and not b.grad.any()  # nothing was computed, so nothing flows back


@require_triton
def test_bfloat16_under_the_triton_interpreter_is_refused(monkeypatch):
    # The interpreter's bfloat16 dot products are wrong (values near 1e10): refuse rather than return them.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (x.bfloat16() for x in make(B=1, H=1, Lq=64, Lk=64, D=16))
    with pytest.raises(ValueError, match=r"backend='triton' cannot compute bfloat16 under TRITON_INTERPRET=1"):
        sparse_linear_attention(q, k, v, blkq=32, blkk=32, backend="triton")
    # "auto" takes the PyTorch operator there, as it does on any CPU tensor
    assert resolve_backend("auto", q.device, q.dtype) == "torch"
    out = sparse_linear_attention(q, k, v, blkq=32, blkk=32)
    assert rel_err(out.float(), sparse_linear_attention(*(x.float() for x in (q, k, v)), blkq=32, blkk=32)) < 2e-2


def test_backend_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises((ValueError, RuntimeError), match="backend='triton'"):
        resolve_backend("triton", torch.device("cpu"))


def test_key_padding_mask_equals_attention_over_kept_keys():
    q, k, v = make(B=3, Lq=150, Lk=200, seed=4)
    weight, bias = torch.randn(32, 32) / 6, torch.randn(32)
    keep = torch.ones(3, 200, dtype=torch.bool)
    keep[0, 180:] = False  # text padding at the end
    keep[2, :30] = False  # and at the start
    out = sparse_linear_attention(q, k, v, weight, bias, key_padding_mask=keep, blkq=32, blkk=32, topk=0.3)
    for b in range(3):
        idx = keep[b].nonzero().squeeze(-1)
        expected = sla_reference(q[b:b + 1], k[b:b + 1, :, idx], v[b:b + 1, :, idx], weight, bias, topk=0.3,
                                 blkq=32, blkk=32, feature_map="softmax", linear_scope="rest")
        assert rel_err(out[b:b + 1], expected) < 1e-6
    # Masked keys are really ignored: changing them changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 180:] += 100.0
    v2[0, :, 180:] -= 50.0
    out2 = sparse_linear_attention(q, k2, v2, weight, bias, key_padding_mask=keep, blkq=32, blkk=32, topk=0.3)
    assert torch.equal(out, out2)


def test_shared_key_padding_mask_runs_one_batched_call():
    q, k, v = make(B=2, Lq=100, Lk=130, seed=5)
    keep = torch.ones(2, 130, dtype=torch.bool)
    keep[:, 100:] = False
    out = sparse_linear_attention(q, k, v, key_padding_mask=keep, blkq=32, blkk=32)
    expected = sparse_linear_attention(q, k[:, :, :100], v[:, :, :100], blkq=32, blkk=32)
    assert torch.equal(out, expected)


def test_fully_masked_sample_gives_finite_output():
    q, k, v = make(B=2, Lq=64, Lk=64, seed=6)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[1] = False
    out = sparse_linear_attention(q, k, v, key_padding_mask=keep, blkq=32, blkk=32)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_enclosing_autocast_does_not_recast_the_operator():
    q, k, v = (x.to(torch.bfloat16) for x in make(seed=8))
    weight, bias = torch.randn(32, 32), torch.randn(32)
    plain = sparse_linear_attention(q, k, v, weight, bias, blkq=32, blkk=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sparse_linear_attention(q, k, v, weight, bias, blkq=32, blkk=32)
    assert inside.dtype == torch.bfloat16 and torch.equal(inside, plain)


def test_scope_none_is_the_sparse_part_without_any_projection():
    q, k, v = make(seed=9)
    q.requires_grad_(True)
    weight, bias = (torch.randn(32, 32) / 6).requires_grad_(True), torch.randn(32).requires_grad_(True)
    out = sparse_linear_attention(q, k, v, weight, bias, blkq=32, blkk=32, topk=0.3, linear_scope="none")
    # no projection needed, and the given one is not read: the same output, and no gradient reaches it
    assert torch.equal(out, sparse_linear_attention(q, k, v, blkq=32, blkk=32, topk=0.3, linear_scope="none"))
    rest_zero = sparse_linear_attention(q, k, v, torch.zeros(32, 32), torch.zeros(32), blkq=32, blkk=32, topk=0.3)
    assert torch.equal(out, rest_zero)
    assert rel_err(out, sparse_linear_attention(q, k, v, weight, bias, blkq=32, blkk=32, topk=0.3)) > 1e-2
    out.square().sum().backward()
    assert weight.grad is None and bias.grad is None and q.grad is not None
    with pytest.raises(ValueError, match="`proj_weight` must have shape \\(32, 32\\)"):  # a wrong one still fails
        sparse_linear_attention(q, k, v, torch.zeros(16, 16), linear_scope="none")


def test_scope_none_fully_masked_sample_gives_zeros_not_the_bias():
    q, k, v = make(B=2, Lq=64, Lk=64, seed=6)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[1] = False
    bias = torch.randn(32)
    out = sparse_linear_attention(q, k, v, torch.eye(32), bias, key_padding_mask=keep, blkq=32, blkk=32,
                                  linear_scope="none")
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    expected = sparse_linear_attention(q[:1], k[:1], v[:1], blkq=32, blkk=32, linear_scope="none")
    assert torch.equal(out[:1], expected)


def test_scale_check_traces_under_torch_compile():
    # A float scale that changes between calls is traced as a symbol: the check must not break the graph.
    cfg = SLAConfig(blkq=32, blkk=32)
    q, k, v = make(B=1, H=2, Lq=64, Lk=64, D=16)
    sparse_linear_attention(q, k, v, config=cfg)  # loads the backend outside the traced code
    fn = torch.compile(lambda q, k, v, s: sparse_linear_attention(q, k, v, scale=s, config=cfg), backend="eager",
                       fullgraph=True)
    for scale in (0.3, 0.4, 0.5):
        expected = sparse_linear_attention(q, k, v, scale=scale, config=cfg)
        assert rel_err(fn(q, k, v, scale), expected) < 1e-6
