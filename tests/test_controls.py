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
from diffusers_sla.config import SLA_MODULE_NAME, SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import disable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.weights.io import get_sla_state_dict

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


@pytest.mark.parametrize("control, bad, message", [
    ("dense_layers", [2], r"\[2\] match no attention module"),
    ("dense_layers", ["nope.*"], r"\['nope\.\*'\] match no attention module"),
    ("layer_topk", {"nope*": 0.7}, r"`layer_topk`: \['nope\*'\] match no attention module"),
    ("layer_topk", {"*": 1.5}, r"`layer_topk` for transformer_blocks\.0\.attn: `topk` must be in \(0, 1\]"),
    ("layer_topk", {1.5: 0.7}, r"`layer_topk` entries must be block indices"),
    ("layer_topk", lambda path: "x", r"`layer_topk` for transformer_blocks\.0\.attn: `topk` must be a number"),
    ("layer_topk", [0.7], r"`layer_topk` must be a dict"),
])
def test_bad_layer_controls_are_errors_and_change_nothing(control, bad, message):
    tiny = build_tiny_model("flux", seed=0)
    processors = dict(tiny.model.attn_processors)
    with pytest.raises(ValueError, match=message):
        enable_sla(tiny.model, **{control: bad}, **TEST_SLA_OVERRIDES)
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
    # (text protection off: with it, both layers keep the text block + 1 of the 2 others)
    enable_sla(tiny.model, topk=0.1, layer_topk=layer_topk, protect_text=False, **TEST_SLA_OVERRIDES)
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


# ===== protect_text =====

# Where each family's joint attention puts the text (diffusers 0.42.1): checked below against the keys themselves.
TEXT_FIRST = {"flux": True, "qwenimage": True, "cogvideox": True, "sd3": False, "hunyuanvideo": False}


def _record_joint_calls(monkeypatch):
    """Spy on the glue (`sdpa._run_sla`: each SLA call's keys and text position) and on block selection (the
    torch operator's `select_blocks`: the forced range and the block map it returns)."""
    from diffusers_sla.integration import sdpa
    from diffusers_sla.ops import reference

    calls, selections = [], []
    run_sla, select = sdpa._run_sla, reference.select_blocks

    def spy_run(attn, processor, call, key_padding_mask, deferred_mask=None, text_tokens=None):
        calls.append((call["key"].detach().clone(), call["query"].shape[-2], text_tokens,
                      sdpa.sla_layer_for(attn, processor, call["query"]).config))
        return run_sla(attn, processor, call, key_padding_mask, deferred_mask, text_tokens)

    def spy_select(q, k, topk, blkq, blkk, forced_blocks=None):
        lut = select(q, k, topk, blkq, blkk, forced_blocks)
        selections.append((forced_blocks, lut))
        return lut

    monkeypatch.setattr(sdpa, "_run_sla", spy_run)
    monkeypatch.setattr(reference, "select_blocks", spy_select)
    return calls, selections


@pytest.mark.parametrize("family", sorted(TEXT_FIRST))
def test_text_blocks_are_in_every_row_of_the_block_map(family, monkeypatch):
    from diffusers_sla.integration.routing import forced_text_keys
    from diffusers_sla.ops.selection import lut_to_block_map

    tiny = build_tiny_model(family, seed=0)
    inputs = tiny.make_inputs(seed=1)
    other = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 1.0)  # the text alone changes
    with torch.no_grad():
        reference = forward_output(tiny.model, inputs)
        enable_sla(tiny.model, topk=0.1, **TEST_SLA_OVERRIDES)  # protect_text is on by default
        calls, selections = _record_joint_calls(monkeypatch)
        forward_output(tiny.model, inputs)
        first_run = len(calls)
        forward_output(tiny.model, other)
    assert first_run and len(calls) == 2 * first_run
    # In the first joint call only the text's keys depend on the text: the rows that change are the text tokens, and
    # the glue must protect exactly those, at the family's end of the sequence.
    (k1, lq, text, config), (k2, *_) = calls[0], calls[first_run]
    changed = ((k1 - k2).abs().amax(dim=(0, 1, 3)) > 0).nonzero().squeeze(-1)
    n_text = inputs["encoder_hidden_states"].shape[1]
    assert changed.numel() == n_text and text == ("first" if TEXT_FIRST[family] else "last", n_text)
    forced = forced_text_keys(config, text, lq, k1.shape[-2])
    assert forced == (changed.min().item(), changed.max().item() + 1)
    # every SLA call of these joint models selected with the text blocks forced, in every row
    assert selections and all(f is not None for f, _ in selections)
    for forced_blocks, lut in selections:
        block_map = lut_to_block_map(lut, max(lut.max().item() + 1, forced_blocks[1]))
        assert block_map[..., forced_blocks[0]:forced_blocks[1]].all()
    # topk=1.0 with protection: still the model's own output
    enable_sla(tiny.model, topk=1.0, **TEST_SLA_OVERRIDES)
    with torch.no_grad():
        assert rel(forward_output(tiny.model, inputs), reference) < 1e-5


def test_protect_text_off_selects_like_before(monkeypatch):
    tiny = build_tiny_model("flux", seed=0)
    inputs = tiny.make_inputs(seed=1)
    enable_sla(tiny.model, topk=0.1, protect_text=False, **TEST_SLA_OVERRIDES)
    _, selections = _record_joint_calls(monkeypatch)
    with torch.no_grad():
        forward_output(tiny.model, inputs)
    assert selections and all(forced is None for forced, _ in selections)
    assert sla_summary(tiny.model).mean_density == pytest.approx(1 / 3)  # 1 of 3 key blocks; protected: 2 of 3


def test_protected_density_counts_the_text_blocks():
    tiny = build_tiny_model("flux", seed=0)
    enable_sla(tiny.model, topk=0.1, **TEST_SLA_OVERRIDES)
    with torch.no_grad():
        forward_output(tiny.model, tiny.make_inputs(seed=1))
    assert sla_summary(tiny.model).mean_density == pytest.approx(2 / 3)  # the text block + 1 of the 2 others


def test_a_sidecar_without_protect_text_loads_with_it_off(tmp_path):
    # A file written before the field existed: its SLA was trained and served without protection.
    from safetensors.torch import load_file, save_file

    tiny = build_tiny_model("flux", seed=0)
    enable_sla(tiny.model, topk=0.1, protect_text=False, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    tiny.model.save_pretrained(tmp_path)
    path = str(tmp_path / SLA_WEIGHTS_NAME)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    old = json.loads(metadata["sla_config"])
    del old["protect_text"], old["dense_layers"]
    save_file(load_file(path), path, metadata={**metadata, "sla_config": json.dumps(old)})

    loaded = type(tiny.model).from_pretrained(tmp_path)
    enable_sla(loaded)
    assert all(layer.config.protect_text is False for _, _, layer in iter_sla_layers(loaded))
    # asking for protection explicitly is a config mismatch with those weights (an operator field)
    fresh = type(tiny.model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="protect_text"):
        enable_sla(fresh, topk=0.1, **TEST_SLA_OVERRIDES)


def test_protect_text_is_not_a_mismatch_where_there_is_no_joint_attention(tmp_path):
    # Wan takes its text through cross-attention: the field changes nothing there, so it must not block a load
    tiny = build_tiny_model("wan", seed=0)
    enable_sla(tiny.model, topk=0.1, protect_text=False, **TEST_SLA_OVERRIDES)
    randomize_sla(tiny.model, seed=3)
    tiny.model.save_pretrained(tmp_path)
    loaded = type(tiny.model).from_pretrained(tmp_path)
    enable_sla(loaded, topk=0.1, **TEST_SLA_OVERRIDES)  # protect_text=True by default, strict load
    assert get_sla_state_dict(loaded).keys() == get_sla_state_dict(tiny.model).keys()
    for key, value in get_sla_state_dict(loaded).items():
        assert torch.equal(value, get_sla_state_dict(tiny.model)[key])


# ===== sla_dense_steps =====


def _pipeline_output(pipe, make_kwargs):
    out = pipe(**dict(make_kwargs(seed=1), num_inference_steps=3))  # fresh generator: the same noise every call
    return (out.images if hasattr(out, "images") else out.frames)


def test_dense_steps_run_the_first_steps_dense():
    from diffusers_sla import sla_dense_steps
    from tiny_models import build_tiny_pipeline

    pipe, make_kwargs = build_tiny_pipeline("flux", seed=0)
    with torch.no_grad():
        reference = _pipeline_output(pipe, make_kwargs)
        enable_sla(pipe, topk=0.1, **TEST_SLA_OVERRIDES)
        randomize_sla(pipe.transformer, seed=3)
        sparse = _pipeline_output(pipe, make_kwargs)
        layers = len(sla_summary(pipe).layers)
        reset_calls = sla_summary(pipe).sla_calls
        assert reset_calls == 3 * layers
        from diffusers_sla import reset_sla_stats

        reset_sla_stats(pipe)
        with sla_dense_steps(pipe, 2):
            mixed = _pipeline_output(pipe, make_kwargs)
            summary = sla_summary(pipe)
            assert summary.dense_calls == {"dense_step": 2 * layers} and summary.sla_calls == layers
            reset_sla_stats(pipe)
            again = _pipeline_output(pipe, make_kwargs)  # a second call inside the block starts dense again
            assert sla_summary(pipe).dense_calls == {"dense_step": 2 * layers}
            with sla_dense_steps(pipe, 3):
                dense = _pipeline_output(pipe, make_kwargs)
        assert torch.equal(mixed, again)
        reset_sla_stats(pipe)
        after = _pipeline_output(pipe, make_kwargs)  # outside the block: SLA at every step again
    assert sla_summary(pipe).sla_calls == 3 * layers and not sla_summary(pipe).dense_calls
    assert torch.equal(after, sparse)
    torch.testing.assert_close(dense, reference, rtol=0, atol=0)  # every step dense: the model's own output
    assert rel(mixed, reference) > 0 and rel(mixed, sparse) > 0
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


@pytest.mark.parametrize("bad, message", [(-1, "`steps` must be"), (1.5, "`steps` must be")])
def test_dense_steps_bad_values(bad, message):
    from diffusers_sla import sla_dense_steps
    from tiny_models import build_tiny_pipeline

    pipe, _ = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, **TEST_SLA_OVERRIDES)
    with pytest.raises(ValueError, match=message):
        with sla_dense_steps(pipe, bad):
            pass
    disable_sla(pipe)
    with pytest.raises(ValueError, match="runs no SLA"):
        with sla_dense_steps(pipe, 1):
            pass


def test_dense_steps_under_compile_compile_two_graphs_once():
    # regional compilation, as diffusers does it; a counting backend (no inductor): the dense and the SLA version of
    # each block are compiled on the first call, and a second call compiles nothing new
    from torch._dynamo.utils import counters

    from diffusers_sla import sla_dense_steps
    from tiny_models import build_tiny_pipeline

    pipe, make_kwargs = build_tiny_pipeline("flux", seed=0)
    enable_sla(pipe, topk=0.1, **TEST_SLA_OVERRIDES)
    randomize_sla(pipe.transformer, seed=3)
    with torch.no_grad(), sla_dense_steps(pipe, 1):
        eager = _pipeline_output(pipe, make_kwargs)
    model = pipe.transformer
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # (the counters are process-wide)
    try:
        model.compile_repeated_blocks(backend=lambda gm, _: gm.forward, fullgraph=True)
        with torch.no_grad(), sla_dense_steps(pipe, 1):
            _pipeline_output(pipe, make_kwargs)
            first = counters["stats"]["unique_graphs"]
            compiled = _pipeline_output(pipe, make_kwargs)
        assert counters["stats"]["unique_graphs"] == first, "recompiled on a later call"
        # dense + SLA per block class, and one more where a guard first meets the attribute
        assert first - before <= 3 * len({type(b) for b in blocks})
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
