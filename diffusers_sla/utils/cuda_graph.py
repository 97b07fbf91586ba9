# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Capture a call in a CUDA graph: how short sequences shed SLA's host time (Python glue, launches per call)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run `fn` `warmup` times on a side stream (Triton compilation, allocator caches), then capture one call of it.

    -> (graph, what the captured call returned). `graph.replay()` reruns the captured kernels on the same memory: copy
    new inputs into the tensors `fn` reads and read the results from the returned tensors, e.g. for a transformer:

        graph, out = capture_cuda_graph(lambda: transformer(**static_inputs, return_dict=False)[0])
        static_inputs["hidden_states"].copy_(latents); graph.replay()   # out now holds the new output
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs the warm-up off the default stream
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result
