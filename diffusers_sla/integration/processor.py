# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SLAAttnProcessor`: SLA beneath each attention module's own diffusers processor.

How it fits into diffusers:

* `SLAAttnProcessor` does not re-implement any model's attention. Each attention module keeps the processor it had
  (Flux's, SD3's joint one, QwenImage's, ...): importing diffusers_sla wraps `set_processor` of diffusers'
  `Attention` and `AttentionModuleMixin` (`hooks.py`) so that, when an `SLAAttnProcessor` replaces another processor,
  the module remembers that processor (`attn._sla_inner_processor`). `SLAAttnProcessor.__call__` runs it, and only
  its attention call (`F.scaled_dot_product_attention`, directly or through `dispatch_attention_fn`) is routed to SLA
  (`sdpa.py`; the routing policy is `routing.py`). RoPE, QK-norm, joint tokens, masks, image-prompt branches and
  returned tuples are the model's own.
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

import inspect
import itertools
import logging
import weakref

import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch import nn

from diffusers_sla.config import SLAConfig
from diffusers_sla.ops.api import BACKEND_NAMES

from .joint import text_tokens
from .logs import log_once
from .modules import DENSE_LAYER_ATTR, DENSE_STEP_ATTR, INNER_PARAMETERS_ATTR, INNER_PROCESSOR_ATTR, call_parameters
from .parallel import check_context_parallel, install_context_parallel_router
from .routing import uncaught_reason
from .sdpa import install_sdpa_router, log_dense_once, routing_scope
from .stats import record_call

# Keyword arguments diffusers itself passes to processors without warning when they are not accepted.
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})
_instance_numbers = itertools.count()


class SLAAttnProcessor:
    """Attention processor that runs each module's own processor with its attention core replaced by SLA.

    Args:
        config (`SLAConfig`, `dict`, JSON string or path, *optional*): operator and routing settings; keyword
            overrides win (`SLAAttnProcessor(topk=0.15)`).
        backend (`str`, *optional*, defaults to `"auto"`): SLA backend, `"auto"`, `"torch"` or `"triton"`.

    Install it with `model.set_attn_processor(SLAAttnProcessor())` (per-layer state is created at first use) or
    with `enable_sla(model)` (state created up front). Which attention calls run SLA is documented in
    `diffusers_sla.integration.routing`; `sla_summary(model)` reports per layer what ran.
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
        # key of this instance's once-per-reason log lines (`logs.log_once`): a constant string, so that compiled
        # code reads no state that its first call changes
        self.log_key = f"SLAAttnProcessor#{next(_instance_numbers)}"
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

    def attach(self, attn: nn.Module) -> None:
        """Record that `attn` runs this processor (the settings above are passed on to the processor it wraps)."""
        self._attached_modules.add(attn)

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
        if parallel is not None:  # Ulysses runs (`parallel.install_context_parallel_router`); ring raises
            check_context_parallel(parallel, f"SLAAttnProcessor in {type(attn).__name__}")
            install_context_parallel_router()
        kwargs = self._kwargs_for(attn, inner, kwargs)
        if attn.__dict__.get(DENSE_LAYER_ATTR, False) or attn.__dict__.get(DENSE_STEP_ATTR, False):
            # a layer or a step the user keeps dense: the module's own processor, its attention call not routed
            record_call(attn, "dense_layer" if attn.__dict__.get(DENSE_LAYER_ATTR, False) else "dense_step")
            return inner(attn, *args, **kwargs)
        with routing_scope(attn, self, text_tokens(attn, inner, args, kwargs)) as scope:
            output = inner(attn, *args, **kwargs)
        if scope.intercepted == 0:
            self._record_uncaught_call(attn, inner)
        return output

    # ----- keyword arguments ------------------------------------------------------------------------------------

    @staticmethod
    def _inner_parameters(attn: nn.Module, inner) -> tuple[frozenset, bool]:
        """(names the inner processor accepts by keyword, whether it takes **kwargs): recorded on the module when
        the processor was set (`set_inner_processor`), so a call reads and writes no cache."""
        recorded = attn.__dict__.get(INNER_PARAMETERS_ATTR)
        if recorded is not None and recorded[0] is type(inner):
            return recorded[1]
        return call_parameters(inner)

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
            log_once(
                ("unused_kwargs", type(inner), tuple(loud)), logging.WARNING,
                f"Arguments {loud} are not expected by {type(inner).__name__} and will be ignored.",
            )
        return {k: v for k, v in kwargs.items() if k in names}

    @classmethod
    def _advertise_parameters(cls, inner) -> None:
        """Add the inner processor's parameter names to `__call__`'s advertised signature."""
        names, _ = call_parameters(inner)
        new = [name for name in sorted(names) if name not in cls._advertised_names]
        if not new:
            return
        cls._advertised_names.update(dict.fromkeys(new))
        cls.__call__.__signature__ = _advertised_signature(cls._advertised_names)

    # ----- reporting --------------------------------------------------------------------------------------------

    def _record_uncaught_call(self, attn: nn.Module, inner) -> None:
        """The inner processor ran without calling torch SDPA: SLA did not run there. Count it and say why once."""
        backend = getattr(inner, "_attention_backend", None) or self._attention_backend
        if backend is None:
            backend = _AttentionBackendRegistry._active_backend
        backend_name = getattr(backend, "value", backend)
        reason = uncaught_reason(inner, backend_name)
        record_call(attn, reason)
        log_dense_once(self, reason, attn, inner=inner, backend_name=backend_name)


def _advertised_signature(names) -> inspect.Signature:
    P = inspect.Parameter
    return inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("attn", P.POSITIONAL_OR_KEYWORD), P("args", P.VAR_POSITIONAL)]
        + [P(name, P.KEYWORD_ONLY, default=None) for name in names]
        + [P("kwargs", P.VAR_KEYWORD)]
    )


SLAAttnProcessor.__call__.__signature__ = _advertised_signature(SLAAttnProcessor._advertised_names)


# ===== Remembering each module's own processor =====


def set_inner_processor(attn: nn.Module, processor) -> None:
    # (an older layout kept an nn.Module processor as the child `_sla_inner_processor`)
    attn._modules.pop(INNER_PROCESSOR_ATTR, None)
    attn.__dict__.pop(INNER_PARAMETERS_ATTR, None)
    old = attn.__dict__.pop(INNER_PROCESSOR_ATTR, None)
    wrapped = isinstance(attn.__dict__.get("processor"), SLAAttnProcessor)
    if wrapped and old is not None and attn._modules.get("processor") is old:
        del attn._modules["processor"]
    if processor is None:
        return
    attn.__dict__[INNER_PROCESSOR_ATTR] = processor
    attn.__dict__[INNER_PARAMETERS_ATTR] = (type(processor), call_parameters(processor))
    if wrapped and isinstance(processor, nn.Module):
        # A processor with weights (IP-Adapter) stays the child `processor`, as without SLA: its state-dict keys,
        # `.to()` and offloading hooks are unchanged. The SLA wrapper in `__dict__` still wins attribute lookup, so
        # `attn.processor` (what the module's forward calls) is the wrapper.
        attn._modules["processor"] = processor
    SLAAttnProcessor._advertise_parameters(processor)

