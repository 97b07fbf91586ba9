# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`ops/launch.py`: the launch shortcut takes the compiled kernel Triton picked, and only when Triton would pick it.

On a CPU machine the GPU launch itself cannot happen, so these tests replace the two calls that would reach the
driver: `kernel[grid]` (Triton's own path: it records the call and returns a stand-in compiled kernel) and the
compiled kernel's launcher (it records what it is given). The kernel's signature is a real `@triton.jit` function's.
On a GPU, `kernels/test_attention_kernels.py::test_fast_launches_match_plain_launches` runs the real thing.
"""

from __future__ import annotations

import pytest
import torch

from testing_utils import HAS_TRITON, require_triton

pytestmark = require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(X, Out, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
        pass


class _Compiled:
    """Stands in for a `CompiledKernel`: its launcher records each call."""

    function = "function handle"
    packed_metadata = ("packed",)

    def __init__(self):
        self.launches = []

    @property
    def run(self):
        return lambda *args: self.launches.append(args)


@pytest.fixture
def launcher(monkeypatch):
    from diffusers_sla.ops import launch, tuning

    monkeypatch.setattr(launch, "is_cuda", lambda: True)
    monkeypatch.setattr(launch, "_TRITON_VERSION", launch.FAST_TRITON[0])
    monkeypatch.setattr(tuning, "FAST_LAUNCH", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class _Driver:  # the active driver's stream query, the only other call that needs a GPU
        class active:
            @staticmethod
            def get_current_stream(device):
                return 1234

    monkeypatch.setattr(launch, "driver", _Driver)
    slow_calls, compiled = [], _Compiled()

    def triton_path(*args, grid, warmup, **kwargs):
        slow_calls.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(_kernel, "run", triton_path)
    return launch.Launcher(_kernel), slow_calls, compiled


def _args(n=64, dtype=torch.float16, offset=0):
    x = torch.randn(n + 8, dtype=dtype)[offset:]
    return x, torch.empty(n, dtype=dtype), n, 0.5


def test_the_second_launch_with_the_same_specialization_goes_straight_to_the_compiled_kernel(launcher):
    fast, slow_calls, compiled = launcher
    fast[(4, 2)](*_args(), BLOCK=16)
    assert len(slow_calls) == 1 and not compiled.launches  # the first launch is Triton's own
    x, out, n, scale = _args(n=96)  # other tensors, another n with the same specialization (a multiple of 16)
    fast[(4, 2)](x, out, n, scale, BLOCK=16)
    assert len(slow_calls) == 1 and fast.fast_calls == 1
    # grid, stream, handle, metadata, no launch metadata or hooks, then every parameter in signature order: the
    # runtime arguments, the keyword constexpr and the default of the one not given
    assert compiled.launches == [(4, 2, 1, 1234, "function handle", ("packed",), None, None, None,
                                  x, out, n, scale, 16, True)]


@pytest.mark.parametrize("change", ["int not a multiple of 16", "int equal to 1", "int64", "dtype",
                                    "misaligned pointer", "constexpr", "launch option"])
def test_a_launch_triton_would_specialize_differently_goes_through_triton(launcher, change):
    fast, slow_calls, compiled = launcher
    fast[(1,)](*_args(), BLOCK=16, num_warps=4)
    x, out, n, scale = _args()
    kwargs = dict(BLOCK=16, num_warps=4)
    if change == "int not a multiple of 16":
        n = 17
    elif change == "int equal to 1":
        n = 1
    elif change == "int64":
        n = 2**40
    elif change == "dtype":
        x, out, n, scale = _args(dtype=torch.float32)
    elif change == "misaligned pointer":
        x = _args(offset=1)[0]  # 2 bytes past a 16-byte boundary
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    else:
        kwargs["num_warps"] = 8
    fast[(1,)](x, out, n, scale, **kwargs)
    assert len(slow_calls) == 2 and not compiled.launches
    assert slow_calls[-1][1] == (x, out, n, scale) and slow_calls[-1][2] == kwargs


def test_runtime_arguments_given_by_keyword_always_go_through_triton(launcher):
    fast, slow_calls, compiled = launcher
    x, out, n, _ = _args()
    for scale in (0.5, 0.25):
        fast[(1,)](x, out, n, scale=scale, BLOCK=16)
    assert len(slow_calls) == 2 and not compiled.launches  # scale's value is not in the key: never remembered


def test_installed_launch_hooks_and_the_off_switch_send_every_launch_through_triton(launcher, monkeypatch):
    from diffusers_sla.ops import launch, tuning

    fast, slow_calls, compiled = launcher
    fast[(1,)](*_args(), BLOCK=16)
    hooks = launch.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):  # a Triton whose hook is a plain attribute
        monkeypatch.setattr(launch.knobs.runtime, "launch_enter_hook", lambda metadata: None)
        fast[(1,)](*_args(), BLOCK=16)
    else:
        def profiler_hook(metadata):
            return None

        hooks.add(profiler_hook)
        try:
            fast[(1,)](*_args(), BLOCK=16)
        finally:
            hooks.remove(profiler_hook)
    assert len(slow_calls) == 2  # a profiler's hook sees the launch
    monkeypatch.setattr(tuning, "FAST_LAUNCH", False)
    fast[(1,)](*_args(), BLOCK=16)
    assert len(slow_calls) == 3 and not compiled.launches
    monkeypatch.setattr(tuning, "FAST_LAUNCH", True)
    fast[(1,)](*_args(), BLOCK=16)
    assert len(compiled.launches) == 1


def test_without_a_gpu_driver_every_launch_is_tritons_own(launcher, monkeypatch):
    from diffusers_sla.ops import launch

    fast, slow_calls, compiled = launcher
    monkeypatch.setattr(launch, "is_cuda", lambda: False)  # the interpreter, or no GPU
    for _ in range(3):
        fast[(1,)](*_args(), BLOCK=16)
    assert len(slow_calls) == 3 and not compiled.launches and fast.fast_calls == 0
