# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Kernel launches with less host work per call.

An eager SLA forward launches nine kernels, and their Python side can take longer than the GPU work they queue, so
that the eager call waits on the host.
Most of a launch's host time is `JITFunction.run` working out, again at every call, which compiled kernel the
arguments select: each argument's specialization (dtype, 16-byte alignment, whether an integer is 1 or a multiple
of 16, ...), a string cache key, the option checks.

`Launcher(kernel)[grid](*args, **constexprs)` is a drop-in for `kernel[grid](...)`. The first call with a given
specialization goes through `kernel[grid]` (which compiles or finds the kernel, as always) and remembers the compiled
kernel under a key built from the same facts Triton specializes on, computed more cheaply; later calls with that key
hand the arguments straight to the compiled kernel's launcher. The key is never coarser than Triton's (every fact
Triton looks at is in it), so a remembered kernel is the one `kernel[grid]` would have picked.

Plain `kernel[grid]` is used instead whenever the shortcut could differ from it: under the interpreter, with launch
hooks installed (profilers), for arguments of a kind the key does not know, and on Triton releases whose launch
interface has not been checked (`FAST_TRITON`).
"""

from __future__ import annotations

import inspect

import torch
import triton
from triton.runtime import driver

from . import tuning
from .kernels.common import is_cuda

try:
    from triton import knobs
except ImportError:  # pragma: no cover - older Triton
    knobs = None

# Releases whose `CompiledKernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
# enter_hook, exit_hook, *args)` (the call `JITFunction.run` ends with) was read and checked, and whose
# specialization (`native_specialize_impl`) gives the same facts for every kind of argument `_arg_key` covers.
FAST_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_INT32 = (-(2**31), 2**31)


def _arg_key(arg):
    """What Triton specializes a runtime argument on, or raises TypeError for a kind this key does not cover."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):  # before int: bool is an int
        return bool
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, _INT32[0] <= arg < _INT32[1]
    if isinstance(arg, float):
        return float
    if arg is None:
        return None
    base = getattr(arg, "base", None)  # a host-side tensor descriptor: its dtype, box and shared-memory layout
    if isinstance(base, torch.Tensor) and hasattr(arg, "block_shape"):
        return (base.dtype, tuple(arg.block_shape), arg.layout, getattr(arg, "padding", None),
                getattr(arg, "round_f32_to_tf32", None))
    raise TypeError(type(arg).__name__)


def _unhooked(hook) -> bool:
    # no launch hook: None, or (Triton 3.6+) a hook chain with nothing in it
    return hook is None or getattr(hook, "calls", None) == []


class Launcher:
    """`Launcher(kernel)[grid](*runtime_args, **constexprs_and_options)`: `kernel[grid](...)` with the compiled kernel
    remembered per specialization (module docstring). Runtime arguments go positionally, constexprs and launch
    options (num_warps, ...) by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel  # under the interpreter an `InterpretedFunction`, always launched as `kernel[grid]`
        self._compiled = {}
        self.fast_calls = 0  # launches that took the shortcut (tests read it)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _usable(self) -> bool:
        return (tuning.FAST_LAUNCH and _TRITON_VERSION in FAST_TRITON and is_cuda() and knobs is not None
                and _unhooked(knobs.runtime.launch_enter_hook) and _unhooked(knobs.runtime.launch_exit_hook)
                and not getattr(self.kernel, "pre_run_hooks", None))

    def _launch(self, grid, args, kwargs):
        if callable(grid) or not self._usable():
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        try:
            key = (device, tuple(map(_arg_key, args)), tuple(kwargs.items()))
            entry = self._compiled.get(key)
        except TypeError:  # an argument of another kind, or an unhashable keyword value
            return self.kernel[grid](*args, **kwargs)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None:
                self._compiled[key] = self._entry(compiled, args, kwargs)
            return compiled
        compiled, tail = entry
        if compiled is None:  # a keyword names a runtime argument: its value is not in the key
            return self.kernel[grid](*args, **kwargs)
        self.fast_calls += 1
        stream = driver.active.get_current_stream(device)
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
        return compiled

    def _entry(self, compiled, args, kwargs):
        # the launcher takes every parameter in signature order, constexprs included: the positional runtime
        # arguments first, then the keyword values (fixed for this key) and the defaults
        params = inspect.signature(self.kernel.fn).parameters
        constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}  # as Triton reads it
        rest = list(params)[len(args):]
        if any(name in kwargs and name not in constexpr for name in rest):
            return None, ()
        tail = tuple(kwargs[name] if name in kwargs else params[name].default for name in rest)
        compiled.run  # noqa: B018 - loads the module and function handles now, as `kernel[grid]` did
        return compiled, tail
