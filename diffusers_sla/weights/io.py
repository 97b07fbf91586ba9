# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Saving and loading SLA weights: `save_sla`, `load_sla`, and the check-then-copy plan every load goes through
(`plan_load`, `apply_plan`: all or nothing)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections import Counter
from typing import Any, NamedTuple

import torch
from torch import nn

from diffusers_sla.config import SLA_WEIGHTS_NAME, SLAConfig
from diffusers_sla.integration.install import use_layer_config
from diffusers_sla.integration.joint import operator_differences_for
from diffusers_sla.integration.layer import REPLAYED_ATTR, SparseLinearAttention, iter_sla_layers
from diffusers_sla.integration.modules import DENSE_LAYER_ATTR

from .format import (
    SLAWeightsFile,
    base_weight_mismatches,
    build_metadata,
    read_sla_file,
    sla_entry_names,
    write_safetensors,
)
from .hub import resolve_sla_file

# The logger name users filter on (`diffusers_sla.serialization`), kept whatever module a line comes from.
logger = logging.getLogger("diffusers_sla.serialization")
ZERO_INIT_NOTE = "SLA starts from zero-initialised projections (`proj_l`), as if it had never been trained"


def get_sla_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{entry name: tensor}` of every SLA parameter of `model`, named as in `sla_attention.safetensors`."""
    state = {}
    for path, _, layer in iter_sla_layers(model):
        params = layer.sla_parameters()
        for entry, name in zip(sla_entry_names(path, layer), layer.sla_parameter_names):
            state[entry] = params[name]
    return state


def is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def sla_components(obj: Any) -> list[tuple[str, nn.Module]]:
    """`[(subfolder, model)]` for every model of `obj` holding SLA layers: the model itself (subfolder `""`), or the
    pipeline components (subfolder = component name, the layout of `pipe.save_pretrained`)."""
    if is_pipeline(obj):
        return [
            (name, comp)
            for name, comp in obj.components.items()
            if isinstance(comp, nn.Module) and next(iter_sla_layers(comp), None) is not None
        ]
    if isinstance(obj, nn.Module):
        return [("", obj)] if next(iter_sla_layers(obj), None) is not None else []
    raise TypeError(f"Expected a diffusers pipeline or a torch model, got {type(obj).__name__}.")


def short_list(items, limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{f', ... and {len(items) - limit} more' if len(items) > limit else ''}]"


# ===== Saving =====


def sla_file_contents(
    model: nn.Module, base_weights: dict[str, dict] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of `model`'s SLA weights file (`base_weights`: see `format.build_metadata`)."""
    layers = list(iter_sla_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLA layers to save: call `enable_sla` first.")
    # Own, contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {
        key: value.detach().to("cpu", torch.float32).contiguous().clone()
        for key, value in get_sla_state_dict(model).items()
    }
    # the operator most layers run is the file's config; the others are listed per layer
    counts = Counter(json.dumps(layer.config.operator_dict(), sort_keys=True) for _, _, layer in layers)
    most = counts.most_common(1)[0][0]
    common = next(layer.config for _, _, layer in layers
                  if json.dumps(layer.config.operator_dict(), sort_keys=True) == most)
    layer_configs = {
        path: layer.config.operator_dict() for path, _, layer in layers if layer.config.operator_differences(common)
    }
    head_dims = {path: layer.head_dim for path, _, layer in layers}
    metadata = build_metadata(type(model).__name__, common, head_dims, layer_configs=layer_configs,
                              base_weights=base_weights)
    return tensors, metadata


def save_sla(
    model_or_pipe: Any,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    weight_name: str = SLA_WEIGHTS_NAME,
) -> list[str]:
    """Write the SLA weights of a model (to `save_directory/sla_attention.safetensors`) or of a pipeline (each
    SLA-enabled component to `save_directory/<component>/sla_attention.safetensors`). Only the main process writes.

    `save_pretrained` and `push_to_hub` already call this for every model with SLA layers; call it yourself to save
    the SLA weights alone (a few hundred KB) next to an unchanged base model.

    Returns the paths of the files (written or, off the main process, that the main process writes).
    """
    targets = sla_components(model_or_pipe)
    if not targets:
        raise ValueError(f"{type(model_or_pipe).__name__} has no SLA layers to save: call `enable_sla` first.")
    paths = []
    for subfolder, model in targets:
        filename = os.path.join(os.fspath(save_directory), subfolder, weight_name)
        if is_main_process:
            tensors, metadata = sla_file_contents(model)
            write_safetensors(tensors, metadata, filename)
            layers = sum(name.endswith("proj_l.weight") for name in tensors)
            logger.info(f"Saved SLA weights of {layers} layers to {filename}.")
        paths.append(filename)
    return paths


# ===== Loading: check everything, then copy =====


class SLALoadResult(NamedTuple):
    """What `load_sla` / the replay in `enable_sla` did for one model."""

    source: str
    loaded_layers: list[str]
    missing_layers: list[str]
    unexpected_keys: list[str]
    # `{field: (installed value, file value)}` over all loaded layers; empty unless `strict=False` let it pass.
    config_differences: dict[str, tuple[Any, Any]]
    # Layers that took the operator config the file stores for them alone (`layer_configs_to_adopt`).
    layer_configs: dict[str, SLAConfig] = {}


def plan_load(model: nn.Module, weights: SLAWeightsFile, strict: bool):
    """Check `weights` against the SLA layers of `model` without touching it. Returns the `(parameter, tensor)` pairs
    to copy and the `SLALoadResult`; raises `ValueError` listing every problem."""
    layers = {path: layer for path, _, layer in iter_sla_layers(model)}
    modules = {path: attn for path, attn, _ in iter_sla_layers(model)}
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no SLA layers: call `enable_sla` before loading SLA weights into it."
        )
    params = {}
    for path, layer in layers.items():
        named = layer.sla_parameters()
        for entry, name in zip(sla_entry_names(path, layer), layer.sla_parameter_names):
            params[entry] = (path, named[name])

    file_keys = set(weights.tensors)
    missing_keys = sorted(set(params) - file_keys)
    # entries of layers the config keeps dense (`dense_layers`) are expected: they are simply not used
    dense_entries = {name for path, module in model.named_modules() if module.__dict__.get(DENSE_LAYER_ATTR)
                     and path not in layers for name in sla_entry_names(path)}
    unexpected = sorted(file_keys - set(params) - dense_entries)
    missing_layers = sorted({params[k][0] for k in missing_keys})
    common = [k for k in params if k in file_keys]

    errors, soft = [], []
    dtypes = [f"{k} ({weights.tensors[k].dtype})" for k in common if weights.tensors[k].dtype != torch.float32]
    if dtypes:
        errors.append(f"SLA weights must be float32, found {short_list(dtypes)}")
    shapes = [
        f"{k}: file {tuple(weights.tensors[k].shape)}, model {tuple(params[k][1].shape)}"
        for k in common
        if tuple(weights.tensors[k].shape) != tuple(params[k][1].shape)
    ]
    if shapes:
        errors.append(f"shape mismatch for {short_list(shapes)}")
    # NaN or inf in proj_l turns every output of the model into NaN
    non_finite = [k for k in common if weights.tensors[k].is_floating_point()
                  and not weights.tensors[k].isfinite().all()]
    if non_finite:
        errors.append(f"values that are not finite (NaN or inf) in {short_list(non_finite)}")
    if missing_layers:
        soft.append(f"missing layers (in the model, not in the file): {short_list(missing_layers)}")
    if unexpected:
        soft.append(f"extra entries (in the file, no such SLA layer in the model): {short_list(unexpected)}")
    if not common:
        errors.append("no SLA layer of the model is in the file")
    mismatches = base_weight_mismatches(weights)
    if mismatches:
        soft.append(
            f"the base weights beside it are not the ones these SLA weights were saved with: {short_list(mismatches)}"
            " (an interrupted `save_pretrained`, or SLA weights copied from another save)"
        )

    adopt = layer_configs_to_adopt(layers, weights)
    differences: dict[str, tuple[Any, Any]] = {}
    by_layer: dict[str, tuple[SLAConfig, dict]] = {}
    for path in sorted({params[k][0] for k in common}):
        installed = adopt.get(path, layers[path].config)
        layer_differences = operator_differences_for(modules[path], installed, weights.config_for(path))
        if layer_differences:
            by_layer[path] = (installed, layer_differences)
        for name, values in layer_differences.items():
            differences.setdefault(name, values)
    if by_layer:
        soft.append(_config_mismatch_message(by_layer, weights, len(set(params[k][0] for k in common))))

    if strict:
        errors += soft
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        # Only layer-set and config problems can be waived.
        fix = "\nPass `strict=False` to load anyway (these problems then become warnings)." if strict and soft else ""
        raise ValueError(f"Cannot load SLA weights from {weights.path} (the model was left unchanged):\n{lines}{fix}")
    for message in soft:
        warnings.warn(f"Loading SLA weights from {weights.path} with strict=False: {message}.", stacklevel=3)

    pairs = [(params[k][1], weights.tensors[k]) for k in common]
    result_layers = {params[k][0] for k in common}
    result = SLALoadResult(
        source=weights.path,
        loaded_layers=sorted({params[k][0] for k in common}),
        missing_layers=missing_layers,
        unexpected_keys=unexpected,
        config_differences=differences,
        layer_configs={path: config for path, config in adopt.items() if path in result_layers},
    )
    return pairs, result


def _fields(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"`{n}` (installed {a!r}, file {b!r})" for n, (a, b) in differences.items())


def _config_mismatch_message(by_layer: dict[str, tuple[SLAConfig, dict]], weights: SLAWeightsFile, loaded: int) -> str:
    head = "the SLA config differs from the one the weights were trained with"
    groups: dict[str, list[str]] = {}
    for path, (_, layer_differences) in by_layer.items():
        groups.setdefault(_fields(layer_differences), []).append(path)
    if len(groups) == 1 and len(by_layer) == loaded:
        return f"{head}: {next(iter(groups))}"  # one difference for every layer: the whole config
    lines = []
    for fields, paths in groups.items():
        installed = by_layer[paths[0]][0].operator_dict()
        stored = weights.config_for(paths[0]).operator_dict()
        lines.append(f"layers {short_list(paths)}: {fields}; installed {installed}, file {stored}")
    return head + ", per layer:\n    " + "\n    ".join(lines)


def layer_configs_to_adopt(layers: dict[str, SparseLinearAttention], weights: SLAWeightsFile) -> dict[str, SLAConfig]:
    """`{path: config}` for the layers the file gives an operator of their own (a module given its own processor
    when saved), when every other layer runs the file's common operator, so that the installed config came from the
    file or agrees with it: those layers take their stored operator, with the routing fields they have."""
    if not weights.layer_configs:
        return {}
    others = [layer for path, layer in layers.items() if path not in weights.layer_configs]
    if any(layer.config.operator_differences(weights.config) for layer in others):
        return {}
    return {
        path: dataclasses.replace(layers[path].config, **stored.operator_dict())
        for path, stored in weights.layer_configs.items()
        if path in layers and layers[path].config.operator_differences(stored)
    }


def apply_plan(model: nn.Module, pairs, layer_configs: dict[str, SLAConfig] | None = None) -> None:
    if layer_configs:
        _adopt_layer_configs(model, layer_configs)
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)
    mark_replayed(model)


def _adopt_layer_configs(model: nn.Module, layer_configs: dict[str, SLAConfig]) -> None:
    for path, attn, layer in iter_sla_layers(model):
        config = layer_configs.get(path)
        if config is None:
            continue
        use_layer_config(attn, layer, config)
        logger.info(f"SLA layer {path} runs the config stored for it: {config.operator_dict()}.")


def mark_replayed(model: nn.Module) -> None:
    # Loaded layers hold trained weights: a later enable_sla must not replay the file over them.
    for _, _, layer in iter_sla_layers(model):
        setattr(layer, REPLAYED_ATTR, True)


def load_sla_state_dict(
    model: nn.Module, weights: SLAWeightsFile | str | os.PathLike, *, strict: bool = True
) -> SLALoadResult:
    """Load an `SLAWeightsFile` (or the path of an `sla_attention.safetensors` file) into the SLA layers of `model`,
    all or nothing."""
    if not isinstance(weights, SLAWeightsFile):
        weights = read_sla_file(weights)
    pairs, result = plan_load(model, weights, strict)
    apply_plan(model, pairs, result.layer_configs)
    return result


def _all_zero(model: nn.Module) -> bool:
    return all(not t.detach().any() for t in get_sla_state_dict(model).values())


def missing_file_warning(model: nn.Module, where: str, stacklevel: int) -> None:
    if _all_zero(model):
        state = ZERO_INIT_NOTE
    else:
        state = "the SLA layers keep their current weights"
    warnings.warn(f"No SLA weights found at {where}: {state}.", UserWarning, stacklevel=stacklevel)


# ===== Loading =====


def load_sla(
    pipe_or_model: Any,
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    strict: bool = True,
    weight_name: str = SLA_WEIGHTS_NAME,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> list[SLALoadResult]:
    """Load `sla_attention.safetensors` into the SLA layers of a model or pipeline (SLA must be enabled first).

    Args:
        pipe_or_model: a diffusers model, or a pipeline: each SLA-enabled component (usually `transformer`) reads the
            file of its own subfolder (`<component>/sla_attention.safetensors`, as `pipe.save_pretrained` writes it)
            unless `subfolder` or a file path is given.
        path_or_repo_id (`str` or `os.PathLike`): the file itself, a local folder, or a Hub repo id (`"user/repo"`,
            fetched with `huggingface_hub`, from the local cache when offline).
        subfolder (`str`, *optional*): folder of the file inside `path_or_repo_id` (`"transformer"` for a pipeline
            repo loaded into a bare transformer).
        strict (`bool`, *optional*, defaults to `True`): when `False`, missing or extra layers and a config that
            differs from the installed one are warnings (the layers present in both are loaded) instead of errors.
            Wrong shapes, non-float32 tensors and damaged files are always errors.
        revision, cache_dir, token, local_files_only: passed to `huggingface_hub.hf_hub_download`.

    Every file is checked before any weight is copied: on error the model is left unchanged. A file that does not
    exist is a warning (the SLA layers keep their weights). Returns one `SLALoadResult` per model loaded.
    """
    targets = sla_components(pipe_or_model)
    if not targets:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no SLA layers: call `enable_sla` before `load_sla` "
            "(`enable_sla` on a model loaded with `from_pretrained` already loads the SLA weights saved beside it)."
        )
    text = os.fspath(path_or_repo_id)
    is_pipe = is_pipeline(pipe_or_model)
    if is_pipe and (subfolder is not None or os.path.isfile(text)) and len(targets) > 1:
        names = [name for name, _ in targets]
        raise ValueError(
            f"The pipeline has several SLA-enabled components {names}: one file cannot fill them all. Pass no "
            "`subfolder` to load each from its own subfolder, or call `load_sla` on one component."
        )
    hub_kwargs = {
        "weight_name": weight_name, "revision": revision, "cache_dir": cache_dir, "token": token,
        "local_files_only": local_files_only,
    }
    plans = []
    for component, model in targets:
        sub = subfolder if (subfolder is not None or not is_pipe or os.path.isfile(text)) else component
        filename, where = resolve_sla_file(text, sub, **hub_kwargs)
        if filename is None:
            hint = ""
            if not is_pipe and not subfolder and os.path.isfile(os.path.join(text, "transformer", weight_name)):
                hint = " (there is one in its `transformer` subfolder: pass `subfolder='transformer'`)"
            missing_file_warning(model, where + hint, stacklevel=3)
            continue
        weights = read_sla_file(filename)
        plans.append((model, *plan_load(model, weights, strict)))
    # Everything was checked: now copy.
    results = []
    for model, pairs, result in plans:
        apply_plan(model, pairs, result.layer_configs)
        logger.info(f"Loaded SLA weights of {len(result.loaded_layers)} layers from {result.source}.")
        results.append(result)
    return results
