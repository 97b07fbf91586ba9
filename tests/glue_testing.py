# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the diffusers glue's tests (test_processor, test_routing, test_install)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import forward_output

from diffusers_sla.integration import logs


def run_eval(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return forward_output(model, inputs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def loss_gradients(model, inputs) -> dict[str, torch.Tensor]:
    """The gradients of one training step (loss: the mean square of the output), by parameter name."""
    model.zero_grad(set_to_none=True)
    forward_output(model, inputs).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def uncompile(model) -> None:
    for module in model.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()


def eager_and_compiled_gradients(model, inputs, **compile_kwargs) -> tuple[dict, dict]:
    """`loss_gradients` eagerly, then with the model's repeated blocks compiled with `aot_eager` (dynamo and
    autograd's tracing, no code generation); the model is left uncompiled."""
    eager = loss_gradients(model, inputs)
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(backend="aot_eager", **compile_kwargs)
        compiled = loss_gradients(model, inputs)
    finally:
        uncompile(model)
    return eager, compiled


@pytest.fixture(autouse=True)
def fresh_logs():
    # Log-once memory is per process; tests that count log lines need a clean slate. (Autouse in every test module
    # that imports it.)
    logs._logged_once.clear()
    yield
