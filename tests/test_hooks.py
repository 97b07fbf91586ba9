# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The patches of diffusers (`diffusers_sla/hooks.py`): `save_pretrained` writes `sla_attention.safetensors`
after plain base weights, `from_pretrained` + `enable_sla` / `set_attn_processor` load it back, pipelines included."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, build_tiny_pipeline, forward_output
from weights_testing import (
    BASE_WEIGHTS,
    assert_same_state,
    enabled_tiny,
    randomize_sla,
    safetensors_keys,
    sla_snapshot,
)

from diffusers_sla import hooks
from diffusers_sla.config import SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.weights.format import read_sla_file
from diffusers_sla.weights.io import get_sla_state_dict, load_sla, save_sla

# ===== save_pretrained / from_pretrained =====


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_save_pretrained_from_pretrained_round_trip(family, tmp_path, caplog):
    tiny = enabled_tiny(family, sla_seed=1)
    inputs = tiny.make_inputs(seed=3)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    tiny.model.save_pretrained(tmp_path)

    assert (tmp_path / SLA_WEIGHTS_NAME).is_file()
    sla_keys = safetensors_keys(tmp_path / SLA_WEIGHTS_NAME)
    assert sorted(sla_keys) == sorted(k.replace(".sla.", ".") for k in tiny.model.state_dict() if ".sla." in k)

    with caplog.at_level(logging.WARNING, logger="diffusers_sla.serialization"):
        loaded = type(tiny.model).from_pretrained(tmp_path).eval()
        enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert "loaded trained SLA weights" in caplog.text and str(tmp_path) in caplog.text
    assert_same_state(sla_snapshot(loaded), sla_snapshot(tiny.model))
    with torch.no_grad():
        assert torch.equal(forward_output(loaded, inputs), expected)
        # The SLA weights matter: the same model with zero projections computes something else.
        for tensor in get_sla_state_dict(loaded).values():
            tensor.zero_()
        assert not torch.allclose(forward_output(loaded, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_base_weights_stay_plain_diffusers(family, tmp_path):
    tiny = enabled_tiny(family, sla_seed=1)
    tiny.model.save_pretrained(tmp_path)
    plain = build_tiny_model(family, seed=0).model
    assert sorted(safetensors_keys(tmp_path / BASE_WEIGHTS)) == sorted(plain.state_dict())
    # diffusers alone loads them with no missing or unexpected key.
    _, info = type(plain).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    # The SLA layers are back in place after the save.
    assert len(list(iter_sla_layers(tiny.model))) == len(sla_snapshot(tiny.model)) // 2 > 0
    assert any(".sla." in k for k in tiny.model.state_dict())


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_pipeline_round_trip(family, tmp_path):
    pipe, make_call_kwargs = build_tiny_pipeline(family, seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    randomize_sla(pipe.transformer, 5)
    expected = pipe(**make_call_kwargs(seed=0))[0]
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / SLA_WEIGHTS_NAME).is_file()
    assert not any(".sla." in k for k in safetensors_keys(tmp_path / "transformer" / BASE_WEIGHTS))

    # The tiny pipelines have no text encoder or tokenizer: say so again when loading.
    absent = {name: None for name, component in pipe.components.items() if component is None}
    loaded = type(pipe).from_pretrained(tmp_path, **absent)
    loaded.set_progress_bar_config(disable=True)
    enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert_same_state(sla_snapshot(loaded.transformer), sla_snapshot(pipe.transformer))
    torch.testing.assert_close(loaded(**make_call_kwargs(seed=0))[0], expected, rtol=1e-5, atol=1e-5)
    # The SLA weights matter at that tolerance: zero projections give another result.
    with torch.no_grad():
        for tensor in get_sla_state_dict(loaded.transformer).values():
            tensor.zero_()
    assert not torch.allclose(loaded(**make_call_kwargs(seed=0))[0], expected, rtol=1e-5, atol=1e-5)

    # load_sla on a pipeline reads each component's subfolder.
    other, _ = build_tiny_pipeline(family, seed=0)
    enable_sla(other, **TEST_SLA_OVERRIDES)
    load_sla(other, tmp_path)
    assert_same_state(sla_snapshot(other.transformer), sla_snapshot(pipe.transformer))


def test_lazily_created_layers_are_saved(tmp_path):
    # SLA installed with set_attn_processor: the layers appear at the first call, and the save hook sees them.
    tiny = build_tiny_model("flux", seed=0)
    tiny.model.set_attn_processor(SLAAttnProcessor(**TEST_SLA_OVERRIDES))
    with torch.no_grad():
        forward_output(tiny.model, tiny.make_inputs(seed=0))
    randomize_sla(tiny.model, 6)
    tiny.model.save_pretrained(tmp_path)
    weights = read_sla_file(tmp_path / SLA_WEIGHTS_NAME)
    assert_same_state(weights.tensors, sla_snapshot(tiny.model))
    assert weights.config.blkq == TEST_SLA_OVERRIDES["blkq"]
    assert not any(".sla." in k for k in safetensors_keys(tmp_path / BASE_WEIGHTS))


def test_model_without_sla_is_unaffected(tmp_path):
    tiny = build_tiny_model("flux", seed=0)
    tiny.model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", BASE_WEIGHTS]
    hooks.install_hooks()  # idempotent: still one wrapper
    from diffusers import ModelMixin

    assert not getattr(ModelMixin.save_pretrained.__wrapped__, "_diffusers_sla_hook", False)


def test_every_patch_is_applied_once():
    # hooks.py's table: each patched function of diffusers is our wrapper, around diffusers' own (not around another
    # wrapper of ours), however often the hooks are installed
    from diffusers import ModelMixin
    from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    hooks.install_hooks()
    hooks.install_hooks()
    patched = [(Attention, "set_processor"), (Attention, "get_processor"), (AttentionModuleMixin, "set_processor"),
               (AttentionModuleMixin, "get_processor"), (AttentionMixin, "set_attn_processor"),
               (ModelMixin, "save_pretrained"), (ModelMixin, "from_pretrained")]
    for owner, name in patched:
        function = owner.__dict__[name]
        function = getattr(function, "__func__", function)  # from_pretrained is a classmethod
        assert getattr(function, "_diffusers_sla_hook", False), f"{owner.__name__}.{name}"
        assert not getattr(function.__wrapped__, "_diffusers_sla_hook", False), f"{owner.__name__}.{name}"


def test_saving_without_sla_removes_a_stale_sidecar(tmp_path, caplog):
    # A folder saved with SLA, then saved again from the same model with SLA turned off: the old sidecar must not
    # stay beside the new base weights, where `enable_sla` would load its old `proj_l`.
    tiny = enabled_tiny("flux", sla_seed=2)
    tiny.model.save_pretrained(tmp_path)
    assert (tmp_path / SLA_WEIGHTS_NAME).is_file()
    disable_sla(tiny.model)
    with caplog.at_level(logging.WARNING, logger="diffusers_sla.serialization"):
        tiny.model.save_pretrained(tmp_path)
    assert not (tmp_path / SLA_WEIGHTS_NAME).exists()
    assert "removed" in caplog.text and SLA_WEIGHTS_NAME in caplog.text
    loaded = type(tiny.model).from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="No SLA weights found"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert all(not t.any() for t in get_sla_state_dict(loaded).values())
    # The same for a pipeline: each component folder.
    pipe, _ = build_tiny_pipeline("wan", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer" / SLA_WEIGHTS_NAME).is_file()
    disable_sla(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "transformer" / SLA_WEIGHTS_NAME).exists()


def test_sidecar_is_written_after_the_base_weights(tmp_path):
    # A save that fails while writing the base weights (here: a folder where the weights file goes) must not leave
    # new SLA weights beside whatever base weights were there.
    tiny = enabled_tiny("flux", sla_seed=2)
    (tmp_path / BASE_WEIGHTS).mkdir()
    with pytest.raises(Exception, match="Is a directory"):
        tiny.model.save_pretrained(tmp_path)
    assert not (tmp_path / SLA_WEIGHTS_NAME).exists()


def test_sidecar_records_the_base_weights_it_was_saved_with(tmp_path):
    tiny = enabled_tiny("flux", sla_seed=2)
    tiny.model.save_pretrained(tmp_path / "one")
    tiny.model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for folder in ("one", "sharded"):
        with safe_open(str(tmp_path / folder / SLA_WEIGHTS_NAME), framework="pt") as handle:
            recorded = json.loads(handle.metadata()["base_weights"])
        on_disk = sorted(n for n in os.listdir(tmp_path / folder) if n.startswith("diffusion_pytorch_model"))
        assert sorted(recorded) == on_disk and (len(on_disk) > 2 if folder == "sharded" else on_disk == [BASE_WEIGHTS])
        assert all(recorded[n]["size"] == os.path.getsize(tmp_path / folder / n) for n in on_disk)


def test_sidecar_is_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    # Spies (the real calls still run): the temporary file's data reaches the disk before the rename publishes it.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    enabled_tiny("flux", sla_seed=2).model.save_pretrained(tmp_path)
    (renamed,) = [path for kind, path in events if kind == "replace" and ".sla_attention." in path]
    synced = [path for kind, path in events if kind == "fsync"]
    assert renamed in synced and events.index(("fsync", renamed)) < events.index(("replace", renamed))
    assert str(tmp_path / BASE_WEIGHTS) in synced  # the base weights are on disk before the sidecar names them


def test_only_main_process_writes(tmp_path):
    tiny = enabled_tiny("flux", sla_seed=1)
    tiny.model.save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / SLA_WEIGHTS_NAME).exists()
    assert not any(".sla." in k for k in safetensors_keys(tmp_path / BASE_WEIGHTS))


def test_saving_works_with_lora_adapters(tmp_path):
    from peft import LoraConfig

    tiny = enabled_tiny("flux", sla_seed=4)
    inputs = tiny.make_inputs(seed=5)
    expected_sla = sla_snapshot(tiny.model)
    tiny.model.add_adapter(LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    # the adapters are in place on the model's own projections, and proj_l is left as it was
    assert type(tiny.model.transformer_blocks[0].attn.to_q).__module__.startswith("peft")
    assert not any("proj_l.lora" in name or "proj_l.base_layer" in name for name, _ in tiny.model.named_parameters())
    with torch.no_grad():
        with_lora = forward_output(tiny.model, inputs)
    (path,) = save_sla(tiny.model, tmp_path / "sla")
    assert_same_state(read_sla_file(path).tensors, expected_sla)
    tiny.model.save_pretrained(tmp_path / "model")
    assert_same_state(read_sla_file(tmp_path / "model" / SLA_WEIGHTS_NAME).tensors, expected_sla)
    assert not any(".sla." in k for k in safetensors_keys(tmp_path / "model" / BASE_WEIGHTS))
    # the LoRA'd model still runs SLA with its trained proj_l: zeroing proj_l changes the output
    with torch.no_grad():
        for tensor in get_sla_state_dict(tiny.model).values():
            tensor.zero_()
        assert not torch.allclose(forward_output(tiny.model, inputs), with_lora, atol=1e-4)


def test_set_attn_processor_loads_the_weights_saved_beside_the_model(tmp_path):
    tiny = enabled_tiny("flux", sla_seed=25)
    tiny.model.save_pretrained(tmp_path)
    expected = forward_output(tiny.model, tiny.make_inputs(seed=3))
    loaded = type(tiny.model).from_pretrained(tmp_path)
    loaded.set_attn_processor(SLAAttnProcessor(**TEST_SLA_OVERRIDES))
    assert_same_state(sla_snapshot(loaded), sla_snapshot(tiny.model))  # up front, before any forward
    assert torch.equal(forward_output(loaded, tiny.make_inputs(seed=3)), expected)


def test_set_attn_processor_with_a_mismatching_config_raises_and_restores(tmp_path):
    enabled_tiny("flux", sla_seed=26, topk=0.5).model.save_pretrained(tmp_path)
    loaded = type(build_tiny_model("flux").model).from_pretrained(tmp_path)
    processors = dict(loaded.attn_processors)
    with pytest.raises(ValueError, match=r"`topk` \(installed 0.2, file 0.5\)"):
        loaded.set_attn_processor(SLAAttnProcessor(**TEST_SLA_OVERRIDES))
    assert not get_sla_state_dict(loaded) and dict(loaded.attn_processors) == processors
