# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sparse_linear_attention`: the public functional form of SLA, and the one registry of its backends.

Backends are plain functions with the signature of `reference.sla_reference`:

    fn(q, k, v, proj_weight, proj_bias, *, topk, blkq, blkk, feature_map, linear_scope, scale) -> o

and, for a fusion other than "sla" (`ops/fusion.py`), also `fusion=`, `ratio_weight=`, `ratio_bias=` keywords.

They see dense (B, H, L, D) tensors of one dtype; input checks, key padding masks and the missing-projection default
are handled here, once, for all of them. With `linear_scope="none"` the projection may be None: backends never read it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Callable

import torch

from ..config import SLAConfig
from ..utils.import_utils import (
    is_triton_available,
    load_on_first_use,
    triton_interpreting,
    triton_kernels_run_on,
)
from .selection import forced_block_range

logger = logging.getLogger(__name__)

# name -> "module:function", imported on first use so that `import diffusers_sla` never needs Triton.
_BACKENDS: dict[str, str] = {
    "torch": "diffusers_sla.ops.reference:sla_reference",
    "triton": "diffusers_sla.ops.autograd:sla_triton",
}
BACKEND_NAMES = ("auto", *_BACKENDS)


def _load_backend(name: str) -> Callable:
    return load_on_first_use(_BACKENDS[name])


def preload_backends() -> None:
    """Import every backend whose dependencies are installed (Triton's only where Triton is), so that a layer's first
    call inside torch.compile'd code finds its backend loaded. Called when a layer is built."""
    for name in _BACKENDS:
        if name != "triton" or is_triton_available():
            try:
                _load_backend(name)
            except ImportError:  # a broken install: the error comes back, unchanged, when that backend is used
                pass


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'auto' -> 'triton' on CUDA when Triton is installed, else 'torch'. An explicit choice that cannot run raises.
    Under the Triton interpreter bfloat16 runs the PyTorch operator ('auto') or is refused ('triton'): the
    interpreter's bfloat16 matrix products are wrong."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
    interpreted_bf16 = dtype == torch.bfloat16 and triton_interpreting()
    if backend == "auto":
        if device.type == "cuda" and triton_kernels_run_on(device) and not interpreted_bf16:
            return "triton"
        return "torch"
    if backend == "triton" and interpreted_bf16:
        raise ValueError(
            "backend='triton' cannot compute bfloat16 under TRITON_INTERPRET=1 (the interpreter's bfloat16 matrix "
            "products are wrong): use float16 or float32 inputs, or backend='torch'."
        )
    if backend == "triton" and not triton_kernels_run_on(device):
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
    if q.shape[-1] == 0:
        raise ValueError(f"head_dim must be positive, got 0 (q of shape {tuple(q.shape)}).")
    if k.shape[2] == 0 and q.shape[0] * q.shape[1] * q.shape[2] > 0:
        raise ValueError(
            f"`k` and `v` must hold at least one key: got Lk=0 for {q.shape[2]} queries (attention over no keys is "
            "undefined)."
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}.")


def _check_projection(proj_weight, proj_bias, q: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    for name, x, shape in (("proj_weight", proj_weight, (head_dim, head_dim)), ("proj_bias", proj_bias, (head_dim,))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor or None, got {type(x).__name__}.")
        if tuple(x.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {tuple(x.shape)}.".replace(",)", ")"))
        if not x.is_floating_point():
            raise ValueError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")
        # A tensor elsewhere (another GPU, `meta`) would be read as garbage by the kernels: refuse it.
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on q's device ({q.device}), got {x.device}.")


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        _bad_scale(scale)
    if torch.compiler.is_compiling():
        return  # a float traced as a symbol has no value to test here; eager calls test it
    if not math.isfinite(scale) or scale <= 0:
        _bad_scale(scale)


def _bad_scale(scale) -> None:
    raise ValueError(f"`scale` must be a positive finite number or None (head_dim ** -0.5), got {scale!r}.")


def _check_ratio(ratio_weight, ratio_bias, head_dim: int) -> None:
    if ratio_weight is None or ratio_bias is None:
        raise ValueError("`fusion='ratio'` needs `ratio_weight` (head_dim,) and `ratio_bias` (1,): the gate's "
                         "parameters (`SparseLinearAttention` owns them).")
    if tuple(ratio_weight.shape) != (head_dim,) or tuple(ratio_bias.shape) != (1,):
        raise ValueError(f"`ratio_weight` must have shape ({head_dim},) and `ratio_bias` (1,), got "
                         f"{tuple(ratio_weight.shape)} and {tuple(ratio_bias.shape)}.")


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
    ratio_weight: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    forced_keys: tuple[int, int] | None = None,
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
        ratio_weight, ratio_bias (`torch.Tensor`, *optional*): (head_dim,) and (1,) float32 parameters of the
            `fusion="ratio"` gate `sigmoid(q . ratio_weight + ratio_bias)`; required with that fusion, unused
            otherwise.
        forced_keys (`tuple`, *optional*): a key range `(start, end)` (token indices into Lk, before any
            `key_padding_mask` is applied) whose key blocks every query block attends to exactly, e.g. a joint
            attention's text tokens. `topk` then applies to the other key blocks, the forced ones come on top
            (`selection.num_kept_blocks`).

    Returns:
        `torch.Tensor` of shape (batch, heads, Lq, head_dim) and q's dtype.
    """
    cfg = SLAConfig.coerce(config, **overrides)
    _check_qkv(q, k, v)
    head_dim = q.shape[-1]
    _check_projection(proj_weight, proj_bias, q)
    _check_scale(scale)
    if cfg.fusion == "ratio":
        _check_ratio(ratio_weight, ratio_bias, head_dim)
    if cfg.linear_scope != "none":  # "none": the backends read no projection, None stays None
        if proj_weight is None:
            proj_weight = torch.eye(head_dim, device=q.device, dtype=torch.float32)
        if proj_bias is None:
            proj_bias = torch.zeros(head_dim, device=q.device, dtype=proj_weight.dtype)
    name = resolve_backend(backend, q.device, q.dtype)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, k)
    if forced_keys is not None:
        start, end = (int(x) for x in forced_keys)
        if not 0 <= start <= end <= k.shape[2]:
            raise ValueError(f"`forced_keys` must be (start, end) with 0 <= start <= end <= Lk={k.shape[2]}, got "
                             f"{forced_keys!r}.")
        forced_keys = (start, end) if end > start else None
    if q.numel() == 0:
        return _empty_output(q, k, v, *((proj_weight, proj_bias) if cfg.linear_scope != "none" else (None, None)))
    with _autocast_disabled(q.device):
        return _run(_load_backend(name), q, k, v, proj_weight, proj_bias, cfg, scale, key_padding_mask, forced_keys,
                    ratio_weight, ratio_bias)


def _empty_output(q, k, v, proj_weight, proj_bias) -> torch.Tensor:
    # No query (batch, heads or Lq of 0): an empty output, still attached to every input so that backward gives
    # each of them a (zero) gradient.
    attached = sum(x.sum() for x in (k, v, proj_weight, proj_bias) if x is not None).to(q.dtype) * 0
    return q * 0 + attached


def _autocast_disabled(device: torch.device):
    # SLA controls its own precision (float32 statistics, float32 proj_l); an enclosing autocast region must not
    # recast its internals. The output still comes back in the caller's dtype.
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _forced(forced_keys, blkk: int, keep: torch.Tensor | None = None):
    """`forced_keys` as the backends' `forced_blocks` argument, counted among the kept keys `keep` (bool (Lk,))."""
    if forced_keys is None:
        return {}
    start, end = forced_keys
    if keep is not None:  # the range among the keys that remain once the masked ones are dropped
        start, end = int(keep[:start].sum()), int(keep[:end].sum())
    return {"forced_blocks": forced_block_range(start, end, blkk)} if end > start else {}


def _run(fn, q, k, v, proj_weight, proj_bias, cfg, scale, key_padding_mask, forced_keys=None, ratio_weight=None,
         ratio_bias=None):
    kwargs = dict(
        topk=cfg.topk, blkq=cfg.blkq, blkk=cfg.blkk, feature_map=cfg.feature_map,
        linear_scope=cfg.linear_scope, scale=scale,
    )
    if cfg.fusion != "sla":  # the default call stays exactly what it was
        kwargs.update(fusion=cfg.fusion, ratio_weight=ratio_weight, ratio_bias=ratio_bias)
    if key_padding_mask is None:
        return fn(q, k, v, proj_weight, proj_bias, **kwargs, **_forced(forced_keys, cfg.blkk))

    if bool((key_padding_mask == key_padding_mask[:1]).all()):
        # One pattern for the whole batch (the usual case: CFG pairs, equal prompts): one call over the kept keys.
        keep = key_padding_mask[0].nonzero().squeeze(-1)
        forced = _forced(forced_keys, cfg.blkk, key_padding_mask[0])
        if keep.numel() == k.shape[2]:
            return fn(q, k, v, proj_weight, proj_bias, **kwargs, **forced)
        if keep.numel() > 0:
            return fn(q, k[:, :, keep], v[:, :, keep], proj_weight, proj_bias, **kwargs, **forced)
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
        forced = _forced(forced_keys, cfg.blkk, key_padding_mask[b])
        outputs.append(fn(q[b : b + 1], kb, vb, proj_weight, proj_bias, **kwargs, **forced))
    return torch.cat(outputs, dim=0)
