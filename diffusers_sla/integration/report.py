# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_summary` and `reset_sla_stats`: what each SLA-enabled attention module ran since the last reset."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers_sla.config import SLA_MODULE_NAME

from .modules import is_attention_module, join, target_models
from .processor import SLAAttnProcessor
from .routing import DENSE_REASONS
from .stats import layer_stats, stats_or_empty


@dataclass
class LayerSummary:
    path: str
    module_type: str
    sla_calls: int
    dense_calls: dict[str, int]
    mean_density: float | None
    has_sla_layer: bool
    # calls inside torch.compile'd code are not counted: the route ("sla" or a dense reason) and density of the
    # last one (`stats.record_call`)
    compiled_route: str | None = None
    compiled_density: float | None = None

    @property
    def total_calls(self) -> int:
        return self.sla_calls + sum(self.dense_calls.values())


@dataclass
class SLASummary:
    """Per-layer report of what `SLAAttnProcessor` did since the last `reset_sla_stats`. `str(summary)` and
    `summary.table()` give a readable table; `summary.to_dict()` a JSON-friendly form."""

    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def sla_calls(self) -> int:
        return sum(layer.sla_calls for layer in self.layers)

    @property
    def dense_calls(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for layer in self.layers:
            for reason, count in layer.dense_calls.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    @property
    def mean_density(self) -> float | None:
        weighted = [(layer.mean_density, layer.sla_calls) for layer in self.layers if layer.sla_calls]
        calls = sum(n for _, n in weighted)
        return sum(d * n for d, n in weighted) / calls if calls else None

    def __getitem__(self, path: str) -> LayerSummary:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    def to_dict(self) -> dict:
        return {
            "sla_calls": self.sla_calls, "dense_calls": self.dense_calls, "mean_density": self.mean_density,
            "layers": [
                {"path": layer.path, "module_type": layer.module_type, "sla_calls": layer.sla_calls,
                 "dense_calls": dict(layer.dense_calls), "mean_density": layer.mean_density,
                 "has_sla_layer": layer.has_sla_layer, "compiled_route": layer.compiled_route,
                 "compiled_density": layer.compiled_density}
                for layer in self.layers
            ],
        }

    def table(self) -> str:
        # a last column only when some calls ran inside torch.compile'd code, which counts none of them
        compiled = any(layer.compiled_route for layer in self.layers)
        header = ("layer", "SLA calls", "dense calls (reason: n)", "density")
        header += ("compiled route",) if compiled else ()
        rows = [
            (
                layer.path,
                str(layer.sla_calls),
                ", ".join(f"{reason}: {n}" for reason, n in sorted(layer.dense_calls.items())) or "-",
                "-" if layer.mean_density is None else f"{layer.mean_density:.3f}",
            ) + ((_compiled_cell(layer),) if compiled else ())
            for layer in self.layers
        ]
        density = self.mean_density
        rows.append((
            f"total ({len(self.layers)} layers)", str(self.sla_calls),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dense_calls.items())) or "-",
            "-" if density is None else f"{density:.3f}",
        ) + (("(not counted)",) if compiled else ()))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _compiled_cell(layer: LayerSummary) -> str:
    if layer.compiled_route is None:
        return "-"
    if layer.compiled_route != "sla":
        return f"dense ({layer.compiled_route})"
    return "sla" if layer.compiled_density is None else f"sla ({layer.compiled_density:.3f})"


def sla_modules(pipe_or_model):
    for prefix, model in target_models(pipe_or_model):
        for path, attn in model.named_modules():
            if not is_attention_module(attn):
                continue
            if isinstance(getattr(attn, "processor", None), SLAAttnProcessor) or SLA_MODULE_NAME in attn._modules:
                yield join(prefix, path), attn


def sla_summary(pipe_or_model) -> SLASummary:
    """Per layer: SDPA calls routed to SLA, dense calls by reason (see `diffusers_sla.integration.routing`), and the
    mean density (kept key blocks / all key blocks) of its SLA calls. Layers are the attention modules running
    `SLAAttnProcessor`, in module order. Calls inside torch.compile'd code are not counted (a counter there would
    recompile the code at every call); the table's "compiled route" column shows what such calls ran instead."""
    layers = []
    for path, attn in sla_modules(pipe_or_model):
        stats = stats_or_empty(attn)
        layers.append(LayerSummary(
            path=path, module_type=type(attn).__name__, sla_calls=stats.sla_calls,
            dense_calls={reason: stats.dense_calls[reason] for reason in DENSE_REASONS
                         if stats.dense_calls.get(reason)},
            mean_density=stats.mean_density, has_sla_layer=SLA_MODULE_NAME in attn._modules,
            compiled_route=stats.compiled_route, compiled_density=stats.compiled_density,
        ))
    return SLASummary(layers)


def reset_sla_stats(pipe_or_model) -> None:
    """Zero the per-layer counters that `sla_summary` reports."""
    for _, attn in sla_modules(pipe_or_model):
        layer_stats(attn).reset()
