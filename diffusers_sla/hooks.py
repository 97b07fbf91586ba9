# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Every patch diffusers-sla makes to torch and diffusers, listed and applied in one place.

Applied once, when `diffusers_sla` is imported (`install_hooks`, idempotent): imported before a model is loaded,
`from_pretrained` remembers where the model came from, so that installing SLA later finds the
`sla_attention.safetensors` saved beside its weights (subfolder included), and `save_pretrained` writes that file.

| patched                                                         | by                                       |
| --------------------------------------------------------------- | ---------------------------------------- |
| `Attention.set_processor`, `AttentionModuleMixin.set_processor` | `integration.install.wrap_set_processor` |
| `Attention.get_processor`, `AttentionModuleMixin.get_processor` | `integration.install.wrap_get_processor` |
| `AttentionMixin.set_attn_processor`                             | `integration.install.wrap_set_attn_processor` |
| `ModelMixin.save_pretrained`                                    | `weights.save_hook.wrap_save_pretrained` |
| `ModelMixin.from_pretrained`                                    | `weights.replay.record_load_source`      |

Two patches wait for first use, so that importing diffusers-sla leaves attention untouched until SLA runs:
`torch.nn.functional.scaled_dot_product_attention` (`integration.sdpa.install_sdpa_router`, when the first
`SLAAttnProcessor` is built, and again at each SLA call if another library replaced it since) and diffusers'
`attention_dispatch._templated_context_parallel_attention` (`integration.parallel.install_context_parallel_router`,
at the first SLA call under context parallelism).

This module also hands the weights' replay to the install (`integration.install.use_weights_replay`): the install sits
below the weights and does not import them.
"""

from __future__ import annotations

from diffusers import ModelMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from .integration.install import (
    WeightsReplay,
    use_weights_replay,
    wrap_get_processor,
    wrap_set_attn_processor,
    wrap_set_processor,
)
from .weights.replay import record_load_source, replay_into_model, replay_into_module, sla_config_at_load_location
from .weights.save_hook import wrap_save_pretrained


def _patch(owner: type, name: str, wrap) -> None:
    """Replace `owner.name` (defined on `owner` itself) by `wrap(original)`, unless it is one of our wrappers."""
    current = owner.__dict__.get(name)
    if current is None:
        return
    is_classmethod = isinstance(current, classmethod)
    function = current.__func__ if is_classmethod else current
    if getattr(function, "_diffusers_sla_hook", False):
        return
    wrapped = wrap(function)
    wrapped._diffusers_sla_hook = True
    setattr(owner, name, classmethod(wrapped) if is_classmethod else wrapped)


def install_hooks() -> None:
    """Apply every patch of the table above once (idempotent: done at import)."""
    for cls in (Attention, AttentionModuleMixin):
        _patch(cls, "set_processor", wrap_set_processor)
        _patch(cls, "get_processor", wrap_get_processor)
    _patch(AttentionMixin, "set_attn_processor", wrap_set_attn_processor)
    _patch(ModelMixin, "save_pretrained", wrap_save_pretrained)
    _patch(ModelMixin, "from_pretrained", record_load_source)
    use_weights_replay(WeightsReplay(stored_config=sla_config_at_load_location, into_model=replay_into_model,
                                     into_module=replay_into_module))


install_hooks()
