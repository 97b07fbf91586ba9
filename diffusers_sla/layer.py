# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SparseLinearAttention`: the SLA operator as an `nn.Module` owning its learnable projection `proj_l`."""

from __future__ import annotations

import torch
from torch import nn

from .config import SLAConfig
from .ops.api import BACKEND_NAMES, preload_backends, sparse_linear_attention


class SLAProjection(nn.Module):
    """`proj_l`: a float32 linear map (`weight`, `bias`: the state-dict keys of an `nn.Linear`) whose weights the SLA
    kernels read directly.

    * Not an `nn.Linear` on purpose: tools that wrap or recast `nn.Linear` layers (PEFT's LoRA with
      `"all-linear"`, diffusers' layerwise casting) would change a forward the kernels never call, so their effect
      would be silently lost; they leave this layer alone instead, and naming `proj_l` as a PEFT target is PEFT's
      "not supported" error. It has `head_dim**2` parameters: train it in full.
    * Every cast reaches its parameters through `_apply` (`model.to(torch.bfloat16)`, `.half()`): the device move
      is kept and the dtype put back to float32, on the same parameter objects, so optimizers holding them stay valid.
    * Called with a function instead of a tensor, it returns `function(weight, bias)`. `SparseLinearAttention`
      reads the weights that way when hooks manage them (accelerate's `cpu_offload`, diffusers' group offloading):
      those hooks put the weights in place before a module's forward and take them away after it.
    """

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.in_features = self.out_features = dim
        # zero: a freshly installed SLA layer adds nothing to the sparse branch until it is trained
        self.weight = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.float32, device=device))

    def forward(self, input):
        if callable(input) and not isinstance(input, torch.Tensor):
            return input(self.weight, self.bias)
        return torch.nn.functional.linear(input, self.weight.to(input.dtype), self.bias.to(input.dtype))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse=recurse)
        for param in self.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad.data = param.grad.data.float()
        return self

    def extra_repr(self) -> str:
        # PEFT's error for a target it cannot wrap quotes this repr: say why
        return f"{self.in_features}, {self.out_features}, float32; read directly by the SLA kernels, takes no adapter"


def _has_hooks(module: nn.Module) -> bool:
    # accelerate and diffusers install their hooks by replacing the instance's `forward`; torch's own hooks are dicts
    return "forward" in module.__dict__ or bool(module._forward_pre_hooks) or bool(module._forward_hooks)


class SparseLinearAttention(nn.Module):
    """Sparse-Linear Attention over (batch, heads, seq, head_dim) tensors.

    Args:
        head_dim (`int`): size of each attention head.
        config (`SLAConfig`, `dict` or JSON, *optional*): operator settings; keyword overrides win
            (`SparseLinearAttention(128, topk=0.15)`).
        backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"torch"` or `"triton"`.

    `proj_l` is an `SLAProjection(head_dim)` (weight and bias as in `nn.Linear`) initialised to zero, so a freshly
    installed SLA layer adds nothing to the sparse branch until it is trained. It stays float32 whatever dtype the
    model is moved to: mixed-precision training keeps its small updates (see `_apply`).

    With `linear_scope="none"` the layer keeps `proj_l` (a sidecar still loads into it, and a layer switched back to
    "rest" or "all" finds its trained weights unchanged) but never reads it: its `.grad` stays None, so optimizers
    leave it untouched (weight decay included). Its `requires_grad` is left as the user set it; DDP needs
    `find_unused_parameters=True` or `proj_l.requires_grad_(False)` for a parameter that gets no gradient.
    """

    # Parameters that belong to SLA (what `sla_attention.safetensors` stores for each layer).
    sla_parameter_names = ("proj_l.weight", "proj_l.bias")

    def sla_parameters(self) -> dict[str, nn.Parameter]:
        """`{name: parameter}` for `sla_parameter_names`, by attribute (not `named_parameters`), so that names stay
        the same whatever else is attached to the model."""
        return {"proj_l.weight": self.proj_l.weight, "proj_l.bias": self.proj_l.bias}

    def __init__(self, head_dim: int, config: SLAConfig | dict | str | None = None, backend: str = "auto",
                 **overrides):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"`head_dim` must be a positive integer, got {head_dim!r}.")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
        self.head_dim = head_dim
        self.config = SLAConfig.coerce(config, **overrides)
        self.backend = backend
        self.proj_l = SLAProjection(head_dim)
        preload_backends()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        key_padding_mask: torch.Tensor | None = None,
        forced_keys: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"This layer was built for head_dim={self.head_dim}, got q of shape {tuple(q.shape)}.")
        return self.call_with_weights(lambda weight, bias: sparse_linear_attention(
            q, k, v, weight, bias,
            config=self.config, scale=scale, key_padding_mask=key_padding_mask, backend=self.backend,
            forced_keys=forced_keys,
        ))

    def call_with_weights(self, function):
        """`function(proj_l.weight, proj_l.bias)`, through `proj_l`'s own call when hooks manage its weights
        (offloading hooks bring them in only around that call)."""
        if _has_hooks(self.proj_l):
            return self.proj_l(function)
        return function(self.proj_l.weight, self.proj_l.bias)

    def extra_repr(self) -> str:
        c = self.config
        return (f"head_dim={self.head_dim}, topk={c.topk}, blkq={c.blkq}, blkk={c.blkk}, "
                f"feature_map={c.feature_map!r}, linear_scope={c.linear_scope!r}, backend={self.backend!r}")


def iter_sla_layers(model: nn.Module):
    """Yield `(path, attention_module, sla_layer)` for every attention module of `model` that holds its own
    `SparseLinearAttention` (as the child `constants.SLA_MODULE_NAME`), in `named_modules()` order."""
    from .constants import SLA_MODULE_NAME

    for path, module in model.named_modules():
        layer = module._modules.get(SLA_MODULE_NAME)
        if isinstance(layer, SparseLinearAttention):
            yield path, module, layer
