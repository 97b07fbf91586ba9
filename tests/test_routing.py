# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The routing policy and the SDPA interception (`diffusers_sla/integration/routing.py`, `sdpa.py`): which calls run
SLA and which run dense, why, and that dense calls are exactly the model's own."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from glue_testing import fresh_logs, max_diff, run_eval  # noqa: F401  (fresh_logs: autouse)
from testing_utils import EXACT_ATOL
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model

from diffusers_sla import SLAConfig
from diffusers_sla.integration.install import enable_sla
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.integration.report import reset_sla_stats, sla_summary
from diffusers_sla.integration.routing import key_padding_mask_from_attn_mask, route_attention_call
from diffusers_sla.integration.sdpa import routing_scope

# ===== Routing policy =====


def test_default_policy_short_sequences_run_dense_and_log_once(caplog):
    model, make_inputs = build_tiny_model("flux")  # 72 joint tokens < 4 key blocks of 64
    inputs = make_inputs(seed=10)
    reference = run_eval(model, inputs)
    enable_sla(model)
    with caplog.at_level(logging.INFO, logger="diffusers_sla.processor"):
        for _ in range(3):
            output = run_eval(model, inputs)
    assert torch.equal(output, reference)
    summary = sla_summary(model)
    assert summary.sla_calls == 0 and summary.dense_calls == {"short_sequence": 6}
    assert sum("fewer than min_kv_blocks" in r.getMessage() for r in caplog.records) == 1


def test_default_policy_runs_sla_on_long_sequences():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    gen = torch.Generator().manual_seed(11)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    inputs = {
        "hidden_states": torch.randn(1, 256, 16, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=gen),
        "pooled_projections": torch.randn(1, 32, generator=gen), "timestep": torch.rand(1, generator=gen),
        "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(8, 3),
    }
    reference = run_eval(model, inputs)
    enable_sla(model, topk=1.0)  # default blocks (64) and min_kv_blocks (4): 264 keys = 5 blocks
    assert max_diff(run_eval(model, inputs), reference) <= EXACT_ATOL
    assert sla_summary(model).sla_calls == 2


@pytest.mark.parametrize("route", ["dense", "sla"])
def test_cross_attention_policy(route, caplog):
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=12)
    inputs["encoder_hidden_states"] = torch.randn(2, 72, 32, generator=torch.Generator().manual_seed(13))
    reference = run_eval(model, inputs)
    with caplog.at_level(logging.INFO, logger="diffusers_sla.processor"):
        enable_sla(model, topk=1.0, cross_attention=route, **TEST_SLA_OVERRIDES)
        output = run_eval(model, inputs)
    assert max_diff(output, reference) <= EXACT_ATOL
    cross = [layer for layer in sla_summary(model).layers if layer.path.endswith("attn2")]
    if route == "dense":
        assert all(layer.sla_calls == 0 and layer.dense_calls == {"cross_attention": 1} for layer in cross)
        assert sum("cross-attention calls run dense" in r.getMessage() for r in caplog.records) == 1
    else:
        assert all(layer.sla_calls == 1 and not layer.dense_calls for layer in cross)


@pytest.mark.parametrize("family", ["qwenimage", "hunyuanvideo"])
def test_padding_mask_models_run_sla_or_dense_by_policy(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=14)
    reference = run_eval(model, inputs)

    enable_sla(model, topk=1.0, masked_attention="dense", **TEST_SLA_OVERRIDES)
    assert torch.equal(run_eval(model, inputs), reference)
    joint = [layer for layer in sla_summary(model).layers if "token_refiner" not in layer.path]
    assert all(layer.sla_calls == 0 and layer.dense_calls == {"key_padding_mask": 1} for layer in joint)

    enable_sla(model, topk=1.0, masked_attention="sla", **TEST_SLA_OVERRIDES)
    reset_sla_stats(model)
    # The mask pads a different number of text tokens per sample: honoured in both branches, or the output moves.
    assert max_diff(run_eval(model, inputs), reference) <= EXACT_ATOL
    assert all(layer.sla_calls == 1 for layer in sla_summary(model).layers if "token_refiner" not in layer.path)


def test_key_padding_mask_recognition():
    B, H, Lq, Lk = 2, 3, 5, 7
    keep = torch.rand(B, Lk, generator=torch.Generator().manual_seed(15)) > 0.4
    as_4d = keep[:, None, None, :]
    assert torch.equal(key_padding_mask_from_attn_mask(as_4d, B, H, Lq, Lk), keep)
    assert torch.equal(key_padding_mask_from_attn_mask(as_4d.expand(B, H, Lq, Lk), B, H, Lq, Lk), keep)
    additive = torch.zeros(B, 1, 1, Lk).masked_fill(~as_4d, float("-inf"))
    assert torch.equal(key_padding_mask_from_attn_mask(additive, B, H, Lq, Lk), keep)
    legacy_additive = torch.zeros(B, 1, 1, Lk).masked_fill(~as_4d, -10000.0)
    assert torch.equal(key_padding_mask_from_attn_mask(legacy_additive, B, H, Lq, Lk), keep)
    # Not key padding masks: varies over queries, a soft bias, a 2-D (Lq, Lk) mask, wrong key length.
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    assert key_padding_mask_from_attn_mask(causal, B, H, Lq, Lk) is None
    assert key_padding_mask_from_attn_mask(torch.randn(B, 1, 1, Lk), B, H, Lq, Lk) is None
    assert key_padding_mask_from_attn_mask(as_4d[..., :-1], B, H, Lq, Lk) is None
    varying = as_4d.expand(B, 1, Lq, Lk).clone()
    varying[0, 0, 0, :] = ~varying[0, 0, 0, :]
    assert key_padding_mask_from_attn_mask(varying, B, H, Lq, Lk) is None


def _call(q, k=None, v=None, **kwargs):
    k = q if k is None else k
    return {"query": q, "key": k, "value": k if v is None else v, "attn_mask": None, "dropout_p": 0.0,
            "is_causal": False, "scale": None, "enable_gqa": False, **kwargs}


def test_route_attention_call_reasons():
    config = SLAConfig(**TEST_SLA_OVERRIDES)
    attn = torch.nn.Module()
    q = torch.randn(1, 2, 96, 16)
    assert route_attention_call(attn, config, _call(q)).reason is None
    assert route_attention_call(attn, config, _call(q, dropout_p=0.1)).reason == "dropout"
    assert route_attention_call(attn, config, _call(q, is_causal=True)).reason == "causal"
    assert route_attention_call(attn, config, _call(q[:, :, :40])).reason == "short_sequence"
    assert route_attention_call(attn, config, _call(q, torch.randn(1, 2, 80, 16))).reason == "cross_attention"
    assert route_attention_call(attn, config, _call(q, torch.randn(1, 2, 96, 8))).reason == "unsupported_shape"
    assert route_attention_call(attn, config, _call(q, torch.randn(1, 3, 96, 16))).reason == "unsupported_shape"
    assert route_attention_call(attn, config, _call(q, torch.randn(1, 1, 96, 16))).reason is None  # GQA
    bias = torch.randn(1, 1, 96, 96)
    assert route_attention_call(attn, config, _call(q, attn_mask=bias)).reason == "attention_mask"
    pad = torch.ones(1, 1, 1, 96, dtype=torch.bool)
    pad[..., -5:] = False
    decision = route_attention_call(attn, config, _call(q, attn_mask=pad))
    assert decision.reason is None and decision.key_padding_mask.shape == (1, 96)
    dense_masked = SLAConfig(masked_attention="dense", **TEST_SLA_OVERRIDES)
    assert route_attention_call(attn, dense_masked, _call(q, attn_mask=pad)).reason == "key_padding_mask"
    attn.is_cross_attention = True  # same lengths, but keys from another sequence
    assert route_attention_call(attn, config, _call(q)).reason == "cross_attention"


def test_routed_sdpa_honours_scale_gqa_and_padding():
    processor = SLAAttnProcessor(topk=1.0, **TEST_SLA_OVERRIDES)
    attn = torch.nn.Module()
    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, 4, 96, 16, generator=gen) for _ in range(3))
    k1, v1 = k[:, :1], v[:, :1]
    pad = torch.ones(2, 1, 1, 96, dtype=torch.bool)
    pad[1, ..., -20:] = False
    cases = [
        ((q, k, v), {"scale": 0.3}),
        ((q, k1, v1), {"enable_gqa": True}),
        ((q, k, v), {"attn_mask": pad}),
        ((q[0], k[0], v[0]), {}),  # 3-D (batch*heads, seq, dim)
    ]
    for args, kwargs in cases:
        expected = F.scaled_dot_product_attention(*args, **kwargs)
        with routing_scope(attn, processor) as scope:
            got = F.scaled_dot_product_attention(*args, **kwargs)
        assert scope.intercepted == 1 and max_diff(got, expected) <= EXACT_ATOL, kwargs
    assert sla_summary_of(attn).sla_calls == len(cases)
    # Outside a routing scope SDPA is torch's own.
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), torch._C._nn.scaled_dot_product_attention(q, k, v))


def sla_summary_of(attn):
    from diffusers_sla.integration.stats import layer_stats

    return layer_stats(attn)


def test_non_native_attention_backend_is_counted_and_logged(caplog):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=17)
    active = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend("flex")  # before SLA: the wrapped processors carry it
        enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
        with caplog.at_level(logging.WARNING, logger="diffusers_sla.processor"):
            run_eval(model, inputs)
            run_eval(model, inputs)
        summary = sla_summary(model)
        assert summary.sla_calls == 0 and summary.dense_calls == {"attention_backend": 4}
        assert sum("which SLA cannot intercept" in r.getMessage() for r in caplog.records) == 1

        model.set_attention_backend("native")  # reaches the wrapped processors through the shared SLA processor
        reset_sla_stats(model)
        run_eval(model, inputs)
        assert sla_summary(model).sla_calls == 2

        model.set_attention_backend("flex")  # after SLA: counted too
        reset_sla_stats(model)
        run_eval(model, inputs)
        assert sla_summary(model).dense_calls == {"attention_backend": 2}
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
        model.reset_attention_backend()


def test_an_sdpa_wrapper_installed_above_the_router_runs_once_and_does_not_recurse():
    """A tool that wraps `F.scaled_dot_product_attention` after SLA's router (a profiler marking each call, say) keeps
    calling the router inside its wrapper; the router must not take that wrapper as the dense SDPA beneath it, or each
    dense call would go round the two without end (it did: RecursionError in `benchmarks/e2e_wan.py`)."""
    import functools

    processor = SLAAttnProcessor(topk=1.0, **TEST_SLA_OVERRIDES)
    attn = torch.nn.Module()
    q, k, v = (torch.randn(1, 2, 96, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    with routing_scope(attn, processor):  # installs the router
        pass
    router = F.scaled_dot_product_attention
    calls = []

    def closure_wrapper(query, key, *args, **kwargs):
        calls.append("closure")
        return router(query, key, *args, **kwargs)

    @functools.wraps(router)
    def wraps_wrapper(*args, **kwargs):
        calls.append("wraps")
        return router.__call__(*args, **kwargs)

    for wrapper in (closure_wrapper, wraps_wrapper, functools.partial(closure_wrapper)):
        F.scaled_dot_product_attention = wrapper
        try:
            calls.clear()
            with routing_scope(attn, processor) as scope:
                got = F.scaled_dot_product_attention(q, k, v)
            assert scope.intercepted == 1 and len(calls) == 1, wrapper
            dense = F.scaled_dot_product_attention(q, k, v)  # outside a scope: the wrapper, then torch's own
            assert torch.equal(dense, torch._C._nn.scaled_dot_product_attention(q, k, v)) and len(calls) == 2
            assert max_diff(got, dense) <= EXACT_ATOL
        finally:
            F.scaled_dot_product_attention = router
    # A replacement that does not call the router is routed around again at the next SLA call.
    F.scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention
    try:
        with routing_scope(attn, processor) as scope:
            F.scaled_dot_product_attention(q, k, v)
        assert scope.intercepted == 1 and F.scaled_dot_product_attention is router
    finally:
        F.scaled_dot_product_attention = router
