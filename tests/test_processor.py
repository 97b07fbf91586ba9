# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLAAttnProcessor, enable_sla, disable_sla and sla_summary on tiny diffusers transformers (CPU, float32).

The central check: with `topk=1.0` SLA is exact attention, so a model running SLA must reproduce the original model
(RoPE, QK-norm, joint tokens, masks and returned tuples included) while the summary proves that SLA did run.
"""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    FAMILIES,
    PIPELINE_FAMILIES,
    TEST_SLA_OVERRIDES,
    build_tiny_model,
    build_tiny_pipeline,
    forward_output,
    randomize_proj_l,
)
from testing_utils import EXACT_ATOL, rel_err, require_cuda

from diffusers_sla import SLAConfig, SparseLinearAttention, iter_sla_layers
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.modules import INNER_PROCESSOR_ATTR
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.integration.report import reset_sla_stats, sla_summary
from diffusers_sla.integration.routing import key_padding_mask_from_attn_mask, route_attention_call
from diffusers_sla.integration.sdpa import routing_scope
from diffusers_sla.utils.cuda_graph import capture_cuda_graph

# Attention modules that run dense by design under the tests' config (`TEST_SLA_OVERRIDES` + `_family_overrides`):
# cross-attention to the text (policy "dense"), Sana's linear self-attention, HunyuanVideo's text-only token refiner
# (8 tokens: shorter than min_kv_blocks key blocks).
DENSE_BY_DESIGN = {
    "wan": {r"\.attn2$": "cross_attention"},
    "ltx": {r"\.attn2$": "cross_attention"},
    "pixart": {r"\.attn2$": "cross_attention"},
    "sana": {r"\.attn1$": "linear_attention"},
    "hunyuanvideo": {r"token_refiner": "short_sequence"},
}


def _family_overrides(family: str) -> dict:
    # Sana's only softmax attention is its cross-attention (72 text tokens in the tiny inputs).
    return {**TEST_SLA_OVERRIDES, **({"cross_attention": "sla"} if family == "sana" else {})}


def _expected_dense_reason(family: str, path: str) -> str | None:
    for pattern, reason in DENSE_BY_DESIGN.get(family, {}).items():
        if re.search(pattern, path):
            return reason
    return None


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return forward_output(model, inputs)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _assert_every_layer_ran_as_designed(family: str, model) -> None:
    summary = sla_summary(model)
    assert summary.layers, "no SLA layer reported"
    for layer in summary.layers:
        expected_dense = _expected_dense_reason(family, layer.path)
        if expected_dense is None:
            assert layer.sla_calls > 0 and not layer.dense_calls, f"{layer.path}: {layer}"
        else:
            assert layer.sla_calls == 0 and set(layer.dense_calls) == {expected_dense}, f"{layer.path}: {layer}"


@pytest.fixture(autouse=True)
def _fresh_logs():
    # Log-once memory is per process; tests that count log lines need a clean slate.
    from diffusers_sla.integration import logs

    logs._logged_once.clear()
    yield


# ===== Every family: exactness, sparsity, restoration =====


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_one_reproduces_the_model(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=1)
    reference = _run(model, inputs)

    enable_sla(model, topk=1.0, **_family_overrides(family))
    output = _run(model, inputs)

    diff = _max_diff(output, reference)
    print(f"{family}: max abs diff at topk=1.0 = {diff:.2e}")
    assert diff <= EXACT_ATOL
    _assert_every_layer_ran_as_designed(family, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_sla_changes_output_and_runs_in_every_self_attention_layer(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=2)
    reference = _run(model, inputs)

    enable_sla(model, topk=0.2, **_family_overrides(family))
    randomize_proj_l(model)
    output = _run(model, inputs)

    assert torch.isfinite(output).all()
    assert _max_diff(output, reference) > 1e-3
    _assert_every_layer_ran_as_designed(family, model)
    for layer in sla_summary(model).layers:
        if layer.sla_calls:
            assert 0.0 < layer.mean_density < 1.0


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_compiled_blocks_run_sla_in_one_graph_each_without_recompiling(family):
    # diffusers' regional compilation (torch.compile per transformer block). A counting backend (no inductor: fast)
    # shows how many graphs each forward runs: one per block means the SLA processor broke no graph.
    from torch._dynamo.utils import counters

    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=3)
    enable_sla(model, topk=0.5, **_family_overrides(family))
    randomize_proj_l(model)
    eager = _run(model, inputs)
    reset_sla_stats(model)

    graphs_run = [0]

    def counting_backend(graph_module, example_inputs):
        def run(*args):
            graphs_run[0] += 1
            return graph_module.forward(*args)

        return run

    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(backend=counting_backend, fullgraph=True)
        _run(model, inputs)  # compiles
        compiled_graphs = counters["stats"]["unique_graphs"]
        graphs_run[0] = 0
        compiled = _run(model, inputs)
        assert graphs_run[0] == len(blocks), "a graph break inside the SLA processor"
        _run(model, inputs)
        assert counters["stats"]["unique_graphs"] == compiled_graphs, "recompiled on a later call"
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()

    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for layer in sla_summary(model).layers:
        # compiled calls are not counted; their route is reported instead
        assert layer.sla_calls == 0 and not layer.dense_calls, layer
        assert layer.compiled_route == (_expected_dense_reason(family, layer.path) or "sla"), layer
        if layer.compiled_route == "sla":
            assert 0.0 < layer.compiled_density <= 1.0
    assert "compiled route" in str(sla_summary(model))


def test_compiled_first_call_logs_its_dense_reasons_under_fullgraph(caplog):
    # the first call ever runs compiled: the once-per-reason log lines come out while dynamo traces (a logging call
    # in the graph would be an error under fullgraph=True), once, and the summary shows the compiled routes
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=3)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(backend="eager", fullgraph=True)
        with caplog.at_level(logging.INFO, logger="diffusers_sla"):
            for _ in range(3):
                _run(model, inputs)
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    lines = [r.getMessage() for r in caplog.records if "cross-attention calls run dense" in r.getMessage()]
    assert len(lines) == 1, lines
    routes = {layer.path: layer.compiled_route for layer in sla_summary(model).layers}
    assert routes == {"blocks.0.attn1": "sla", "blocks.0.attn2": "cross_attention", "blocks.1.attn1": "sla",
                      "blocks.1.attn2": "cross_attention"}


def test_compiled_blocks_train_like_eager():
    # forward + backward through compiled blocks (aot_eager: dynamo and autograd's tracing, no code generation)
    # gives the eager loss and gradients, proj_l's included
    model, make_inputs = build_tiny_model("wan")
    model.train()
    inputs = make_inputs(seed=3)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)

    def step():
        model.zero_grad(set_to_none=True)
        forward_output(model, inputs).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = step()
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(backend="aot_eager")
        compiled = step()
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    assert compiled.keys() == eager.keys() and any(".sla.proj_l." in name for name in eager)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@require_cuda
def test_gpu_compiled_blocks_around_the_triton_kernels_match_eager():
    # inductor-compiled blocks with the Triton SLA kernels inside (custom ops): the same output and gradients as
    # eager mode, proj_l's included. Both run the same kernels; what differs is the surrounding code inductor fuses
    # (H100: output 1e-7, gradients up to 2e-4 apart).
    model, make_inputs = build_tiny_model("wan")
    model = model.cuda().train()
    inputs = {name: value.cuda() for name, value in make_inputs(seed=3).items()}
    enable_sla(model, topk=0.5, backend="triton", **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)

    def step():
        model.zero_grad(set_to_none=True)
        out = forward_output(model, inputs)
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = step()
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks()
        step()  # compiles
        out, grads = step()
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    assert rel_err(out, eager_out) < 1e-4
    assert grads.keys() == eager_grads.keys() and any(".sla.proj_l." in name for name in grads)
    for name, grad in eager_grads.items():
        assert rel_err(grads[name], grad) < 2e-3, name


@pytest.mark.gpu
@require_cuda
def test_gpu_whole_model_replays_from_one_cuda_graph():
    # the transformer's whole forward with SLA on (Triton kernels) captured in one CUDA graph: no host time per call,
    # which short sequences need; replays on new inputs equal eager calls bit for bit
    model, make_inputs = build_tiny_model("wan")
    model = model.cuda()
    enable_sla(model, topk=0.5, backend="triton", **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    static = {name: value.cuda() for name, value in make_inputs(seed=3).items()}
    graph, out = capture_cuda_graph(lambda: _run(model, static))
    for seed in (4, 5):
        fresh = make_inputs(seed=seed)
        for name, value in static.items():
            value.copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        eager = _run(model, {name: value.cuda() for name, value in fresh.items()})
        assert torch.equal(out, eager), seed
    assert sla_summary(model)["blocks.0.attn1"].sla_calls > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_sla_restores_the_original_model(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=3)
    reference = _run(model, inputs)
    processors = dict(model.attn_processors)
    state_keys = set(model.state_dict())

    enable_sla(model, topk=0.2, **_family_overrides(family))
    randomize_proj_l(model)
    _run(model, inputs)
    removed = disable_sla(model)

    assert torch.equal(_run(model, inputs), reference)
    assert removed and all(isinstance(layer, SparseLinearAttention) for layer in removed.values())
    assert all(model.attn_processors[name] is proc for name, proc in processors.items())
    assert set(model.state_dict()) == state_keys
    assert not sla_summary(model).layers
    assert not any(hasattr(m, INNER_PROCESSOR_ATTR) for m in model.modules())


# ===== set_attn_processor: one shared instance, per-layer state, each module's own processor =====


@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage", "hunyuanvideo", "cogvideox", "wan"])
def test_set_attn_processor_wraps_each_modules_own_processor(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=4)
    reference = _run(model, inputs)
    own_processor_types = {name: type(proc) for name, proc in model.attn_processors.items()}

    processor = SLAAttnProcessor(topk=1.0, **_family_overrides(family))
    model.set_attn_processor(processor)
    created = {path: layer for path, _, layer in iter_sla_layers(model)}
    assert created, "set_attn_processor creates the SLA layers up front, like enable_sla"
    output = _run(model, inputs)
    assert {path: layer for path, _, layer in iter_sla_layers(model)} == created

    assert _max_diff(output, reference) <= EXACT_ATOL
    for name, proc in model.attn_processors.items():
        # diffusers' processor API sees the module's own processor; SLA runs beneath it
        assert type(proc) is own_processor_types[name]
        module = model.get_submodule(name.rsplit(".processor", 1)[0])
        assert module.processor is processor and getattr(module, INNER_PROCESSOR_ATTR) is proc
    layers = [layer for _, _, layer in iter_sla_layers(model)]
    assert layers and len({id(layer) for layer in layers}) == len(layers)
    assert len({id(layer.proj_l.weight) for layer in layers}) == len(layers)
    param_ids = {id(p) for p in model.parameters()}
    assert all(id(layer.proj_l.weight) in param_ids and layer.proj_l.weight.dtype == torch.float32 for layer in layers)
    _assert_every_layer_ran_as_designed(family, model)


def test_dropping_rope_would_be_caught(monkeypatch):
    # Negative control for the equality tests: a processor whose signature is just (attn, *args, **kwargs) loses
    # CogVideoX's `image_rotary_emb` (its `Attention.forward` filters keyword arguments by that signature).
    model, make_inputs = build_tiny_model("cogvideox")
    inputs = make_inputs(seed=5)
    reference = _run(model, inputs)
    enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    plain = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("attn", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ])
    monkeypatch.setattr(SLAAttnProcessor.__call__, "__signature__", plain)
    assert _max_diff(_run(model, inputs), reference) > 1e-3


def test_advertised_signature_covers_the_wrapped_processors():
    model, _ = build_tiny_model("qwenimage")
    enable_sla(model, **TEST_SLA_OVERRIDES)
    advertised = set(inspect.signature(SLAAttnProcessor().__call__).parameters)
    assert {"encoder_hidden_states_mask", "image_rotary_emb", "attention_mask"} <= advertised


def _set_on_each_module(model, processor):
    # Module by module, not through the model's set_attn_processor: the path on which SLA state is born lazily.
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(processor)


def test_lazy_state_created_in_inference_mode_is_trainable():
    model, make_inputs = build_tiny_model("flux")
    _set_on_each_module(model, SLAAttnProcessor(topk=0.2, **TEST_SLA_OVERRIDES))
    assert not list(iter_sla_layers(model))
    with torch.inference_mode():
        forward_output(model, make_inputs(seed=6))
    layers = [layer for _, _, layer in iter_sla_layers(model)]
    assert len(layers) == 2 and not any(layer.proj_l.weight.is_inference() for layer in layers)
    forward_output(model, make_inputs(seed=7)).square().mean().backward()
    assert all(layer.proj_l.weight.grad is not None and layer.proj_l.weight.grad.abs().sum() > 0 for layer in layers)


def test_module_built_with_sla_processor_fails_clearly():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=32, heads=2, dim_head=16, processor=SLAAttnProcessor())
    with pytest.raises(RuntimeError, match="no processor of its own"):
        attn(torch.randn(1, 8, 32))


# ===== enable_sla: state up front, pipelines, re-enable =====


def test_enable_sla_creates_one_layer_per_sla_module_up_front():
    model, _ = build_tiny_model("wan")
    processor = enable_sla(model, **TEST_SLA_OVERRIDES)

    paths = [path for path, _, _ in iter_sla_layers(model)]
    assert paths == ["blocks.0.attn1", "blocks.1.attn1"]  # cross-attention (policy "dense") gets no state
    state = model.state_dict()
    assert state["blocks.0.attn1.sla.proj_l.weight"].dtype == torch.float32
    assert all(m.processor is processor for m in model.modules() if hasattr(m, "set_processor"))

    enable_sla(model, cross_attention="sla", **{k: v for k, v in TEST_SLA_OVERRIDES.items()})
    assert [path for path, _, _ in iter_sla_layers(model)] == [
        "blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"
    ]


def test_enable_sla_again_keeps_trained_weights_and_updates_config():
    model, _ = build_tiny_model("flux")
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    before = {path: layer.proj_l.weight.clone() for path, _, layer in iter_sla_layers(model)}
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    for path, _, layer in iter_sla_layers(model):
        assert torch.equal(layer.proj_l.weight, before[path]) and layer.config.topk == 0.5


def test_linear_scope_none_runs_the_sparse_part_alone_and_switching_back_keeps_proj_l():
    """A model switched to `linear_scope="none"` computes what "rest" computes with every proj_l at zero (the
    sparse part alone), gives proj_l no gradient, leaves it as it was, and a switch back to "rest" serves the trained
    proj_l again."""
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=9)
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = _run(model, inputs)
    before = {path: [p.clone() for p in layer.proj_l.parameters()] for path, _, layer in iter_sla_layers(model)}
    enable_sla(model, topk=0.2, linear_scope="none", **TEST_SLA_OVERRIDES)
    sparse_only = forward_output(model, inputs)
    sparse_only.square().mean().backward()
    for path, _, layer in iter_sla_layers(model):
        assert layer.config.linear_scope == "none" and "linear_scope='none'" in repr(layer)
        assert all(p.grad is None for p in layer.proj_l.parameters()), path
        assert all(torch.equal(p, b) for p, b in zip(layer.proj_l.parameters(), before[path]))
    assert any(p.grad is not None for name, p in model.named_parameters() if ".sla." not in name)
    assert _max_diff(sparse_only, trained) > 1e-3
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(model):
            for p in layer.proj_l.parameters():
                p.zero_()
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    assert torch.equal(_run(model, inputs), sparse_only.detach())  # "rest" with proj_l at exact zero
    with torch.no_grad():
        for path, _, layer in iter_sla_layers(model):
            for p, b in zip(layer.proj_l.parameters(), before[path]):
                p.copy_(b)
    assert torch.equal(_run(model, inputs), trained)


def test_disable_then_enable_with_removed_layers_keeps_weights():
    model, make_inputs = build_tiny_model("sd3")
    inputs = make_inputs(seed=8)
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = _run(model, inputs)
    removed = disable_sla(model)
    enable_sla(model, topk=0.2, sla_layers=removed, **TEST_SLA_OVERRIDES)
    assert torch.equal(_run(model, inputs), trained)


def test_enable_sla_works_without_set_attn_processor():
    # A plain nn.Module holding diffusers attention modules: enable_sla walks the modules with `set_processor`.
    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=9)
    reference = _run(model, inputs)
    wrapper = torch.nn.ModuleDict({"inner": model})
    assert not hasattr(wrapper, "set_attn_processor")
    enable_sla(wrapper, topk=1.0, **TEST_SLA_OVERRIDES)
    assert _max_diff(_run(model, inputs), reference) <= EXACT_ATOL
    assert sla_summary(wrapper).sla_calls == 2
    disable_sla(wrapper)
    assert torch.equal(_run(model, inputs), reference)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_pipeline_end_to_end(family):
    pipe, make_call_kwargs = build_tiny_pipeline(family)
    reference = pipe(**make_call_kwargs(seed=0))[0]

    enable_sla(pipe, topk=0.2, **TEST_SLA_OVERRIDES)
    output = pipe(**make_call_kwargs(seed=0))[0]
    summary = sla_summary(pipe)

    assert output.shape == reference.shape and torch.isfinite(output).all()
    assert _max_diff(output, reference) > 1e-4
    assert summary.sla_calls > 0 and all(layer.path.startswith("transformer.") for layer in summary.layers)
    assert all(layer.sla_calls > 0 for layer in summary.layers if not layer.path.endswith("attn2"))
    disable_sla(pipe)
    assert torch.equal(pipe(**make_call_kwargs(seed=0))[0], reference)


# ===== Routing policy =====


def test_default_policy_short_sequences_run_dense_and_log_once(caplog):
    model, make_inputs = build_tiny_model("flux")  # 72 joint tokens < 4 key blocks of 64
    inputs = make_inputs(seed=10)
    reference = _run(model, inputs)
    enable_sla(model)
    with caplog.at_level(logging.INFO, logger="diffusers_sla.processor"):
        for _ in range(3):
            output = _run(model, inputs)
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
    reference = _run(model, inputs)
    enable_sla(model, topk=1.0)  # default blocks (64) and min_kv_blocks (4): 264 keys = 5 blocks
    assert _max_diff(_run(model, inputs), reference) <= EXACT_ATOL
    assert sla_summary(model).sla_calls == 2


@pytest.mark.parametrize("route", ["dense", "sla"])
def test_cross_attention_policy(route, caplog):
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=12)
    inputs["encoder_hidden_states"] = torch.randn(2, 72, 32, generator=torch.Generator().manual_seed(13))
    reference = _run(model, inputs)
    with caplog.at_level(logging.INFO, logger="diffusers_sla.processor"):
        enable_sla(model, topk=1.0, cross_attention=route, **TEST_SLA_OVERRIDES)
        output = _run(model, inputs)
    assert _max_diff(output, reference) <= EXACT_ATOL
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
    reference = _run(model, inputs)

    enable_sla(model, topk=1.0, masked_attention="dense", **TEST_SLA_OVERRIDES)
    assert torch.equal(_run(model, inputs), reference)
    joint = [layer for layer in sla_summary(model).layers if "token_refiner" not in layer.path]
    assert all(layer.sla_calls == 0 and layer.dense_calls == {"key_padding_mask": 1} for layer in joint)

    enable_sla(model, topk=1.0, masked_attention="sla", **TEST_SLA_OVERRIDES)
    reset_sla_stats(model)
    # The mask pads a different number of text tokens per sample: honoured in both branches, or the output moves.
    assert _max_diff(_run(model, inputs), reference) <= EXACT_ATOL
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
        assert scope.intercepted == 1 and _max_diff(got, expected) <= EXACT_ATOL, kwargs
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
            _run(model, inputs)
            _run(model, inputs)
        summary = sla_summary(model)
        assert summary.sla_calls == 0 and summary.dense_calls == {"attention_backend": 4}
        assert sum("which SLA cannot intercept" in r.getMessage() for r in caplog.records) == 1

        model.set_attention_backend("native")  # reaches the wrapped processors through the shared SLA processor
        reset_sla_stats(model)
        _run(model, inputs)
        assert sla_summary(model).sla_calls == 2

        model.set_attention_backend("flex")  # after SLA: counted too
        reset_sla_stats(model)
        _run(model, inputs)
        assert sla_summary(model).dense_calls == {"attention_backend": 2}
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
        model.reset_attention_backend()


# ===== fuse_qkv_projections and LoRA =====


@pytest.mark.parametrize("family", ["flux", "sd3", "cogvideox"])
@pytest.mark.parametrize("order", ["fuse_first", "sla_first"])
def test_fuse_qkv_projections(family, order):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=18)
    reference = _run(model, inputs)
    if order == "fuse_first":
        model.fuse_qkv_projections()
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    else:
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
        model.fuse_qkv_projections()
    assert any(getattr(m, "fused_projections", False) for m in model.modules())
    assert _max_diff(_run(model, inputs), reference) <= EXACT_ATOL
    _assert_every_layer_ran_as_designed(family, model)
    model.unfuse_qkv_projections()
    assert _max_diff(_run(model, inputs), reference) <= EXACT_ATOL


@pytest.mark.parametrize("order", ["lora_first", "sla_first"])
def test_lora_on_qkv(order):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=19)
    base = _run(model, inputs)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if order == "lora_first":
        model.add_adapter(lora)
        with_lora = _run(model, inputs)
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    else:
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
        model.add_adapter(lora)
        disable_sla(model)
        with_lora = _run(model, inputs)
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    assert _max_diff(with_lora, base) > 1e-3
    assert _max_diff(_run(model, inputs), with_lora) <= EXACT_ATOL

    # Training with LoRA and SLA: gradients reach both the adapters and proj_l.
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    forward_output(model, inputs).square().mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(layer.proj_l.weight.grad.abs().sum() > 0 for _, _, layer in iter_sla_layers(model))


# ===== Summary and bad input =====


def test_summary_reports_density_and_resets():
    # 72 joint keys = 3 blocks of 32, the text in the last: topk 0.5 keeps 1 of the 2 others, plus the text block
    model, make_inputs = build_tiny_model("sd3")
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    _run(model, make_inputs(seed=20))
    summary = sla_summary(model)
    assert [layer.path for layer in summary.layers] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert summary.mean_density == pytest.approx(2 / 3)
    table = summary.table()
    assert "transformer_blocks.1.attn" in table and "0.667" in table and str(summary) == table
    assert summary.to_dict()["layers"][0]["sla_calls"] == 1
    assert summary["transformer_blocks.0.attn"].sla_calls == 1
    reset_sla_stats(model)
    assert sla_summary(model).sla_calls == 0 and sla_summary(model).mean_density is None


def test_bad_input():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        SLAAttnProcessor(backend="cuda")
    with pytest.raises(ValueError, match="`topk`"):
        SLAAttnProcessor(topk=0)
    with pytest.raises(ValueError, match="Unknown SLAConfig keys"):
        enable_sla(build_tiny_model("flux").model, top_k=0.1)
    with pytest.raises(ValueError, match="`pipe_or_model` must be"):
        enable_sla("transformer")
    with pytest.raises(ValueError, match="no attention module"):
        enable_sla(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="`sla_layers`"):
        enable_sla(build_tiny_model("flux").model, sla_layers={"nowhere": SparseLinearAttention(16)})


def test_enable_sla_replays_saved_weights_and_their_config(tmp_path):
    from diffusers import FluxTransformer2DModel

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=21)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = _run(model, inputs)
    model.save_pretrained(tmp_path)

    loaded = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    enable_sla(loaded)  # no config: the stored one (topk=0.5, blocks of 32) and the trained proj_l come back
    assert all(layer.config.topk == 0.5 and layer.config.blkk == 32 for _, _, layer in iter_sla_layers(loaded))
    assert torch.equal(_run(loaded, inputs), trained)


def test_model_with_sla_survives_deepcopy_and_pickle():
    import copy
    import io

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=22)
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    expected = _run(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(_run(clone, inputs), expected)
        assert sla_summary(clone).sla_calls > 0


def test_lazy_layers_born_in_a_training_forward_warn(monkeypatch, caplog):
    # Parameters created inside a training forward are in no optimizer or DDP bucket built before: a WARNING, once.
    from diffusers_sla.integration import logs

    monkeypatch.setattr(logs, "_logged_once", set())
    model, make_inputs = build_tiny_model("wan")
    model.train()
    _set_on_each_module(model, SLAAttnProcessor(**TEST_SLA_OVERRIDES))
    with caplog.at_level(logging.INFO, logger="diffusers_sla.processor"):
        forward_output(model, make_inputs(seed=0))
        forward_output(model, make_inputs(seed=1))
    warnings = [r for r in caplog.records if "during a training forward" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert len(list(iter_sla_layers(model))) > 0
