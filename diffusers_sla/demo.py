# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The offline demo behind `diffusers-sla demo`: a tiny pipeline generates with dense attention and with SLA, the
results are saved side by side, and the SLA weights go through `save_pretrained` / `from_pretrained` and back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import SLA_WEIGHTS_NAME, SLAConfig
from .integration.install import enable_sla
from .integration.layer import iter_sla_layers
from .integration.report import reset_sla_stats, sla_summary
from .tiny import build_tiny_pipeline, tiny_prompt_embeddings


@dataclass
class DemoResult:
    output_dir: Path
    dense_seconds: float
    sla_seconds: float
    relative_difference: float  # ‖SLA − dense‖ / ‖dense‖ over the decoded pixels
    psnr_db: float
    mean_density: float | None
    reload_max_abs_diff: float  # reloaded pipeline vs the SLA run: 0.0 when the SLA weights travelled intact
    files: list[Path]


def _generate(pipe, family: str, prompt: dict, steps: int, height: int, width: int, frames: int, seed: int):
    kwargs = dict(prompt, height=height, width=width, num_inference_steps=steps, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    if family == "wan":
        return pipe(num_frames=frames, guidance_scale=5.0, **kwargs).frames[0]  # (frames, H, W, 3) in [0, 1]
    return pipe(guidance_scale=3.5, **kwargs).images  # (1, H, W, 3)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _difference_gain(dense: np.ndarray, sla: np.ndarray) -> float:
    """Brightness gain that maps the largest |SLA - dense| to white, so that small differences stay visible."""
    largest = float(np.abs(sla - dense).max())
    return 1.0 / largest if largest > 0 else 1.0


def _side_by_side(dense: np.ndarray, sla: np.ndarray) -> np.ndarray:
    """dense | SLA | |difference| x gain, for each frame: (frames, H, 3W + 16, 3)."""
    diff = np.clip(np.abs(sla - dense) * _difference_gain(dense, sla), 0.0, 1.0)
    gap = np.ones((*dense.shape[:2], 8, 3), dtype=dense.dtype)
    return np.concatenate([dense, gap, sla, gap, diff], axis=2)


def _save_images(dense: np.ndarray, sla: np.ndarray, output_dir: Path, family: str) -> list[Path]:
    from PIL import Image

    frames = _to_uint8(_side_by_side(dense, sla))
    middle = output_dir / f"{family}_dense_vs_sla.png"
    Image.fromarray(frames[len(frames) // 2]).save(middle)
    files = [middle]
    if len(frames) > 1:
        gif = output_dir / f"{family}_dense_vs_sla.gif"
        pictures = [Image.fromarray(frame) for frame in frames]
        pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=120, loop=0)
        files.append(gif)
    return files


def run_demo(
    family: str = "wan",
    output_dir: str | Path = "sla-demo-output",
    *,
    topk: float = 0.2,
    steps: int = 4,
    height: int = 256,
    width: int = 256,
    frames: int = 9,
    seed: int = 0,
    device: str = "cpu",
    print_fn=print,
) -> DemoResult:
    """Dense vs SLA on a tiny pipeline; see the module docstring. Returns the measured figures."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(family, seed=seed).to(device)
    pipe.set_progress_bar_config(desc="denoising")
    prompt = tiny_prompt_embeddings(pipe, seed=seed)
    prompt = {name: tensor.to(device) for name, tensor in prompt.items()}
    size = f"{frames} frames of {height}x{width}" if family == "wan" else f"{height}x{width}"
    print_fn(f"[1/4] tiny {type(pipe).__name__} (random weights, built from a config), {size}, {steps} steps, "
             f"on {device}")

    start = time.perf_counter()
    dense = _generate(pipe, family, prompt, steps, height, width, frames, seed)
    dense_seconds = time.perf_counter() - start

    config = SLAConfig(topk=topk)
    enable_sla(pipe, config)
    # The projections start at zero. Stand-ins for fine-tuned weights, so that the save/reload check below has
    # something non-trivial to carry: small random values (a real model gets them from `examples/train_sla.py`).
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(pipe.transformer):
            for parameter in layer.proj_l.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    reset_sla_stats(pipe)
    print_fn(f"[2/4] SLA enabled: topk={config.topk}, blocks {config.blkq}x{config.blkk}, "
             f"feature map {config.feature_map}")
    start = time.perf_counter()
    sla = _generate(pipe, family, prompt, steps, height, width, frames, seed)
    sla_seconds = time.perf_counter() - start
    summary = sla_summary(pipe)
    print_fn(summary.table())

    difference = float(np.linalg.norm(sla - dense) / np.linalg.norm(dense))
    mse = float(np.mean((sla - dense) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
    print_fn(f"dense: {dense_seconds:.2f} s, SLA: {sla_seconds:.2f} s (a CPU and a tiny model say nothing of GPU "
             f"speed: see the README's benchmarks); SLA vs dense: relative difference {difference:.3f}, "
             f"PSNR {psnr:.1f} dB")

    print_fn("[3/4] save_pretrained -> from_pretrained -> enable_sla")
    saved = output_dir / f"{family}_pipeline"
    pipe.save_pretrained(saved)
    sidecar = saved / "transformer" / SLA_WEIGHTS_NAME
    if not sidecar.is_file():
        raise RuntimeError(f"save_pretrained did not write {sidecar}")
    # The tiny pipelines have no text encoders (prompt embeddings are passed in): tell from_pretrained so.
    absent = {name: None for name, component in pipe.components.items() if component is None}
    reloaded = type(pipe).from_pretrained(saved, **absent).to(device)
    reloaded.set_progress_bar_config(desc="denoising (reloaded)")
    enable_sla(reloaded)
    again = _generate(reloaded, family, prompt, steps, height, width, frames, seed)
    reload_diff = float(np.abs(again - sla).max())
    print_fn(f"wrote {sidecar} ({sidecar.stat().st_size / 1024:.1f} KiB); reloaded pipeline vs SLA run: "
             f"max abs difference {reload_diff:.2e}")

    files = _save_images(dense, sla, output_dir, family)
    print_fn(f"[4/4] images (dense | SLA | |difference| x {_difference_gain(dense, sla):.0f}): "
             + ", ".join(str(path) for path in files))
    return DemoResult(output_dir, dense_seconds, sla_seconds, difference, psnr, summary.mean_density, reload_diff,
                      files)
