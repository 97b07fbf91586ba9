# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Convert SLA weights that users already have into `sla_attention.safetensors` for a diffusers model.

* SimpleTuner's `sla_attention.pt`: `{"settings": {...}, "state": {"<head_dim>:<dtype>": {"proj_l.weight",
  "proj_l.bias"}}}`, one projection shared by every attention call of that head size. It is copied into every SLA
  layer of the diffusers model with that head size.
* TurboDiffusion Wan checkpoints (`.pth` state dicts): `blocks.{i}.self_attn.attn_op.local_attn.proj_l.{weight,bias}`
  becomes `blocks.{i}.attn1.proj_l.{weight,bias}` of `WanTransformer3DModel`.

Both are pickles: they are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers. Both were trained with the thu-ml SLA implementation, whose linear branch covers every key block, hence
the default `linear_scope="all"` of the converted config; it selects text key blocks like any others, hence
`protect_text=False`.

The target `model` may be a model object (with SLA enabled, or not: then SLA is enabled on an empty copy built from
its config), a diffusers model folder (a pipeline folder uses its `transformer` subfolder) or a config dict.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, NamedTuple

import diffusers
import torch
from torch import nn

from diffusers_sla.config import SLA_WEIGHTS_NAME, SLAConfig
from diffusers_sla.integration.install import enable_sla
from diffusers_sla.integration.layer import iter_sla_layers

from .format import build_metadata, sla_entry_names, write_safetensors
from .replay import NO_REPLAY_ATTR

# The thu-ml SLA implementation (used by SimpleTuner and TurboDiffusion) runs its linear branch over all key blocks.
# thu-ml's SLA: the linear branch over every key block, and no protected text tokens in joint attention
LEGACY_CONFIG_DEFAULTS = {"linear_scope": "all", "protect_text": False}

_TURBO_WAN_KEY = re.compile(
    r"^(?P<prefix>.*?)blocks\.(?P<block>\d+)\.self_attn\.attn_op\.local_attn\.proj_l\.(?P<name>weight|bias)$"
)


class ConversionResult(NamedTuple):
    path: str | None  # the written file, None when no `output` was given
    tensors: dict[str, torch.Tensor]
    config: SLAConfig
    matched: dict[str, list[str]]  # source entry (head dim, block) -> attention paths it filled
    unmatched_layers: list[str]  # SLA layers of the model the source had nothing for


# ===== Target model =====


class _Target(NamedTuple):
    class_name: str
    head_dims: dict[str, int]  # attention path -> head_dim, for every SLA layer


def _load_model_config(source: str | os.PathLike | dict, subfolder: str | None) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isfile(path):
        return _read_model_config(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No model folder or config file at {path!r}.")
    if subfolder is None and os.path.isfile(os.path.join(path, "model_index.json")):
        subfolder = "transformer"  # a pipeline folder: SLA goes into its transformer
    config_file = os.path.join(path, subfolder or "", "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No diffusers model config at {config_file}.")
    return _read_model_config(config_file)


def _read_model_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"The target model {path!r} is not a diffusers model config (JSON): {err}. Pass the model's folder, a "
            "pipeline folder, or its config.json."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"The target model config {path!r} must hold a JSON object, got {type(config).__name__}.")
    return config


def _skeleton_with_sla(config: dict, sla_config: SLAConfig) -> nn.Module:
    """An empty (meta-device) model built from `config`, with SLA enabled as `enable_sla` would enable it."""
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise ValueError(f"Cannot build the target model: unknown diffusers class {class_name!r} in its config.")
    with torch.device("meta"):
        model = cls.from_config(config)
    setattr(model, NO_REPLAY_ATTR, True)
    enable_sla(model, sla_config)
    return model


def _resolve_target(model: Any, sla_config: SLAConfig, subfolder: str | None) -> _Target:
    if isinstance(model, nn.Module) and next(iter_sla_layers(model), None) is not None:
        return _Target(type(model).__name__, {path: layer.head_dim for path, _, layer in iter_sla_layers(model)})
    if isinstance(model, nn.Module):
        config = dict(getattr(model, "config", {}) or {})
        config.setdefault("_class_name", type(model).__name__)
    else:
        config = _load_model_config(model, subfolder)
    skeleton = _skeleton_with_sla(config, sla_config)
    head_dims = {path: layer.head_dim for path, _, layer in iter_sla_layers(skeleton)}
    if not head_dims:
        raise ValueError(f"`enable_sla` installs no SLA layer in {type(skeleton).__name__} with this config.")
    return _Target(type(skeleton).__name__, head_dims)


# ===== Reading legacy files =====


def _torch_load(path: str | os.PathLike) -> Any:
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError (truncated)
        raise ValueError(
            f"Could not read {os.fspath(path)} with `torch.load(weights_only=True)` (only tensors and plain "
            f"containers are accepted; the file may be truncated or hold Python objects): {err}"
        ) from err


def _legacy_config(settings: dict | None, config: Any, overrides: dict) -> SLAConfig:
    values = dict(LEGACY_CONFIG_DEFAULTS)
    if settings:
        known = set(SLAConfig.field_names())
        ignored = sorted(set(settings) - known)
        if ignored:
            warnings.warn(f"Ignoring settings that are not SLAConfig fields: {ignored}.", stacklevel=3)
        values.update({k: v for k, v in settings.items() if k in known})
    if isinstance(config, SLAConfig):
        values.update(config.to_dict())  # a complete config: it says everything
    elif config is not None:
        # A partial dict or JSON ('{"topk": 0.1}') changes only the fields it names, like keyword overrides do.
        partial = json.loads(SLAConfig.coerce(config).to_json())
        given = config if isinstance(config, dict) else _json_object(config)
        values.update({k: partial[k] for k in given})
    values.update(overrides)
    return SLAConfig.from_dict(values)


def _json_object(config: str | os.PathLike) -> dict:
    text = os.fspath(config)
    if not text.lstrip().startswith("{"):
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    return json.loads(text)


def _output_file(output: str | os.PathLike) -> str:
    path = os.fspath(output)
    return path if path.endswith(".safetensors") else os.path.join(path, SLA_WEIGHTS_NAME)


def _check_projection(name: str, weight: Any, bias: Any, head_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise ValueError(f"{name}: `proj_l.weight` and `proj_l.bias` must be tensors.")
    dim = head_dim if head_dim is not None else (weight.shape[-1] if weight.ndim == 2 else None)
    if dim is None or tuple(weight.shape) != (dim, dim) or tuple(bias.shape) != (dim,):
        expected = f"{(dim, dim)} and proj_l.bias {(dim,)}" if dim is not None else "(D, D) and proj_l.bias (D,)"
        raise ValueError(
            f"{name}: expected proj_l.weight {expected}, got {tuple(weight.shape)} and {tuple(bias.shape)}."
        )
    if not weight.is_floating_point() or not bias.is_floating_point():
        raise ValueError(f"{name}: proj_l tensors must be floating point, got {weight.dtype} and {bias.dtype}.")
    if not weight.isfinite().all() or not bias.isfinite().all():
        raise ValueError(f"{name}: proj_l holds values that are not finite (NaN or inf): the model would output NaN.")
    return weight.detach().float().contiguous(), bias.detach().float().contiguous()


# ===== SimpleTuner =====


def convert_simpletuner_sla(
    source: str | os.PathLike,
    model: Any,
    output: str | os.PathLike | None = None,
    *,
    config: SLAConfig | dict | str | None = None,
    source_dtype: str | None = None,
    subfolder: str | None = None,
    **overrides,
) -> ConversionResult:
    """Convert SimpleTuner's `sla_attention.pt` into `sla_attention.safetensors` for `model`.

    Args:
        source: path of `sla_attention.pt`.
        model: the diffusers model the weights are for (see the module docstring).
        output: a folder (the file is `output/sla_attention.safetensors`) or a `.safetensors` path; `None` writes
            nothing and only returns the tensors.
        config, **overrides: the `SLAConfig` the weights were trained with, over the file's `settings` (and
            `linear_scope="all"`, the thu-ml implementation's behaviour).
        source_dtype: which `"<head_dim>:<dtype>"` entry to use when the file has several dtypes for one head size.

    Each projection is copied into every SLA layer with its head size; the result says which head sizes matched.
    Layers whose head size has no projection are left out (warning: load the file with `strict=False`).
    """
    data = _torch_load(source)
    if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
        raise ValueError(f"{os.fspath(source)} is not a SimpleTuner `sla_attention.pt`: no `state` dict.")
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else None
    sla_config = _legacy_config(settings, config, overrides)

    by_head_dim: dict[int, list[tuple[str, dict]]] = {}
    for key, entry in data["state"].items():
        head, _, dtype = str(key).partition(":")
        if not head.strip().isdigit() or not isinstance(entry, dict):
            raise ValueError(
                f"Unexpected `state` entry {key!r} in {os.fspath(source)}: expected '<head_dim>:<dtype>'."
            )
        if source_dtype is not None and dtype.replace("torch.", "") != source_dtype.replace("torch.", ""):
            continue
        by_head_dim.setdefault(int(head), []).append((str(key), entry))
    ambiguous = {h: [k for k, _ in entries] for h, entries in by_head_dim.items() if len(entries) > 1}
    if ambiguous:
        raise ValueError(f"Several entries for one head size {ambiguous}: choose one with `source_dtype=`.")

    target = _resolve_target(model, sla_config, subfolder)
    tensors, matched, unmatched = {}, {}, []
    for path, head_dim in target.head_dims.items():
        if head_dim not in by_head_dim:
            unmatched.append(path)
            continue
        key, entry = by_head_dim[head_dim][0]
        weight, bias = _check_projection(key, entry.get("proj_l.weight"), entry.get("proj_l.bias"), head_dim)
        entry_w, entry_b = sla_entry_names(path)
        # Own copies: one shared projection becomes one independent parameter per layer.
        tensors[entry_w], tensors[entry_b] = weight.clone(), bias.clone()
        matched.setdefault(key, []).append(path)
    if not matched:
        raise ValueError(
            f"No head size of {os.fspath(source)} ({sorted(by_head_dim)}) matches an SLA layer of "
            f"{target.class_name} (head sizes {sorted(set(target.head_dims.values()))})."
        )
    if unmatched:
        warnings.warn(
            f"No projection for the SLA layers {unmatched} (head sizes without an entry in the file): they are not "
            "in the converted file and keep zero-initialised projections; load it with `strict=False`.",
            stacklevel=2,
        )
    return _finish(tensors, sla_config, target, matched, unmatched, output, "simpletuner")


# ===== TurboDiffusion Wan =====


def convert_turbodiffusion_wan(
    source: str | os.PathLike,
    model: Any = None,
    output: str | os.PathLike | None = None,
    *,
    config: SLAConfig | dict | str | None = None,
    key_prefix: str | None = None,
    subfolder: str | None = None,
    **overrides,
) -> ConversionResult:
    """Convert the SLA projections of a TurboDiffusion Wan checkpoint (`.pth`) into `sla_attention.safetensors` for
    diffusers' `WanTransformer3DModel` (`blocks.{i}.self_attn.attn_op.local_attn.proj_l.*` -> `blocks.{i}.attn1.*`).

    Args:
        source: the `.pth` state dict (optionally nested under `state_dict`, `model`, `ema` or `net`).
        model: the target Wan model (checked: every block must exist with the same head size); `None` converts by
            the key mapping alone.
        output, config, **overrides: as in `convert_simpletuner_sla`. TurboDiffusion checkpoints carry no SLA
            settings: pass the `topk` (and block sizes) the checkpoint was trained with.
        key_prefix: which prefix to use when the checkpoint holds several copies (e.g. `"net."` and `"ema."`).
    """
    data = _torch_load(source)
    state = _find_state_dict(data)
    sla_config = _legacy_config(None, config, overrides)

    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _TURBO_WAN_KEY.match(str(key))
        if match:
            blocks = found.setdefault(match["prefix"], {})
            blocks.setdefault(int(match["block"]), {})[match["name"]] = value
    if key_prefix is not None:
        found = {p: b for p, b in found.items() if p == key_prefix}
    if not found:
        raise ValueError(
            f"No `blocks.<i>.self_attn.attn_op.local_attn.proj_l.*` entries in {os.fspath(source)}"
            f"{f' under prefix {key_prefix!r}' if key_prefix is not None else ''}: not a TurboDiffusion Wan "
            "checkpoint."
        )
    if len(found) > 1:
        raise ValueError(
            f"The checkpoint holds SLA weights under several prefixes {sorted(found)}: pass `key_prefix=`."
        )
    blocks = next(iter(found.values()))

    target = None if model is None else _resolve_target(model, sla_config, subfolder)
    tensors, matched, head_dims = {}, {}, {}
    for block in sorted(blocks):
        path = f"blocks.{block}.attn1"
        entry = blocks[block]
        head_dim = None if target is None else target.head_dims.get(path)
        if target is not None and head_dim is None:
            raise ValueError(
                f"Block {block} of the checkpoint has no SLA layer `{path}` in {target.class_name} (SLA layers: "
                f"{sorted(target.head_dims)[:6]}...): is it the matching Wan model?"
            )
        weight, bias = _check_projection(f"block {block}", entry.get("weight"), entry.get("bias"), head_dim)
        entry_w, entry_b = sla_entry_names(path)
        tensors[entry_w], tensors[entry_b] = weight, bias
        head_dims[path] = weight.shape[0]
        matched[f"blocks.{block}"] = [path]
    unmatched = [] if target is None else sorted(set(target.head_dims) - set(head_dims))
    if unmatched:
        warnings.warn(
            f"The checkpoint has no SLA weights for {unmatched}: they are not in the converted file and keep "
            "zero-initialised projections; load it with `strict=False`.",
            stacklevel=2,
        )
    if target is None:
        target = _Target("WanTransformer3DModel", head_dims)
    return _finish(tensors, sla_config, target, matched, unmatched, output, "turbodiffusion")


def _find_state_dict(data: Any) -> dict:
    if isinstance(data, dict):
        if any(_TURBO_WAN_KEY.match(str(k)) for k in data):
            return data
        for name in ("state_dict", "model", "ema", "net"):
            if isinstance(data.get(name), dict):
                return _find_state_dict(data[name])
        return data
    raise ValueError(f"Expected a state dict, got {type(data).__name__}.")


def _finish(tensors, sla_config, target, matched, unmatched, output, source_kind) -> ConversionResult:
    head_dims = {path: target.head_dims.get(path, tensors[sla_entry_names(path)[0]].shape[0]) for path in
                 dict.fromkeys(p for paths in matched.values() for p in paths)}
    path = None
    if output is not None:
        path = _output_file(output)
        metadata = build_metadata(target.class_name, sla_config, head_dims, converted_from=source_kind)
        write_safetensors(tensors, metadata, path)
    return ConversionResult(path, tensors, sla_config, matched, unmatched)


__all__ = ["LEGACY_CONFIG_DEFAULTS", "ConversionResult", "convert_simpletuner_sla", "convert_turbodiffusion_wan"]
