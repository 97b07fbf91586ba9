# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_attention.safetensors`: round trips through save_pretrained / from_pretrained / pipelines / the Hub cache,
push_to_hub, the replay in `enable_sla`, bad files (message + model untouched) and the legacy converters."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, build_tiny_pipeline, forward_output

from diffusers_sla import hooks
from diffusers_sla.config import SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.weights.converters import convert_simpletuner_sla, convert_turbodiffusion_wan
from diffusers_sla.weights.format import read_sla_file
from diffusers_sla.weights.hub import parse_hf_cache_path
from diffusers_sla.weights.io import get_sla_state_dict, load_sla, save_sla

BASE_WEIGHTS = "diffusion_pytorch_model.safetensors"


# ===== Helpers =====


def randomize_sla(model, seed: int) -> None:
    """Random non-zero SLA weights (large enough to change the output visibly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in get_sla_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


def sla_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_sla_state_dict(model).items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def enabled_tiny(family: str, seed: int = 0, sla_seed: int | None = None, **overrides):
    tiny = build_tiny_model(family, seed=seed)
    enable_sla(tiny.model, **{**TEST_SLA_OVERRIDES, **overrides})
    if sla_seed is not None:
        randomize_sla(tiny.model, sla_seed)
    return tiny


def safetensors_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def rewrite(src, dst, *, drop=(), add=None, replace=None, metadata_update=None, metadata=True) -> None:
    """Copy an SLA file with some entries or metadata changed: the bad files of the tests below."""
    with safe_open(str(src), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in drop}
    tensors.update(add or {})
    for key, fn in (replace or {}).items():
        tensors[key] = fn(tensors[key])
    meta.update(metadata_update or {})
    save_file(tensors, str(dst), metadata=meta if metadata else None)


# ===== Round trips =====


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
def test_load_sla_into_fresh_model(family, tmp_path):
    tiny = enabled_tiny(family, sla_seed=2)
    inputs = tiny.make_inputs(seed=4)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    (path,) = save_sla(tiny.model, tmp_path)
    assert path == str(tmp_path / SLA_WEIGHTS_NAME)

    fresh = enabled_tiny(family)  # same base weights (same seed), zero SLA projections
    (result,) = load_sla(fresh.model, tmp_path)
    assert result.loaded_layers and not result.missing_layers and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(forward_output(fresh.model, inputs), expected)


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


def test_sidecar_beside_other_base_weights_is_detected(tmp_path):
    # SLA weights from one save beside the base weights of another (an interrupted save, a copied file): the same
    # architecture and file sizes, other weights.
    first = enabled_tiny("flux", seed=0, sla_seed=2)
    second = enabled_tiny("flux", seed=1, sla_seed=3)
    first.model.save_pretrained(tmp_path / "first")
    second.model.save_pretrained(tmp_path / "second")
    os.replace(tmp_path / "second" / SLA_WEIGHTS_NAME, tmp_path / "first" / SLA_WEIGHTS_NAME)
    loaded = type(first.model).from_pretrained(tmp_path / "first")
    with pytest.raises(ValueError, match=rf"(?s)base weights beside it .*{BASE_WEIGHTS}.*strict=False"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert not get_sla_state_dict(loaded)
    target = enabled_tiny("flux", sla_seed=4)
    before = sla_snapshot(target.model)
    _expect_error(target.model, before, tmp_path / "first", "base weights beside it")
    with pytest.warns(UserWarning, match="base weights beside it"):
        load_sla(target.model, tmp_path / "first", strict=False)
    assert_same_state(sla_snapshot(target.model), sla_snapshot(second.model))
    # The file alone, away from any base weights, loads as before.
    (tmp_path / "alone").mkdir()
    os.replace(tmp_path / "first" / SLA_WEIGHTS_NAME, tmp_path / "alone" / SLA_WEIGHTS_NAME)
    load_sla(target.model, tmp_path / "alone")


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


def test_metadata(tmp_path):
    tiny = enabled_tiny("wan", sla_seed=1, topk=0.5)
    (path,) = save_sla(tiny.model, tmp_path)
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes == {torch.float32}
    assert meta["diffusers_sla_format"] == "1" and meta["format"] == "pt"
    assert meta["model_class"] == "WanTransformer3DModel"
    weights = read_sla_file(path)
    assert weights.config.topk == 0.5 and weights.config.blkk == TEST_SLA_OVERRIDES["blkk"]
    assert set(json.loads(meta["head_dims"]).values()) == {16}


def test_sparse_only_scope_round_trips_and_is_an_operator_difference(tmp_path):
    """A model saved with `linear_scope="none"` writes its proj_l entries as always and "none" in the config metadata;
    `enable_sla` with no config serves it with "none" again (same output, which proj_l does not change), and a model
    installed with "rest" refuses the file by that field."""
    tiny = enabled_tiny("wan", sla_seed=5, linear_scope="none")
    inputs = tiny.make_inputs(seed=6)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    tiny.model.save_pretrained(tmp_path)
    weights = read_sla_file(tmp_path / SLA_WEIGHTS_NAME)
    assert weights.config.linear_scope == "none" and len(weights.tensors) == 2 * len(list(iter_sla_layers(tiny.model)))
    with safe_open(str(tmp_path / SLA_WEIGHTS_NAME), framework="pt") as handle:
        assert '"linear_scope": "none"' in handle.metadata()["sla_config"]

    loaded = type(tiny.model).from_pretrained(tmp_path).eval()
    enable_sla(loaded)  # the stored config, "none" included
    assert all(layer.config.linear_scope == "none" for _, _, layer in iter_sla_layers(loaded))
    assert_same_state(sla_snapshot(loaded), sla_snapshot(tiny.model))
    with torch.no_grad():
        assert torch.equal(forward_output(loaded, inputs), expected)
        for tensor in get_sla_state_dict(loaded).values():  # proj_l is not part of this operator
            tensor.zero_()
        assert torch.equal(forward_output(loaded, inputs), expected)

    rest = type(tiny.model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`linear_scope` \(installed 'rest', file 'none'\)"):
        enable_sla(rest, **TEST_SLA_OVERRIDES)


# ===== PEFT adapters =====


def test_lora_cannot_target_proj_l(tmp_path):
    # The SLA kernels read proj_l's weight and bias directly, so an adapter there would change nothing they compute:
    # naming it is an error, and "all-linear" leaves it alone.
    from peft import LoraConfig

    tiny = enabled_tiny("flux", sla_seed=3)
    with pytest.raises(ValueError, match=r"(?s)SLAProjection.*not supported"):
        tiny.model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "proj_l"]), adapter_name="bad")
    assert all(isinstance(t, torch.nn.Parameter) for t in get_sla_state_dict(tiny.model).values())


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


# ===== Hub: push_to_hub and loading by repo id =====


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, with huggingface_hub in offline mode (it read the environment at
    import, so its constants are patched too)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def populate_cache(cache, repo_id: str, commit: str = "a" * 40):
    """The layout huggingface_hub leaves behind: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def intercepted_hub(monkeypatch):
    """The ONLY mock allowed in these tests: the Hub client's `create_repo` and `upload_folder` calls as diffusers
    makes them (the Hub's servers cannot exist here). The upload records the folder's files and reads them back."""
    uploads = []

    def create_repo(repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def upload_folder(*, repo_id, folder_path, path_in_repo=None, **kwargs):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                full = os.path.join(root, name)
                files[os.path.relpath(full, folder_path).replace(os.sep, "/")] = full
        sla = {rel: read_sla_file(full) for rel, full in files.items() if rel.endswith(SLA_WEIGHTS_NAME)}
        base = {rel: safetensors_keys(full) for rel, full in files.items() if rel.endswith(BASE_WEIGHTS)}
        uploads.append({"repo_id": repo_id, "files": sorted(files), "sla": sla, "base_keys": base})

    from diffusers.models import modeling_utils
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import hub_utils

    for module in (modeling_utils, pipeline_utils, hub_utils):
        if hasattr(module, "create_repo"):
            monkeypatch.setattr(module, "create_repo", create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_sidecar(offline_hub_cache, intercepted_hub, tmp_path):
    tiny = enabled_tiny("flux", sla_seed=7)
    expected = sla_snapshot(tiny.model)

    tiny.model.push_to_hub("user/tiny-flux-sla")
    (upload,) = intercepted_hub
    assert upload["repo_id"] == "user/tiny-flux-sla"
    assert {SLA_WEIGHTS_NAME, BASE_WEIGHTS, "config.json"} <= set(upload["files"])
    assert_same_state(upload["sla"][SLA_WEIGHTS_NAME].tensors, expected)
    assert not any(".sla." in k for k in upload["base_keys"][BASE_WEIGHTS])

    # save_pretrained(push_to_hub=True) uploads from inside the save: the sidecar must already be there.
    tiny.model.save_pretrained(str(tmp_path / "out"), push_to_hub=True, repo_id="user/tiny-flux-sla")
    assert SLA_WEIGHTS_NAME in intercepted_hub[1]["files"]


def test_pipeline_push_to_hub_uploads_sidecar(offline_hub_cache, intercepted_hub):
    pipe, _ = build_tiny_pipeline("wan", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    randomize_sla(pipe.transformer, 8)
    pipe.push_to_hub("user/tiny-wan-sla")
    (upload,) = intercepted_hub
    assert f"transformer/{SLA_WEIGHTS_NAME}" in upload["files"]
    assert "model_index.json" in upload["files"] and f"transformer/{BASE_WEIGHTS}" in upload["files"]
    assert_same_state(upload["sla"][f"transformer/{SLA_WEIGHTS_NAME}"].tensors, sla_snapshot(pipe.transformer))


def test_load_by_repo_id_from_offline_cache(offline_hub_cache):
    source = enabled_tiny("flux", sla_seed=9)
    snapshot = populate_cache(offline_hub_cache, "user/tiny-flux-sla")
    save_sla(source.model, snapshot / "transformer")

    target = enabled_tiny("flux")
    (result,) = load_sla(target.model, "user/tiny-flux-sla", subfolder="transformer")
    assert result.source.startswith(str(offline_hub_cache))
    assert_same_state(sla_snapshot(target.model), sla_snapshot(source.model))

    # A pipeline reads its transformer's subfolder by itself.
    pipe, _ = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    load_sla(pipe, "user/tiny-flux-sla")
    assert_same_state(sla_snapshot(pipe.transformer), sla_snapshot(source.model))


def test_replay_from_offline_cache_with_subfolder(offline_hub_cache):
    source = enabled_tiny("wan", sla_seed=10)
    snapshot = populate_cache(offline_hub_cache, "user/tiny-wan-sla")
    source.model.save_pretrained(snapshot / "transformer")

    loaded = type(source.model).from_pretrained("user/tiny-wan-sla", subfolder="transformer")
    enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert_same_state(sla_snapshot(loaded), sla_snapshot(source.model))


def test_replay_from_the_hub_beside_a_local_folder_named_like_the_org(offline_hub_cache, tmp_path, monkeypatch):
    # diffusers resolved "user/..." as a repo id: the replay must not take it for a path under ./user.
    source = enabled_tiny("wan", sla_seed=15)
    snapshot = populate_cache(offline_hub_cache, "user/tiny-wan-sla")
    source.model.save_pretrained(snapshot / "transformer")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user").mkdir()
    loaded = type(source.model).from_pretrained("user/tiny-wan-sla", subfolder="transformer")
    enable_sla(loaded)
    assert_same_state(sla_snapshot(loaded), sla_snapshot(source.model))


def test_pipeline_from_offline_cache_replays(offline_hub_cache):
    pipe, _ = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    randomize_sla(pipe.transformer, 14)
    pipe.save_pretrained(populate_cache(offline_hub_cache, "user/tiny-flux-pipe"))

    absent = {name: None for name, component in pipe.components.items() if component is None}
    loaded = type(pipe).from_pretrained("user/tiny-flux-pipe", local_files_only=True, **absent)
    enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert_same_state(sla_snapshot(loaded.transformer), sla_snapshot(pipe.transformer))


def test_local_looking_names_fail_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    # Mocked: the Hub's servers, as hf_hub_download (it must not be reached for these names; a real one waits for
    # the network before failing).
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(repo_id)
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    target = enabled_tiny("flux")
    for name in ("typo.safetensors", "sla_attention.pt", "weights/sla.safetensors", "outputs/run1", "runs\\one"):
        expected = rf"No such file or directory: {re.escape(repr(name))}.*\(taken for a local "
        with pytest.raises(FileNotFoundError, match=expected):
            load_sla(target.model, name)
    assert calls == []
    # A name shaped like a repo id still goes to the Hub.
    with pytest.warns(UserWarning, match="No SLA weights found at user/sla-weights/sla_attention.safetensors"):
        load_sla(target.model, "user/sla-weights")
    assert calls == ["user/sla-weights"]


def _pipeline_in_cache_without_sidecar(cache):
    pipe, _ = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    snapshot = populate_cache(cache, "user/tiny-flux-pipe")
    pipe.save_pretrained(snapshot)
    (snapshot / "transformer" / SLA_WEIGHTS_NAME).unlink()  # downloaded by diffusers before the SLA file existed
    absent = {name: None for name, component in pipe.components.items() if component is None}
    return type(pipe).from_pretrained("user/tiny-flux-pipe", local_files_only=True, **absent)


def test_unreachable_hub_warning_names_the_repo_the_file_and_the_command(offline_hub_cache):
    loaded = _pipeline_in_cache_without_sidecar(offline_hub_cache)
    command = f"hf download user/tiny-flux-pipe transformer/{SLA_WEIGHTS_NAME} --revision {'a' * 40}`"
    with pytest.warns(UserWarning, match=r"(?s)user/tiny-flux-pipe/transformer/sla_attention.safetensors.*offline "
                                         rf"mode.*{re.escape(command)}.*zero-initialised"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)


def test_unreachable_hub_without_offline_mode(offline_hub_cache, monkeypatch):
    # Mocked: the Hub's servers, unreachable: hf_hub_download fails as it does without a network and without the
    # file in the cache.
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    loaded = _pipeline_in_cache_without_sidecar(offline_hub_cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def hf_hub_download(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub and the file is not cached.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.warns(UserWarning, match=r"(?s)user/tiny-flux-pipe/transformer/sla_attention.safetensors.*could not "
                                         r"be reached.*hf download user/tiny-flux-pipe transformer/"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)


def test_hf_cache_paths_lead_back_to_the_repo(tmp_path):
    # Pipelines load components from cache snapshots without downloading the SLA file: the snapshot folder says
    # which repo, commit and subfolder to fetch it from.
    folder = tmp_path / "hub" / "models--user--tiny-wan" / "snapshots" / ("b" * 40) / "transformer"
    assert parse_hf_cache_path(str(folder)) == (
        str(tmp_path / "hub"), "user/tiny-wan", "b" * 40, "transformer"
    )
    assert parse_hf_cache_path(str(tmp_path / "plain" / "transformer")) is None


def test_missing_file_in_offline_cache_warns(offline_hub_cache):
    target = enabled_tiny("flux")
    populate_cache(offline_hub_cache, "user/no-sla")
    with pytest.warns(UserWarning, match="No SLA weights found.*offline.*zero-initialised"):
        assert load_sla(target.model, "user/no-sla", subfolder="transformer") == []
    assert all(not t.any() for t in get_sla_state_dict(target.model).values())


# ===== Missing files and the replay rule =====


def test_replay_missing_file_warns_zero_init(tmp_path):
    build_tiny_model("flux", seed=0).model.save_pretrained(tmp_path)  # no SLA: no sidecar
    loaded = type(build_tiny_model("flux").model).from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"No SLA weights found at .*sla_attention.safetensors: SLA starts from "
                                         r"zero-initialised projections"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)
    assert all(not t.any() for t in get_sla_state_dict(loaded).values())


def test_load_sla_missing_file_keeps_weights(tmp_path):
    tiny = enabled_tiny("flux", sla_seed=11)
    before = sla_snapshot(tiny.model)
    with pytest.warns(UserWarning, match="No SLA weights found .* keep their current weights"):
        assert load_sla(tiny.model, tmp_path) == []
    assert_same_state(sla_snapshot(tiny.model), before)


def test_load_sla_needs_sla_layers(tmp_path):
    with pytest.raises(ValueError, match="call `enable_sla` before `load_sla`"):
        load_sla(build_tiny_model("flux").model, tmp_path)


def test_replay_happens_once_per_layer(tmp_path):
    enabled_tiny("flux", sla_seed=12).model.save_pretrained(tmp_path)
    loaded = type(build_tiny_model("flux").model).from_pretrained(tmp_path)
    enable_sla(loaded, **TEST_SLA_OVERRIDES)
    randomize_sla(loaded, 13)  # training moved the weights on
    trained = sla_snapshot(loaded)
    enable_sla(loaded, **{**TEST_SLA_OVERRIDES, "topk": 0.5})  # a config change must not reload the old file
    assert_same_state(sla_snapshot(loaded), trained)
    layers = disable_sla(loaded)
    enable_sla(loaded, sla_layers=layers, **TEST_SLA_OVERRIDES)
    assert_same_state(sla_snapshot(loaded), trained)


# ===== Bad files: clear error, model untouched =====


@pytest.fixture
def bad_file_setup(tmp_path):
    """A model with SLA weights A, and a valid file of weights B for the same model."""
    target = enabled_tiny("flux", sla_seed=20)
    source = enabled_tiny("flux", sla_seed=21)
    (good,) = save_sla(source.model, tmp_path / "good")
    return target.model, sla_snapshot(target.model), good, tmp_path


def _expect_error(model, before, path, match, strict=True, error=ValueError):
    with pytest.raises(error, match=match):
        load_sla(model, path, strict=strict)
    assert_same_state(sla_snapshot(model), before)


def test_bad_truncated_file(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    data = Path(good).read_bytes()
    for cut in (len(data) // 2, 6):
        bad = tmp / f"truncated_{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _expect_error(model, before, bad, "not a valid safetensors file")


def test_bad_pickle_file(bad_file_setup):
    model, before, _, tmp = bad_file_setup
    bad = tmp / SLA_WEIGHTS_NAME
    torch.save({"proj_l.weight": torch.randn(16, 16)}, bad)
    _expect_error(model, before, bad, "not a valid safetensors file .*pickled")


def test_bad_not_an_sla_file(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    rewrite(good, tmp / "nometa.safetensors", metadata=False)
    _expect_error(model, before, tmp / "nometa.safetensors", "not SLA weights written by diffusers-sla")
    rewrite(good, tmp / "v99.safetensors", metadata_update={"diffusers_sla_format": "99"})
    _expect_error(model, before, tmp / "v99.safetensors", "format '99'.*Upgrade")


def test_bad_missing_layer(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    drop = [k for k in safetensors_keys(good) if k.startswith("single_transformer_blocks.0.")]
    rewrite(good, tmp / "missing.safetensors", drop=drop)
    _expect_error(model, before, tmp / "missing.safetensors",
                  r"(?s)missing layers .*'single_transformer_blocks.0.attn'.*strict=False")
    with pytest.warns(UserWarning, match="missing layers"):
        (result,) = load_sla(model, tmp / "missing.safetensors", strict=False)
    assert result.missing_layers == ["single_transformer_blocks.0.attn"]
    after, source = sla_snapshot(model), read_sla_file(good).tensors
    for key in after:
        assert torch.equal(after[key], before[key] if key in drop else source[key]), key


def test_bad_extra_layer(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    extra = {"transformer_blocks.7.attn.proj_l.weight": torch.randn(16, 16)}
    rewrite(good, tmp / "extra.safetensors", add=extra)
    _expect_error(
        model, before, tmp / "extra.safetensors", r"extra entries .*'transformer_blocks.7.attn.proj_l.weight'"
    )
    with pytest.warns(UserWarning, match="extra entries"):
        load_sla(model, tmp / "extra.safetensors", strict=False)
    assert_same_state(sla_snapshot(model), read_sla_file(good).tensors)


def test_bad_shape(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    key = "transformer_blocks.0.attn.proj_l.weight"
    rewrite(good, tmp / "shape.safetensors", replace={key: lambda t: torch.randn(8, 8)})
    for strict in (True, False):
        _expect_error(model, before, tmp / "shape.safetensors", rf"shape mismatch .*{key}: file \(8, 8\), model "
                                                               r"\(16, 16\)", strict=strict)


def test_bad_dtype(bad_file_setup):
    model, before, good, tmp = bad_file_setup
    key = "transformer_blocks.0.attn.proj_l.bias"
    rewrite(good, tmp / "bf16.safetensors", replace={key: lambda t: t.to(torch.bfloat16)})
    for strict in (True, False):
        _expect_error(model, before, tmp / "bf16.safetensors", rf"must be float32.*{key} \(torch.bfloat16\)",
                      strict=strict)


@pytest.mark.parametrize("entry, value", [
    ("sla_layer_configs", "[1]"), ("sla_layer_configs", '{"transformer_blocks.0.attn": 1}'),
    ("sla_layer_configs", "not json"), ("base_weights", "[]"), ("sla_config", "[1]"),
])
def test_bad_metadata(bad_file_setup, entry, value):
    model, before, good, tmp = bad_file_setup
    rewrite(good, tmp / "meta.safetensors", metadata_update={entry: value})
    for strict in (True, False):
        _expect_error(model, before, tmp / "meta.safetensors", rf"invalid `{entry}` metadata entry", strict=strict)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_non_finite_weights(bad_file_setup, bad):
    # NaN or inf in proj_l turns every output of the model into NaN: refuse the file, naming the entries.
    model, before, good, tmp = bad_file_setup
    key = "single_transformer_blocks.0.attn.proj_l.weight"
    rewrite(good, tmp / "nan.safetensors", replace={key: lambda t: t.index_fill(0, torch.tensor([3]), bad)})
    for strict in (True, False):
        _expect_error(model, before, tmp / "nan.safetensors", rf"not finite .*{key}", strict=strict)


def test_bad_config(bad_file_setup):
    model, before, _, tmp = bad_file_setup
    other = enabled_tiny("flux", sla_seed=22, topk=0.5, feature_map="elu")
    (path,) = save_sla(other.model, tmp / "other")
    _expect_error(model, before, path, r"`topk` \(installed 0.2, file 0.5\), `feature_map` \(installed 'softmax', "
                                       r"file 'elu'\)")
    with pytest.warns(UserWarning, match="SLA config differs"):
        (result,) = load_sla(model, path, strict=False)
    assert result.config_differences == {"topk": (0.2, 0.5), "feature_map": ("softmax", "elu")}
    assert_same_state(sla_snapshot(model), sla_snapshot(other.model))


def test_bad_config_in_replay_raises_and_keeps_model(tmp_path):
    enabled_tiny("flux", sla_seed=23, topk=0.5).model.save_pretrained(tmp_path)
    loaded = type(build_tiny_model("flux").model).from_pretrained(tmp_path)
    processors = dict(loaded.attn_processors)
    with pytest.raises(ValueError, match=r"`topk` \(installed 0.2, file 0.5\)"):
        enable_sla(loaded, **TEST_SLA_OVERRIDES)
    # Really unchanged: SLA was not left half-installed with zero projections.
    assert not get_sla_state_dict(loaded) and dict(loaded.attn_processors) == processors
    # strict=False proceeds: the installed config stands, the trained weights are loaded, with a warning.
    with pytest.warns(UserWarning, match="strict=False"):
        enable_sla(loaded, strict=False, **TEST_SLA_OVERRIDES)
    assert all(t.any() for t in get_sla_state_dict(loaded).values())


def test_per_layer_configs_round_trip(tmp_path):
    # One layer given its own processor: its config is saved with it and comes back with it.
    tiny = enabled_tiny("flux", sla_seed=27)
    odd = "single_transformer_blocks.0.attn"
    tiny.model.get_submodule(odd).set_processor(SLAAttnProcessor(**{**TEST_SLA_OVERRIDES, "topk": 0.25}))
    inputs = tiny.make_inputs(seed=3)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    tiny.model.save_pretrained(tmp_path)
    for settings in ({}, TEST_SLA_OVERRIDES):  # the stored config, or an explicit one that agrees with it
        loaded = type(tiny.model).from_pretrained(tmp_path)
        enable_sla(loaded, **settings)
        configs = {path: layer.config for path, _, layer in iter_sla_layers(loaded)}
        assert configs[odd].topk == 0.25 and configs["transformer_blocks.0.attn"].topk == 0.2
        assert loaded.get_submodule(odd).processor.config.topk == 0.25
        with torch.no_grad():
            assert torch.equal(forward_output(loaded, inputs), expected)
    # load_sla into a model running the common config does the same.
    target = enabled_tiny("flux")
    (result,) = load_sla(target.model, tmp_path)
    assert {path: c.topk for path, c in result.layer_configs.items()} == {odd: 0.25}
    with torch.no_grad():
        assert torch.equal(forward_output(target.model, inputs), expected)


def test_per_layer_config_mismatch_names_the_layer_and_both_configs(tmp_path):
    tiny = enabled_tiny("flux", sla_seed=28)
    odd = "single_transformer_blocks.0.attn"
    tiny.model.get_submodule(odd).set_processor(SLAAttnProcessor(**{**TEST_SLA_OVERRIDES, "topk": 0.25}))
    tiny.model.save_pretrained(tmp_path)
    loaded = type(tiny.model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"(?s)\['{odd}'\]: `topk` \(installed 0.5, file 0.25\).*installed "
                                         r"\{'topk': 0.5.*file \{'topk': 0.25.*"
                                         r"\['transformer_blocks.0.attn'\]: `topk` \(installed 0.5, file 0.2\)"):
        enable_sla(loaded, **{**TEST_SLA_OVERRIDES, "topk": 0.5})
    assert not get_sla_state_dict(loaded)
    with pytest.warns(UserWarning, match=rf"(?s)strict=False.*'{odd}'"):
        enable_sla(loaded, strict=False, **{**TEST_SLA_OVERRIDES, "topk": 0.5})
    assert all(layer.config.topk == 0.5 for _, _, layer in iter_sla_layers(loaded))


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


def test_pipeline_bad_component_leaves_everything_unchanged(tmp_path):
    pipe, _ = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    randomize_sla(pipe.transformer, 24)
    before = sla_snapshot(pipe.transformer)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / SLA_WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_sla(pipe, tmp_path)
    assert_same_state(sla_snapshot(pipe.transformer), before)


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
