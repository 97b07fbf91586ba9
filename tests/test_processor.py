# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLAAttnProcessor (`diffusers_sla/integration/processor.py`) and sla_summary on tiny diffusers transformers (CPU,
float32); the routing policy and `enable_sla` have files of their own (test_routing, test_install).

The central check: with `topk=1.0` SLA is exact attention, so a model running SLA must reproduce the original model
(RoPE, QK-norm, joint tokens, masks and returned tuples included) while the summary proves that SLA did run.
"""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch
from glue_testing import eager_and_compiled_gradients, fresh_logs, max_diff, run_eval  # noqa: F401  (fresh_logs: autouse)
from testing_utils import EXACT_ATOL, rel_err, require_cuda
from tiny_models import FAMILIES, TEST_SLA_OVERRIDES, build_tiny_model, forward_output, randomize_proj_l

from diffusers_sla import SparseLinearAttention, iter_sla_layers
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.modules import INNER_PROCESSOR_ATTR
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.integration.report import reset_sla_stats, sla_summary
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


def _assert_every_layer_ran_as_designed(family: str, model) -> None:
    summary = sla_summary(model)
    assert summary.layers, "no SLA layer reported"
    for layer in summary.layers:
        expected_dense = _expected_dense_reason(family, layer.path)
        if expected_dense is None:
            assert layer.sla_calls > 0 and not layer.dense_calls, f"{layer.path}: {layer}"
        else:
            assert layer.sla_calls == 0 and set(layer.dense_calls) == {expected_dense}, f"{layer.path}: {layer}"


# ===== Every family: exactness, sparsity, restoration =====


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_one_reproduces_the_model(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=1)
    reference = run_eval(model, inputs)

    enable_sla(model, topk=1.0, **_family_overrides(family))
    output = run_eval(model, inputs)

    diff = max_diff(output, reference)
    print(f"{family}: max abs diff at topk=1.0 = {diff:.2e}")
    assert diff <= EXACT_ATOL
    _assert_every_layer_ran_as_designed(family, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_sla_changes_output_and_runs_in_every_self_attention_layer(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=2)
    reference = run_eval(model, inputs)

    enable_sla(model, topk=0.2, **_family_overrides(family))
    randomize_proj_l(model)
    output = run_eval(model, inputs)

    assert torch.isfinite(output).all()
    assert max_diff(output, reference) > 1e-3
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
    eager = run_eval(model, inputs)
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
        run_eval(model, inputs)  # compiles
        compiled_graphs = counters["stats"]["unique_graphs"]
        graphs_run[0] = 0
        compiled = run_eval(model, inputs)
        assert graphs_run[0] == len(blocks), "a graph break inside the SLA processor"
        run_eval(model, inputs)
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
                run_eval(model, inputs)
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

    eager, compiled = eager_and_compiled_gradients(model, inputs)
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
    graph, out = capture_cuda_graph(lambda: run_eval(model, static))
    for seed in (4, 5):
        fresh = make_inputs(seed=seed)
        for name, value in static.items():
            value.copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        eager = run_eval(model, {name: value.cuda() for name, value in fresh.items()})
        assert torch.equal(out, eager), seed
    assert sla_summary(model)["blocks.0.attn1"].sla_calls > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_sla_restores_the_original_model(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=3)
    reference = run_eval(model, inputs)
    processors = dict(model.attn_processors)
    state_keys = set(model.state_dict())

    enable_sla(model, topk=0.2, **_family_overrides(family))
    randomize_proj_l(model)
    run_eval(model, inputs)
    removed = disable_sla(model)

    assert torch.equal(run_eval(model, inputs), reference)
    assert removed and all(isinstance(layer, SparseLinearAttention) for layer in removed.values())
    assert all(model.attn_processors[name] is proc for name, proc in processors.items())
    assert set(model.state_dict()) == state_keys
    assert not sla_summary(model).layers
    assert not any(hasattr(m, INNER_PROCESSOR_ATTR) for m in model.modules())


def test_disable_then_enable_with_removed_layers_keeps_weights():
    model, make_inputs = build_tiny_model("sd3")
    inputs = make_inputs(seed=8)
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = run_eval(model, inputs)
    removed = disable_sla(model)
    enable_sla(model, topk=0.2, sla_layers=removed, **TEST_SLA_OVERRIDES)
    assert torch.equal(run_eval(model, inputs), trained)


# ===== set_attn_processor: one shared instance, per-layer state, each module's own processor =====


@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage", "hunyuanvideo", "cogvideox", "wan"])
def test_set_attn_processor_wraps_each_modules_own_processor(family):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=4)
    reference = run_eval(model, inputs)
    own_processor_types = {name: type(proc) for name, proc in model.attn_processors.items()}

    processor = SLAAttnProcessor(topk=1.0, **_family_overrides(family))
    model.set_attn_processor(processor)
    created = {path: layer for path, _, layer in iter_sla_layers(model)}
    assert created, "set_attn_processor creates the SLA layers up front, like enable_sla"
    output = run_eval(model, inputs)
    assert {path: layer for path, _, layer in iter_sla_layers(model)} == created

    assert max_diff(output, reference) <= EXACT_ATOL
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
    reference = run_eval(model, inputs)
    enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    plain = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("attn", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ])
    monkeypatch.setattr(SLAAttnProcessor.__call__, "__signature__", plain)
    assert max_diff(run_eval(model, inputs), reference) > 1e-3


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


# ===== fuse_qkv_projections and LoRA =====


@pytest.mark.parametrize("family", ["flux", "sd3", "cogvideox"])
@pytest.mark.parametrize("order", ["fuse_first", "sla_first"])
def test_fuse_qkv_projections(family, order):
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=18)
    reference = run_eval(model, inputs)
    if order == "fuse_first":
        model.fuse_qkv_projections()
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    else:
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
        model.fuse_qkv_projections()
    assert any(getattr(m, "fused_projections", False) for m in model.modules())
    assert max_diff(run_eval(model, inputs), reference) <= EXACT_ATOL
    _assert_every_layer_ran_as_designed(family, model)
    model.unfuse_qkv_projections()
    assert max_diff(run_eval(model, inputs), reference) <= EXACT_ATOL


@pytest.mark.parametrize("order", ["lora_first", "sla_first"])
def test_lora_on_qkv(order):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=19)
    base = run_eval(model, inputs)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if order == "lora_first":
        model.add_adapter(lora)
        with_lora = run_eval(model, inputs)
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    else:
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
        model.add_adapter(lora)
        disable_sla(model)
        with_lora = run_eval(model, inputs)
        enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    assert max_diff(with_lora, base) > 1e-3
    assert max_diff(run_eval(model, inputs), with_lora) <= EXACT_ATOL

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
    run_eval(model, make_inputs(seed=20))
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


def test_model_with_sla_survives_deepcopy_and_pickle():
    import copy
    import io

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=22)
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    expected = run_eval(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(run_eval(clone, inputs), expected)
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
