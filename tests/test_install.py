# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`enable_sla` / `disable_sla` (`diffusers_sla/integration/install.py`): SLA layers up front, re-enabling, pipelines,
and the replay of saved weights."""

from __future__ import annotations

import pytest
import torch
from glue_testing import fresh_logs, max_diff, run_eval  # noqa: F401  (fresh_logs: autouse)
from testing_utils import EXACT_ATOL
from tiny_models import (
    PIPELINE_FAMILIES,
    TEST_SLA_OVERRIDES,
    build_tiny_model,
    build_tiny_pipeline,
    forward_output,
    randomize_proj_l,
)

from diffusers_sla import iter_sla_layers
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.report import sla_summary

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
    trained = run_eval(model, inputs)
    before = {path: [p.clone() for p in layer.proj_l.parameters()] for path, _, layer in iter_sla_layers(model)}
    enable_sla(model, topk=0.2, linear_scope="none", **TEST_SLA_OVERRIDES)
    sparse_only = forward_output(model, inputs)
    sparse_only.square().mean().backward()
    for path, _, layer in iter_sla_layers(model):
        assert layer.config.linear_scope == "none" and "linear_scope='none'" in repr(layer)
        assert all(p.grad is None for p in layer.proj_l.parameters()), path
        assert all(torch.equal(p, b) for p, b in zip(layer.proj_l.parameters(), before[path]))
    assert any(p.grad is not None for name, p in model.named_parameters() if ".sla." not in name)
    assert max_diff(sparse_only, trained) > 1e-3
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(model):
            for p in layer.proj_l.parameters():
                p.zero_()
    enable_sla(model, topk=0.2, **TEST_SLA_OVERRIDES)
    assert torch.equal(run_eval(model, inputs), sparse_only.detach())  # "rest" with proj_l at exact zero
    with torch.no_grad():
        for path, _, layer in iter_sla_layers(model):
            for p, b in zip(layer.proj_l.parameters(), before[path]):
                p.copy_(b)
    assert torch.equal(run_eval(model, inputs), trained)


def test_enable_sla_works_without_set_attn_processor():
    # A plain nn.Module holding diffusers attention modules: enable_sla walks the modules with `set_processor`.
    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=9)
    reference = run_eval(model, inputs)
    wrapper = torch.nn.ModuleDict({"inner": model})
    assert not hasattr(wrapper, "set_attn_processor")
    enable_sla(wrapper, topk=1.0, **TEST_SLA_OVERRIDES)
    assert max_diff(run_eval(model, inputs), reference) <= EXACT_ATOL
    assert sla_summary(wrapper).sla_calls == 2
    disable_sla(wrapper)
    assert torch.equal(run_eval(model, inputs), reference)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_pipeline_end_to_end(family):
    pipe, make_call_kwargs = build_tiny_pipeline(family)
    reference = pipe(**make_call_kwargs(seed=0))[0]

    enable_sla(pipe, topk=0.2, **TEST_SLA_OVERRIDES)
    output = pipe(**make_call_kwargs(seed=0))[0]
    summary = sla_summary(pipe)

    assert output.shape == reference.shape and torch.isfinite(output).all()
    assert max_diff(output, reference) > 1e-4
    assert summary.sla_calls > 0 and all(layer.path.startswith("transformer.") for layer in summary.layers)
    assert all(layer.sla_calls > 0 for layer in summary.layers if not layer.path.endswith("attn2"))
    disable_sla(pipe)
    assert torch.equal(pipe(**make_call_kwargs(seed=0))[0], reference)


def test_enable_sla_replays_saved_weights_and_their_config(tmp_path):
    from diffusers import FluxTransformer2DModel

    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=21)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = run_eval(model, inputs)
    model.save_pretrained(tmp_path)

    loaded = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    enable_sla(loaded)  # no config: the stored one (topk=0.5, blocks of 32) and the trained proj_l come back
    assert all(layer.config.topk == 0.5 and layer.config.blkk == 32 for _, _, layer in iter_sla_layers(loaded))
    assert torch.equal(run_eval(loaded, inputs), trained)
