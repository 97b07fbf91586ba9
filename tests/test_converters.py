# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The legacy converters (`diffusers_sla/weights/converters.py`): SimpleTuner `sla_attention.pt` and TurboDiffusion
Wan checkpoints -> `sla_attention.safetensors`."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, forward_output
from weights_testing import enabled_tiny, safetensors_keys

from diffusers_sla.config import SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import enable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.weights.converters import convert_simpletuner_sla, convert_turbodiffusion_wan
from diffusers_sla.weights.io import get_sla_state_dict, load_sla

# ===== Converters =====


def simpletuner_file(path, head_dims=(16,), seed=30, settings=None):
    gen = torch.Generator().manual_seed(seed)
    state = {
        f"{d}:torch.bfloat16": {
            "proj_l.weight": torch.randn(d, d, generator=gen), "proj_l.bias": torch.randn(d, generator=gen)
        }
        for d in head_dims
    }
    torch.save({"settings": settings or {"topk": 0.3, "blkq": 32, "blkk": 32, "tie_feature_map_qk": True},
                "state": state}, path)
    return state


def test_convert_simpletuner(tmp_path):
    state = simpletuner_file(tmp_path / "sla_attention.pt", head_dims=(16, 8))
    tiny = enabled_tiny("flux", topk=0.3)
    result = convert_simpletuner_sla(tmp_path / "sla_attention.pt", tiny.model, tmp_path / "out", min_kv_blocks=2)
    assert result.path == str(tmp_path / "out" / SLA_WEIGHTS_NAME)
    assert list(result.matched) == ["16:torch.bfloat16"] and not result.unmatched_layers
    assert result.config.topk == 0.3 and result.config.linear_scope == "all" and result.config.blkq == 32

    # Load into a model enabled with the converted config: every layer holds the shared projection.
    enable_sla(tiny.model, result.config)
    load_sla(tiny.model, result.path)
    for path, _, layer in iter_sla_layers(tiny.model):
        assert torch.equal(layer.proj_l.weight, state["16:torch.bfloat16"]["proj_l.weight"]), path
        assert torch.equal(layer.proj_l.bias, state["16:torch.bfloat16"]["proj_l.bias"]), path
    # One parameter per layer, not one shared storage.
    weights = [layer.proj_l.weight for _, _, layer in iter_sla_layers(tiny.model)]
    assert len({w.data_ptr() for w in weights}) == len(weights) == 2


@pytest.mark.parametrize("config", [{"topk": 0.1}, '{"topk": 0.1}'])
def test_convert_partial_config_changes_only_the_fields_it_names(tmp_path, config):
    simpletuner_file(tmp_path / "sla_attention.pt")
    tiny = enabled_tiny("flux", topk=0.3)
    result = convert_simpletuner_sla(tmp_path / "sla_attention.pt", tiny.model, None, config=config)
    # topk from the user; blkq/blkk from the file's settings; linear_scope from the legacy default
    assert (result.config.topk, result.config.blkq, result.config.blkk, result.config.linear_scope) == (
        0.1, 32, 32, "all")


def test_convert_simpletuner_for_model_folder(tmp_path):
    state = simpletuner_file(tmp_path / "sla_attention.pt")
    build_tiny_model("wan").model.save_pretrained(tmp_path / "wan")  # a plain model: SLA layers come from its config
    result = convert_simpletuner_sla(tmp_path / "sla_attention.pt", tmp_path / "wan", tmp_path / "wan",
                                     cross_attention="dense", min_kv_blocks=2)
    keys = set(safetensors_keys(result.path))
    assert keys == {f"blocks.{i}.attn1.proj_l.{n}" for i in (0, 1) for n in ("weight", "bias")}
    # The replay picks it up from the model folder.
    loaded = type(build_tiny_model("wan").model).from_pretrained(tmp_path / "wan")
    enable_sla(loaded, result.config)
    assert torch.equal(loaded.blocks[1].attn1.sla.proj_l.weight, state["16:torch.bfloat16"]["proj_l.weight"])


def test_convert_simpletuner_errors(tmp_path):
    tiny = enabled_tiny("flux")
    simpletuner_file(tmp_path / "other.pt", head_dims=(8, 32))
    with pytest.raises(ValueError, match=r"No head size .* \(\[8, 32\]\) matches .* \(head sizes \[16\]\)"):
        convert_simpletuner_sla(tmp_path / "other.pt", tiny.model)

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"settings": {}, "state": {}, "obj": NotATensor()}, handle)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\)"):
        convert_simpletuner_sla(tmp_path / "evil.pt", tiny.model)


def test_convert_refuses_non_finite_and_malformed_tensors(tmp_path):
    tiny = enabled_tiny("flux")
    state = simpletuner_file(tmp_path / "sla_attention.pt")
    state["16:torch.bfloat16"]["proj_l.bias"][2] = float("nan")
    torch.save({"settings": {}, "state": state}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"16:torch.bfloat16: .*not finite"):
        convert_simpletuner_sla(tmp_path / "nan.pt", tiny.model)
    wan = enabled_tiny("wan")
    turbo = turbo_file(tmp_path / "turbo.pth")
    turbo["net.blocks.1.self_attn.attn_op.local_attn.proj_l.weight"] = torch.tensor(1.0)  # 0-d
    torch.save(turbo, tmp_path / "scalar.pth")
    for model in (wan.model, None):
        with pytest.raises(ValueError, match=r"block 1: expected proj_l.weight .* got \(\)"):
            convert_turbodiffusion_wan(tmp_path / "scalar.pth", model)
    turbo["net.blocks.1.self_attn.attn_op.local_attn.proj_l.weight"] = torch.full((16, 16), float("inf"))
    torch.save(turbo, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=r"block 1: .*not finite"):
        convert_turbodiffusion_wan(tmp_path / "inf.pth", wan.model)


class NotATensor:
    """A Python object in a pickle: `weights_only=True` must refuse it."""


def turbo_file(path, blocks=2, head_dim=16, prefix="net.", seed=40):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(blocks):
        base = f"{prefix}blocks.{i}.self_attn"
        state[f"{base}.q.weight"] = torch.randn(32, 32, generator=gen)  # unrelated backbone weights
        state[f"{base}.attn_op.local_attn.proj_l.weight"] = torch.randn(head_dim, head_dim, generator=gen)
        state[f"{base}.attn_op.local_attn.proj_l.bias"] = torch.randn(head_dim, generator=gen)
    torch.save(state, path)
    return state


def test_convert_turbodiffusion_wan(tmp_path):
    state = turbo_file(tmp_path / "turbo.pth")
    tiny = enabled_tiny("wan", linear_scope="all", topk=0.1)
    inputs = tiny.make_inputs(seed=5)
    result = convert_turbodiffusion_wan(tmp_path / "turbo.pth", tiny.model, tmp_path / "sla.safetensors",
                                        topk=0.1, **TEST_SLA_OVERRIDES)
    assert result.path == str(tmp_path / "sla.safetensors")
    (loaded,) = load_sla(tiny.model, result.path)
    assert loaded.loaded_layers == ["blocks.0.attn1", "blocks.1.attn1"]
    for i in (0, 1):
        sla = tiny.model.blocks[i].attn1.sla
        assert torch.equal(sla.proj_l.weight, state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"])
        assert torch.equal(sla.proj_l.bias, state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias"])
    with torch.no_grad():
        out = forward_output(tiny.model, inputs)
    assert torch.isfinite(out).all()


def test_convert_turbodiffusion_errors(tmp_path):
    tiny = enabled_tiny("wan")
    turbo_file(tmp_path / "three.pth", blocks=3)
    with pytest.raises(ValueError, match="Block 2 of the checkpoint has no SLA layer `blocks.2.attn1`"):
        convert_turbodiffusion_wan(tmp_path / "three.pth", tiny.model)
    turbo_file(tmp_path / "wide.pth", head_dim=32)
    with pytest.raises(ValueError, match=r"expected proj_l.weight \(16, 16\)"):
        convert_turbodiffusion_wan(tmp_path / "wide.pth", tiny.model)
    torch.save({"blocks.0.attn1.to_q.weight": torch.randn(4, 4)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a TurboDiffusion Wan checkpoint"):
        convert_turbodiffusion_wan(tmp_path / "plain.pth", tiny.model)
    state = turbo_file(tmp_path / "two_copies.pth")
    state.update({k.replace("net.", "ema."): v for k, v in state.items()})
    torch.save(state, tmp_path / "two_copies.pth")
    with pytest.raises(ValueError, match=r"several prefixes \['ema.', 'net.'\]"):
        convert_turbodiffusion_wan(tmp_path / "two_copies.pth", tiny.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = convert_turbodiffusion_wan(tmp_path / "two_copies.pth", tiny.model, key_prefix="ema.")
    assert sorted(result.tensors) == sorted(get_sla_state_dict(tiny.model))
