# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_dense_steps`: the first denoising steps of a pipeline call with dense attention, the later ones with SLA."""

from __future__ import annotations

import contextlib
import functools
from numbers import Integral

from .modules import DENSE_STEP_ATTR
from .report import sla_modules


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
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)):
        raise ValueError(f"`pipe`: sla_dense_steps needs a diffusers pipeline with a `scheduler`, got "
                         f"{type(pipe).__name__}.")
    modules = [attn for _, attn in sla_modules(pipe)]
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
