# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Which kernel family runs each pass: the Hopper (Gluon) kernels or their portable Triton twins.

Both compute the same function and differ only in rounding order (the GPU checks in `benchmarks/kernel.py` and the GPU
tests compare them); the choice is logged once per reason on a Hopper GPU, so that a slower portable run is never
silent.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import gluon_compat, tuning
from .buffers import Geometry
from .kernels import gluon_bwd, gluon_fwd
from .kernels.common import is_cuda

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def on_hopper(q: torch.Tensor) -> bool:
    return is_cuda() and q.is_cuda and _capability(q.device.index) == (9, 0)


def choose_kernel(part: str, q: torch.Tensor, hopper_reason) -> str:
    """"hopper" (Gluon, asynchronous tensor-core products) or "portable" (Triton) for one part of the operator.
    `tuning.kernel_switch(part)`: "auto" (default: hopper wherever it can run, on a Triton release it was checked on
    with a GPU, `gluon_compat.GPU_CHECKED`), "portable", or "hopper" (an error where it cannot run, with the reason;
    on any Triton whose Gluon has the names the kernels use). hopper_reason() -> None, or why Gluon cannot run it. On
    a Hopper GPU the choice and its reason are logged once."""
    env = tuning.KERNEL_ENV[part]
    choice = tuning.kernel_switch(part)
    if choice == "portable":
        return "portable"
    hopper = on_hopper(q)
    reason = hopper_reason() if hopper else "needs a CUDA device of compute capability 9.0 (Hopper)"
    if reason is None:
        unchecked = gluon_compat.auto_reason()
        if choice == "hopper":
            log_choice_once(part, "hopper", f"{env}=hopper" + (f"; note: {unchecked}" if unchecked else ""))
            return "hopper"
        if unchecked is None:
            log_choice_once(part, "hopper", f"Triton {gluon_compat.version_text()} is GPU-checked for them")
            return "hopper"
        reason = unchecked
    elif choice == "hopper":
        raise ValueError(f"{env}=hopper cannot run this call: {reason}")
    if hopper:
        log_choice_once(part, "portable", reason)
    return "portable"


@functools.lru_cache(maxsize=None)
def log_choice_once(part: str, kernel: str, reason: str) -> None:
    # said once per choice and reason, not per call: the portable kernel gives the same results, slower
    if kernel == "hopper":
        logger.info("SLA %s on this Hopper GPU runs the Hopper (Gluon) kernels (%s).", part, reason)
    else:
        logger.warning("SLA %s on a Hopper GPU runs the portable Triton kernel (%s).", part, reason)


def forward_kernel(q: torch.Tensor, g: Geometry, blkq: int, blkk: int, dot_precision: str) -> str:
    """The forward kernel: `gluon_fwd._attn_fwd_hopper` or `triton_fwd.attn_fwd` (`choose_kernel`)."""
    return choose_kernel("forward", q, lambda: gluon_fwd.supports(q.element_size(), blkq, blkk, g.block_d, g.D,
                                                                  g.kept, dot_precision))


def backward_kernel(q: torch.Tensor, g: Geometry, blkq: int, blkk: int, dot_precision: str) -> str:
    """The backward's dK/dV and dQ kernels: `gluon_bwd`'s two or the two program kinds of `triton_bwd.attn_bwd`
    (`choose_kernel`). The preprocess and the proj_l gradients are Triton kernels on every device."""
    return choose_kernel("backward", q, lambda: gluon_bwd.supports(q.element_size(), blkq, blkk, g.block_d, g.D,
                                                                   dot_precision))
