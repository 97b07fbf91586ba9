# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
import json

import pytest

from diffusers_sla import SLAConfig


def test_defaults_are_what_users_know():
    cfg = SLAConfig()
    assert (cfg.topk, cfg.blkq, cfg.blkk, cfg.feature_map, cfg.tie_feature_map_qk, cfg.linear_scope) == (
        0.2, 64, 64, "softmax", True, "rest")


def test_from_json_string_with_booleans():
    cfg = SLAConfig.from_json('{"topk":0.15,"blkq":32,"tie_feature_map_qk":false}')
    assert cfg.topk == 0.15 and cfg.blkq == 32 and cfg.tie_feature_map_qk is False and cfg.blkk == 64


@pytest.mark.parametrize("source", ["dict", "json", "file", "config"])
def test_round_trip(tmp_path, source):
    original = SLAConfig(topk=0.1, blkq=128, blkk=32, feature_map="elu", tie_feature_map_qk=False,
                         linear_scope="all", cross_attention="sla", masked_attention="dense", min_kv_blocks=2)
    if source == "dict":
        loaded = SLAConfig.coerce(original.to_dict())
    elif source == "json":
        loaded = SLAConfig.coerce(original.to_json())
    elif source == "file":
        path = tmp_path / "sla_config.json"
        original.save_pretrained(path)
        assert "diffusers_sla_version" in json.loads(path.read_text())
        loaded = SLAConfig.coerce(str(path))
    else:
        loaded = SLAConfig.coerce(original)
    assert loaded == original


@pytest.mark.parametrize("scope", ["rest", "all", "none", "NONE"])
def test_every_linear_scope_round_trips(tmp_path, scope):
    cfg = SLAConfig(linear_scope=scope)
    assert cfg.linear_scope == scope.lower() and cfg.operator_dict()["linear_scope"] == scope.lower()
    cfg.save_pretrained(tmp_path / "sla_config.json")
    assert SLAConfig.coerce(str(tmp_path / "sla_config.json")) == cfg == SLAConfig.from_json(cfg.to_json())
    if scope != "rest":  # an operator field: a file saved with another scope differs from the default
        assert SLAConfig().operator_differences(cfg) == {"linear_scope": ("rest", scope.lower())}


def test_overrides_win_and_are_validated():
    assert SLAConfig.coerce({"topk": 0.3}, topk=0.5).topk == 0.5
    with pytest.raises(ValueError, match="`blkk` must be one of \\[32, 64, 128\\], got 48"):
        SLAConfig.coerce(None, blkk=48)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"topk": 0.0}, "`topk` must be in \\(0, 1\\], got 0.0"),
        ({"topk": 1.5}, "`topk` must be in \\(0, 1\\], got 1.5"),
        ({"topk": "0.2"}, "`topk` must be a number"),
        ({"blkq": 96}, "`blkq` must be one of \\[32, 64, 128\\], got 96"),
        ({"blkk": True}, "`blkk` must be one of"),
        ({"feature_map": "hedgehog"}, "`feature_map` must be one of \\['softmax', 'elu', 'relu'\\], got 'hedgehog'"),
        ({"linear_scope": "sparse"}, "`linear_scope` must be one of \\['rest', 'all', 'none'\\], got 'sparse'"),
        ({"cross_attention": "maybe"}, "`cross_attention` must be one of \\['sla', 'dense'\\]"),
        ({"masked_attention": 1}, "`masked_attention` must be one of"),
        ({"tie_feature_map_qk": "yes"}, "`tie_feature_map_qk` must be true or false"),
        ({"min_kv_blocks": -1}, "`min_kv_blocks` must be a non-negative integer"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLAConfig(**kwargs)


def test_unknown_keys_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="Unknown SLAConfig keys \\['top_k'\\]; known keys are \\['topk'"):
        SLAConfig.from_json('{"top_k": 0.1}')
    with pytest.warns(UserWarning, match="newer diffusers-sla"):
        cfg = SLAConfig.from_dict({"topk": 0.1, "future_field": 1}, allow_unknown=True)
    assert cfg.topk == 0.1


def test_bad_json_and_bad_types():
    with pytest.raises(ValueError, match="could not parse JSON"):
        SLAConfig.from_json("{topk: 0.1}")
    with pytest.raises(ValueError, match="path to a .json file"):
        SLAConfig.from_json("/no/such/file.json")
    with pytest.raises(TypeError, match="`config` must be an SLAConfig"):
        SLAConfig.coerce(0.2)


def test_case_is_normalised_and_operator_differences():
    cfg = SLAConfig(feature_map="ELU")
    assert cfg.feature_map == "elu"
    diff = SLAConfig(topk=0.1).operator_differences(SLAConfig(topk=0.2, cross_attention="sla"))
    assert diff == {"topk": (0.1, 0.2)}


def test_config_is_immutable_and_derived_with_replace():
    # A config is checked once, when it is built: edits after that would reach the kernels unchecked.
    import dataclasses

    from diffusers_sla import SLAAttnProcessor, SparseLinearAttention

    cfg = SLAConfig(topk=0.1)
    for name, value in (("blkq", 48), ("topk", 5.0), ("topk", 0.3)):
        with pytest.raises(dataclasses.FrozenInstanceError, match=name):
            setattr(cfg, name, value)
    assert cfg == SLAConfig(topk=0.1)
    assert dataclasses.replace(cfg, topk=0.3).topk == 0.3 and cfg.topk == 0.1
    with pytest.raises(ValueError, match="`blkq` must be one of"):
        dataclasses.replace(cfg, blkq=48)
    # Processors and layers hold a config no caller can change under them.
    processor, layer = SLAAttnProcessor(cfg), SparseLinearAttention(16, cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        processor.config.topk = 5.0
    assert processor.config.topk == layer.config.topk == 0.1
    assert hash(cfg) == hash(SLAConfig(topk=0.1))


def test_one_rule_for_numbers_of_every_field():
    # Python and numpy numbers alike, whole floats for the integer fields; stored as plain Python values.
    import numpy as np

    cfg = SLAConfig(topk=np.float32(0.25), blkq=np.int64(64), blkk=32.0, min_kv_blocks=np.float64(4.0),
                    tie_feature_map_qk=np.bool_(False), feature_map=np.str_("elu"))
    assert cfg == SLAConfig(topk=0.25, blkq=64, blkk=32, min_kv_blocks=4, tie_feature_map_qk=False, feature_map="elu")
    assert [type(getattr(cfg, n)) for n in ("topk", "blkq", "blkk", "min_kv_blocks", "tie_feature_map_qk")] == [
        float, int, int, int, bool]
    json.dumps(cfg.to_dict())  # plain values only
    assert SLAConfig.from_dict({"min_kv_blocks": 4.0, "topk": np.float64(0.2)}).min_kv_blocks == 4
    for kwargs, message in (
        ({"min_kv_blocks": 4.5}, "`min_kv_blocks` must be a non-negative integer, got 4.5"),
        ({"blkq": 64.5}, "`blkq` must be one of"),
        ({"blkq": "64"}, "`blkq` must be one of"),
        ({"topk": np.bool_(True)}, "`topk` must be a number"),
        ({"min_kv_blocks": True}, "`min_kv_blocks` must be a non-negative integer"),
        ({"topk": float("nan")}, "`topk` must be in"),
        ({"tie_feature_map_qk": 1}, "`tie_feature_map_qk` must be true or false"),
    ):
        with pytest.raises(ValueError, match=message):
            SLAConfig(**kwargs)


def test_unreadable_config_files_are_clear_errors(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"could not read .*weights.bin.* as UTF-8 JSON"):
        SLAConfig.from_json(str(binary))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json.* must hold a JSON object .*got list"):
        SLAConfig.coerce(str(listed))

