# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Installing SLA on a model: `enable_sla`, `disable_sla`, and what `set_processor` / `set_attn_processor` do when
they are given an `SLAAttnProcessor` (`hooks.py` applies those wrappers to diffusers' classes).

An install is all or nothing (`snapshot.py`), and ends by replaying the `sla_attention.safetensors` saved where the
model was loaded from. Reading that file is the weights wing's work, which sits above this one: it hands its replay
to `use_weights_replay` (done once, by `hooks.py`), so that this module does not import it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from diffusers_sla.config import SLA_MODULE_NAME, SLAConfig, layer_selectors

from .joint import hook_single_stream_blocks
from .layer import SparseLinearAttention
from .logs import log_once, logger
from .modules import (
    DENSE_LAYER_ATTR,
    INNER_PROCESSOR_ATTR,
    expects_sla,
    infer_head_dim,
    inner_processor,
    is_attention_module,
    join,
    module_device,
    short,
    target_models,
)
from .parallel import check_model_parallelism
from .processor import SLAAttnProcessor, set_inner_processor
from .selectors import check_selectors, select_layers
from .snapshot import installing, model_install, restore, snapshot, snapshot_modules
from .stats import drop_stats, layer_stats

# ===== The weights' replay =====


@dataclass(frozen=True)
class WeightsReplay:
    """How an install finds and loads the SLA weights saved where a model was loaded from (`weights.replay`)."""

    # (model) -> the `SLAConfig` stored in those weights, or None; never raises for a missing file
    stored_config: Callable[[nn.Module], SLAConfig | None]
    # (model, *, strict) after a model-level install: load the whole file (raises when `strict` checks fail)
    into_model: Callable[..., Any]
    # (attn, processor) after `attn.set_processor(SLAAttnProcessor())` on one module: load its entries
    into_module: Callable[[nn.Module, SLAAttnProcessor], None]


# Replaced by `hooks.py` when diffusers_sla is imported, before any model can be installed on: importing any module
# of the package runs its __init__, which imports `hooks`.
_replay = WeightsReplay(stored_config=lambda model: None, into_model=lambda model, strict: [],
                        into_module=lambda attn, processor: None)


def use_weights_replay(replay: WeightsReplay) -> None:
    """Plug in the weights wing's replay (`hooks.py` does, at import)."""
    global _replay
    _replay = replay


# ===== set_processor / get_processor / set_attn_processor =====

_disabling = threading.local()


def wrap_set_processor(original):
    @functools.wraps(original)
    def set_processor(self, processor):
        current = self.__dict__.get("processor", self._modules.get("processor"))
        if isinstance(processor, SLAAttnProcessor):
            inner = inner_processor(self) if isinstance(current, SLAAttnProcessor) else current
            layer = self._modules.get(SLA_MODULE_NAME)
            if isinstance(layer, SparseLinearAttention):
                layer.config, layer.backend = processor.config, processor.backend
            processor.attach(self)
            saved = snapshot_modules([self])
            result = original(self, processor)
            set_inner_processor(self, inner)
            layer_stats(self)  # exists before any call, so compiled code never sees it appear
            try:
                if not installing():  # (a model-level install replays the whole file at its end)
                    _replay.into_module(self, processor)
            except BaseException:
                restore(saved)
                raise
            return result
        if isinstance(current, SLAAttnProcessor) and not getattr(_disabling, "active", False):
            # The documented rule: SLA runs beneath whatever processor a module has; setting another one replaces
            # that processor (IP-Adapters, fuse_qkv_projections, a user's own) and SLA stays on with its config.
            # Only `disable_sla` turns SLA off.
            set_inner_processor(self, processor)
            backend = current._attention_backend
            if backend is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = backend
            log_once(
                ("replaced_inner", type(processor)), logging.INFO,
                f"{type(self).__name__}.set_processor({type(processor).__name__}) on a module running SLA: SLA stays "
                f"on beneath {type(processor).__name__} (`get_processor()` returns it). Call "
                "`diffusers_sla.disable_sla(model)` to turn SLA off.",
            )
            return None
        return original(self, processor)

    return set_processor


def wrap_get_processor(original):
    @functools.wraps(original)
    def get_processor(self, *args, **kwargs):
        # SLA is not one of diffusers' processors: the processor API (`get_processor`, `attn_processors`, and what
        # diffusers' IP-Adapter loading, scaling and unloading read from it) sees the processor SLA runs beneath.
        processor = original(self, *args, **kwargs)
        if isinstance(processor, SLAAttnProcessor):
            inner = inner_processor(self)
            if inner is not None:
                return inner
        return processor

    return get_processor


def wrap_set_attn_processor(original):
    """`model.set_attn_processor(SLAAttnProcessor())` (or a dict holding one) does what `enable_sla` does: every SLA
    layer is created up front (so an optimizer built next holds them) and SLA weights saved beside the model are
    loaded; on an error the model is left as it was."""

    @functools.wraps(original)
    def set_attn_processor(self, processor):
        values = processor.values() if isinstance(processor, dict) else [processor]
        installs_sla = any(isinstance(value, SLAAttnProcessor) for value in values)  # before diffusers pops the dict
        if not installs_sla:
            return original(self, processor)
        for value in values:
            if isinstance(value, SLAAttnProcessor):
                check_selectors("dense_layers", value.config.dense_layers, [("", self)])
        saved = snapshot(self)
        try:
            with model_install():
                result = original(self, processor)
                _complete_install(self, "", {}, strict=True)
        except BaseException:
            restore(saved)
            raise
        return result

    return set_attn_processor


# ===== enable / disable =====


def enable_sla(
    pipe_or_model,
    config: SLAConfig | dict | str | None = None,
    *,
    backend: str = "auto",
    sla_layers: dict[str, SparseLinearAttention] | None = None,
    strict: bool = True,
    layer_topk=None,
    **overrides,
) -> SLAAttnProcessor:
    """Run SLA in every attention module of a model, or of a pipeline's denoiser(s).

    Args:
        pipe_or_model: a diffusers pipeline (its `transformer*` / `unet*` components are converted) or any
            `nn.Module`; every submodule with `set_processor` (diffusers `Attention` and `AttentionModuleMixin`
            modules) gets the processor, whether or not the model has `set_attn_processor`.
        config (`SLAConfig`, `dict`, JSON string or path, *optional*): SLA settings; keyword overrides win
            (`enable_sla(pipe, topk=0.15)`). With neither a config nor overrides, the config stored in the
            `sla_attention.safetensors` found at the model's load location is used if there is one, else the
            defaults.
        backend (`str`, *optional*, defaults to `"auto"`): SLA backend, `"auto"`, `"torch"` or `"triton"`.
        sla_layers (`dict`, *optional*): layers returned by `disable_sla`, re-attached instead of fresh ones, so
            trained `proj_l` weights survive a disable/enable round trip.
        strict (`bool`, *optional*, defaults to `True`): how the `sla_attention.safetensors` found at the model's
            load location is replayed: when `False`, a config that differs from `config` and missing or extra layers
            are warnings instead of errors (as in `load_sla`). On an error SLA is not installed: the model is left
            as it was.
        layer_topk (`dict` or callable, *optional*): a `topk` per layer. A dict maps layer selectors (block indices
            and module-path globs, as in `SLAConfig.dense_layers`; the first that matches wins, each must match some
            attention module) to a `topk`; a callable takes the attention module's path (as `sla_summary` prints it)
            and returns a `topk`, or None for the config's. Those modules get a processor of their own with that
            `topk`; the sidecar saves it per layer (`sla_layer_configs`), and `enable_sla(model)` after
            `from_pretrained` restores it.

    Every module that will run SLA (softmax attention, not a cross-attention module kept dense by the policy) gets
    its own `attn.sla` up front (float32, on the module's device). Calling `enable_sla` again changes the config and
    keeps the existing layers and their weights. Finally `sla_attention.safetensors` found at the model's load
    location is replayed (`diffusers_sla.weights.replay.replay_into_model`).

    Returns:
        the `SLAAttnProcessor` installed.
    """
    targets = target_models(pipe_or_model)
    for prefix, model in targets:  # before anything changes: refuse the context parallelism SLA cannot run
        check_model_parallelism(model, f"enable_sla on {prefix or type(model).__name__}")
    if config is None and not overrides:
        # Weights trained with SLA must be served with the operator they were trained with: default to it. With
        # explicit settings the user's config stands and a mismatch with the file is reported by the replay.
        for _, model in targets:
            stored = _replay.stored_config(model)
            if stored is not None:
                logger.info("enable_sla: using the SLA config stored with %s's SLA weights.", type(model).__name__)
                config = stored
                break
    processor = SLAAttnProcessor(config, backend=backend, **overrides)
    sla_layers = dict(sla_layers or {})
    modules_of = []
    for prefix, model in targets:
        modules = [(path, m) for path, m in model.named_modules() if is_attention_module(m)]
        if not modules:
            raise ValueError(
                f"`pipe_or_model`: {type(model).__name__} has no attention module with `set_processor` "
                "(diffusers `Attention` or `AttentionModuleMixin`) to run SLA in."
            )
        modules_of.append(modules)
    # All or nothing: check what can be checked before touching anything, and undo every model on a later error.
    check_selectors("dense_layers", processor.config.dense_layers, targets)
    known = {join(prefix, path) for (prefix, _), modules in zip(targets, modules_of) for path, _ in modules}
    unknown = sorted(set(sla_layers) - known)
    if unknown:
        raise ValueError(
            f"`sla_layers`: no attention module at {unknown} in this model (nothing was changed); its attention "
            f"modules are {short(sorted(known))}."
        )
    own = _per_layer_processors(processor, layer_topk, targets, modules_of)
    snapshots = [snapshot(model) for _, model in targets]
    try:
        with model_install():
            for (prefix, model), modules in zip(targets, modules_of):
                for path, attn in modules:
                    attn.set_processor(own.get(join(prefix, path), processor))
                _complete_install(model, prefix, sla_layers, strict=strict)
    except BaseException:
        for saved in snapshots:
            restore(saved)
        raise
    return processor


def _per_layer_processors(processor: SLAAttnProcessor, layer_topk, targets, modules_of) -> dict:
    """`{path: SLAAttnProcessor}` for the modules `layer_topk` gives a `topk` other than the processor's (one
    processor per distinct value). Every value is checked before the caller touches the model."""
    if layer_topk is None:
        return {}
    if not (isinstance(layer_topk, dict) or callable(layer_topk)):
        raise ValueError("`layer_topk` must be a dict {block index or module-path glob: topk} or a callable "
                         f"(module path) -> topk, got {type(layer_topk).__name__}.")
    wanted = {}
    if isinstance(layer_topk, dict):
        selectors = layer_selectors("layer_topk", list(layer_topk))  # the same rules as `dense_layers`
        values = dict(zip(selectors, layer_topk.values()))
        check_selectors("layer_topk", selectors, targets)
        for (prefix, model), modules in zip(targets, modules_of):
            matched = select_layers(model, prefix, selectors, [path for path, _ in modules])[0]
            wanted.update({join(prefix, path): values[selector] for path, selector in matched.items()})
    else:
        for (prefix, _), modules in zip(targets, modules_of):
            for path, _ in modules:
                value = layer_topk(join(prefix, path))
                if value is not None:
                    wanted[join(prefix, path)] = value
    made, own = {}, {}
    for path, value in wanted.items():
        try:
            config = dataclasses.replace(processor.config, topk=value)
        except ValueError as err:
            raise ValueError(f"`layer_topk` for {path}: {err}") from None
        if config.topk == processor.config.topk:
            continue
        if config.topk not in made:
            made[config.topk] = SLAAttnProcessor(config, backend=processor.backend)
        own[path] = made[config.topk]
    return own


def _attach_sla_layers(model: nn.Module, prefix: str, sla_layers: dict[str, SparseLinearAttention]) -> None:
    """Give every module of `model` running an `SLAAttnProcessor` its own SLA layer, up front: re-attached from
    `sla_layers` (popped) when given there, kept (with the processor's config) when it has one, else new and
    zero-initialised. Modules that will not run SLA (linear attention, cross-attention kept dense, the config's
    `dense_layers`) get none; a dense layer keeps the SLA layer it had (its weights are saved and loaded as before)."""
    installed = [(path, attn) for path, attn in model.named_modules()
                 if is_attention_module(attn) and isinstance(getattr(attn, "processor", None), SLAAttnProcessor)]
    paths, matched = [p for p, _ in installed], {}
    dense = set()
    for path, attn in installed:
        selectors = attn.processor.config.dense_layers
        if selectors not in matched:  # (one match per distinct setting, not per module)
            matched[selectors] = select_layers(model, prefix, selectors, paths)[0] if selectors else {}
        if path in matched[selectors]:
            dense.add(path)
    for path, attn in installed:
        processor = attn.processor
        layer_stats(attn)  # exists before any call, so compiled code never sees it appear
        attn.__dict__[DENSE_LAYER_ATTR] = path in dense
        existing = attn._modules.get(SLA_MODULE_NAME)
        reused = sla_layers.pop(join(prefix, path), None)
        if reused is not None:
            attn.add_module(SLA_MODULE_NAME, reused.to(module_device(attn)))
            existing = reused
        if isinstance(existing, SparseLinearAttention):
            existing.config, existing.backend = processor.config, processor.backend
            continue
        if path in dense or not expects_sla(attn, processor.config):
            continue
        head_dim = infer_head_dim(attn)
        if head_dim is None:
            log_once(
                ("no_head_dim", type(attn)), logging.INFO,
                f"{type(attn).__name__} does not expose its head size; its SLA layer is created at first use.",
            )
            continue
        layer = SparseLinearAttention(head_dim, config=processor.config, backend=processor.backend)
        attn.add_module(SLA_MODULE_NAME, layer.to(module_device(attn)))


def _complete_install(model: nn.Module, prefix: str, sla_layers: dict[str, SparseLinearAttention], *,
                      strict: bool) -> None:
    """The second half of installing SLA, shared by `enable_sla` and `set_attn_processor`: create the SLA layers and
    their counters up front, then load the `sla_attention.safetensors` saved beside `model`
    (`WeightsReplay.into_model`). The callers undo everything if this raises."""
    _attach_sla_layers(model, prefix, sla_layers)
    hook_single_stream_blocks(model)
    _declare_fp32_layers(model)
    _replay.into_model(model, strict=strict)


# Module-name patterns (diffusers matches them with `re.search`) naming SLA's float32 layers.
SLA_LAYERWISE_CASTING_SKIP = rf"(^|\.){SLA_MODULE_NAME}(\.|$)"


def _declare_fp32_layers(model: nn.Module) -> None:
    """Tell diffusers' dtype bookkeeping that `proj_l` stays float32 (it does whatever is cast: `SLAProjection`):
    `enable_layerwise_casting` then leaves SLA layers unhooked, and a class that declares `_keep_in_fp32_modules`
    gets `proj_l` added to the instance's list (a class with none keeps none: diffusers warns on `.to(dtype)` for
    any, and `proj_l` needs no such warning)."""
    patterns = getattr(model, "_skip_layerwise_casting_patterns", None)
    if hasattr(model, "_skip_layerwise_casting_patterns") and SLA_LAYERWISE_CASTING_SKIP not in (patterns or ()):
        model._skip_layerwise_casting_patterns = (*(patterns or ()), SLA_LAYERWISE_CASTING_SKIP)
    keep = getattr(model, "_keep_in_fp32_modules", None)
    if keep and "proj_l" not in keep:
        model._keep_in_fp32_modules = [*([keep] if isinstance(keep, str) else keep), "proj_l"]


def disable_sla(pipe_or_model) -> dict[str, SparseLinearAttention]:
    """Restore every module's own processor and remove the SLA layers.

    Returns:
        `{path: SparseLinearAttention}` of the removed layers (trained `proj_l` included); pass it to
        `enable_sla(..., sla_layers=...)` to turn SLA back on without losing them.
    """
    removed: dict[str, SparseLinearAttention] = {}
    for prefix, model in target_models(pipe_or_model):
        for path, attn in list(model.named_modules()):
            if not is_attention_module(attn):
                continue
            if isinstance(getattr(attn, "processor", None), SLAAttnProcessor):
                inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
                if inner is None:
                    raise RuntimeError(
                        f"`disable_sla`: {join(prefix, path)} runs SLA without a recorded processor to restore."
                    )
                _disabling.active = True
                try:
                    attn.set_processor(inner)
                finally:
                    _disabling.active = False
            set_inner_processor(attn, None)
            drop_stats(attn)
            attn.__dict__.pop(DENSE_LAYER_ATTR, None)
            layer = attn._modules.pop(SLA_MODULE_NAME, None)
            if layer is not None:
                removed[join(prefix, path)] = layer
    return removed


def use_layer_config(attn: nn.Module, layer: SparseLinearAttention, config: SLAConfig) -> None:
    """Run `layer` (held by `attn`) with `config`, which differs from the config of the processor it shares."""
    # A module whose SLA layer runs a config of its own needs a processor of its own: the shared one hands its
    # config to every layer it runs.
    current = getattr(attn, "processor", None)
    if isinstance(current, SLAAttnProcessor):
        own = SLAAttnProcessor(config, backend=current.backend)
        if current._attention_backend is not None:
            own._attention_backend = current._attention_backend
        attn.set_processor(own)
    layer.config = config
