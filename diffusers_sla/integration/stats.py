# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Per-layer counters of what each attention module ran: SLA calls with their density, dense calls by reason."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The attribute of each attention module that holds its `LayerStats`.
STATS_ATTR = "_sla_stats"


@dataclass
class LayerStats:
    """What one attention module did since the last reset: SDPA calls sent to SLA, dense calls by reason, and the
    summed density (kept key blocks / all key blocks) of its SLA calls."""

    sla_calls: int = 0
    dense_calls: dict[str, int] = field(default_factory=dict)  # a plain dict: torch.compile cannot build a Counter
    density_sum: float = 0.0
    # Calls inside a torch.compile'd region are not counted (see `record_call`); the last one's route ("sla" or a
    # dense reason) and density (None when it depends on a mask's values) are kept instead.
    compiled_route: str | None = None
    compiled_density: float | None = None

    @property
    def mean_density(self) -> float | None:
        return self.density_sum / self.sla_calls if self.sla_calls else None

    @property
    def total_dense_calls(self) -> int:
        return sum(self.dense_calls.values())

    def reset(self) -> None:
        self.sla_calls = 0
        self.dense_calls.clear()
        self.density_sum = 0.0
        self.compiled_route = self.compiled_density = None


def layer_stats(attn: torch.nn.Module) -> LayerStats:
    stats = attn.__dict__.get(STATS_ATTR)
    if stats is None:
        stats = attn.__dict__[STATS_ATTR] = LayerStats()
    return stats


def record_call(attn: torch.nn.Module, reason: str | None, density: float | None = None) -> None:
    """Count one attention call of `attn`: SLA (`reason` None, with its density) or dense for `reason`.

    Inside a torch.compile'd region a counter would become a guard on its own value, i.e. a recompilation at every
    call until dynamo gives up and runs the region eagerly. There the call only stores its route and density:
    plain writes, which the compiled code replays on every run without guarding on them."""
    stats = layer_stats(attn)
    if torch.compiler.is_compiling():
        stats.compiled_route, stats.compiled_density = reason or "sla", density
    elif reason is None:
        stats.sla_calls += 1
        stats.density_sum += density
    else:
        stats.dense_calls[reason] = stats.dense_calls.get(reason, 0) + 1


def drop_stats(attn: torch.nn.Module) -> None:
    attn.__dict__.pop(STATS_ATTR, None)


def stats_or_empty(attn: torch.nn.Module) -> LayerStats:
    """The module's counters, or empty ones (without creating them on the module)."""
    return attn.__dict__.get(STATS_ATTR) or LayerStats()
