# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SparseLinearAttention`: the SLA operator as an `nn.Module` owning its learnable projection `proj_l`."""

from __future__ import annotations

import torch
from torch import nn

from diffusers_sla.config import SLA_MODULE_NAME, SLAConfig
from diffusers_sla.ops.api import BACKEND_NAMES, preload_backends, sparse_linear_attention
from diffusers_sla.ops.fusion import RATIO_BIAS_INIT, fusion_parameter_shapes

# Set on SLA layers once they hold loaded weights (or once the replay found nothing to load), so that a later
# `enable_sla` does not replay the saved file over trained weights.
REPLAYED_ATTR = "_sla_replayed"


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


class _ParameterNames:
    """`sla_parameter_names`: on the class, the parameters every layer has (`proj_l`); on a layer, those plus the
    ones its fusion adds (`fusion="ratio"`: the gate's `fusion_ratio_weight`, `fusion_ratio_bias`)."""

    base = ("proj_l.weight", "proj_l.bias")

    def __get__(self, layer, owner=None):
        if layer is None:
            return self.base
        return self.base + tuple(fusion_parameter_shapes(layer.config.fusion, layer.head_dim))


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

    With `fusion="ratio"` the layer also owns the gate's float32 parameters `fusion_ratio_weight` (head_dim,), zero,
    and `fusion_ratio_bias` (1,), 3.0 (the gate starts at sigmoid(3) = 0.95 towards the sparse part); they are
    created when that fusion is first set, saved in the sidecar with `proj_l`, and kept float32 like it.
    """

    # Parameters that belong to SLA (what `sla_attention.safetensors` stores for each layer).
    sla_parameter_names = _ParameterNames()

    def sla_parameters(self) -> dict[str, nn.Parameter]:
        """`{name: parameter}` for `sla_parameter_names`, by attribute (not `named_parameters`), so that names stay
        the same whatever else is attached to the model."""
        params = {"proj_l.weight": self.proj_l.weight, "proj_l.bias": self.proj_l.bias}
        for name in fusion_parameter_shapes(self.config.fusion, self.head_dim):
            params[name] = getattr(self, name)
        return params

    def __init__(self, head_dim: int, config: SLAConfig | dict | str | None = None, backend: str = "auto",
                 **overrides):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"`head_dim` must be a positive integer, got {head_dim!r}.")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
        self.head_dim = head_dim
        self.backend = backend
        self.proj_l = SLAProjection(head_dim)
        self.config = SLAConfig.coerce(config, **overrides)
        preload_backends()

    @property
    def config(self) -> SLAConfig:
        return self._sla_config

    @config.setter
    def config(self, value: SLAConfig) -> None:
        # A fusion with parameters creates them the first time it is set (also when a processor switches a layer
        # to it); switching away keeps them, unused, so that switching back finds them trained.
        self._sla_config = value
        for name, shape in fusion_parameter_shapes(value.fusion, self.head_dim).items():
            if name not in self._parameters:
                init = RATIO_BIAS_INIT if name == "fusion_ratio_bias" else 0.0
                data = torch.full(shape, init, dtype=torch.float32, device=self.proj_l.weight.device)
                self.register_parameter(name, nn.Parameter(data))

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
        ratio = {}
        if self.config.fusion == "ratio":
            ratio = dict(ratio_weight=self.fusion_ratio_weight, ratio_bias=self.fusion_ratio_bias)
        return self.call_with_weights(lambda weight, bias: sparse_linear_attention(
            q, k, v, weight, bias,
            config=self.config, scale=scale, key_padding_mask=key_padding_mask, backend=self.backend,
            forced_keys=forced_keys, **ratio,
        ))

    def call_with_weights(self, function):
        """`function(proj_l.weight, proj_l.bias)`, through `proj_l`'s own call when hooks manage its weights
        (offloading hooks bring them in only around that call)."""
        if _has_hooks(self.proj_l):
            return self.proj_l(function)
        return function(self.proj_l.weight, self.proj_l.bias)

    def _apply(self, fn, recurse=True):
        # the fusion's own parameters stay float32 through casts, as `SLAProjection._apply` keeps proj_l's
        super()._apply(fn, recurse=recurse)
        for name, param in self._parameters.items():
            if name.startswith("fusion_") and param is not None and param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad.data = param.grad.data.float()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"head_dim={self.head_dim}, topk={c.topk}, blkq={c.blkq}, blkk={c.blkk}, "
                f"feature_map={c.feature_map!r}, linear_scope={c.linear_scope!r}, fusion={c.fusion!r}, "
                f"backend={self.backend!r}")


def iter_sla_layers(model: nn.Module):
    """Yield `(path, attention_module, sla_layer)` for every attention module of `model` that holds its own
    `SparseLinearAttention` (as the child `config.SLA_MODULE_NAME`), in `named_modules()` order."""
    for path, module in model.named_modules():
        layer = module._modules.get(SLA_MODULE_NAME)
        if isinstance(layer, SparseLinearAttention):
            yield path, module, layer
