# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the SLA weights' tests (test_weights, test_hooks, test_hub, test_converters)."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model

from diffusers_sla.integration.install import enable_sla
from diffusers_sla.weights.io import get_sla_state_dict

BASE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def randomize_sla(model, seed: int) -> None:
    """Random non-zero SLA weights (large enough to change the output visibly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in get_sla_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


def sla_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_sla_state_dict(model).items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def enabled_tiny(family: str, seed: int = 0, sla_seed: int | None = None, **overrides):
    tiny = build_tiny_model(family, seed=seed)
    enable_sla(tiny.model, **{**TEST_SLA_OVERRIDES, **overrides})
    if sla_seed is not None:
        randomize_sla(tiny.model, sla_seed)
    return tiny


def safetensors_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def rewrite(src, dst, *, drop=(), add=None, replace=None, metadata_update=None, metadata=True) -> None:
    """Copy an SLA file with some entries or metadata changed: the bad files of the tests below."""
    with safe_open(str(src), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in drop}
    tensors.update(add or {})
    for key, fn in (replace or {}).items():
        tensors[key] = fn(tensors[key])
    meta.update(metadata_update or {})
    save_file(tensors, str(dst), metadata=meta if metadata else None)
