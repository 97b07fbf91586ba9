# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sparse_linear_attention`: the public functional form of SLA, and the one registry of its backends.

Backends are plain functions with the signature of `reference.sla_reference`:

    fn(q, k, v, proj_weight, proj_bias, *, topk, blkq, blkk, feature_map, linear_scope, scale) -> o

They see dense (B, H, L, D) tensors of one dtype; input checks, key padding masks and the missing-projection default
are handled here, once, for all of them. With `linear_scope="none"` the projection may be None: backends never read it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Callable

import torch

from ..config import SLAConfig

logger = logging.getLogger(__name__)

# name -> "module:function", imported on first use so that `import diffusers_sla` never needs Triton.
_BACKENDS: dict[str, str] = {
    "torch": "diffusers_sla.ops.reference:sla_reference",
    "triton": "diffusers_sla.ops.autograd:sla_triton",
}
BACKEND_NAMES = ("auto", *_BACKENDS)
_LOADED: dict[str, Callable] = {}


def _load_backend(name: str) -> Callable:
    # a dict lookup once loaded: torch.compile traces through it, where an import would break the graph
    fn = _LOADED.get(name)
    if fn is None:
        module_name, function_name = _BACKENDS[name].split(":")
        fn = _LOADED[name] = getattr(importlib.import_module(module_name), function_name)
    return fn


def preload_backends() -> None:
    """Import every backend whose dependencies are installed (Triton's only where Triton is), so that a layer's first
    call inside torch.compile'd code finds its backend loaded. Called when a layer is built."""
    from ..utils.import_utils import is_triton_available

    for name in _BACKENDS:
        if name != "triton" or is_triton_available():
            try:
                _load_backend(name)
            except ImportError:  # a broken install: the error comes back, unchanged, when that backend is used
                pass


def triton_backend_usable(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA tensors with Triton installed, or any tensor under the Triton
    interpreter (`TRITON_INTERPRET=1`, used by CI to test the real kernels on the CPU)."""
    from ..utils.import_utils import is_triton_available

    if not is_triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when Triton is installed, else 'torch'. An explicit choice that cannot run raises."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
    if backend == "auto":
        if device.type == "cuda" and triton_backend_usable(device):
            return "triton"
        return "torch"
    if backend == "triton" and not triton_backend_usable(device):
        from ..utils.import_utils import is_triton_available

        if not is_triton_available():
            raise RuntimeError("backend='triton' needs Triton: `pip install triton` (Linux) or use backend='torch'.")
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), got a tensor on {device}."
        )
    return backend


# ===== Checks =====


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    # q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, D)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"`{name}` must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise ValueError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")
    if k.shape != v.shape:
        raise ValueError(f"`k` and `v` must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"`q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree in batch, heads and head_dim "
            "(expand grouped key/value heads before calling)."
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"Sequences must not be empty, got Lq={q.shape[2]} and Lk={k.shape[2]}.")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}.")


def _check_projection(proj_weight, proj_bias, head_dim: int) -> None:
    if proj_weight is not None and tuple(proj_weight.shape) != (head_dim, head_dim):
        raise ValueError(f"`proj_weight` must have shape ({head_dim}, {head_dim}), got {tuple(proj_weight.shape)}.")
    if proj_bias is not None and tuple(proj_bias.shape) != (head_dim,):
        raise ValueError(f"`proj_bias` must have shape ({head_dim},), got {tuple(proj_bias.shape)}.")


def _check_key_padding_mask(mask: torch.Tensor, k: torch.Tensor) -> None:
    # mask: (B, Lk) bool, True = attend to this key
    if mask.dtype != torch.bool or tuple(mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"`key_padding_mask` must be a bool tensor of shape (batch, Lk) = ({k.shape[0]}, {k.shape[2]}) with "
            f"True for keys to attend to, got {mask.dtype} {tuple(mask.shape)}."
        )


# ===== Public API =====


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    config: SLAConfig | dict | str | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    **overrides,
) -> torch.Tensor:
    """Sparse-Linear Attention.

    Args:
        q (`torch.Tensor`): queries, (batch, heads, Lq, head_dim).
        k (`torch.Tensor`): keys, (batch, heads, Lk, head_dim). Lk may differ from Lq (cross or joint attention).
        v (`torch.Tensor`): values, (batch, heads, Lk, head_dim).
        proj_weight (`torch.Tensor`, *optional*): (head_dim, head_dim) weight of the linear branch's projection
            (`proj_l`); None means the identity. Not read with `linear_scope="none"` (no gradient reaches it).
        proj_bias (`torch.Tensor`, *optional*): (head_dim,) bias of that projection; None means zero. Not read with
            `linear_scope="none"`.
        config (`SLAConfig`, `dict` or JSON, *optional*): operator settings; keyword overrides such as `topk=0.1` win.
        scale (`float`, *optional*): softmax scale, `head_dim ** -0.5` when None.
        key_padding_mask (`torch.Tensor`, *optional*): (batch, Lk) bool, True for keys to attend to. Masked keys take
            part in neither branch nor in block selection. Samples are run one by one over their own keys (this
            reads the mask on the host).
        backend (`str`, *optional*, defaults to `"auto"`): `"torch"`, `"triton"` or `"auto"` (Triton on CUDA).

    Returns:
        `torch.Tensor` of shape (batch, heads, Lq, head_dim) and q's dtype.
    """
    cfg = SLAConfig.coerce(config, **overrides)
    _check_qkv(q, k, v)
    head_dim = q.shape[-1]
    _check_projection(proj_weight, proj_bias, head_dim)
    if cfg.linear_scope != "none":  # "none": the backends read no projection, None stays None
        if proj_weight is None:
            proj_weight = torch.eye(head_dim, device=q.device, dtype=torch.float32)
        if proj_bias is None:
            proj_bias = torch.zeros(head_dim, device=q.device, dtype=proj_weight.dtype)
    with _autocast_disabled(q.device):
        return _run(_load_backend(resolve_backend(backend, q.device)), q, k, v, proj_weight, proj_bias, cfg, scale,
                    key_padding_mask)


def _autocast_disabled(device: torch.device):
    # SLA controls its own precision (float32 statistics, float32 proj_l); an enclosing autocast region must not
    # recast its internals. The output still comes back in the caller's dtype.
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _run(fn, q, k, v, proj_weight, proj_bias, cfg, scale, key_padding_mask):
    kwargs = dict(
        topk=cfg.topk, blkq=cfg.blkq, blkk=cfg.blkk, feature_map=cfg.feature_map,
        linear_scope=cfg.linear_scope, scale=scale,
    )
    if key_padding_mask is None:
        return fn(q, k, v, proj_weight, proj_bias, **kwargs)

    _check_key_padding_mask(key_padding_mask, k)
    if bool((key_padding_mask == key_padding_mask[:1]).all()):
        # One pattern for the whole batch (the usual case: CFG pairs, equal prompts): one call over the kept keys.
        keep = key_padding_mask[0].nonzero().squeeze(-1)
        if keep.numel() == k.shape[2]:
            return fn(q, k, v, proj_weight, proj_bias, **kwargs)
        if keep.numel() > 0:
            return fn(q, k[:, :, keep], v[:, :, keep], proj_weight, proj_bias, **kwargs)
    outputs = []
    for b in range(q.shape[0]):
        keep = key_padding_mask[b].nonzero().squeeze(-1)
        if keep.numel() == 0:
            # No key to attend to: SDPA would return NaN; we return what an empty key set gives the linear branch
            # (proj_l's bias; zero without a linear branch).
            empty = torch.zeros_like(q[b : b + 1])
            outputs.append(empty if cfg.linear_scope == "none" else empty + proj_bias.to(q.dtype))
            continue
        kb, vb = k[b : b + 1, :, keep], v[b : b + 1, :, keep]
        outputs.append(fn(q[b : b + 1], kb, vb, proj_weight, proj_bias, **kwargs))
    return torch.cat(outputs, dim=0)
