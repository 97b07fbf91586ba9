# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The controls of a sparse-attention switch on real tiny diffusers models: dense layers (`dense_layers`) and
per-layer sparsity (`layer_topk`), their place in `sla_summary`, the sidecar and `diffusers-sla inspect`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, forward_output

from diffusers_sla import SLAConfig, enable_sla, sla_summary
from diffusers_sla.cli import main
from diffusers_sla.constants import SLA_MODULE_NAME, SLA_WEIGHTS_NAME
from diffusers_sla.layer import iter_sla_layers
from diffusers_sla.processor import disable_sla
from diffusers_sla.serialization import get_sla_state_dict

FLUX_DOUBLE, FLUX_SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


def randomize_sla(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in get_sla_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ===== dense_layers =====


@pytest.mark.parametrize("selectors", [["*"], [0, -1], ["transformer_blocks.0", "single_*"]])
def test_all_dense_layers_give_the_models_own_output(selectors):
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    with torch.no_grad():
        reference = forward_output(tiny.model, inputs)
        enable_sla(tiny.model, dense_layers=selectors, topk=0.1, **TEST_SLA_OVERRIDES)
        out = forward_output(tiny.model, inputs)
    assert torch.equal(out, reference)
    summary = sla_summary(tiny.model)
    assert summary.sla_calls == 0 and summary.dense_calls == {"dense_layer": 2}
    assert not any(True for _ in iter_sla_layers(tiny.model))  # no SLA layer (no proj_l) on a dense layer


def test_dense_layers_split_the_model():
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    enable_sla(tiny.model, dense_layers=[0], topk=0.1, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    with torch.no_grad():
        forward_output(tiny.model, inputs)
    summary = sla_summary(tiny.model)
    assert summary[FLUX_DOUBLE].dense_calls == {"dense_layer": 1} and summary[FLUX_DOUBLE].sla_calls == 0
    assert summary[FLUX_SINGLE].sla_calls == 1 and not summary[FLUX_SINGLE].dense_calls
    assert [path for path, _, _ in iter_sla_layers(tiny.model)] == [FLUX_SINGLE]
    # enable_sla again without dense layers: the layer runs SLA again
    enable_sla(tiny.model, topk=0.1, **TEST_SLA_OVERRIDES)
    with torch.no_grad():
        forward_output(tiny.model, inputs)
    assert sla_summary(tiny.model)[FLUX_DOUBLE].sla_calls == 1


@pytest.mark.parametrize("bad, message", [
    ([2], r"\[2\] match no attention module"),
    (["nope.*"], r"\['nope\.\*'\] match no attention module"),
])
def test_dense_layers_matching_nothing_is_an_error_and_changes_nothing(bad, message):
    tiny = build_tiny_model("flux", seed=0)
    processors = dict(tiny.model.attn_processors)
    with pytest.raises(ValueError, match=message):
        enable_sla(tiny.model, dense_layers=bad, **TEST_SLA_OVERRIDES)
    assert dict(tiny.model.attn_processors) == processors
    assert not any(SLA_MODULE_NAME in m._modules for m in tiny.model.modules())


@pytest.mark.parametrize("bad", [[1.5], [""], [None], [True], 3.0])
def test_dense_layers_entries_are_checked(bad):
    with pytest.raises(ValueError, match="`dense_layers`"):
        SLAConfig(dense_layers=bad)


def test_dense_layers_config_round_trips_through_json():
    config = SLAConfig(dense_layers=[0, "single_*"])
    assert config.dense_layers == (0, "single_*")
    assert SLAConfig.from_json(config.to_json()) == config


def test_dense_layers_are_saved_and_restored(tmp_path, capsys):
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    enable_sla(tiny.model, dense_layers=[0], topk=0.1, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    tiny.model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / SLA_WEIGHTS_NAME), framework="pt") as handle:
        assert json.loads(handle.metadata()["sla_config"])["dense_layers"] == [0]

    loaded = type(tiny.model).from_pretrained(tmp_path).eval()
    enable_sla(loaded)  # the stored config, dense layers included
    with torch.no_grad():
        out = forward_output(loaded, inputs)
    assert torch.equal(out, expected)
    summary = sla_summary(loaded)
    assert summary[FLUX_DOUBLE].dense_calls == {"dense_layer": 1} and summary[FLUX_SINGLE].sla_calls == 1

    assert main(["inspect", str(tmp_path)]) == 0
    assert "dense_layers: [0]" in capsys.readouterr().out


def test_a_dense_layer_keeps_its_trained_weights_and_loads_them_without_complaint(tmp_path):
    # trained with SLA everywhere, served with one layer dense: the file's entry for that layer is not "extra"
    tiny = build_tiny_model("flux", seed=0)
    enable_sla(tiny.model, topk=0.1, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    tiny.model.save_pretrained(tmp_path)
    loaded = type(tiny.model).from_pretrained(tmp_path).eval()
    enable_sla(loaded, dense_layers=[0], topk=0.1, **TEST_SLA_OVERRIDES)  # strict: would raise on extra entries
    assert [path for path, _, _ in iter_sla_layers(loaded)] == [FLUX_SINGLE]
    assert torch.equal(get_sla_state_dict(loaded)[f"{FLUX_SINGLE}.proj_l.weight"],
                       get_sla_state_dict(tiny.model)[f"{FLUX_SINGLE}.proj_l.weight"])


def test_disable_sla_clears_dense_layers():
    tiny = build_tiny_model("flux", seed=0)
    enable_sla(tiny.model, dense_layers=[0], **TEST_SLA_OVERRIDES)
    disable_sla(tiny.model)
    assert not any("_sla_dense_layer" in m.__dict__ for m in tiny.model.modules())


# ===== layer_topk =====


def _layer_topks(model) -> dict[str, float]:
    return {path: layer.config.topk for path, _, layer in iter_sla_layers(model)}


@pytest.mark.parametrize("layer_topk", [
    {"single_*": 0.7},
    {-1: 0.7, "*": 0.1},  # the first selector that matches wins
    lambda path: 0.7 if path.startswith("single") else None,
])
def test_layer_topk_gives_layers_their_own_topk(layer_topk):
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    enable_sla(tiny.model, topk=0.1, layer_topk=layer_topk, **TEST_SLA_OVERRIDES)
    assert _layer_topks(tiny.model) == {FLUX_DOUBLE: 0.1, FLUX_SINGLE: 0.7}
    assert tiny.model.get_submodule(FLUX_SINGLE).processor.config.topk == 0.7
    with torch.no_grad():
        forward_output(tiny.model, inputs)
    summary = sla_summary(tiny.model)
    # the measured density follows each layer's own topk (0.7 keeps 2 of the 3 key blocks, 0.1 keeps 1)
    assert summary[FLUX_SINGLE].mean_density > summary[FLUX_DOUBLE].mean_density


def test_layer_topk_changes_the_output_of_its_layer_only():
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    with torch.no_grad():
        reference = forward_output(tiny.model, inputs)
        enable_sla(tiny.model, topk=0.1, layer_topk={"*": 1.0}, linear_scope="none", **TEST_SLA_OVERRIDES)
        out = forward_output(tiny.model, inputs)
    assert rel(out, reference) < 1e-5  # topk 1.0 everywhere, sparse only: exact attention


@pytest.mark.parametrize("bad, message", [
    ({"nope*": 0.7}, r"`layer_topk`: \['nope\*'\] match no attention module"),
    ({"*": 1.5}, r"`layer_topk` for transformer_blocks\.0\.attn: `topk` must be in \(0, 1\]"),
    ({1.5: 0.7}, r"`layer_topk` entries must be block indices"),
    (lambda path: "x", r"`layer_topk` for transformer_blocks\.0\.attn: `topk` must be a number"),
    ([0.7], r"`layer_topk` must be a dict"),
])
def test_layer_topk_bad_values_are_errors_and_change_nothing(bad, message):
    tiny = build_tiny_model("flux", seed=0)
    processors = dict(tiny.model.attn_processors)
    with pytest.raises(ValueError, match=message):
        enable_sla(tiny.model, layer_topk=bad, **TEST_SLA_OVERRIDES)
    assert dict(tiny.model.attn_processors) == processors
    assert not any(SLA_MODULE_NAME in m._modules for m in tiny.model.modules())


def test_layer_topk_is_saved_and_restored(tmp_path, capsys):
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    enable_sla(tiny.model, topk=0.1, layer_topk={"single_*": 0.7}, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs)
    tiny.model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / SLA_WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    stored = {json.loads(metadata["sla_config"])["topk"]} | {
        values["topk"] for values in json.loads(metadata["sla_layer_configs"]).values()}
    assert stored == {0.1, 0.7}

    loaded = type(tiny.model).from_pretrained(tmp_path).eval()
    enable_sla(loaded)
    assert _layer_topks(loaded) == {FLUX_DOUBLE: 0.1, FLUX_SINGLE: 0.7}
    with torch.no_grad():
        assert torch.equal(forward_output(loaded, inputs), expected)

    assert main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert any(line.split()[0] == FLUX_SINGLE and line.split()[-1] == "0.7" for line in table.splitlines()
               if line.strip())
    assert any(line.split()[0] == FLUX_DOUBLE and line.split()[-1] == "0.1" for line in table.splitlines()
               if line.strip())
