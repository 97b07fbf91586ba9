# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/e2e_wan.py`'s in-model split of the GPU time (which kernel is self-attention, cross-attention or the
rest of the model) and the bound it prints, read back by `benchmarks/render_results.py`.

The profiler events are stand-ins with the fields torch.profiler's `FunctionEvent` has (name, parent op, input
shapes, the kernels an op launched, device-side events): the GPU run itself needs a GPU.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch.autograd.profiler_util import Kernel

from benchmarks import e2e_wan

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def _op(name, parent=None, shapes=(), kernel_ms=()):
    return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=[list(s) for s in shapes], device_type=CPU,
                           kernels=[Kernel(f"k{i}", 0, ms * 1e3) for i, ms in enumerate(kernel_ms)], device_time=0)


def _device(ms, annotation=False):
    return SimpleNamespace(name="kernel", device_type=CUDA, device_time=ms * 1e3, is_user_annotation=annotation,
                           kernels=[])


def test_kernels_are_split_by_the_op_that_launched_them():
    block = _op("WanTransformerBlock")
    dense_self = _op("aten::_scaled_dot_product_cudnn_attention", block,
                     [(1, 12, 32760, 128), (1, 12, 32760, 128)], [10.0])
    dense_cross = _op("aten::_scaled_dot_product_cudnn_attention", block, [(1, 12, 32760, 128), (1, 12, 512, 128)],
                      [0.5])
    marked_cross = _op("e2e::cross_attention", block)
    copy_in_cross = _op("aten::copy_", marked_cross, kernel_ms=[0.25])  # no SDPA op, but inside a marked range
    sla = _op("diffusers_sla::sla_fwd", block)
    sla_kernel = _op("cuLaunchKernel-like child", sla, kernel_ms=[1.0, 0.5])
    marked_self = _op("e2e::self_attention", block)
    glue = _op("aten::mm", marked_self, kernel_ms=[0.125])  # SLA's torch glue: self-attention too
    linear = _op("aten::addmm", block, kernel_ms=[3.0])
    events = [block, dense_self, dense_cross, marked_cross, copy_in_cross, sla, sla_kernel, marked_self, glue, linear]
    claimed = 10.0 + 0.5 + 0.25 + 1.5 + 0.125 + 3.0
    events += [_device(claimed + 2.0), _device(99.0, annotation=True)]  # 2 ms no op claims; annotations not counted
    split = e2e_wan.gpu_time_split(events)
    assert split["self"] == 10.0 + 1.5 + 0.125
    assert split["cross"] == 0.5 + 0.25
    assert split["unattributed"] == 2.0
    assert split["rest"] == 3.0 + 2.0
    assert split["total"] == claimed + 2.0


def test_the_bound_is_the_dense_forwards_gpu_time_over_what_is_left_without_self_attention():
    split = {"sdpa-cudnn": dict(total=613.0, self=310.0, cross=31.0, rest=272.0),
             "SLA topk=0.05": dict(total=316.0, self=41.6, cross=5.4, rest=269.0)}
    lines = e2e_wan.inmodel_lines(split)
    assert "| sdpa-cudnn | 613.0 | 310.0 | 31.0 | 272.0 | 51% |" in lines
    (bound,) = [line for line in lines if "bounds the forward" in line]
    assert f"at {613 / (613 - 310):.2f}x" in bound and f"SLA topk=0.05 stands at {613 / 316:.2f}x" in bound
    # what `render_results.py` reads out of the log (share and bound, not SLA's standing)
    found = re.search(r"sdpa-cudnn in model: self-attention is (\d+)% .* bounds the forward at ([\d.]+)x", bound)
    assert found.groups() == ("51", f"{613 / 303:.2f}")
    compiled = e2e_wan.inmodel_lines(split, " (compiled)")
    assert any(line.startswith("sdpa-cudnn (compiled) in model: self-attention is 51%") for line in compiled)


def test_kernels_a_runtime_stall_lists_again_are_counted_once():
    """The profiler lists kernels launched while CUDA's command buffer was full a second time, under a "Command Buffer
    Full" event inside the op: counted there too, they were attributed twice (715.8 ms claimed against 626.5 ms of
    kernels on the GPU, benchmarks/runs/e2e-wan-h100)."""
    block = _op("WanTransformerBlock")
    sdpa = _op("aten::_scaled_dot_product_cudnn_attention", block, [(1, 12, 4096, 128), (1, 12, 4096, 128)])
    cudnn = _op("aten::_cudnn_attention_forward", sdpa, kernel_ms=[5.0])
    stall = _op("Command Buffer Full", cudnn, kernel_ms=[5.0])
    linear = _op("aten::addmm", block, kernel_ms=[2.0])
    split = e2e_wan.gpu_time_split([block, sdpa, cudnn, stall, linear, _device(7.0)])
    assert split["self"] == 5.0 and split["rest"] == 2.0 and split["total"] == 7.0


def test_sdpa_calls_are_split_by_their_shapes_and_sla_layers_by_their_range():
    from torch.profiler import ProfilerActivity, profile

    from diffusers_sla import SLAConfig, SparseLinearAttention

    q, k_self, k_cross = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 3, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k_self, k_self)
        torch.nn.functional.scaled_dot_product_attention(q, k_cross, k_cross)
    kinds = [e2e_wan._attention_kind(e) for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert kinds == ["self", "cross"]

    original = SparseLinearAttention.forward
    layer = SparseLinearAttention(8, SLAConfig(topk=0.5, blkq=32, blkk=32))
    x = torch.randn(1, 2, 128, 8)
    with e2e_wan.marked_sla_layers(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x, x, x)
    assert SparseLinearAttention.forward is original
    inside = [e for e in prof.events() if e.name.startswith("aten::") and e2e_wan._attention_kind(e) == "self"]
    assert inside, "the SLA layer's ops should sit in the self-attention range"
