# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SLAAttnProcessor`, `enable_sla`, `disable_sla`, `sla_summary`: SLA on every attention module of a diffusers model.

How it fits into diffusers:

* `SLAAttnProcessor` does not re-implement any model's attention. Each attention module keeps the processor it had
  (Flux's, SD3's joint one, QwenImage's, ...): importing this module wraps `set_processor` of diffusers' `Attention`
  and `AttentionModuleMixin` so that, when an `SLAAttnProcessor` replaces another processor, the module remembers
  that processor (`attn._sla_inner_processor`). `SLAAttnProcessor.__call__` runs it, and only its attention call
  (`F.scaled_dot_product_attention`, directly or through `dispatch_attention_fn`) is routed to SLA
  (`diffusers_sla/dispatch.py`, which also documents the routing policy). RoPE, QK-norm, joint tokens, masks,
  image-prompt branches and returned tuples are the model's own.
* One processor instance serves every module (that is what `set_attn_processor` does), but every module owns its
  SLA state: `attn.sla`, a `SparseLinearAttention` with its own float32 `proj_l`, so its parameters are parameters
  of the model. `enable_sla` creates them up front; `set_attn_processor(SLAAttnProcessor())` creates them at first
  use.
* SLA runs beneath diffusers' processor API, it is not one of its processors: `get_processor()` (and so
  `attn_processors`) returns the processor SLA wraps. While a module runs SLA, setting another processor on it
  (`set_processor`, `set_attn_processor(...)`, `load_ip_adapter`, `fuse_qkv_projections`) replaces the processor
  SLA wraps, and SLA stays on with the layer's config; only `disable_sla` turns it off. A processor with weights
  stays the module's child `processor` (the state-dict keys of a model without SLA).
* Module classes filter keyword arguments by `inspect.signature(self.processor.__call__)`. `SLAAttnProcessor`
  advertises the union of the parameter names of every processor it wraps (`__call__.__signature__`), and passes
  each wrapped processor exactly the names it accepts, so nothing (`image_rotary_emb`, `rotary_emb`,
  `encoder_hidden_states_mask`, `temb`, ...) is dropped on the way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import itertools
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import SLAConfig
from .constants import SLA_MODULE_NAME
from .dispatch import (
    DENSE_REASONS,
    LayerStats,
    install_context_parallel_router,
    install_sdpa_router,
    layer_stats,
    record_call,
    routing_scope,
)
from .layer import SparseLinearAttention, iter_sla_layers
from .ops.api import BACKEND_NAMES
from .parallel import check_context_parallel

logger = logging.getLogger(__name__)

INNER_PROCESSOR_ATTR = "_sla_inner_processor"
_INNER_PARAMETERS_ATTR = "_sla_inner_parameters"
# Keyword arguments diffusers itself passes to processors without warning when they are not accepted.
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})
# Dense reasons that follow the configured policy (logged at INFO); the others mean SLA did not run where a user
# probably expected it (logged at WARNING).
_POLICY_REASONS = frozenset({"cross_attention", "short_sequence", "key_padding_mask", "linear_attention"})
# Set on attention modules that `SLAConfig.dense_layers` keeps on the model's own attention.
DENSE_LAYER_ATTR = "_sla_dense_layer"

# Where each joint-attention processor puts the text tokens in the sequence it hands to SDPA (diffusers 0.42.1):
# Flux and QwenImage `cat([text, image])`, CogVideoX `cat([encoder_hidden_states, hidden_states])`, SD3's joint
# processors and HunyuanVideo's (double and single blocks) `cat([image, text])`. The text length is
# `encoder_hidden_states.shape[1]`, or, for Flux's single-stream blocks (whose processor gets the joint sequence with
# no `encoder_hidden_states`), the block's `encoder_hidden_states` recorded by `_record_single_block_text`.
JOINT_TEXT_POSITION = {
    "FluxAttnProcessor": "first", "FluxIPAdapterAttnProcessor": "first", "FluxAttnProcessor2_0": "first",
    "FusedFluxAttnProcessor2_0": "first", "QwenDoubleStreamAttnProcessor2_0": "first",
    "CogVideoXAttnProcessor2_0": "first", "FusedCogVideoXAttnProcessor2_0": "first",
    "JointAttnProcessor2_0": "last", "FusedJointAttnProcessor2_0": "last", "SD3IPAdapterJointAttnProcessor2_0": "last",
    "HunyuanVideoAttnProcessor2_0": "last",
}
# Blocks that concatenate text and image before their attention module: (class name, the attention child's name).
_SINGLE_STREAM_BLOCKS = {"FluxSingleTransformerBlock": "attn"}
_BLOCK_TEXT_ATTR = "_sla_block_text_tokens"
# Set on attention modules while `sla_dense_steps` runs the current denoising step dense.
DENSE_STEP_ATTR = "_sla_dense_step"

_logged_once: set = set()
_instance_numbers = itertools.count()
_logged_once_lock = threading.Lock()


def _log_once(key, level: int, message: str) -> None:
    """Log `message` the first time `key` is seen in this process. Inside torch.compile'd code the check and the
    log happen while dynamo traces (`comptime`), never in the graph: compiled code must not read the set of keys
    (it would guard on it, and the next call would recompile) nor call the logger (a graph break)."""
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime

        comptime(_log_once_while_tracing)
        return
    _log_once_now(key, level, message)


def _log_once_now(key, level: int, message: str) -> None:
    with _logged_once_lock:
        if key in _logged_once:
            return
        _logged_once.add(key)
    logger.log(level, message)


def _log_once_while_tracing(ctx) -> None:
    # runs inside dynamo: `key`, `level` and `message` are the traced constants of `_log_once`'s frame
    values = [ctx.get_local(name).as_python_constant() for name in ("key", "level", "message")]
    _log_once_now(*values)


def _is_linear_attention_processor(processor) -> bool:
    # Sana's self-attention is ReLU linear attention: there is no softmax attention for SLA to replace.
    return "LinearAttn" in type(processor).__name__


# ===== The processor =====


class SLAAttnProcessor:
    """Attention processor that runs each module's own processor with its attention core replaced by SLA.

    Args:
        config (`SLAConfig`, `dict`, JSON string or path, *optional*): operator and routing settings; keyword
            overrides win (`SLAAttnProcessor(topk=0.15)`).
        backend (`str`, *optional*, defaults to `"auto"`): SLA backend, `"auto"`, `"torch"` or `"triton"`.

    Install it with `model.set_attn_processor(SLAAttnProcessor())` (per-layer state is created at first use) or
    with `enable_sla(model)` (state created up front). Which attention calls run SLA is documented in
    `diffusers_sla.dispatch`; `sla_summary(model)` reports per layer what ran.
    """

    # Parameter names advertised to module classes that filter keyword arguments by our signature; grows with every
    # processor we wrap (see `_advertise_parameters`).
    _advertised_names: dict[str, None] = dict.fromkeys(
        ("hidden_states", "encoder_hidden_states", "attention_mask", "temb", "image_rotary_emb", "rotary_emb",
         "encoder_hidden_states_mask", "encoder_hidden_states_img")
    )

    def __init__(self, config: SLAConfig | dict | str | None = None, backend: str = "auto", **overrides):
        if backend not in BACKEND_NAMES:
            raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
        self.config = SLAConfig.coerce(config, **overrides)
        self.backend = backend
        # key of this instance's once-per-reason log lines (in `_logged_once`): a constant string, so that compiled
        # code reads no state that its first call changes
        self._log_key = f"SLAAttnProcessor#{next(_instance_numbers)}"
        self._attached_modules = weakref.WeakSet()  # modules this instance was set on, for `_attention_backend`
        self._backend_setting = None
        # now, in eager code: the first call may run inside torch.compile, which cannot take the install's lock
        install_sdpa_router()

    # diffusers' `set_attention_backend` / `reset_attention_backend` set `processor._attention_backend` on each
    # module's processor, which is this shared instance: pass the setting on to the processors SLA wraps, since they
    # make the attention call. SLA needs the native backend: a module whose attention call does not reach torch SDPA
    # is counted as a dense call (reason "attention_backend") and logged once.
    @property
    def _attention_backend(self):
        return self._backend_setting

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self._backend_setting = backend
        for attn in list(self._attached_modules):
            inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
            if getattr(attn, "processor", None) is self and inner is not None and hasattr(inner, "_attention_backend"):
                inner._attention_backend = backend

    # diffusers' `enable_parallelism` sets `processor._parallel_config` on each module's processor that has the
    # attribute: record it here (each SLA call runs Ulysses or refuses ring, see `parallel.py`) and pass it on to the
    # wrapped processors, so that `disable_sla` gives back processors that run the model's parallelism.
    @property
    def _parallel_config(self):
        return self.__dict__.get("_parallel_setting")

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.__dict__["_parallel_setting"] = config
        for attn in list(self._attached_modules):
            inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
            if getattr(attn, "processor", None) is self and inner is not None and hasattr(inner, "_parallel_config"):
                inner._parallel_config = config

    def __getstate__(self) -> dict:
        # Weak references do not pickle (`torch.save(model)`); modules re-register at their next call.
        state = dict(self.__dict__)
        state["_attached_modules"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attached_modules = weakref.WeakSet()

    def __repr__(self) -> str:
        c = self.config
        return (f"SLAAttnProcessor(topk={c.topk}, blkq={c.blkq}, blkk={c.blkk}, "
                f"cross_attention={c.cross_attention!r}, "
                f"masked_attention={c.masked_attention!r}, min_kv_blocks={c.min_kv_blocks}, backend={self.backend!r})")

    def __call__(self, attn: nn.Module, *args, **kwargs):
        inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
        if inner is None:
            raise RuntimeError(
                f"{type(attn).__name__} has no processor of its own for SLAAttnProcessor to wrap (it was built with "
                "SLAAttnProcessor, or `diffusers_sla` was imported after `set_attn_processor`). Build the model with "
                "its own processors, import diffusers_sla, then call `enable_sla(model)`."
            )
        if not torch.compiler.is_compiling():  # (set_processor registered it; this re-registers after unpickling,
            self._attached_modules.add(attn)  # and would make compiled code guard on the set's contents)
        parallel = self.__dict__.get("_parallel_setting") or getattr(inner, "_parallel_config", None)
        if parallel is not None:  # Ulysses runs (`dispatch._sla_templated_attention`); ring raises
            check_context_parallel(parallel, f"SLAAttnProcessor in {type(attn).__name__}")
            install_context_parallel_router()
        kwargs = self._kwargs_for(attn, inner, kwargs)
        if attn.__dict__.get(DENSE_LAYER_ATTR, False) or attn.__dict__.get(DENSE_STEP_ATTR, False):
            # a layer or a step the user keeps dense: the module's own processor, its attention call not routed
            record_call(attn, "dense_layer" if attn.__dict__.get(DENSE_LAYER_ATTR, False) else "dense_step")
            return inner(attn, *args, **kwargs)
        with routing_scope(attn, self, _text_tokens(attn, inner, args, kwargs)) as scope:
            output = inner(attn, *args, **kwargs)
        if scope.intercepted == 0:
            self._record_uncaught_call(attn, inner)
        return output

    # ----- keyword arguments ------------------------------------------------------------------------------------

    @staticmethod
    def _inner_parameters(attn: nn.Module, inner) -> tuple[frozenset, bool]:
        """(names the inner processor accepts by keyword, whether it takes **kwargs): recorded on the module when
        the processor was set (`_set_inner_processor`), so a call reads and writes no cache."""
        recorded = attn.__dict__.get(_INNER_PARAMETERS_ATTR)
        if recorded is not None and recorded[0] is type(inner):
            return recorded[1]
        return _call_parameters(inner)

    def _kwargs_for(self, attn: nn.Module, inner, kwargs: dict) -> dict:
        names, takes_var_kwargs = self._inner_parameters(attn, inner)
        if takes_var_kwargs or not kwargs:
            return kwargs
        dropped = [k for k in kwargs if k not in names]
        if not dropped:
            return kwargs
        loud = sorted(set(dropped) - _QUIET_KWARGS)
        if loud:
            # The same warning diffusers gives when a processor does not take an argument, once per class and names.
            _log_once(
                ("unused_kwargs", type(inner), tuple(loud)), logging.WARNING,
                f"Arguments {loud} are not expected by {type(inner).__name__} and will be ignored.",
            )
        return {k: v for k, v in kwargs.items() if k in names}

    @classmethod
    def _advertise_parameters(cls, inner) -> None:
        """Add the inner processor's parameter names to `__call__`'s advertised signature."""
        names, _ = _call_parameters(inner)
        new = [name for name in sorted(names) if name not in cls._advertised_names]
        if not new:
            return
        cls._advertised_names.update(dict.fromkeys(new))
        cls.__call__.__signature__ = _advertised_signature(cls._advertised_names)

    # ----- SLA state ----------------------------------------------------------------------------------------------

    def _sla_layer_for(self, attn: nn.Module, q: torch.Tensor) -> SparseLinearAttention:
        """The module's own SLA layer, created at first use when `enable_sla` did not create it."""
        layer = attn._modules.get(SLA_MODULE_NAME)
        if layer is None:
            # While training, parameters born now are in no optimizer and no DDP bucket: say so loudly.
            training = torch.is_grad_enabled() and attn.training
            _log_once(
                "lazy_layers_training" if training else "lazy_layers", logging.WARNING if training else logging.INFO,
                "SLAAttnProcessor created the SLA layers (`attn.sla`, with their `proj_l`) at first use"
                + (" during a training forward: an optimizer or DDP wrapper built before now does not hold them" if
                   training else "")
                + ". Call `diffusers_sla.enable_sla(model)` to create them before building an optimizer or wrapping "
                "the model.",
            )
            with torch.inference_mode(False):
                layer = SparseLinearAttention(q.shape[-1], config=self.config, backend=self.backend).to(q.device)
            attn.add_module(SLA_MODULE_NAME, layer)
        elif layer.config is not self.config:
            layer.config = self.config
        return layer

    # ----- reporting --------------------------------------------------------------------------------------------

    def _record_uncaught_call(self, attn: nn.Module, inner) -> None:
        """The inner processor ran without calling torch SDPA: SLA did not run there. Count it and say why once."""
        backend = getattr(inner, "_attention_backend", None) or self._attention_backend
        if backend is None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry._active_backend
        backend_name = getattr(backend, "value", backend)
        if _is_linear_attention_processor(inner):
            reason = "linear_attention"
        elif backend_name not in (None, "native") and not str(backend_name).startswith("_native"):
            reason = "attention_backend"
        else:
            reason = "no_sdpa_call"
        record_call(attn, reason)
        self._log_dense_once(reason, attn, None, inner=inner, backend_name=backend_name)

    def _log_dense_once(self, reason: str, attn: nn.Module, call: dict | None, inner=None, backend_name=None):
        if not torch.compiler.is_compiling() and (self._log_key, reason) in _logged_once:
            return  # (eager dense calls: no message built after the first)
        c = self.config
        messages = {
            "unsupported_shape": "attention calls whose tensors are not (batch, heads, seq, head_dim) with matching "
            "key/value shapes run dense",
            "dropout": "attention calls with dropout_p > 0 run dense",
            "causal": "causal attention calls (is_causal=True) run dense",
            "cross_attention": f"cross-attention calls run dense (SLAConfig.cross_attention={c.cross_attention!r}; "
            "set it to 'sla' to run SLA there)",
            "short_sequence": "attention calls with fewer than min_kv_blocks * blkk = "
            f"{c.min_kv_blocks * c.blkk} keys run dense",
            "key_padding_mask": "attention calls with a key padding mask run dense "
            f"(SLAConfig.masked_attention={c.masked_attention!r}; set it to 'sla' to run SLA there)",
            "attention_mask": "attention calls with a mask that is not a key padding mask run dense",
            "attention_backend": f"{type(inner).__name__} uses the attention backend {backend_name!r}, which SLA "
            "cannot intercept: those layers run that backend, not SLA. Call "
            "`model.set_attention_backend('native')` to run SLA",
            "no_sdpa_call": f"{type(inner).__name__} ran without calling torch's scaled_dot_product_attention, so SLA "
            "did not run there",
            "linear_attention": f"{type(inner).__name__} is linear attention (no softmax attention to replace): it "
            "runs unchanged",
        }
        level = logging.INFO if reason in _POLICY_REASONS else logging.WARNING
        _log_once((self._log_key, reason), level, f"SLA: {messages[reason]} (first seen in {type(attn).__name__}; "
                  "counted per layer in `sla_summary(model)`).")


def is_joint_attention(attn: nn.Module) -> bool:
    """Whether `attn` runs a joint text+image processor, where `SLAConfig.protect_text` changes results."""
    return type(attn.__dict__.get(INNER_PROCESSOR_ATTR)).__name__ in JOINT_TEXT_POSITION


def operator_differences_for(attn: nn.Module, installed: SLAConfig, stored: SLAConfig) -> dict:
    """`installed.operator_differences(stored)`, less `protect_text` where `attn` has no text to protect."""
    differences = installed.operator_differences(stored)
    if "protect_text" in differences and not is_joint_attention(attn):
        del differences["protect_text"]
    return differences


def _text_tokens(attn: nn.Module, inner, args: tuple, kwargs: dict) -> tuple | None:
    """("first" | "last", n): where a joint-attention call's n text tokens sit (`JOINT_TEXT_POSITION`), or None."""
    position = JOINT_TEXT_POSITION.get(type(inner).__name__)
    if position is None:
        return None
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[1] if len(args) > 1 else None)
    if isinstance(encoder, torch.Tensor) and encoder.ndim == 3:
        return (position, encoder.shape[1])
    recorded = attn.__dict__.get(_BLOCK_TEXT_ATTR)
    return None if recorded is None else (position, recorded)


def _record_single_block_text(block: nn.Module, args: tuple, kwargs: dict) -> None:
    # forward pre-hook of a single-stream block: its attention module sees text + image as one sequence
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[1] if len(args) > 1 else None)
    attn = block._modules.get(_SINGLE_STREAM_BLOCKS[type(block).__name__])
    if attn is not None:
        attn.__dict__[_BLOCK_TEXT_ATTR] = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None


def _hook_single_stream_blocks(model: nn.Module) -> None:
    for block in model.modules():
        if type(block).__name__ in _SINGLE_STREAM_BLOCKS and not block.__dict__.get("_sla_text_hook"):
            block.register_forward_pre_hook(_record_single_block_text, with_kwargs=True)
            block.__dict__["_sla_text_hook"] = True


def _call_parameters(processor) -> tuple[frozenset, bool]:
    """Keyword names of `processor.__call__` after the module argument, and whether it takes **kwargs."""
    try:
        params = list(inspect.signature(processor.__call__).parameters.values())
    except (TypeError, ValueError):
        return frozenset(), True
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return frozenset(p.name for p in named[1:]), takes_var_kwargs


def _advertised_signature(names) -> inspect.Signature:
    P = inspect.Parameter
    return inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("attn", P.POSITIONAL_OR_KEYWORD), P("args", P.VAR_POSITIONAL)]
        + [P(name, P.KEYWORD_ONLY, default=None) for name in names]
        + [P("kwargs", P.VAR_KEYWORD)]
    )


SLAAttnProcessor.__call__.__signature__ = _advertised_signature(SLAAttnProcessor._advertised_names)


# ===== Remembering each module's own processor =====

_disabling = threading.local()


def _inner_processor(attn: nn.Module):
    """The processor SLA runs beneath on `attn` (None when SLA is not installed there)."""
    return attn.__dict__.get(INNER_PROCESSOR_ATTR)


def _set_inner_processor(attn: nn.Module, processor) -> None:
    # (an older layout kept an nn.Module processor as the child `_sla_inner_processor`)
    attn._modules.pop(INNER_PROCESSOR_ATTR, None)
    attn.__dict__.pop(_INNER_PARAMETERS_ATTR, None)
    old = attn.__dict__.pop(INNER_PROCESSOR_ATTR, None)
    wrapped = isinstance(attn.__dict__.get("processor"), SLAAttnProcessor)
    if wrapped and old is not None and attn._modules.get("processor") is old:
        del attn._modules["processor"]
    if processor is None:
        return
    attn.__dict__[INNER_PROCESSOR_ATTR] = processor
    attn.__dict__[_INNER_PARAMETERS_ATTR] = (type(processor), _call_parameters(processor))
    if wrapped and isinstance(processor, nn.Module):
        # A processor with weights (IP-Adapter) stays the child `processor`, as without SLA: its state-dict keys,
        # `.to()` and offloading hooks are unchanged. The SLA wrapper in `__dict__` still wins attribute lookup, so
        # `attn.processor` (what the module's forward calls) is the wrapper.
        attn._modules["processor"] = processor
    SLAAttnProcessor._advertise_parameters(processor)


def _wrap_set_processor(cls) -> None:
    original = cls.__dict__["set_processor"]
    if getattr(original, "_sla_original", None) is not None:
        return

    @functools.wraps(original)
    def set_processor(self, processor):
        current = self.__dict__.get("processor", self._modules.get("processor"))
        if isinstance(processor, SLAAttnProcessor):
            inner = _inner_processor(self) if isinstance(current, SLAAttnProcessor) else current
            layer = self._modules.get(SLA_MODULE_NAME)
            if isinstance(layer, SparseLinearAttention):
                layer.config, layer.backend = processor.config, processor.backend
            processor._attached_modules.add(self)
            snapshot = _module_snapshot(self)
            result = original(self, processor)
            _set_inner_processor(self, inner)
            layer_stats(self)  # exists before any call, so compiled code never sees it appear
            try:
                _replay_into_module(self, processor)
            except BaseException:
                _restore(snapshot)
                raise
            return result
        if isinstance(current, SLAAttnProcessor) and not getattr(_disabling, "active", False):
            # The documented rule: SLA runs beneath whatever processor a module has; setting another one replaces
            # that processor (IP-Adapters, fuse_qkv_projections, a user's own) and SLA stays on with its config.
            # Only `disable_sla` turns SLA off.
            _set_inner_processor(self, processor)
            backend = current._attention_backend
            if backend is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = backend
            _log_once(
                ("replaced_inner", type(processor)), logging.INFO,
                f"{type(self).__name__}.set_processor({type(processor).__name__}) on a module running SLA: SLA stays "
                f"on beneath {type(processor).__name__} (`get_processor()` returns it). Call "
                "`diffusers_sla.disable_sla(model)` to turn SLA off.",
            )
            return None
        return original(self, processor)

    set_processor._sla_original = original
    cls.set_processor = set_processor


def _module_snapshot(attn: nn.Module) -> list[tuple]:
    return _snapshot_modules([attn])


@functools.lru_cache(maxsize=2)
def _read_sla_file_cached(filename: str, mtime_ns: int, size: int):
    from .serialization import read_sla_file

    return read_sla_file(filename)


def _replay_into_module(attn: nn.Module, processor: "SLAAttnProcessor") -> None:
    """`attn.set_processor(SLAAttnProcessor())` on one module of a model loaded with `from_pretrained` (the
    per-module idiom): load this module's entries of the `sla_attention.safetensors` saved beside the model, with
    `enable_sla`'s checks for one layer (present, float32, shape, the same operator config). Model-level installs
    (`enable_sla`, `set_attn_processor`) replay the whole file themselves instead."""
    from .serialization import _REPLAYED_ATTR, MODULE_ORIGIN_ATTR, resolve_sla_file, sla_entry_names

    origin = attn.__dict__.get(MODULE_ORIGIN_ATTR)
    if origin is None or getattr(_install_state, "depth", 0):
        return
    existing = attn._modules.get(SLA_MODULE_NAME)
    if isinstance(existing, SparseLinearAttention) and getattr(existing, _REPLAYED_ATTR, False):
        return  # holds loaded (or trained) weights already
    source, path = origin
    try:
        filename, where = resolve_sla_file(
            source["path"], source.get("subfolder"), revision=source.get("revision"),
            cache_dir=source.get("cache_dir"), local_files_only=bool(source.get("local_files_only")),
        )
    except (OSError, ValueError) as err:
        _log_once(("module_replay_unreachable", source["path"]), logging.WARNING,
                  f"set_processor(SLAAttnProcessor): could not look for SLA weights beside {source['path']!r} "
                  f"({err}); these modules start from zero-initialised projections. Call "
                  "`diffusers_sla.load_sla(model, path_or_repo_id)` to load them.")
        return
    if filename is None:
        _log_once(("module_replay_missing", where), logging.WARNING,
                  f"set_processor(SLAAttnProcessor): no SLA weights found at {where}: SLA starts from "
                  "zero-initialised projections (`proj_l`).")
        return
    stat = os.stat(filename)
    weights = _read_sla_file_cached(filename, stat.st_mtime_ns, stat.st_size)
    names = sla_entry_names(path)
    fix = ("(the module was left as it was). Call `diffusers_sla.enable_sla(model)` for the whole model, or "
           "`load_sla(model, ..., strict=False)` after it.")
    absent = [name for name in names if name not in weights.tensors]
    if len(absent) == len(names) and not _expects_sla(attn, processor.config):
        return  # a module the policy keeps dense (cross-attention): enable_sla gives it no layer either
    if absent:
        raise ValueError(f"set_processor(SLAAttnProcessor) on {path!r}: the SLA weights saved beside the model "
                         f"({filename}) have no entry {absent} for this layer {fix}")
    tensors = [weights.tensors[name] for name in names]
    head_dim = _infer_head_dim(attn) or tensors[0].shape[-1]
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
    setattr(layer, _REPLAYED_ATTR, True)
    if layer is not existing:
        attn.add_module(SLA_MODULE_NAME, layer.to(_module_device(attn)))
    _log_once(("module_replay", filename), logging.WARNING,
              f"diffusers-sla: set_processor(SLAAttnProcessor) loads the trained SLA weights saved beside the model "
              f"({filename}) into each module it is set on.")


def _wrap_get_processor(cls) -> None:
    original = cls.__dict__["get_processor"]
    if getattr(original, "_sla_original", None) is not None:
        return

    @functools.wraps(original)
    def get_processor(self, *args, **kwargs):
        # SLA is not one of diffusers' processors: the processor API (`get_processor`, `attn_processors`, and what
        # diffusers' IP-Adapter loading, scaling and unloading read from it) sees the processor SLA runs beneath.
        processor = original(self, *args, **kwargs)
        if isinstance(processor, SLAAttnProcessor):
            inner = _inner_processor(self)
            if inner is not None:
                return inner
        return processor

    get_processor._sla_original = original
    cls.get_processor = get_processor


def _install_set_processor_hooks() -> None:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for cls in (Attention, AttentionModuleMixin):
        if "set_processor" in cls.__dict__:
            _wrap_set_processor(cls)
        if "get_processor" in cls.__dict__:
            _wrap_get_processor(cls)


def _original_set_processor(attn: nn.Module):
    method = type(attn).set_processor
    return getattr(method, "_sla_original", method)


_install_set_processor_hooks()


# ===== enable / disable =====


def _check_context_parallel(model: nn.Module, where: str) -> None:
    """Raise when `enable_parallelism` gave `model` (or one of its attention processors) context parallelism that SLA
    does not run (ring; see `parallel.py`)."""
    check_context_parallel(getattr(model, "_parallel_config", None), where)
    for module in model.modules():
        if _is_attention_module(module):
            inner = getattr(module, INNER_PROCESSOR_ATTR, None) or module.processor
            check_context_parallel(getattr(inner, "_parallel_config", None), where)


def _is_attention_module(module: nn.Module) -> bool:
    return callable(getattr(module, "set_processor", None)) and hasattr(module, "processor")


def _target_models(pipe_or_model) -> list[tuple[str, nn.Module]]:
    """(prefix, model) pairs: the model itself, or a pipeline's denoisers (`transformer*`, `unet*` components)."""
    if isinstance(pipe_or_model, nn.Module):
        return [("", pipe_or_model)]
    components = getattr(pipe_or_model, "components", None)
    if isinstance(components, dict):
        models = [
            (name, component) for name, component in components.items()
            if isinstance(component, nn.Module) and name.startswith(("transformer", "unet"))
        ]
        if not models:
            raise ValueError(
                f"`pipe_or_model`: {type(pipe_or_model).__name__} has no `transformer*` or `unet*` component, "
                f"its components are {sorted(components)}."
            )
        return models
    raise ValueError(
        f"`pipe_or_model` must be a diffusers pipeline or a torch.nn.Module, got {type(pipe_or_model).__name__}."
    )


def _join(prefix: str, path: str) -> str:
    return ".".join(part for part in (prefix, path) if part)


def _infer_head_dim(attn: nn.Module) -> int | None:
    head_dim = getattr(attn, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    inner_dim, heads = getattr(attn, "inner_dim", None), getattr(attn, "heads", None)
    if isinstance(inner_dim, int) and isinstance(heads, int) and heads > 0 and inner_dim % heads == 0:
        return inner_dim // heads
    return None


def _declared_cross_attention(attn: nn.Module) -> bool:
    declared = getattr(attn, "is_cross_attention", None)
    if isinstance(declared, bool):
        return declared
    cross_dim, query_dim = getattr(attn, "cross_attention_dim", None), getattr(attn, "query_dim", None)
    return isinstance(cross_dim, int) and isinstance(query_dim, int) and cross_dim != query_dim


def _expects_sla(attn: nn.Module, config: SLAConfig) -> bool:
    """Whether `enable_sla` gives this module an SLA layer up front: it has a softmax-attention processor and is not
    a cross-attention module that the policy keeps dense."""
    inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
    if inner is None or _is_linear_attention_processor(inner):
        return False
    return not (_declared_cross_attention(attn) and config.cross_attention == "dense")


def _module_device(attn: nn.Module) -> torch.device:
    for param in attn.parameters():
        if not param.is_meta:
            return param.device
    # offloaded with accelerate (weights on "meta" between calls): new SLA layers live where the module runs
    device = getattr(getattr(attn, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


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
    location is replayed (`diffusers_sla.serialization.on_sla_enabled`).

    Returns:
        the `SLAAttnProcessor` installed.
    """
    from .serialization import sla_config_at_load_location

    targets = _target_models(pipe_or_model)
    for prefix, model in targets:  # before anything changes: refuse the context parallelism SLA cannot run
        _check_context_parallel(model, f"enable_sla on {prefix or type(model).__name__}")
    if config is None and not overrides:
        # Weights trained with SLA must be served with the operator they were trained with: default to it. With
        # explicit settings the user's config stands and a mismatch with the file is reported by `on_sla_enabled`.
        for _, model in targets:
            stored = sla_config_at_load_location(model)
            if stored is not None:
                logger.info("enable_sla: using the SLA config stored with %s's SLA weights.", type(model).__name__)
                config = stored
                break
    processor = SLAAttnProcessor(config, backend=backend, **overrides)
    sla_layers = dict(sla_layers or {})
    modules_of = []
    for prefix, model in targets:
        modules = [(path, m) for path, m in model.named_modules() if _is_attention_module(m)]
        if not modules:
            raise ValueError(
                f"`pipe_or_model`: {type(model).__name__} has no attention module with `set_processor` "
                "(diffusers `Attention` or `AttentionModuleMixin`) to run SLA in."
            )
        modules_of.append(modules)
    # All or nothing: check what can be checked before touching anything, and undo every model on a later error.
    _check_selectors("dense_layers", processor.config.dense_layers, targets)
    known = {_join(prefix, path) for (prefix, _), modules in zip(targets, modules_of) for path, _ in modules}
    unknown = sorted(set(sla_layers) - known)
    if unknown:
        raise ValueError(
            f"`sla_layers`: no attention module at {unknown} in this model (nothing was changed); its attention "
            f"modules are {_short(sorted(known))}."
        )
    own = _per_layer_processors(processor, layer_topk, targets, modules_of)
    snapshots = [_snapshot(model) for _, model in targets]
    try:
        with _model_install():
            for (prefix, model), modules in zip(targets, modules_of):
                for path, attn in modules:
                    attn.set_processor(own.get(_join(prefix, path), processor))
                _complete_install(model, prefix, sla_layers, strict=strict)
    except BaseException:
        for snapshot in snapshots:
            _restore(snapshot)
        raise
    return processor


def _per_layer_processors(processor: "SLAAttnProcessor", layer_topk, targets, modules_of) -> dict:
    """`{path: SLAAttnProcessor}` for the modules `layer_topk` gives a `topk` other than the processor's (one
    processor per distinct value). Every value is checked before the caller touches the model."""
    if layer_topk is None:
        return {}
    if not (isinstance(layer_topk, dict) or callable(layer_topk)):
        raise ValueError("`layer_topk` must be a dict {block index or module-path glob: topk} or a callable "
                         f"(module path) -> topk, got {type(layer_topk).__name__}.")
    wanted = {}
    if isinstance(layer_topk, dict):
        from .config import _layer_selectors

        selectors = _layer_selectors("layer_topk", list(layer_topk))  # the same rules as `dense_layers`
        values = dict(zip(selectors, layer_topk.values()))
        _check_selectors("layer_topk", selectors, targets)
        for (prefix, model), modules in zip(targets, modules_of):
            matched = select_layers(model, prefix, selectors, [path for path, _ in modules])[0]
            wanted.update({_join(prefix, path): values[selector] for path, selector in matched.items()})
    else:
        for (prefix, _), modules in zip(targets, modules_of):
            for path, _ in modules:
                value = layer_topk(_join(prefix, path))
                if value is not None:
                    wanted[_join(prefix, path)] = value
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


def _short(items, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ----- all-or-nothing installs -----

_install_state = threading.local()


@contextlib.contextmanager
def _model_install():
    # A model-level install (`enable_sla`, `set_attn_processor`) replays the whole file once at its end; the
    # per-module replay of `set_processor` stands down meanwhile.
    depth = getattr(_install_state, "depth", 0)
    _install_state.depth = depth + 1
    try:
        yield
    finally:
        _install_state.depth = depth


def _snapshot(model: nn.Module) -> list[tuple]:
    """What an install may change on each attention module of `model`: its processor (wrapper or own, plain or
    child module), the processor SLA wraps, its SLA layer with the layer's config and weights' replay mark."""
    return _snapshot_modules([m for m in model.modules() if _is_attention_module(m)])


def _snapshot_modules(modules) -> list[tuple]:
    from .serialization import _REPLAYED_ATTR

    rows = []
    for attn in modules:
        layer = attn._modules.get(SLA_MODULE_NAME)
        rows.append((
            attn, attn.__dict__.get("processor"), attn._modules.get("processor"), attn.__dict__.get(INNER_PROCESSOR_ATTR),
            layer, getattr(layer, "config", None), getattr(layer, "backend", None),
            getattr(layer, _REPLAYED_ATTR, None), attn.__dict__.get(DENSE_LAYER_ATTR),
        ))
    return rows


def _restore(snapshot: list[tuple]) -> None:
    from .serialization import _REPLAYED_ATTR

    for attn, plain, child, inner, layer, config, backend, replayed, dense in snapshot:
        attn.__dict__.pop(DENSE_LAYER_ATTR, None)
        if dense is not None:
            attn.__dict__[DENSE_LAYER_ATTR] = dense
        attn.__dict__.pop("processor", None)
        attn._modules.pop("processor", None)
        if plain is not None:
            attn.__dict__["processor"] = plain
        if child is not None:
            attn._modules["processor"] = child
        attn.__dict__.pop(INNER_PROCESSOR_ATTR, None)
        attn.__dict__.pop(_INNER_PARAMETERS_ATTR, None)
        if inner is not None:
            attn.__dict__[INNER_PROCESSOR_ATTR] = inner
            attn.__dict__[_INNER_PARAMETERS_ATTR] = (type(inner), _call_parameters(inner))
        attn._modules.pop(SLA_MODULE_NAME, None)
        if layer is not None:
            attn._modules[SLA_MODULE_NAME] = layer
            layer.config, layer.backend = config, backend
            if replayed is None:
                layer.__dict__.pop(_REPLAYED_ATTR, None)
            else:
                setattr(layer, _REPLAYED_ATTR, replayed)
        if plain is None and inner is None:
            attn.__dict__.pop("_sla_stats", None)


def _attach_sla_layers(model: nn.Module, prefix: str, sla_layers: dict[str, SparseLinearAttention]) -> None:
    """Give every module of `model` running an `SLAAttnProcessor` its own SLA layer, up front: re-attached from
    `sla_layers` (popped) when given there, kept (with the processor's config) when it has one, else new and
    zero-initialised. Modules that will not run SLA (linear attention, cross-attention kept dense, the config's
    `dense_layers`) get none; a dense layer keeps the SLA layer it had (its weights are saved and loaded as before)."""
    installed = [(path, attn) for path, attn in model.named_modules()
                 if _is_attention_module(attn) and isinstance(getattr(attn, "processor", None), SLAAttnProcessor)]
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
        reused = sla_layers.pop(_join(prefix, path), None)
        if reused is not None:
            attn.add_module(SLA_MODULE_NAME, reused.to(_module_device(attn)))
            existing = reused
        if isinstance(existing, SparseLinearAttention):
            existing.config, existing.backend = processor.config, processor.backend
            continue
        if path in dense or not _expects_sla(attn, processor.config):
            continue
        head_dim = _infer_head_dim(attn)
        if head_dim is None:
            _log_once(
                ("no_head_dim", type(attn)), logging.INFO,
                f"{type(attn).__name__} does not expose its head size; its SLA layer is created at first use.",
            )
            continue
        layer = SparseLinearAttention(head_dim, config=processor.config, backend=processor.backend)
        attn.add_module(SLA_MODULE_NAME, layer.to(_module_device(attn)))


def _block_paths(model: nn.Module) -> list[str]:
    """The model's transformer blocks in module order: the items of its top-level `nn.ModuleList`s named `*blocks`
    (Flux: `transformer_blocks.*` then `single_transformer_blocks.*`)."""
    paths = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            paths += [f"{name}.{index}" for index in range(len(child))]
    return paths


def _glob_matches(pattern: str, path: str) -> bool:
    # a pattern naming a module also names the attention modules below it ("transformer_blocks.0")
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def select_layers(model: nn.Module, prefix: str, selectors, paths) -> tuple[dict, list]:
    """Match layer selectors (block indices and module-path globs, see `SLAConfig.dense_layers`) against the
    attention module `paths` of `model` (whose paths in a pipeline start with `prefix`). Returns
    `({path: first matching selector}, [selectors matching none of them])`."""
    blocks = _block_paths(model)
    matched, unmatched = {}, []
    for selector in selectors:
        if isinstance(selector, int):
            if not -len(blocks) <= selector < len(blocks):
                unmatched.append(selector)
                continue
            block = blocks[selector]
            hits = [p for p in paths if p == block or p.startswith(block + ".")]
        else:
            hits = [p for p in paths if _glob_matches(selector, p) or _glob_matches(selector, _join(prefix, p))]
        if not hits:
            unmatched.append(selector)
        for path in hits:
            matched.setdefault(path, selector)
    return matched, unmatched


def _check_selectors(name: str, selectors, targets) -> None:
    """Raise when a layer selector matches no attention module of any of `targets` ((prefix, model) pairs)."""
    if not selectors:
        return
    unmatched = None
    for prefix, model in targets:
        paths = [path for path, m in model.named_modules() if _is_attention_module(m)]
        missed = select_layers(model, prefix, selectors, paths)[1]
        unmatched = missed if unmatched is None else [s for s in unmatched if s in missed]
    if unmatched:
        prefix, model = targets[0]
        raise ValueError(
            f"`{name}`: {unmatched} match no attention module (nothing was changed). Integers are indices of the "
            f"{len(_block_paths(model))} transformer blocks of {type(model).__name__} (negative from the end); "
            f"strings are globs on module paths such as {_short([_join(prefix, p) for p, m in model.named_modules() if _is_attention_module(m)], 3)}."
        )


def _has_sla_layers(model: nn.Module) -> bool:
    return any(True for _ in iter_sla_layers(model))


def _complete_install(model: nn.Module, prefix: str, sla_layers: dict[str, SparseLinearAttention], *,
                      strict: bool) -> None:
    """The second half of installing SLA, shared by `enable_sla` and `set_attn_processor`: create the SLA layers and
    their counters up front, then load the `sla_attention.safetensors` saved beside `model`
    (`serialization.on_sla_enabled`). The callers undo everything if this raises."""
    from .serialization import on_sla_enabled

    _attach_sla_layers(model, prefix, sla_layers)
    _hook_single_stream_blocks(model)
    _declare_fp32_layers(model)
    on_sla_enabled(model, strict=strict)


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


def _wrap_set_attn_processor() -> None:
    """`model.set_attn_processor(SLAAttnProcessor())` (or a dict holding one) does what `enable_sla` does: every SLA
    layer is created up front (so an optimizer built next holds them) and SLA weights saved beside the model are
    loaded; on an error the model is left as it was."""
    from diffusers.models.attention import AttentionMixin

    original = AttentionMixin.__dict__["set_attn_processor"]
    if getattr(original, "_sla_original", None) is not None:
        return

    @functools.wraps(original)
    def set_attn_processor(self, processor):
        values = processor.values() if isinstance(processor, dict) else [processor]
        installs_sla = any(isinstance(value, SLAAttnProcessor) for value in values)  # before diffusers pops the dict
        if not installs_sla:
            return original(self, processor)
        for value in values:
            if isinstance(value, SLAAttnProcessor):
                _check_selectors("dense_layers", value.config.dense_layers, [("", self)])
        snapshot = _snapshot(self)
        try:
            with _model_install():
                result = original(self, processor)
                _complete_install(self, "", {}, strict=True)
        except BaseException:
            _restore(snapshot)
            raise
        return result

    set_attn_processor._sla_original = original
    AttentionMixin.set_attn_processor = set_attn_processor


def disable_sla(pipe_or_model) -> dict[str, SparseLinearAttention]:
    """Restore every module's own processor and remove the SLA layers.

    Returns:
        `{path: SparseLinearAttention}` of the removed layers (trained `proj_l` included); pass it to
        `enable_sla(..., sla_layers=...)` to turn SLA back on without losing them.
    """
    from .serialization import on_sla_disabled

    removed: dict[str, SparseLinearAttention] = {}
    for prefix, model in _target_models(pipe_or_model):
        for path, attn in list(model.named_modules()):
            if not _is_attention_module(attn):
                continue
            if isinstance(getattr(attn, "processor", None), SLAAttnProcessor):
                inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
                if inner is None:
                    raise RuntimeError(
                        f"`disable_sla`: {_join(prefix, path)} runs SLA without a recorded processor to restore."
                    )
                _disabling.active = True
                try:
                    attn.set_processor(inner)
                finally:
                    _disabling.active = False
            _set_inner_processor(attn, None)
            attn.__dict__.pop("_sla_stats", None)
            attn.__dict__.pop(DENSE_LAYER_ATTR, None)
            layer = attn._modules.pop(SLA_MODULE_NAME, None)
            if layer is not None:
                removed[_join(prefix, path)] = layer
        on_sla_disabled(model)
    return removed


# ===== Reporting =====


@dataclass
class LayerSummary:
    path: str
    module_type: str
    sla_calls: int
    dense_calls: dict[str, int]
    mean_density: float | None
    has_sla_layer: bool
    # calls inside torch.compile'd code are not counted: the route ("sla" or a dense reason) and density of the
    # last one (`dispatch.record_call`)
    compiled_route: str | None = None
    compiled_density: float | None = None

    @property
    def total_calls(self) -> int:
        return self.sla_calls + sum(self.dense_calls.values())


@dataclass
class SLASummary:
    """Per-layer report of what `SLAAttnProcessor` did since the last `reset_sla_stats`. `str(summary)` and
    `summary.table()` give a readable table; `summary.to_dict()` a JSON-friendly form."""

    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def sla_calls(self) -> int:
        return sum(layer.sla_calls for layer in self.layers)

    @property
    def dense_calls(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for layer in self.layers:
            for reason, count in layer.dense_calls.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    @property
    def mean_density(self) -> float | None:
        weighted = [(layer.mean_density, layer.sla_calls) for layer in self.layers if layer.sla_calls]
        calls = sum(n for _, n in weighted)
        return sum(d * n for d, n in weighted) / calls if calls else None

    def __getitem__(self, path: str) -> LayerSummary:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    def to_dict(self) -> dict:
        return {
            "sla_calls": self.sla_calls, "dense_calls": self.dense_calls, "mean_density": self.mean_density,
            "layers": [
                {"path": layer.path, "module_type": layer.module_type, "sla_calls": layer.sla_calls,
                 "dense_calls": dict(layer.dense_calls), "mean_density": layer.mean_density,
                 "has_sla_layer": layer.has_sla_layer, "compiled_route": layer.compiled_route,
                 "compiled_density": layer.compiled_density}
                for layer in self.layers
            ],
        }

    def table(self) -> str:
        # a last column only when some calls ran inside torch.compile'd code, which counts none of them
        compiled = any(layer.compiled_route for layer in self.layers)
        header = ("layer", "SLA calls", "dense calls (reason: n)", "density")
        header += ("compiled route",) if compiled else ()
        rows = [
            (
                layer.path,
                str(layer.sla_calls),
                ", ".join(f"{reason}: {n}" for reason, n in sorted(layer.dense_calls.items())) or "-",
                "-" if layer.mean_density is None else f"{layer.mean_density:.3f}",
            ) + ((_compiled_cell(layer),) if compiled else ())
            for layer in self.layers
        ]
        density = self.mean_density
        rows.append((
            f"total ({len(self.layers)} layers)", str(self.sla_calls),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dense_calls.items())) or "-",
            "-" if density is None else f"{density:.3f}",
        ) + (("(not counted)",) if compiled else ()))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _compiled_cell(layer: LayerSummary) -> str:
    if layer.compiled_route is None:
        return "-"
    if layer.compiled_route != "sla":
        return f"dense ({layer.compiled_route})"
    return "sla" if layer.compiled_density is None else f"sla ({layer.compiled_density:.3f})"


def _sla_modules(pipe_or_model):
    for prefix, model in _target_models(pipe_or_model):
        for path, attn in model.named_modules():
            if not _is_attention_module(attn):
                continue
            if isinstance(getattr(attn, "processor", None), SLAAttnProcessor) or SLA_MODULE_NAME in attn._modules:
                yield _join(prefix, path), attn


def sla_summary(pipe_or_model) -> SLASummary:
    """Per layer: SDPA calls routed to SLA, dense calls by reason (see `diffusers_sla.dispatch`), and the mean
    density (kept key blocks / all key blocks) of its SLA calls. Layers are the attention modules running
    `SLAAttnProcessor`, in module order. Calls inside torch.compile'd code are not counted (a counter there would
    recompile the code at every call); the table's "compiled route" column shows what such calls ran instead."""
    layers = []
    for path, attn in _sla_modules(pipe_or_model):
        stats: LayerStats = attn.__dict__.get("_sla_stats") or LayerStats()
        layers.append(LayerSummary(
            path=path, module_type=type(attn).__name__, sla_calls=stats.sla_calls,
            dense_calls={reason: stats.dense_calls[reason] for reason in DENSE_REASONS
                         if stats.dense_calls.get(reason)},
            mean_density=stats.mean_density, has_sla_layer=SLA_MODULE_NAME in attn._modules,
            compiled_route=stats.compiled_route, compiled_density=stats.compiled_density,
        ))
    return SLASummary(layers)


@contextlib.contextmanager
def sla_dense_steps(pipe, steps: int):
    """Run the first `steps` denoising steps of every call of `pipe` inside the block with dense attention (the
    model's own), the later ones with SLA; `sla_summary` counts the dense ones with reason `dense_step`.

        with sla_dense_steps(pipe, 2):
            image = pipe(prompt, num_inference_steps=28).images[0]

    Works with any diffusers pipeline whose denoising loop calls `pipe.scheduler.step` once per step (every
    pipeline in diffusers does): a pipeline call starts dense when it sets the scheduler's timesteps
    (`set_timesteps`), and each `scheduler.step` counts a finished step. True CFG, several calls per step and several
    denoisers (Wan 2.2's `transformer_2`) are covered: the switch is on the attention modules. Under torch.compile
    the switch is a Python attribute of each attention module, so each compiled region is compiled twice (dense and
    SLA) on its first steps and then reused: no recompilation per step."""
    from numbers import Integral

    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)):
        raise ValueError(f"`pipe`: sla_dense_steps needs a diffusers pipeline with a `scheduler`, got "
                         f"{type(pipe).__name__}.")
    modules = [attn for _, attn in _sla_modules(pipe)]
    if not modules:
        raise ValueError("`pipe` runs no SLA: call `enable_sla(pipe)` before `sla_dense_steps`.")
    done = [0]

    def switch():
        dense = done[0] < steps
        for attn in modules:
            attn.__dict__[DENSE_STEP_ATTR] = dense

    original_step, original_set = scheduler.__dict__.get("step"), scheduler.__dict__.get("set_timesteps")
    step_method, set_method = scheduler.step, getattr(scheduler, "set_timesteps", None)

    @functools.wraps(step_method)
    def step(*args, **kwargs):
        output = step_method(*args, **kwargs)
        done[0] += 1
        switch()
        return output

    def set_timesteps(*args, **kwargs):
        done[0] = 0  # a new pipeline call
        switch()
        return set_method(*args, **kwargs)

    scheduler.step = step
    if set_method is not None:
        scheduler.set_timesteps = functools.wraps(set_method)(set_timesteps)
    switch()
    try:
        yield
    finally:
        for name, original in (("step", original_step), ("set_timesteps", original_set)):
            scheduler.__dict__.pop(name, None)
            if original is not None:
                scheduler.__dict__[name] = original
        for attn in modules:
            attn.__dict__.pop(DENSE_STEP_ATTR, None)


def reset_sla_stats(pipe_or_model) -> None:
    """Zero the per-layer counters that `sla_summary` reports."""
    for _, attn in _sla_modules(pipe_or_model):
        layer_stats(attn).reset()


_wrap_set_attn_processor()

# Importing the processor installs serialization's `from_pretrained` / `save_pretrained` hooks too, so that a model
# loaded after `from diffusers_sla import enable_sla` remembers where its SLA weights are. Last, so that a future
# `serialization -> processor` import finds every name defined.
from . import serialization  # noqa: E402, F401
