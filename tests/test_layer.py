# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SparseLinearAttention` (`layer.py`)."""

import pytest
import torch

from diffusers_sla import SLAConfig, SparseLinearAttention
from diffusers_sla.integration.layer import SLAProjection
from diffusers_sla.ops import sla_reference

from testing_utils import rel_err


def test_public_api_shape_and_defaults():
    cfg = SLAConfig(topk=0.2, blkq=64, blkk=64, feature_map="softmax", tie_feature_map_qk=True, linear_scope="rest")
    attn = SparseLinearAttention(head_dim=128, config=cfg)
    # weight and bias named as nn.Linear names them, but not a Linear: nothing may wrap what the kernels read directly
    assert isinstance(attn.proj_l, SLAProjection) and not isinstance(attn.proj_l, torch.nn.Linear)
    assert attn.proj_l.weight.shape == (128, 128) and attn.proj_l.bias.shape == (128,)
    assert attn.proj_l.weight.dtype == torch.float32
    assert attn.proj_l.weight.abs().sum() == 0 and attn.proj_l.bias.abs().sum() == 0
    assert SparseLinearAttention(head_dim=128, topk=0.15).config.topk == 0.15
    q, k, v = (torch.randn(1, 2, 300, 128, dtype=torch.bfloat16) for _ in range(3))
    out = attn(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


def test_forward_is_the_operator_with_this_layers_projection():
    attn = SparseLinearAttention(32, topk=0.3, blkq=32, blkk=32, feature_map="elu")
    with torch.no_grad():
        attn.proj_l.weight.normal_()
        attn.proj_l.bias.normal_()
    q, k, v = (torch.randn(2, 2, 100, 32) for _ in range(3))
    expected = sla_reference(q, k, v, attn.proj_l.weight, attn.proj_l.bias, topk=0.3, blkq=32, blkk=32,
                             feature_map="elu", linear_scope="rest")
    assert rel_err(attn(q, k, v), expected) == 0


def test_gradients_reach_q_k_v_and_proj_l():
    attn = SparseLinearAttention(16, blkq=32, blkk=32, topk=0.5)
    q, k, v = (torch.randn(1, 2, 90, 16, requires_grad=True) for _ in range(3))
    attn(q, k, v).square().sum().backward()
    for tensor in (q, k, v, attn.proj_l.weight, attn.proj_l.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to("cpu", torch.float16)])
def test_proj_l_stays_float32_and_keeps_identity(cast):
    parent = torch.nn.Sequential(torch.nn.Linear(8, 8), SparseLinearAttention(8))
    param = parent[1].proj_l.weight
    cast(parent)
    assert parent[0].weight.dtype != torch.float32
    assert parent[1].proj_l.weight.dtype == torch.float32 and parent[1].proj_l.weight is param


def test_bad_arguments():
    with pytest.raises(ValueError, match="`head_dim` must be a positive integer"):
        SparseLinearAttention(0)
    with pytest.raises(ValueError, match="`blkq` must be one of"):
        SparseLinearAttention(64, blkq=16)
    with pytest.raises(ValueError, match="built for head_dim=64"):
        SparseLinearAttention(64)(*(torch.randn(1, 1, 10, 32) for _ in range(3)))


def test_scope_none_keeps_proj_l_but_never_reads_it():
    attn = SparseLinearAttention(16, blkq=32, blkk=32, topk=0.5, linear_scope="none")
    with torch.no_grad():
        attn.proj_l.weight.normal_()
        attn.proj_l.bias.normal_()
    # still a parameter (sidecars load into it, a switch back to "rest" serves it), trainable as the user set it
    assert set(attn.state_dict()) == {"proj_l.weight", "proj_l.bias"} and attn.proj_l.weight.requires_grad
    q, k, v = (torch.randn(1, 2, 90, 16, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    expected = sla_reference(q, k, v, None, None, topk=0.5, blkq=32, blkk=32, feature_map="softmax",
                             linear_scope="none")
    assert torch.equal(out, expected)
    out.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))
    assert attn.proj_l.weight.grad is None and attn.proj_l.bias.grad is None
    optimizer = torch.optim.AdamW(attn.parameters(), lr=0.1, weight_decay=0.1)
    before = attn.proj_l.weight.clone()
    optimizer.step()  # no gradient: AdamW leaves it alone, weight decay included
    assert torch.equal(attn.proj_l.weight, before)


def test_backend_is_checked_when_a_layer_is_built():
    with pytest.raises(ValueError, match=r"`backend` must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        SparseLinearAttention(16, backend="cuda")
