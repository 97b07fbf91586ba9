# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""diffusers' own contracts with SLA on (tiny models, CPU): the processor API, IP-Adapters, torch.compile from a cold
start, every install path's replay of saved SLA weights, all-or-nothing installs, offloading and casting.

The rule tested here: SLA is not one of diffusers' processors. It runs beneath whatever processor each module has;
`get_processor()` / `attn_processors` return that processor; setting another one replaces it and SLA stays on with
the layer's own config; only `disable_sla` turns SLA off.
"""

from __future__ import annotations

import pytest
import torch
from glue_testing import eager_and_compiled_gradients, run_eval, uncompile
from testing_utils import EXACT_ATOL
from tiny_models import (
    TEST_SLA_OVERRIDES,
    build_tiny_model,
    build_tiny_pipeline,
    randomize_proj_l,
)

from diffusers_sla import SparseLinearAttention, iter_sla_layers
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.integration.report import sla_summary


def _attention_modules(model):
    return [(path, m) for path, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _configs(model) -> dict:
    return {path: layer.config for path, _, layer in iter_sla_layers(model)}


# ===== The processor API =====


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_get_processor_returns_what_was_set_and_sla_stays_on_beneath(family):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=1)
    reference = run_eval(model, inputs)
    own = {name: type(p) for name, p in model.attn_processors.items()}
    enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    assert {name: type(p) for name, p in model.attn_processors.items()} == own
    configs = _configs(model)

    path, attn = next((p, m) for p, m in _attention_modules(model) if p in configs)
    new = type(attn.get_processor())()  # a fresh instance of the module's own processor class
    attn.set_processor(new)
    assert attn.get_processor() is new and model.attn_processors[f"{path}.processor"] is new
    assert run_eval(model, inputs).sub(reference).abs().max() <= EXACT_ATOL
    assert sla_summary(model)[path].sla_calls == 1  # SLA ran beneath the new processor
    assert _configs(model) == configs

    if family == "wan":  # a processor class that is not the model's own (what diffusers' tests set)
        other = AttnProcessor2_0()
        attn.set_processor(other)
        assert attn.get_processor() is other


def test_set_attn_processor_round_trip_keeps_the_users_config():
    # `model.set_attn_processor(model.attn_processors)` and diffusers' `value.__class__()` rebuilds (unload_ip_adapter)
    # must never replace SLA's config with defaults.
    model, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=2)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    before = run_eval(model, inputs)
    configs = _configs(model)
    model.set_attn_processor({name: type(p)() for name, p in model.attn_processors.items()})
    model.set_attn_processor(dict(model.attn_processors))
    assert _configs(model) == configs and all(c.topk == 0.5 and c.blkq == 32 for c in configs.values())
    assert torch.equal(run_eval(model, inputs), before)
    disable_sla(model)  # one rule: only disable_sla turns SLA off
    assert not list(iter_sla_layers(model)) and not any(
        isinstance(m.processor, SLAAttnProcessor) for _, m in _attention_modules(model))


# ===== IP-Adapter (Flux) =====


def _flux_ip_adapter_state_dict(transformer, image_embed_dim: int = 24, seed: int = 0) -> dict:
    """A random IP-Adapter in the layout `FluxTransformer2DModel._load_ip_adapter_weights` reads: an image projection
    (`proj` to 4 tokens of `joint_attention_dim`, then a LayerNorm) and, per double-stream block, the key and value
    projections of the image tokens."""
    gen = torch.Generator().manual_seed(seed)
    cross_dim = transformer.config.joint_attention_dim
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tokens = 4
    image_proj = {
        "proj.weight": torch.randn(tokens * cross_dim, image_embed_dim, generator=gen) * 0.2,
        "proj.bias": torch.randn(tokens * cross_dim, generator=gen) * 0.1,
        "norm.weight": 1.0 + torch.randn(cross_dim, generator=gen) * 0.1,
        "norm.bias": torch.randn(cross_dim, generator=gen) * 0.1,
    }
    ip_adapter = {}
    for index in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{index}.{name}.weight"] = torch.randn(hidden, cross_dim, generator=gen) * 0.3
            ip_adapter[f"{index}.{name}.bias"] = torch.randn(hidden, generator=gen) * 0.1
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _with_image(inputs: dict, image_embeds: torch.Tensor) -> dict:
    # the transformer pops `ip_adapter_image_embeds` from the dict: a fresh one per call
    return {**inputs, "joint_attention_kwargs": {"ip_adapter_image_embeds": [image_embeds]}}


def test_flux_ip_adapter_load_scale_unload_with_sla_match_dense():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    pipe, _ = build_tiny_pipeline("flux")
    model = pipe.transformer
    _, make_inputs = build_tiny_model("flux")
    inputs = make_inputs(seed=3)
    image = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(4))
    state_dict = _flux_ip_adapter_state_dict(model)

    # dense: the same transformer before SLA
    no_adapter = run_eval(model, inputs)
    model._load_ip_adapter_weights([state_dict])
    dense_adapter = run_eval(model, _with_image(inputs, image))
    pipe.unload_ip_adapter()
    assert (dense_adapter - no_adapter).abs().max() > 1e-3, "the adapter must change the output"

    enable_sla(pipe, topk=1.0, **TEST_SLA_OVERRIDES)
    configs = _configs(model)
    model._load_ip_adapter_weights([state_dict])
    ip_processors = [p for p in model.attn_processors.values() if isinstance(p, FluxIPAdapterAttnProcessor)]
    assert len(ip_processors) == len(model.transformer_blocks)
    assert any(".processor.to_k_ip." in name for name in model.state_dict())  # the keys a dense model has
    out = run_eval(model, _with_image(inputs, image))
    assert (out - dense_adapter).abs().max() <= EXACT_ATOL
    assert sla_summary(model).sla_calls > 0

    pipe.set_ip_adapter_scale(0.0)
    assert all(p.scale == [0.0] for p in ip_processors)
    assert (run_eval(model, _with_image(inputs, image)) - no_adapter).abs().max() <= EXACT_ATOL

    pipe.unload_ip_adapter()
    assert not any(isinstance(p, FluxIPAdapterAttnProcessor) for p in model.attn_processors.values())
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())
    assert _configs(model) == configs  # not reset to SLAAttnProcessor()'s defaults
    assert (run_eval(model, inputs) - no_adapter).abs().max() <= EXACT_ATOL
    assert not any(".to_k_ip." in name for name in model.state_dict())


# ===== Every install path replays the saved SLA weights (issue #29, item 2) =====


def _saved_wan(tmp_path):
    model, make_inputs = build_tiny_model("wan")
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model, seed=5)
    model.save_pretrained(tmp_path / "m")
    return make_inputs(seed=6)


@pytest.mark.parametrize("path", ["per_module", "dict"])
def test_every_install_path_replays_the_saved_sla_weights(tmp_path, path):
    from diffusers import WanTransformer3DModel

    inputs = _saved_wan(tmp_path)
    served = WanTransformer3DModel.from_pretrained(tmp_path / "m")
    enable_sla(served)
    expected = run_eval(served, inputs)

    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "m")
    processor = SLAAttnProcessor(topk=0.5, **TEST_SLA_OVERRIDES)
    if path == "per_module":
        for _, attn in _attention_modules(loaded):
            attn.set_processor(processor)
    else:
        loaded.set_attn_processor({name: processor for name in loaded.attn_processors})
    assert torch.equal(run_eval(loaded, inputs), expected)


def test_per_module_install_with_another_config_fails_and_leaves_the_module(tmp_path):
    from diffusers import WanTransformer3DModel

    _saved_wan(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "m")
    attn = loaded.blocks[0].attn1
    own = attn.processor
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1.*`topk` \(set 0\.2, file 0\.5\)"):
        attn.set_processor(SLAAttnProcessor(topk=0.2, **TEST_SLA_OVERRIDES))
    assert attn.processor is own and "sla" not in attn._modules


# ===== All or nothing (issue #29, item 4) =====


def test_enable_sla_with_an_unknown_sla_layers_key_changes_nothing():
    model, _ = build_tiny_model("flux")
    processors = dict(model.attn_processors)
    with pytest.raises(ValueError, match=r"`sla_layers`: no attention module at \['nope'\]"):
        enable_sla(model, sla_layers={"nope": SparseLinearAttention(16)}, **TEST_SLA_OVERRIDES)
    assert not list(iter_sla_layers(model))
    assert not any(isinstance(m.processor, SLAAttnProcessor) for _, m in _attention_modules(model))
    assert dict(model.attn_processors) == processors


def test_pipeline_whose_second_transformer_has_a_bad_sidecar_is_left_unchanged(tmp_path):
    from diffusers import WanTransformer3DModel

    pipe, _ = build_tiny_pipeline("wan")
    second, _ = build_tiny_model("wan", seed=1)
    enable_sla(second, topk=0.5, **TEST_SLA_OVERRIDES)
    second.save_pretrained(tmp_path / "t2")
    (tmp_path / "t2" / "sla_attention.safetensors").write_bytes(b"not a safetensors file")
    pipe.register_modules(transformer_2=WanTransformer3DModel.from_pretrained(tmp_path / "t2"))
    states = {name: dict(getattr(pipe, name).attn_processors) for name in ("transformer", "transformer_2")}
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        enable_sla(pipe, topk=0.5, **TEST_SLA_OVERRIDES)
    for name, processors in states.items():
        component = getattr(pipe, name)
        assert not list(iter_sla_layers(component)), name
        assert not any(isinstance(m.processor, SLAAttnProcessor) for _, m in _attention_modules(component)), name
        assert dict(component.attn_processors) == processors


# ===== Offloading and casting (issue #29, items 8 and 9) =====


@pytest.mark.parametrize("order", ["sla_then_offload", "offload_then_sla"])
def test_accelerate_cpu_offload_in_either_order(order):
    from accelerate import cpu_offload

    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=7)
    reference, _ = build_tiny_model("wan")
    enable_sla(reference, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(reference)
    expected = run_eval(reference, inputs)
    state = reference.state_dict()

    if order == "sla_then_offload":
        enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
        model.load_state_dict(state)
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        cpu_offload(model, execution_device=torch.device("cpu"))
        enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
        with torch.no_grad():
            for path, _, layer in iter_sla_layers(model):
                layer.proj_l.weight.copy_(state[f"{path}.sla.proj_l.weight"])
                layer.proj_l.bias.copy_(state[f"{path}.sla.proj_l.bias"])
    assert torch.equal(run_eval(model, inputs), expected)
    assert sla_summary(model).sla_calls > 0


@pytest.mark.parametrize("storage_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_layerwise_casting_keeps_proj_l_float32(storage_dtype):
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=8)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    trained = {path: layer.proj_l.weight.clone() for path, _, layer in iter_sla_layers(model)}
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
    assert any(p.dtype == storage_dtype for p in model.parameters()), "nothing was cast"
    run_eval(model, inputs)
    for path, _, layer in iter_sla_layers(model):
        assert layer.proj_l.weight.dtype == torch.float32 and layer.proj_l.bias.dtype == torch.float32
        assert torch.equal(layer.proj_l.weight, trained[path])
    assert "proj_l" in model._keep_in_fp32_modules and any("sla" in p for p in model._skip_layerwise_casting_patterns)


def test_lora_all_linear_leaves_proj_l_alone():
    # PEFT wraps `nn.Linear` layers; proj_l's weights are read by the kernels, not through a forward a wrapper
    # could change, so "all-linear" must not pick it (issue #29, item 3)
    from peft import LoraConfig

    model, _ = build_tiny_model("wan")
    enable_sla(model, **TEST_SLA_OVERRIDES)
    model.add_adapter(LoraConfig(r=2, target_modules="all-linear"))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert not any(".sla." in name and "lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_runs_sla_with_the_same_output(offload_type):
    model, make_inputs = build_tiny_model("wan")
    inputs = make_inputs(seed=9)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    expected = run_eval(model, inputs)
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type=offload_type, num_blocks_per_group=1)
    assert torch.equal(run_eval(model, inputs), expected)
    assert all(layer.proj_l.weight.dtype == torch.float32 for _, _, layer in iter_sla_layers(model))


# ===== torch.compile from a cold start =====


@pytest.mark.parametrize("family", ["wan", "flux", "qwenimage"])
@pytest.mark.parametrize("how", ["whole_model", "repeated_blocks"])
def test_compile_from_cold_does_not_recompile(family, how):
    # The first call ever is compiled (no eager call warms anything up); the second must run the same graphs.
    model, make_inputs = build_tiny_model(family)
    inputs = make_inputs(seed=10)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            if how == "whole_model":
                compiled = torch.compile(model, fullgraph=True, backend="eager")
                first = run_eval(compiled, inputs)
                second = run_eval(compiled, inputs)
            else:
                model.compile_repeated_blocks(fullgraph=True, backend="eager")
                first = run_eval(model, inputs)
                second = run_eval(model, inputs)
    finally:
        uncompile(model)
    eager = run_eval(model, inputs)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)
    assert all(layer.compiled_route is not None for layer in sla_summary(model).layers)


# ===== IP-Adapter (SD3) =====

# diffusers' SD3 loader renames the image projection's keys from the original checkpoint layout; this is the same
# renaming read backwards (module-name prefix inside `layers.<i>.`), to write a state dict in the original layout.
_SD3_IMAGE_PROJ_ORIGINAL_NAMES = {
    "ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_kv": "0.to_kv", "attn.to_out.0": "0.to_out",
    "adaln_norm": "1.0", "ff.net.0.proj": "1.1", "ff.net.2": "1.3", "adaln_proj": "2.1",
}


def _sd3_ip_adapter_state_dict(transformer, image_embed_dim: int = 24, seed: int = 0) -> dict:
    """A random SD3 IP-Adapter in the layout `SD3Transformer2DModel._load_ip_adapter_weights` reads: a time-aware
    image projection (heads of 64: hidden size 64, one head) and, per joint block, `SD3IPAdapterJointAttnProcessor2_0`'s
    weights (AdaLayerNorm on the image tokens, their key and value projections, RMS norms)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    hidden = 64
    projection = IPAdapterTimeImageProjection(embed_dim=image_embed_dim, output_dim=inner, hidden_dim=hidden, heads=1,
                                              num_queries=4, timestep_in_dim=32)
    image_proj = {}
    for key, value in projection.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            for new, old in sorted(_SD3_IMAGE_PROJ_ORIGINAL_NAMES.items(), key=lambda kv: -len(kv[0])):
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            key = f"layers.{index}.{rest}"
        image_proj[key] = value
    ip_adapter = {}
    for index in range(len(transformer.transformer_blocks)):
        processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                      head_dim=transformer.config.attention_head_dim,
                                                      timesteps_emb_dim=hidden)
        for name, value in processor.state_dict().items():
            # random, not the zero/one initialisation, so that the adapter changes the output
            ip_adapter[f"{index}.{name}"] = torch.randn_like(value) * 0.3 + (1.0 if "norm_" in name and
                                                                             name.endswith("weight") and
                                                                             value.ndim == 1 else 0.0)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_sd3_ip_adapter_load_scale_unload_with_sla_match_dense():
    from types import SimpleNamespace

    from diffusers.loaders.ip_adapter import SD3IPAdapterMixin
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

    model, make_inputs = build_tiny_model("sd3")
    pipe = SimpleNamespace(transformer=model)  # the pipeline methods read only `transformer` (no image encoder here)
    inputs = make_inputs(seed=11)
    image = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(12))
    state_dict = _sd3_ip_adapter_state_dict(model)

    def with_image():
        return {**inputs, "joint_attention_kwargs": {"ip_adapter_image_embeds": image}}

    no_adapter = run_eval(model, inputs)
    model._load_ip_adapter_weights(state_dict)
    dense_adapter = run_eval(model, with_image())
    SD3IPAdapterMixin.unload_ip_adapter(pipe)
    assert (dense_adapter - no_adapter).abs().max() > 1e-3, "the adapter must change the output"

    enable_sla(model, topk=1.0, **TEST_SLA_OVERRIDES)
    configs = _configs(model)
    model._load_ip_adapter_weights(state_dict)
    assert all(isinstance(p, SD3IPAdapterJointAttnProcessor2_0) for n, p in model.attn_processors.items()
               if n.startswith("transformer_blocks."))  # (the image projection has attention modules of its own)
    assert (run_eval(model, with_image()) - dense_adapter).abs().max() <= EXACT_ATOL
    assert sla_summary(model).sla_calls > 0

    SD3IPAdapterMixin.set_ip_adapter_scale(pipe, 0.0)
    assert (run_eval(model, with_image()) - no_adapter).abs().max() <= EXACT_ATOL

    SD3IPAdapterMixin.unload_ip_adapter(pipe)
    assert {n: type(p) for n, p in model.attn_processors.items()} == {n: JointAttnProcessor2_0 for n in model.attn_processors}
    assert _configs(model) == configs
    assert (run_eval(model, inputs) - no_adapter).abs().max() <= EXACT_ATOL


def test_compiled_masked_blocks_train_like_eager():
    # QwenImage's joint attention has a key padding mask: compiled, it runs the opaque `masked_sla` op, whose backward
    # recomputes the forward; loss gradients must be eager's (aot_eager: autograd's tracing, no code generation)
    model, make_inputs = build_tiny_model("qwenimage")
    model.train()
    inputs = make_inputs(seed=3)
    enable_sla(model, topk=0.5, **TEST_SLA_OVERRIDES)
    randomize_proj_l(model)

    eager, compiled = eager_and_compiled_gradients(model, inputs, fullgraph=True)
    assert any(".sla.proj_l." in name for name in eager)
    for name, grad in compiled.items():
        if name in eager:
            torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
        else:  # unused in eager (no gradient at all), zero when compiled
            assert not grad.any(), name
    assert eager.keys() <= compiled.keys()
    assert {layer.compiled_route for layer in sla_summary(model).layers} == {"sla"}
