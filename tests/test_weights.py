# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_attention.safetensors` (`diffusers_sla/weights/`: format, io, replay): save_sla / load_sla, metadata, the
replay in `enable_sla`, bad files (message + model untouched), per-layer configs, and finding the file on the Hub
and in its cache (`hub.py`: push_to_hub, loading by repo id, offline messages). The save/load hooks and the
converters have files of their own (test_hooks, test_converters)."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, build_tiny_pipeline, forward_output
from weights_testing import (
    BASE_WEIGHTS,
    assert_same_state,
    enabled_tiny,
    randomize_sla,
    rewrite,
    safetensors_keys,
    sla_snapshot,
)

from diffusers_sla.config import SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import disable_sla, enable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.integration.processor import SLAAttnProcessor
from diffusers_sla.weights.format import read_sla_file
from diffusers_sla.weights.hub import parse_hf_cache_path
from diffusers_sla.weights.io import get_sla_state_dict, load_sla, save_sla

# ===== save_sla / load_sla =====


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
