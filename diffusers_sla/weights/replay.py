# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Replaying saved SLA weights: a model loaded with `from_pretrained` remembers where it came from
(`record_load_source`), and installing SLA on it loads the `sla_attention.safetensors` found there: the whole file
after a model-level install (`replay_into_model`), one module's entries after `attn.set_processor(SLAAttnProcessor())`
(`replay_into_module`). `hooks.py` hands these to `integration.install.use_weights_replay`.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from diffusers_sla.config import SLA_MODULE_NAME, SLAConfig
from diffusers_sla.integration.joint import operator_differences_for
from diffusers_sla.integration.layer import REPLAYED_ATTR, SparseLinearAttention, iter_sla_layers
from diffusers_sla.integration.logs import log_once
from diffusers_sla.integration.modules import expects_sla, infer_head_dim, module_device
from diffusers_sla.integration.processor import SLAAttnProcessor

from .format import read_sla_file, sla_entry_names
from .hub import resolve_sla_file
from .io import (
    ZERO_INIT_NOTE,
    SLALoadResult,
    load_sla_state_dict,
    logger,
    mark_replayed,
    missing_file_warning,
    sla_components,
)

# Attribute set on models by the `from_pretrained` hook: where the model was loaded from.
LOAD_SOURCE_ATTR = "_sla_load_source"
# Set on each attention module by the same hook: `(load source, path in the model)`.
MODULE_ORIGIN_ATTR = "_sla_module_origin"
# Set on throw-away skeletons (converters) so that `replay_into_model` does not try to replay anything into them.
NO_REPLAY_ATTR = "_sla_no_replay"


def _load_location(model: nn.Module) -> dict[str, Any] | None:
    source = getattr(model, LOAD_SOURCE_ATTR, None)
    if source is not None:
        return source
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return {"path": name} if name else None


def _on_meta_device(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def replay_into_model(model_or_pipe: Any, *, strict: bool = True) -> list[SLALoadResult]:
    """Replay rule, called by `enable_sla` once SLA layers are installed.

    For each model with SLA layers (the model, or each SLA-enabled pipeline component), look where the model was
    loaded from (`from_pretrained`'s path or repo id, subfolder and revision; for pipeline components, the folder of
    the component, which for a Hub pipeline is a cache snapshot and leads back to the repo): if
    `sla_attention.safetensors` is there, load it (same checks as `load_sla`) and say so with a warning-level log
    line. If the model has a load location but no SLA file, warn that SLA starts from zero-initialised projections.
    Models built from a config have no load location: nothing happens.
    """
    results = []
    for _, model in sla_components(model_or_pipe):
        if getattr(model, NO_REPLAY_ATTR, False) or _on_meta_device(model):
            continue
        layers = [layer for _, _, layer in iter_sla_layers(model)]
        fresh = [layer for layer in layers if not getattr(layer, REPLAYED_ATTR, False)]
        if len(fresh) < len(layers):
            # Calling enable_sla again (new config, re-attached layers) must not overwrite trained weights with
            # the file: replay only into a model whose SLA layers are all new.
            if fresh:
                logger.info(f"{len(fresh)} new SLA layers of {type(model).__name__} start from zero (no replay).")
            mark_replayed(model)
            continue
        location = _load_location(model)
        if location is None or not location.get("path"):
            logger.info(f"{type(model).__name__} was not loaded from a folder or repo: no SLA weights to replay.")
            mark_replayed(model)
            continue
        try:
            filename, where = resolve_sla_file(
                location["path"],
                location.get("subfolder"),
                revision=location.get("revision"),
                cache_dir=location.get("cache_dir"),
                local_files_only=bool(location.get("local_files_only")),
                guess_local_paths=False,
            )
        except (OSError, ValueError) as err:
            # A network or auth failure must not make enable_sla fail; the user can still call load_sla.
            warnings.warn(
                f"Could not look for SLA weights beside {location['path']!r} ({err}); {ZERO_INIT_NOTE}. Call "
                "`load_sla(model, path_or_repo_id)` to load them explicitly.",
                UserWarning,
                stacklevel=3,
            )
            mark_replayed(model)
            continue
        if filename is None:
            missing_file_warning(model, where, stacklevel=3)
            mark_replayed(model)
            continue
        result = load_sla_state_dict(model, filename, strict=strict)
        logger.warning(
            f"diffusers-sla: loaded trained SLA weights of {len(result.loaded_layers)} layers of "
            f"{type(model).__name__} from {filename}."
        )
        results.append(result)
    return results


def peek_sla_config(
    path_or_repo_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs
) -> SLAConfig | None:
    """The `SLAConfig` stored in the SLA weights at `path_or_repo_id` (see `resolve_sla_file`), or `None` when there
    is no such file. Lets `enable_sla` default to the config the weights were trained with."""
    filename, _ = resolve_sla_file(path_or_repo_id, subfolder, **hub_kwargs)
    return None if filename is None else read_sla_file(filename).config


def sla_config_at_load_location(model: nn.Module) -> SLAConfig | None:
    """The `SLAConfig` of the SLA weights that `replay_into_model` would replay into `model`, or `None`. Never raises
    for a missing file or an unreachable Hub."""
    location = _load_location(model)
    if location is None or not location.get("path"):
        return None
    try:
        return peek_sla_config(
            location["path"], location.get("subfolder"), revision=location.get("revision"),
            cache_dir=location.get("cache_dir"), local_files_only=bool(location.get("local_files_only")),
            guess_local_paths=False,
        )
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=2)
def _read_sla_file_cached(filename: str, mtime_ns: int, size: int):
    return read_sla_file(filename)


def replay_into_module(attn: nn.Module, processor: SLAAttnProcessor) -> None:
    """`attn.set_processor(SLAAttnProcessor())` on one module of a model loaded with `from_pretrained` (the
    per-module idiom): load this module's entries of the `sla_attention.safetensors` saved beside the model, with
    `enable_sla`'s checks for one layer (present, float32, shape, the same operator config). Model-level installs
    (`enable_sla`, `set_attn_processor`) replay the whole file themselves instead."""
    origin = attn.__dict__.get(MODULE_ORIGIN_ATTR)
    if origin is None:
        return
    existing = attn._modules.get(SLA_MODULE_NAME)
    if isinstance(existing, SparseLinearAttention) and getattr(existing, REPLAYED_ATTR, False):
        return  # holds loaded (or trained) weights already
    source, path = origin
    try:
        filename, where = resolve_sla_file(
            source["path"], source.get("subfolder"), revision=source.get("revision"),
            cache_dir=source.get("cache_dir"), local_files_only=bool(source.get("local_files_only")),
        )
    except (OSError, ValueError) as err:
        log_once(("module_replay_unreachable", source["path"]), logging.WARNING,
                 f"set_processor(SLAAttnProcessor): could not look for SLA weights beside {source['path']!r} "
                 f"({err}); these modules start from zero-initialised projections. Call "
                 "`diffusers_sla.load_sla(model, path_or_repo_id)` to load them.")
        return
    if filename is None:
        log_once(("module_replay_missing", where), logging.WARNING,
                 f"set_processor(SLAAttnProcessor): no SLA weights found at {where}: SLA starts from "
                 "zero-initialised projections (`proj_l`).")
        return
    stat = os.stat(filename)
    weights = _read_sla_file_cached(filename, stat.st_mtime_ns, stat.st_size)
    names = sla_entry_names(path)
    fix = ("(the module was left as it was). Call `diffusers_sla.enable_sla(model)` for the whole model, or "
           "`load_sla(model, ..., strict=False)` after it.")
    absent = [name for name in names if name not in weights.tensors]
    if len(absent) == len(names) and not expects_sla(attn, processor.config):
        return  # a module the policy keeps dense (cross-attention): enable_sla gives it no layer either
    if absent:
        raise ValueError(f"set_processor(SLAAttnProcessor) on {path!r}: the SLA weights saved beside the model "
                         f"({filename}) have no entry {absent} for this layer {fix}")
    tensors = [weights.tensors[name] for name in names]
    head_dim = infer_head_dim(attn) or tensors[0].shape[-1]
    layer = existing if isinstance(existing, SparseLinearAttention) else SparseLinearAttention(
        head_dim, config=processor.config, backend=processor.backend)
    differences = operator_differences_for(attn, processor.config, weights.config_for(path))
    if differences:
        fields = ", ".join(f"`{n}` (set {a!r}, file {b!r})" for n, (a, b) in differences.items())
        raise ValueError(f"set_processor(SLAAttnProcessor) on {path!r}: the SLA config differs from the one the "
                         f"weights in {filename} were trained with: {fields} {fix}")
    params = [param for _, param in layer.named_parameters()]
    bad = [f"{name}: {tuple(t.shape)} {t.dtype}" for name, t, param in zip(names, tensors, params)
           if t.dtype != torch.float32 or tuple(t.shape) != tuple(param.shape)]
    if bad:
        raise ValueError(f"set_processor(SLAAttnProcessor) on {path!r}: SLA weights in {filename} must be float32 "
                         f"with shape {tuple(params[0].shape)} / {tuple(params[1].shape)}, found {bad} {fix}")
    with torch.no_grad():
        for param, tensor in zip(params, tensors):
            param.copy_(tensor)
    setattr(layer, REPLAYED_ATTR, True)
    if layer is not existing:
        attn.add_module(SLA_MODULE_NAME, layer.to(module_device(attn)))
    log_once(("module_replay", filename), logging.WARNING,
              f"diffusers-sla: set_processor(SLAAttnProcessor) loads the trained SLA weights saved beside the model "
              f"({filename}) into each module it is set on.")


def record_load_source(original):
    """Wrap `ModelMixin.from_pretrained` (the function under the classmethod) to remember where a model came from."""
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path=None, **kwargs):
        model = original(cls, pretrained_model_name_or_path, **kwargs)
        # diffusers records only the path or repo id (`config._name_or_path`): keep what is needed to find the
        # SLA file beside the weights again (never the token).
        if isinstance(model, nn.Module) and pretrained_model_name_or_path is not None:
            source = {
                "path": os.fspath(pretrained_model_name_or_path),
                "subfolder": kwargs.get("subfolder"),
                "revision": kwargs.get("revision"),
                "cache_dir": os.fspath(kwargs["cache_dir"]) if kwargs.get("cache_dir") else None,
                "local_files_only": kwargs.get("local_files_only"),
            }
            setattr(model, LOAD_SOURCE_ATTR, source)
            for path, module in model.named_modules():  # for the per-module `set_processor` install's replay
                if hasattr(module, "set_processor"):
                    module.__dict__[MODULE_ORIGIN_ATTR] = (source, path)
        return model

    return from_pretrained
