# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Quality study: what SLA fine-tuning keeps, at small scale, on one GPU (the paper's ablation, arXiv 2509.24006).

A `WanTransformer3DModel` (6 layers, 4 heads of 64, 6.9M parameters) is trained from scratch with dense attention
(the teacher) on procedurally generated videos: one shape (disc, square, triangle, plus, ring, diamond) of random
size and brightness bouncing around a 32x32 frame, conditioned on its class through a one-token text embedding.
Training is flow matching as diffusers' `FlowMatchEulerDiscreteScheduler` defines it (its sigmas and timesteps,
x_t = (1 - sigma) x0 + sigma noise, velocity target noise - x0); samples are drawn with that scheduler from fixed
noise.
Every variant is then fine-tuned from the teacher with the same loss, steps, learning rate, seeds and data:

    full          dense attention (tuned too, so that tuning itself is not credited to SLA)
    sla_K         SLA, topk K %                       sparse_K   the sparse branch alone (no linear branch)
    mass_K        SLA with fusion "mass", topk K %    ratio_K    SLA with fusion "ratio" (docs/fusion.md)
                  (fusion rows at the preset's `fusion_topks`: 5 % and a sparser 3 %, with sla_3 and sparse_3 beside)
    linear_only   every key block through the linear branch and proj_l (a study-only path, not in the package)
    teacher, sla_K_untuned, mass_K_untuned: the teacher itself and SLA (fusion "sla" / "mass") installed on it
                  without tuning (evaluated, not tuned, at the teacher stage; a tuned row's first curve point is
                  the same number); sla_K_lsfit_untuned: SLA with proj_l set to the teacher probe's least-squares
                  fit (see Diagnostics)

Diagnostics, so that a result can be explained: in the teacher, per layer, the attention mass outside the selected
blocks, the part of the output the sparse branch misses, and how much of it the best (ridge least-squares) proj_l
over the linear branch explains, on videos held out from the fit; after tuning, ||proj_l(linear)|| / ||sparse||,
proj_l's weight size and gradient norms, and the validation loss with proj_l zeroed. Recipe changes run beside the
main rows under `--tag NAME` (`--proj-l-lr-mult`, `--proj-l-init lsfit`, `--linear-scope`, `--feature-map`,
`--objective distill`, `--steps`, `--lr`).

Stages (each resumable: rows already in the log are skipped; each stops before --time-budget-s and writes what it has;
the teacher checkpoints are cached under --cache, an ignored folder):

    python -m benchmarks.quality teacher --length 4k  --out OUT
    python -m benchmarks.quality tune    --length 4k  --out OUT
    python -m benchmarks.quality teacher --length 16k --out OUT --init-from 4k   # starts from the 4K teacher
    python -m benchmarks.quality tune    --length 16k --out OUT
    python -m benchmarks.quality render  --out OUT                               # CPU: metrics, table, figures

`OUT/quality.json` holds every number (losses, curves, diagnostics, wall times, GPU and versions); `OUT/samples.pt`
the generated videos (uint8). `render` computes the library metrics from them (PSNR/SSIM against the teacher's
samples with scikit-image; a scikit-learn shape classifier trained on the generator's frames scores the generated
frames against their conditioning class) and writes `quality_table.md`, `quality_metrics.json`, `quality_loss.png`
and `quality_samples_<length>.png` into --figures. The GPU stages need only torch and diffusers. Presets: `study`
(the GPU study), `cpu` (a smaller look on a CPU), `toy` (the smoke test).

Run from the repository's root (`python -m benchmarks.quality ...`), as every script of `benchmarks/` is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ("disc", "square", "triangle", "plus", "ring", "diamond")
# the teacher's data and noise streams; tuning seeds are 0, 1, 2, ... so they never replay the teacher's batches
TEACHER_SEED = 1000
LOG_NAME = "quality.json"
SAMPLES_NAME = "samples.pt"

# Model, lengths and recipe per preset. "study" is the GPU study; "toy" runs on a CPU in seconds (the smoke test).
# Step counts are sized for ~14 H100-minutes in all; --steps overrides them, the same for every row.
PRESETS = {
    "study": {
        "model": dict(num_layers=6, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, freq_dim=64,
                      text_dim=16),
        # (frames, height, width) of the pixel-space videos; patch (1, 2, 2) -> frames * height/2 * width/2 tokens
        "lengths": {"4k": (16, 32, 32), "16k": (64, 32, 32)},
        "block": 64,
        "topks": (0.05, 0.10),
        # the fusion rows: topk 5 % and a sparser setting (3 %: 97 % sparsity, SLA2's figure), where sla_K and
        # sparse_K rows are added beside them
        "fusion_topks": (0.05, 0.03),
        "teacher_steps": {"4k": 3000, "16k": 600},
        "tune_steps": {"4k": 400, "16k": 200},
        "batch": {"4k": 8, "16k": 2},
        "val_videos": {"4k": 32, "16k": 8},
        "sample_videos": {"4k": 8, "16k": 4},
        "sample_steps": 20,
        # SLA rows are also sampled with their first denoising steps dense (`sla_dense_steps`): 5 of 20
        "dense_sample_steps": 5,
        "eval_every": {"4k": 50, "16k": 25},
        "teacher_eval_every": {"4k": 150, "16k": 50},
        "teacher_lr": 5e-4,
        "tune_lr": 1e-4,
        "seeds": (0, 1, 2),
    },
    # a look on a CPU in ~15 minutes (not the study: one seed, a smaller model and length)
    "cpu": {
        "model": dict(num_layers=4, num_attention_heads=2, attention_head_dim=32, ffn_dim=256, freq_dim=32,
                      text_dim=16),
        "lengths": {"1k": (16, 16, 16)},
        "block": 32,
        "topks": (0.05, 0.10),
        "teacher_steps": {"1k": 800},
        "tune_steps": {"1k": 150},
        "batch": {"1k": 4},
        "val_videos": {"1k": 16},
        "sample_videos": {"1k": 6},
        "sample_steps": 10,
        "eval_every": {"1k": 25},
        "teacher_eval_every": {"1k": 100},
        "teacher_lr": 1e-3,
        "tune_lr": 1e-4,
        "seeds": (0,),
    },
    "toy": {
        "model": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=16,
                      text_dim=8),
        "lengths": {"toy": (4, 16, 16), "toy2": (8, 16, 16)},
        "block": 32,
        "topks": (0.25, 0.5),
        "fusion_topks": (0.25, 0.125),
        "teacher_steps": {"toy": 40, "toy2": 10},
        "tune_steps": {"toy": 8, "toy2": 6},
        "batch": {"toy": 4, "toy2": 2},
        "val_videos": {"toy": 4, "toy2": 2},
        "sample_videos": {"toy": 2, "toy2": 2},
        "sample_steps": 3,
        "dense_sample_steps": 1,
        "eval_every": {"toy": 4, "toy2": 3},
        "teacher_eval_every": {"toy": 4, "toy2": 3},
        "teacher_lr": 2e-3,
        "tune_lr": 5e-4,
        "seeds": (0, 1),
    },
}


def log(*parts) -> None:
    print(" ".join(str(p) for p in parts), flush=True)


# ===== Data: one bouncing shape per video =====


def _bounce(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect positions into [lo, hi] (a ball bouncing off two walls)."""
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u > span, 2 * span - u, u)


def _shape_masks(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Inside-mask of each video's shape at offsets (dx, dy) from its centre; all (n, F, h, w), r and labels (n,)."""
    r = r.view(-1, 1, 1, 1)
    ax, ay = dx.abs(), dy.abs()
    dist = torch.sqrt(dx * dx + dy * dy)
    masks = torch.stack([
        dist <= r,                                                               # disc
        torch.maximum(ax, ay) <= 0.8 * r,                                        # square
        (dy >= -r) & (dy <= 0.7 * r) & (ax <= 0.6 * (dy + r)),                   # triangle (apex up)
        ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r)),               # plus
        (dist <= r) & (dist >= 0.55 * r),                                        # ring
        ax + ay <= r,                                                            # diamond
    ])  # (classes, n, F, h, w)
    index = labels.view(1, -1, 1, 1, 1).expand(1, *masks.shape[1:])
    return masks.gather(0, index)[0].float()


def make_videos(n: int, frames: int, height: int, width: int, generator: torch.Generator,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`n` videos (n, 1, frames, height, width) in [-1, 1] and their class labels (n,).

    Random draws come from `generator`, on its device (a CPU generator gives the same videos on every device; a
    CUDA one keeps training steps free of host-to-device copies, which would synchronise); rendering runs on `device`,
    anti-aliased by 2x supersampling."""
    size = min(height, width)
    g = {"generator": generator, "device": generator.device}
    labels = torch.randint(len(SHAPES), (n,), **g)
    radius = (0.16 + 0.08 * torch.rand(n, **g)) * size
    lo = torch.stack([radius, radius], dim=1)
    hi = torch.stack([width - radius, height - radius], dim=1)
    start = lo + torch.rand(n, 2, **g) * (hi - lo)
    speed = 0.4 + 0.8 * torch.rand(n, **g)
    angle = 2 * math.pi * torch.rand(n, **g)
    velocity = torch.stack([speed * torch.cos(angle), speed * torch.sin(angle)], dim=1)
    brightness = 0.6 + 0.4 * torch.rand(n, **g)

    t = torch.arange(frames, dtype=torch.float32, device=generator.device)
    pos = _bounce(start[:, None] + velocity[:, None] * t[None, :, None], lo[:, None], hi[:, None])  # (n, F, 2)
    labels, radius, pos, brightness = (x.to(device) for x in (labels, radius, pos, brightness))
    ss = 2
    xs = (torch.arange(width * ss, device=device, dtype=torch.float32) + 0.5) / ss
    ys = (torch.arange(height * ss, device=device, dtype=torch.float32) + 0.5) / ss
    dx = xs.view(1, 1, 1, -1) - pos[..., 0, None, None]
    dy = ys.view(1, 1, -1, 1) - pos[..., 1, None, None]
    cover = _shape_masks(dx, dy, radius, labels)  # (n, F, H*ss, W*ss)
    cover = F.avg_pool2d(cover.flatten(0, 1)[:, None], ss).view(n, frames, height, width)
    video = -1.0 + 2.0 * brightness.view(-1, 1, 1, 1) * cover
    return video[:, None], labels


def conditioning(labels: torch.Tensor, text_dim: int) -> torch.Tensor:
    """The class as a one-token 'text' embedding (n, 1, text_dim): Wan's cross-attention reads it."""
    # a comparison, not F.one_hot, which checks the labels' range on the host (a synchronisation on CUDA)
    return (labels[:, None] == torch.arange(text_dim, device=labels.device)).float()[:, None]


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ===== Model, flow matching, sampling =====


def build_model(preset: dict):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=1, out_channels=1, rope_max_seq_len=1024,
                                 **preset["model"])


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Wan's pipelines sample with a shifted schedule; shift 3 puts more training steps at high noise.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict(model, x, timesteps, cond):
    return model(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond, return_dict=False)[0]


def _schedule_on(scheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's training sigmas and timesteps on `device`, copied once (a copy per step would synchronise)."""
    cache = scheduler.__dict__.setdefault("_study_schedule", {})
    if str(device) not in cache:
        cache[str(device)] = (scheduler.sigmas.to(device), scheduler.timesteps.to(device))
    return cache[str(device)]


def flow_matching_loss(model, scheduler, x0, noise, index, cond, teacher=None) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) at the scheduler's training sigma `index`; with
    `teacher`, MSE to the teacher's prediction instead (distillation)."""
    sigmas, timesteps = _schedule_on(scheduler, x0.device)
    sigmas, timesteps = sigmas[index].view(-1, 1, 1, 1, 1), timesteps[index]
    x_t = (1.0 - sigmas) * x0 + sigmas * noise
    with autocast(x0.device):
        pred = predict(model, x_t, timesteps, cond)
        if teacher is not None:
            with torch.no_grad():
                target = predict(teacher, x_t, timesteps, cond)
    if teacher is None:
        target = noise - x0
    return F.mse_loss(pred.float(), target.float())


class ValSet:
    """Fixed held-out videos, noise and training-sigma indices (evenly spread over the schedule)."""

    def __init__(self, n: int, shape: tuple[int, int, int], text_dim: int, device: torch.device, seed: int = 1234):
        gen = torch.Generator().manual_seed(seed)
        self.x0, self.labels = make_videos(n, *shape, gen, device)
        self.noise = torch.randn(self.x0.shape, generator=gen).to(device)
        self.index = torch.linspace(0, 999, n).round().long().to(device)
        self.cond = conditioning(self.labels, text_dim).to(device)

    @torch.no_grad()
    def loss(self, model, scheduler, batch: int) -> float:
        was_training = model.training
        model.eval()
        total = 0.0
        for s in range(0, self.x0.shape[0], batch):
            sl = slice(s, s + batch)
            loss = flow_matching_loss(model, scheduler, self.x0[sl], self.noise[sl], self.index[sl], self.cond[sl])
            total += loss.item() * self.x0[sl].shape[0]
        model.train(was_training)
        return total / self.x0.shape[0]


def sample_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % len(SHAPES)


@torch.no_grad()
def sample(model, n: int, shape: tuple[int, int, int], text_dim: int, steps: int, device, batch: int,
           seed: int = 4321, dense_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos drawn with FlowMatchEulerDiscreteScheduler from fixed noise and fixed labels (the same for every
    variant): (uint8 (n, F, H, W), labels (n,)). With `dense_steps`, an SLA model runs its first `dense_steps`
    steps dense through the package's `sla_dense_steps`, as a user's pipeline call would."""
    from diffusers_sla import sla_dense_steps

    gen = torch.Generator().manual_seed(seed)
    labels = sample_labels(n)
    noise = torch.randn((n, 1, *shape), generator=gen)
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, n, batch):
        x = noise[s : s + batch].to(device)
        cond = conditioning(labels[s : s + batch], text_dim).to(device)
        scheduler = make_scheduler()
        # the pipeline-shaped object sla_dense_steps expects: the denoiser among `components`, and the scheduler
        pipe = types.SimpleNamespace(components={"transformer": model}, scheduler=scheduler)
        with sla_dense_steps(pipe, dense_steps) if dense_steps else contextlib.nullcontext():
            scheduler.set_timesteps(steps, device=device)
            for t in scheduler.timesteps:
                with autocast(device):
                    v = predict(model, x, t.expand(x.shape[0]), cond)
                x = scheduler.step(v.float(), t, x).prev_sample
        out.append(to_uint8(x[:, 0]))
    model.train(was_training)
    return torch.cat(out), labels


# ===== Variants =====


def _linear_branch(q, k, v, layer, scope: str, forced=None) -> torch.Tensor:
    """proj_l(phi(q) R / phi(q).z) of the package's reference operator, float32, over `scope` key blocks."""
    from diffusers_sla.ops.reference import linear_attention_reference
    from diffusers_sla.ops.selection import select_blocks

    c = layer.config
    lut = select_blocks(q, k, c.topk, c.blkq, c.blkk, forced) if scope == "rest" else None
    out = linear_attention_reference(q.float(), k.float(), v.float(), lut, c.blkq, c.blkk, c.feature_map, scope)
    return F.linear(out, layer.proj_l.weight.float(), layer.proj_l.bias.float())


def _linear_only_forward(self, q, k, v, scale=None, key_padding_mask=None, forced_keys=None):
    # Study-only path: the softmax attention is replaced by the linear branch over every key block.
    with torch.autocast(q.device.type, enabled=False):
        return _linear_branch(q, k, v, self, "all").to(q.dtype)


def sparse_only_mode() -> str:
    """How sparse-only rows drop the linear branch: the package's `linear_scope="none"` where the installed version
    has it, else `proj_l` frozen at zero (the same function: the linear branch is multiplied by zero)."""
    from diffusers_sla import SLAConfig

    try:
        SLAConfig(linear_scope="none")
        return "linear_scope=none"
    except ValueError:
        return "proj_l frozen at zero"


def apply_variant(model, variant: dict, preset: dict, args) -> str:
    """Install `variant` on `model` (a teacher copy); returns a note on how."""
    from diffusers_sla import enable_sla, iter_sla_layers

    kind = variant["kind"]
    if kind == "dense":
        return "dense attention"
    sla = dict(blkq=preset["block"], blkk=preset["block"], min_kv_blocks=2, feature_map=args.feature_map,
               backend=args.backend)
    if kind == "sparse":
        mode = sparse_only_mode()
        if mode == "linear_scope=none":
            enable_sla(model, topk=variant["topk"], linear_scope="none", **sla)
        else:
            enable_sla(model, topk=variant["topk"], linear_scope="rest", **sla)
            for _, _, layer in iter_sla_layers(model):
                layer.proj_l.requires_grad_(False)
        return mode
    if kind in ("mass", "ratio"):
        enable_sla(model, topk=variant["topk"], linear_scope="rest", fusion=kind, **sla)
        return f"SLA fusion={kind} linear_scope=rest proj_l init zero"
    if kind == "sla":
        enable_sla(model, topk=variant["topk"], linear_scope=args.linear_scope, **sla)
        _init_proj_l(model, args.proj_l_init, variant, args)
        return f"SLA linear_scope={args.linear_scope} proj_l init {args.proj_l_init}"
    if kind == "linear":
        enable_sla(model, topk=1.0, linear_scope="all", **sla)
        for _, _, layer in iter_sla_layers(model):
            layer.forward = _linear_only_forward.__get__(layer)
            # start from plain linear attention: a zero proj_l would switch attention off entirely
            with torch.no_grad():
                layer.proj_l.weight.copy_(torch.eye(layer.head_dim))
        return "linear branch over all key blocks, proj_l init identity"
    raise ValueError(f"unknown variant kind {kind!r}")


def _init_proj_l(model, how: str, variant: dict, args) -> None:
    from diffusers_sla import iter_sla_layers

    if how == "zero":
        return
    if how == "lsfit":
        # the least-squares proj_l of the teacher probe: the best a fixed proj_l can do before the backbone adapts
        fits = args.teacher_fits.get(f"{variant['topk']:.4f}")
        if fits is None:
            raise ValueError(f"--proj-l-init lsfit: the teacher log has no fit for topk {variant['topk']}.")
        for (_, _, layer), fit in zip(iter_sla_layers(model), fits):
            with torch.no_grad():
                layer.proj_l.weight.copy_(torch.tensor(fit["weight"]))
                layer.proj_l.bias.copy_(torch.tensor(fit["bias"]))
        return
    raise ValueError(f"`--proj-l-init` must be one of ['zero', 'lsfit'], got {how!r}.")


def variants_for(preset: dict) -> dict[str, dict]:
    out = {"full": {"kind": "dense"}}
    for topk in preset["topks"]:
        out[f"sla_{round(topk * 100)}"] = {"kind": "sla", "topk": topk}
    for topk in preset["topks"]:
        out[f"sparse_{round(topk * 100)}"] = {"kind": "sparse", "topk": topk}
    out["linear_only"] = {"kind": "linear"}
    for topk in preset.get("fusion_topks", ()):
        if topk not in preset["topks"]:  # the sparser setting: its SLA and sparse-only rows, to compare with
            out[f"sla_{round(topk * 100)}"] = {"kind": "sla", "topk": topk}
            out[f"sparse_{round(topk * 100)}"] = {"kind": "sparse", "topk": topk}
        for kind in ("mass", "ratio"):
            out[f"{kind}_{round(topk * 100)}"] = {"kind": kind, "topk": topk}
    return out


def proj_l_params(model) -> list[torch.nn.Parameter]:
    from diffusers_sla import iter_sla_layers

    return [p for _, _, layer in iter_sla_layers(model) for p in layer.proj_l.parameters()]


def ratio_gate_values(model) -> list[dict]:
    """Per SLA layer of a "ratio" row, the tuned gate: sigmoid(c) (its value for a zero query) and ||u||."""
    from diffusers_sla import iter_sla_layers

    return [{"sigmoid_bias": float(torch.sigmoid(layer.fusion_ratio_bias.detach().float())),
             "weight_norm": float(layer.fusion_ratio_weight.detach().float().norm())}
            for _, _, layer in iter_sla_layers(model)]


def proj_l_weight_rms(model) -> list[float]:
    """Per SLA layer, the root mean square of proj_l's weight entries (Adam moves each by about lr per step)."""
    from diffusers_sla import iter_sla_layers

    return [float(layer.proj_l.weight.detach().float().pow(2).mean().sqrt()) for _, _, layer in iter_sla_layers(model)]


def proj_l_grad_norms(model) -> torch.Tensor | None:
    """Per SLA layer, ||grad|| of proj_l (weight and bias together), NaN where it has no gradient; None without SLA
    layers. A device tensor: reading it every step would stall the GPU."""
    from diffusers_sla import iter_sla_layers

    norms = []
    for _, _, layer in iter_sla_layers(model):
        grads = [p.grad for p in layer.proj_l.parameters() if p.grad is not None]
        if grads:
            norms.append(torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt())
        else:
            norms.append(torch.full((), float("nan"), device=layer.proj_l.weight.device))
    return torch.stack(norms) if norms else None


def _window_means(window: list) -> list:
    """Per-layer means over a window of `proj_l_grad_norms` results; None for a layer that never had a gradient."""
    if not window or window[0] is None:
        return []
    means = torch.stack(window).float().nanmean(dim=0).tolist()
    return [None if math.isnan(m) else m for m in means]


# ===== Diagnostics =====


def _probe_forward(self, q, k, v, scale=None, key_padding_mask=None, forced_keys=None):
    """Teacher probe: dense attention output (so the model runs as the teacher), plus, per topk, the attention mass
    outside the selected blocks and how much of the missing part (dense - sparse) a proj_l can explain."""
    from diffusers_sla.ops.reference import linear_attention_reference, sparse_attention_reference
    from diffusers_sla.ops.selection import forced_block_range, lut_to_block_map, select_blocks

    c = self.config
    forced = None if forced_keys is None else forced_block_range(*forced_keys, c.blkk)  # protected text
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = q.float(), k.float(), v.float()
        B, H, L, D = qf.shape
        n_k = L // c.blkk
        luts = {t: select_blocks(q, k, t, c.blkq, c.blkk, forced) for t in self._probe_topks}
        maps = {t: lut_to_block_map(lut, n_k) for t, lut in luts.items()}
        outside = {t: torch.zeros((), device=q.device, dtype=torch.float64) for t in luts}
        dense = []
        rows = max(c.blkq, (1 << 22) // max(1, B * H * L) // c.blkq * c.blkq)
        for r0 in range(0, L, rows):
            probs = torch.softmax((qf[:, :, r0 : r0 + rows] @ kf.transpose(-1, -2)) * scale, dim=-1)
            dense.append(probs @ vf)
            per_block = probs.view(B, H, -1, n_k, c.blkk).sum(-1)  # (B, H, rows, n_k)
            qblock = torch.arange(r0, r0 + probs.shape[2], device=q.device) // c.blkq
            for t, bm in maps.items():
                kept = (per_block * bm[:, :, qblock].float()).sum(-1)
                outside[t] += (1.0 - kept).double().sum()
        dense = torch.cat(dense, dim=2)
        for t, lut in luts.items():
            sparse = sparse_attention_reference(qf, kf, vf, lut, c.blkq, c.blkk, scale)
            resid = (dense - sparse).reshape(-1, D).double()
            stats = self._probe_stats.setdefault(t, {"outside": 0.0, "rows": 0, "dense2": 0.0, "branches": {}})
            stats["outside"] += float(outside[t])
            stats["rows"] += B * H * L
            stats["dense2"] += float(dense.double().pow(2).sum())
            # the configured linear branch first, then the other feature maps and scopes it could have been
            for feature_map, scope in self._probe_branches:
                lin = linear_attention_reference(qf, kf, vf, lut, c.blkq, c.blkk, feature_map, scope)
                x = torch.cat([lin.reshape(-1, D).double(), torch.ones_like(resid[:, :1])], dim=1)
                splits = stats["branches"].setdefault(f"{feature_map}/{scope}",
                                                      [{"xtx": 0, "xty": 0, "y2": 0.0} for _ in range(2)])
                split = splits[self._probe_split]
                split["xtx"] = split["xtx"] + x.T @ x
                split["xty"] = split["xty"] + x.T @ resid
                split["y2"] += float(resid.pow(2).sum())
    return dense.to(q.dtype)


def _norm_probe_forward(self, q, k, v, scale=None, key_padding_mask=None, forced_keys=None):
    """Tuned-model probe: the SLA output (torch reference), recording ||proj_l(linear)|| and ||sparse||."""
    from diffusers_sla.ops.reference import sparse_attention_reference
    from diffusers_sla.ops.selection import forced_block_range, select_blocks

    c = self.config
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    forced = None if forced_keys is None else forced_block_range(*forced_keys, c.blkk)  # protected text
    with torch.autocast(q.device.type, enabled=False):
        lut = select_blocks(q, k, c.topk, c.blkq, c.blkk, forced)
        sparse = sparse_attention_reference(q.float(), k.float(), v.float(), lut, c.blkq, c.blkk, scale)
        lin = _linear_branch(q, k, v, self, c.linear_scope, forced)
        self._norms[0] += float(lin.double().pow(2).sum())
        self._norms[1] += float(sparse.double().pow(2).sum())
        return (sparse + lin).to(q.dtype)


@contextlib.contextmanager
def patched_forward(model, fn, **attrs):
    from diffusers_sla import iter_sla_layers

    layers = [layer for _, _, layer in iter_sla_layers(model)]
    for layer in layers:
        layer.forward = fn.__get__(layer)
        for name, value in attrs.items():
            setattr(layer, name, copy.deepcopy(value))
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.forward
            for name in attrs:
                delattr(layer, name)


@torch.no_grad()
def teacher_probe(model, val: ValSet, preset: dict, args, n_videos: int) -> dict:
    """Per layer and topk: attention mass outside the selected blocks, ||dense - sparse|| / ||dense||, and the
    fraction of ||dense - sparse||^2 that the best least-squares proj_l(linear) explains (R^2), with that fit."""
    from diffusers_sla import disable_sla, enable_sla

    model = copy.deepcopy(model)
    enable_sla(model, topk=1.0, blkq=preset["block"], blkk=preset["block"], min_kv_blocks=2,
               feature_map=args.feature_map)
    scheduler = make_scheduler()
    topks = list(preset["topks"])
    branches = [(args.feature_map, "rest")]
    branches += [(fm, "rest") for fm in ("softmax", "elu", "relu") if fm != args.feature_map]
    branches += [(args.feature_map, "all")]
    main = f"{args.feature_map}/rest"
    with patched_forward(model, _probe_forward, _probe_topks=topks, _probe_stats={}, _probe_split=0,
                         _probe_branches=branches) as layers:
        model.eval()
        for i in range(n_videos):
            for layer in layers:
                layer._probe_split = i % 2  # even videos fit, odd ones score the fit (held-out R^2)
            sl = slice(i, i + 1)
            flow_matching_loss(model, scheduler, val.x0[sl], val.noise[sl], val.index[sl], val.cond[sl])
        out = {}
        for t in topks:
            per_layer = []
            for layer in layers:
                s = layer._probe_stats[t]
                fits = {label: _fit_branch(splits, args.lsfit_ridge) for label, splits in s["branches"].items()}
                w, both = fits[main]["w"], fits[main]["both"]  # w: (D+1, D), rows 0..D-1 = weight.T, row D = bias
                per_layer.append({
                    "mass_outside": s["outside"] / s["rows"],
                    "resid_rel": math.sqrt(both["y2"] / s["dense2"]),
                    "lsfit_r2": fits[main]["r2"],
                    "lsfit_r2_heldout": fits[main]["r2_heldout"],
                    "lsfit_ridge": fits[main]["ridge"],
                    "lsfit_weight_rms": float(w[:-1].pow(2).mean().sqrt()),
                    "weight": w[:-1].T.float().cpu().tolist(),
                    "bias": w[-1].float().cpu().tolist(),
                    "branches": {label: {k: f[k] for k in ("r2", "r2_heldout", "ridge")} for label, f in fits.items()},
                })
            out[f"{t:.4f}"] = per_layer
    disable_sla(model)
    return out


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _fit_branch(splits: list[dict], ridge: float | None) -> dict:
    """Ridge least-squares proj_l for one linear branch: the ridge (unless given) is the one that scores best when
    fitted on the even videos and scored on the odd ones; the returned fit uses every video."""
    fit_half, test_half = splits
    both = {k: fit_half[k] + test_half[k] for k in ("xtx", "xty", "y2")} if test_half["y2"] else fit_half
    ridges = [ridge] if ridge is not None else list(RIDGES)
    held = {r: _explained(_ridge_fit(fit_half, r), test_half) for r in ridges} if test_half["y2"] else {}
    chosen = max(held, key=held.get) if held else ridges[0]
    w = _ridge_fit(both, chosen)
    return {"w": w, "both": both, "ridge": chosen, "r2": _explained(w, both), "r2_heldout": held.get(chosen)}


def _ridge_fit(stats: dict, ridge: float) -> torch.Tensor:
    """argmin_W ||X W - Y||^2 + lam ||W||^2 from X^T X and X^T Y; lam = ridge * mean diagonal of X^T X, because the
    linear branch's outputs are nearly collinear (phi(q) R / phi(q).z is close to a mean of v) and an unregularised
    fit blows up outside the videos it was fitted on."""
    xtx = stats["xtx"]
    lam = ridge * float(torch.diagonal(xtx).mean())
    return torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0], device=xtx.device, dtype=xtx.dtype), stats["xty"])


def _explained(w: torch.Tensor, stats: dict) -> float:
    """1 - ||X W - Y||^2 / ||Y||^2 (Y = dense - sparse): the share of the missing output W explains."""
    if not stats["y2"]:
        return 0.0
    residual = stats["y2"] - float(2 * (w * stats["xty"]).sum() - (w * (stats["xtx"] @ w)).sum())
    return 1.0 - residual / stats["y2"]


@torch.no_grad()
def tuned_probe(model, val: ValSet, n_videos: int) -> list[float]:
    """Per SLA layer, ||proj_l(linear)|| / ||sparse output|| on the first `n_videos` validation videos."""
    scheduler = make_scheduler()
    with patched_forward(model, _norm_probe_forward, _norms=[0.0, 0.0]) as layers:
        for i in range(n_videos):
            sl = slice(i, i + 1)
            flow_matching_loss(model, scheduler, val.x0[sl], val.noise[sl], val.index[sl], val.cond[sl])
        return [math.sqrt(layer._norms[0] / layer._norms[1]) if layer._norms[1] else 0.0 for layer in layers]


@torch.no_grad()
def loss_without_linear(model, val: ValSet, batch: int) -> float:
    """Validation loss of a tuned SLA model with proj_l set to zero: what the tuned model owes its linear branch."""
    params = proj_l_params(model)
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.zero_()
    loss = val.loss(model, make_scheduler(), batch)
    for p, s in zip(params, saved):
        p.copy_(s)
    return loss


# ===== Log =====


def environment(device: torch.device) -> dict:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    import diffusers_sla

    env["diffusers_sla"] = diffusers_sla.__version__
    return env


class RunLog:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOG_NAME
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {
            "meta": {}, "teachers": {}, "rows": {}, "stages": []}
        spath = out / SAMPLES_NAME
        self.samples = torch.load(spath) if spath.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
        stmp = self.out / (SAMPLES_NAME + ".tmp")
        torch.save(self.samples, stmp)
        os.replace(stmp, self.out / SAMPLES_NAME)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    def __init__(self, device):
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


# ===== Training =====


def train(model, scheduler, preset: dict, length: str, steps: int, lr: float, seed: int, device, val: ValSet,
          eval_every: int, *, warmup: int, cosine: bool, proj_l_lr_mult: float = 1.0, deadline: float | None = None,
          track_proj_l: bool = False, teacher=None, verbose: bool = False) -> dict:
    """AdamW on every trainable parameter with the flow-matching loss (or distillation from `teacher`); returns the
    validation curve (always the flow-matching loss) and proj_l gradient norms."""
    shape = preset["lengths"][length]
    text_dim = preset["model"]["text_dim"]
    batch = preset["batch"][length]
    special = {id(p) for p in proj_l_params(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in special], "lr": lr}]
    if any(id(p) in special for p in params):
        groups.append({"params": [p for p in params if id(p) in special], "lr": lr * proj_l_lr_mult})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    data_gen = torch.Generator(device=device).manual_seed(10_000 + seed)
    noise_gen = torch.Generator(device=device).manual_seed(20_000 + seed)
    start = time.perf_counter()
    curve = [(0, val.loss(model, scheduler, batch))]
    train_losses, grad_windows, window = [], [], []
    model.train()
    done = 0
    for step in range(1, steps + 1):
        if deadline is not None and time.perf_counter() > deadline:
            break
        factor = min(1.0, step / max(1, warmup))
        if cosine:
            factor *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        x0, labels = make_videos(batch, *shape, data_gen, device)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        index = torch.randint(0, 1000, (batch,), generator=noise_gen, device=device)
        loss = flow_matching_loss(model, scheduler, x0, noise, index, conditioning(labels, text_dim), teacher=teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if track_proj_l:
            window.append(proj_l_grad_norms(model))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_losses.append(loss.detach())  # read at the evaluations, which synchronise anyway
        done = step
        if step % eval_every == 0 or step == steps:
            curve.append((step, val.loss(model, scheduler, batch)))
            if verbose:
                recent = float(torch.stack(train_losses[-eval_every:]).mean())
                log(f"  step {step}/{steps}: val {curve[-1][1]:.4f}, train {recent:.4f}, "
                    f"{time.perf_counter() - start:.1f} s")
            if track_proj_l:
                grad_windows.append((step, _window_means(window)))
                window = []
    if done % eval_every != 0 and done != steps and done > 0:
        curve.append((done, val.loss(model, scheduler, batch)))
        if track_proj_l and window:
            grad_windows.append((done, _window_means(window)))
    train_losses = torch.stack(train_losses).tolist() if train_losses else []
    return {"steps_done": done, "curve": curve, "train_loss_first": _mean(train_losses[:10]),
            "train_loss_last": _mean(train_losses[-10:]), "proj_l_grad_norm": grad_windows}


def _mean(values):
    return sum(values) / len(values) if values else None


def _mean_columns(rows: list[list]) -> list:
    """Column means of per-step per-layer values; None where a layer never had a gradient."""
    if not rows:
        return []
    out = []
    for col in zip(*rows):
        vals = [v for v in col if v is not None]
        out.append(_mean(vals) if vals else None)
    return out


# ===== Stages =====


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _teacher_path(args, length: str) -> Path:
    return Path(args.cache) / args.preset / f"teacher_{length}.pt"


def _setup(args):
    preset = PRESETS[args.preset]
    if args.length not in preset["lengths"]:
        raise SystemExit(f"--length must be one of {list(preset['lengths'])} for preset {args.preset!r}.")
    device = _device(args)
    torch.manual_seed(0)
    runlog = RunLog(Path(args.out))
    meta = runlog.data["meta"]
    if meta.get("preset", args.preset) != args.preset:
        raise SystemExit(f"{args.out} holds a {meta['preset']!r} run; use another --out for preset {args.preset!r}.")
    meta.update({"preset": args.preset, "backend": args.backend, "preset_config": _jsonable(preset),
                 "env": environment(device), "sparse_only_mode": sparse_only_mode()})
    return preset, device, runlog


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


def _eval_row(model, preset, length, device, val, args, clock) -> tuple[dict, torch.Tensor]:
    shape = preset["lengths"][length]
    batch = preset["batch"][length]
    with clock.phase("eval"):
        loss = val.loss(model, make_scheduler(), batch)
    with clock.phase("sample"):
        videos, _ = sample(model, preset["sample_videos"][length], shape, preset["model"]["text_dim"],
                           args.sample_steps or preset["sample_steps"], device, batch)
    return {"val_loss": loss}, videos


def cmd_teacher(args) -> None:
    preset, device, runlog = _setup(args)
    length = args.length
    stage_start = time.perf_counter()
    deadline = stage_start + args.time_budget_s if args.time_budget_s else None
    clock = Clock(device)
    shape = preset["lengths"][length]
    text_dim = preset["model"]["text_dim"]
    val = ValSet(preset["val_videos"][length], shape, text_dim, device)
    path = _teacher_path(args, length)
    entry = runlog.data["teachers"].get(length)
    if entry is not None and path.exists() and not args.force:
        log(f"teacher {length}: already in the log and cached at {path}; skipped (--force retrains)")
        return
    log(f"teacher {length}: {shape[0]}x{shape[1]}x{shape[2]} videos, "
        f"{shape[0] * shape[1] * shape[2] // 4} tokens, device {device}")
    model = build_model(preset).to(device)
    init = None
    if args.init_from:
        src = _teacher_path(args, args.init_from)
        if not src.exists():
            raise SystemExit(f"--init-from {args.init_from}: no cached teacher at {src}; run that teacher first.")
        model.load_state_dict(torch.load(src, map_location=device))
        init = args.init_from
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.steps or preset["teacher_steps"][length]
    scheduler = make_scheduler()
    # the probe and the samples need time too: keep a tenth of the budget for them
    train_deadline = None if deadline is None else stage_start + 0.85 * args.time_budget_s
    with clock.phase("train"):
        result = train(model, scheduler, preset, length, steps, args.lr or preset["teacher_lr"], TEACHER_SEED,
                       device, val, preset["teacher_eval_every"][length], warmup=max(1, steps // 20),
                       cosine=True, deadline=train_deadline, verbose=True)
    log(f"teacher {length}: {result['steps_done']}/{steps} steps in {clock.times['train']:.1f} s, "
        f"val loss {result['curve'][-1][1]:.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    row, videos = _eval_row(model, preset, length, device, val, args, clock)
    runlog.samples[f"{length}/labels"] = sample_labels(preset["sample_videos"][length])
    runlog.samples[f"{length}/teacher"] = videos
    with clock.phase("probe"):
        # videos of their own, so that the least-squares fits are not scored on the data they were fitted to
        probe_set = ValSet(args.probe_videos, shape, text_dim, device, seed=999)
        probe = teacher_probe(model, probe_set, preset, args, args.probe_videos)
    untuned = {}
    for topk in preset["topks"]:
        for proj_init in ("zero", "lsfit"):
            name = f"sla_{round(topk * 100)}_{'lsfit_' if proj_init == 'lsfit' else ''}untuned"
            m = copy.deepcopy(model)
            untuned_args = argparse.Namespace(**{**vars(args), "proj_l_init": proj_init, "linear_scope": "rest",
                                                 "teacher_fits": probe})
            apply_variant(m, {"kind": "sla", "topk": topk}, preset, untuned_args)
            r, v = _eval_row(m, preset, length, device, val, args, clock)
            untuned[name] = r
            runlog.samples[f"{length}/{name}"] = v
            log(f"  {name}: val loss {r['val_loss']:.4f}")
    # the fusions' starting points: "mass" changes the function before any tuning (proj_l zero: the decomposition
    # itself), and the sparser setting's SLA for comparison ("ratio" starts near the sparse part: not evaluated)
    for topk in preset.get("fusion_topks", ()):
        kinds = ["mass"] + (["sla"] if topk not in preset["topks"] else [])
        for kind in kinds:
            name = f"{kind}_{round(topk * 100)}_untuned"
            m = copy.deepcopy(model)
            untuned_args = argparse.Namespace(**{**vars(args), "proj_l_init": "zero", "linear_scope": "rest"})
            apply_variant(m, {"kind": kind, "topk": topk}, preset, untuned_args)
            r, v = _eval_row(m, preset, length, device, val, args, clock)
            untuned[name] = r
            runlog.samples[f"{length}/{name}"] = v
            log(f"  {name}: val loss {r['val_loss']:.4f}")
    for t, layers in probe.items():
        log(f"  probe topk {float(t):.2f}: mass outside " + " ".join(f"{x['mass_outside']:.3f}" for x in layers)
            + " | resid/dense " + " ".join(f"{x['resid_rel']:.3f}" for x in layers)
            + " | LS proj_l R2 " + " ".join(f"{x['lsfit_r2']:.3f}" for x in layers)
            + " | held out " + " ".join("-" if x["lsfit_r2_heldout"] is None else f"{x['lsfit_r2_heldout']:.3f}"
                                        for x in layers))
    runlog.data["teachers"][length] = {
        "steps": steps, "init_from": init, "params": n_params, "tokens": shape[0] * shape[1] * shape[2] // 4,
        "lr": args.lr or preset["teacher_lr"], "batch": preset["batch"][length], **result, **row,
        "untuned": untuned, "probe": probe, "wall_s": dict(clock.times),
    }
    runlog.data["stages"].append({"stage": "teacher", "length": length, "wall_s": time.perf_counter() - stage_start,
                                  "phases": dict(clock.times)})
    runlog.save()
    log(f"teacher {length}: phases " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.times.items())
        + f"; stage {time.perf_counter() - stage_start:.1f} s")


def cmd_tune(args) -> None:
    preset, device, runlog = _setup(args)
    length = args.length
    stage_start = time.perf_counter()
    path = _teacher_path(args, length)
    teacher = runlog.data["teachers"].get(length)
    if teacher is None or not path.exists():
        raise SystemExit(f"tune --length {length}: no teacher in {args.out} or no checkpoint at {path}; "
                         "run the teacher stage first.")
    args.teacher_fits = {t: layers for t, layers in teacher["probe"].items()}
    shape = preset["lengths"][length]
    text_dim = preset["model"]["text_dim"]
    val = ValSet(preset["val_videos"][length], shape, text_dim, device)
    state = torch.load(path, map_location=device)
    variants = variants_for(preset)
    names = args.variants or list(variants)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(variants)}")
    seeds = args.seeds if args.seeds is not None else list(preset["seeds"])
    steps = args.steps or preset["tune_steps"][length]
    lr = args.lr or preset["tune_lr"]
    recipe = {"steps": steps, "lr": lr, "proj_l_lr_mult": args.proj_l_lr_mult, "proj_l_init": args.proj_l_init,
              "feature_map": args.feature_map, "linear_scope": args.linear_scope, "batch": preset["batch"][length],
              "objective": args.objective}
    teacher_model = None
    if args.objective == "distill":
        teacher_model = build_model(preset)
        teacher_model.load_state_dict(state)
        teacher_model.to(device).eval().requires_grad_(False)
    row_times = []
    # seeds outermost: if the budget runs out, every variant has the same seeds
    for seed in seeds:
        for name in names:
            row_name = f"{name}+{args.tag}" if args.tag else name
            key = f"{length}/{row_name}/seed{seed}"
            if key in runlog.data["rows"] and not args.force:
                continue
            if args.time_budget_s and row_times:
                left = args.time_budget_s - (time.perf_counter() - stage_start)
                # the first row also compiles the Triton kernels: judge by the later ones once there are some
                expected = max(row_times[1:] or row_times)
                if left < 1.2 * expected:
                    log(f"tune {length}: {left:.0f} s left, a row takes ~{expected:.0f} s; stopping "
                        "(rerun the same command to resume)")
                    runlog.save()
                    return
            row_start = time.perf_counter()
            clock = Clock(device)
            model = build_model(preset)
            model.load_state_dict(state)
            model.to(device)
            how = apply_variant(model, variants[name], preset, args)
            torch.manual_seed(seed)
            is_sla = variants[name]["kind"] in ("sla", "linear")
            with clock.phase("tune"):
                result = train(model, make_scheduler(), preset, length, steps, lr, seed, device, val,
                               preset["eval_every"][length], warmup=min(20, steps // 5 + 1), cosine=False,
                               proj_l_lr_mult=args.proj_l_lr_mult,
                               track_proj_l=variants[name]["kind"] != "dense", teacher=teacher_model)
            row, videos = _eval_row(model, preset, length, device, val, args, clock)
            if is_sla and variants[name]["kind"] == "sla":
                with clock.phase("diagnostics"):
                    row["val_loss_without_linear"] = loss_without_linear(model, val, preset["batch"][length])
                    row["linear_over_sparse"] = tuned_probe(model, val, min(args.probe_videos, val.x0.shape[0]))
                    row["proj_l_weight_rms"] = proj_l_weight_rms(model)
            if variants[name]["kind"] == "ratio":
                row["ratio_gate"] = ratio_gate_values(model)
            dense_steps = preset.get("dense_sample_steps", 0)
            if dense_steps and variants[name]["kind"] in ("sla", "sparse", "mass", "ratio"):
                with clock.phase("sample"):
                    runlog.samples[f"{key}@dense"], _ = sample(
                        model, preset["sample_videos"][length], shape, text_dim,
                        args.sample_steps or preset["sample_steps"], device, preset["batch"][length],
                        dense_steps=dense_steps)
                row["dense_sample_steps"] = dense_steps
            runlog.data["rows"][key] = {"length": length, "variant": row_name, "seed": seed, "how": how,
                                        "recipe": recipe, **result, **row, "wall_s": dict(clock.times)}
            runlog.samples[key] = videos
            runlog.save()
            row_times.append(time.perf_counter() - row_start)
            extra = ""
            if "val_loss_without_linear" in row:
                extra = (f", without linear {row['val_loss_without_linear']:.4f}, |lin|/|sparse| "
                         + " ".join(f"{x:.3f}" for x in row["linear_over_sparse"]))
            log(f"{key}: val {result['curve'][0][1]:.4f} -> {row['val_loss']:.4f}{extra} "
                f"({row_times[-1]:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in clock.times.items()) + ")")
    runlog.data["stages"].append({"stage": "tune", "length": length, "wall_s": time.perf_counter() - stage_start,
                                  "rows": len(row_times)})
    runlog.save()
    log(f"tune {length}: {len(row_times)} rows in {time.perf_counter() - stage_start:.1f} s")


# ===== Render (CPU): library metrics, table, figures =====


def _crop_features(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """Frames (N, H, W) in [-1, 1] -> (N, crop*crop) windows centred on each frame's brightness centroid, so that a
    classifier sees the shape wherever it moved."""
    n, h, w = frames.shape
    weight = (frames + 1).clamp_min(0) / 2
    total = weight.sum((1, 2)).clamp_min(1e-6)
    cy = (weight.sum(2) * torch.arange(h)).sum(1) / total
    cx = (weight.sum(1) * torch.arange(w)).sum(1) / total
    half = crop // 2
    padded = F.pad(frames, (half, half, half, half), value=-1.0)
    ys = (cy.round().long()[:, None] + torch.arange(crop)[None]).clamp(0, h + 2 * half - 1)  # top-left in padded
    xs = (cx.round().long()[:, None] + torch.arange(crop)[None]).clamp(0, w + 2 * half - 1)
    windows = padded[torch.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]
    return windows.reshape(n, -1)


def shape_classifier(height: int, width: int, crop: int, seed: int = 777):
    """A scikit-learn logistic regression on centroid crops of the generator's frames; returns it and its held-out
    accuracy on real frames (how far the metric itself can be trusted)."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(seed)
    videos, labels = make_videos(600, 4, height, width, gen)
    frames = videos[:, 0].reshape(-1, height, width)
    y = labels.repeat_interleave(4)
    x = _crop_features(frames, crop)
    split = 3 * x.shape[0] // 4
    clf = LogisticRegression(max_iter=500, C=0.1)
    clf.fit(x[:split].numpy(), y[:split].numpy())
    return clf, float(clf.score(x[split:].numpy(), y[split:].numpy()))


def sample_metrics(videos: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, clf, crop: int) -> dict:
    """PSNR and SSIM (scikit-image) of each video against the teacher's from the same noise, and the fraction of
    frames the classifier assigns to the video's conditioning class."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = videos.numpy(), reference.numpy()
    psnr, ssim = [], []
    for v in range(a.shape[0]):
        psnr.append(peak_signal_noise_ratio(b[v], a[v], data_range=255) if (a[v] != b[v]).any() else float("inf"))
        ssim.append(sum(structural_similarity(b[v, f], a[v, f], data_range=255) for f in range(a.shape[1]))
                    / a.shape[1])
    n, frames, h, w = videos.shape
    x = _crop_features(videos.float().reshape(-1, h, w) / 127.5 - 1.0, crop)
    pred = torch.from_numpy(clf.predict(x.numpy())).view(n, frames)
    acc = float((pred == labels[:, None]).float().mean())
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "class_acc": acc}


def _stats(values: list) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _fmt(values: list, digits: int = 4) -> str:
    mean, std, n = _stats(values)
    if mean is None:
        return "–"
    if math.isinf(mean):
        return "identical"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def load_runs(folders: list[str]) -> tuple[dict, dict]:
    data = {"meta": {}, "teachers": {}, "rows": {}, "stages": []}
    samples = {}
    for folder in folders:
        path = Path(folder)
        if not (path / LOG_NAME).exists():
            raise SystemExit(f"render: no {LOG_NAME} in {folder}.")
        d = json.loads((path / LOG_NAME).read_text())
        data["meta"] = data["meta"] or d["meta"]
        data["teachers"].update(d["teachers"])
        data["rows"].update(d["rows"])
        data["stages"] += d["stages"]
        if (path / SAMPLES_NAME).exists():
            samples.update(torch.load(path / SAMPLES_NAME))
    return data, samples


def _add_metrics(entry: dict, record: dict, videos: torch.Tensor | None, scorer: dict) -> None:
    """Append one run's numbers (from the log, and from its samples) to the per-seed lists of `entry`."""
    entry.setdefault("val_loss", []).append(record.get("val_loss"))
    for name in ("val_loss_without_linear", "steps_done"):
        if name in record:
            entry.setdefault(name, []).append(record[name])
    if "linear_over_sparse" in record:
        entry.setdefault("linear_over_sparse", []).append(_mean(record["linear_over_sparse"]))
    if videos is not None and scorer["ref"] is not None:
        metrics = sample_metrics(videos, scorer["ref"], scorer["labels"], scorer["clf"], scorer["crop"])
        for name, value in metrics.items():
            entry.setdefault(name, []).append(value)


def compute_metrics(data: dict, samples: dict) -> dict:
    """{length: {"classifier_acc_real": a, "rows": {variant: {metric: [per seed]}}}} in variant order."""
    preset = data["meta"]["preset_config"]
    out = {}
    for length, teacher in data["teachers"].items():
        _, height, width = preset["lengths"][length]
        crop = 2 * round(0.3125 * min(height, width))
        clf, real_acc = shape_classifier(height, width, crop)
        scorer = {"ref": samples.get(f"{length}/teacher"), "labels": samples.get(f"{length}/labels"), "clf": clf,
                  "crop": crop}
        records = [("teacher", teacher, f"{length}/teacher")]
        records += [(name, record, f"{length}/{name}") for name, record in teacher["untuned"].items()]
        tuned = sorted((r for r in data["rows"].values() if r["length"] == length),
                       key=lambda r: (_variant_order(preset, r["variant"]), r["seed"]))
        for r in tuned:
            records.append((r["variant"], r, f"{length}/{r['variant']}/seed{r['seed']}"))
        # the same tuned rows sampled with their first steps dense: sample metrics only (the loss is unchanged)
        for r in tuned:
            if r.get("dense_sample_steps"):
                records.append((f"{r['variant']}@dense{r['dense_sample_steps']}", {},
                                f"{length}/{r['variant']}/seed{r['seed']}@dense"))
        rows: dict[str, dict[str, list]] = {}
        for variant, record, key in records:
            _add_metrics(rows.setdefault(variant, {}), record, samples.get(key), scorer)
        out[length] = {"classifier_acc_real": real_acc, "crop": crop, "rows": rows}
    return out


def _variant_order(preset: dict, variant: str) -> tuple:
    """Untagged rows in the study's order, then each tag's rows in the same order."""
    order = list(variants_for(preset))
    base, _, tag = variant.partition("+")
    return (tag, order.index(base) if base in order else len(order), variant)


ROW_NOTES = {
    "teacher": "dense teacher, not tuned",
    "full": "dense, tuned",
    "linear_only": "linear branch only, tuned",
}


def _row_label(variant: str) -> str:
    if "@dense" in variant:
        base, _, n = variant.partition("@dense")
        return f"{variant} {_row_label(base)[len(base) + 1:-1]}, sampled with the first {n} steps dense)"
    base, _, tag = variant.partition("+")
    if tag:
        return f"{variant} {_row_label(base)[len(base) + 1:-1]}, recipe +{tag})"
    if variant in ROW_NOTES:
        return f"{variant} ({ROW_NOTES[variant]})"
    parts = variant.split("_")
    if variant.endswith("_lsfit_untuned"):
        return f"{variant} (SLA topk {parts[1]} %, proj_l = teacher's LS fit, not tuned)"
    if variant.endswith("_untuned") and parts[0] == "mass":
        return f"{variant} (SLA topk {parts[1]} %, fusion mass, proj_l zero, not tuned)"
    if variant.endswith("_untuned"):
        return f"{variant} (SLA topk {parts[1]} %, not tuned)"
    if parts[0] == "sla":
        return f"{variant} (SLA topk {parts[1]} %, tuned)"
    if parts[0] == "sparse":
        return f"{variant} (sparse only, topk {parts[1]} %, tuned)"
    if parts[0] in ("mass", "ratio"):
        return f"{variant} (SLA topk {parts[1]} %, fusion {parts[0]}, tuned)"
    return variant


def render_table(data: dict, metrics: dict) -> str:
    meta = data["meta"]
    env = meta.get("env", {})
    lines = [
        (f"Run: {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, triton {env.get('triton')}, "
         f"diffusers {env.get('diffusers')}, diffusers-sla {env.get('diffusers_sla')}; preset "
         f"`{meta.get('preset')}`; sparse-only rows: {meta.get('sparse_only_mode')}. Mean ± std over tuning seeds "
         "(n in the last column)."),
        "",
    ]
    for length, m in metrics.items():
        teacher = data["teachers"][length]
        recipes = {json.dumps(r["recipe"], sort_keys=True) for r in data["rows"].values()
                   if r["length"] == length and "+" not in r["variant"]}
        recipe = json.loads(recipes.pop()) if len(recipes) == 1 else None
        tagged = {}
        for r in data["rows"].values():
            if r["length"] == length and "+" in r["variant"]:
                tagged.setdefault(r["variant"].partition("+")[2], r["recipe"])
        lines.append(
            f"**{teacher['tokens']} tokens** ({length}): teacher {teacher['params'] / 1e6:.2f}M params, "
            f"{teacher['steps_done']} steps" + (f" from the {teacher['init_from']} teacher" if teacher["init_from"]
                                                else " from scratch")
            + (f"; tuning {recipe['steps']} steps, lr {recipe['lr']:g}, batch {recipe['batch']}, proj_l lr x"
               f"{recipe['proj_l_lr_mult']:g}, proj_l init {recipe['proj_l_init']}, feature map "
               f"{recipe['feature_map']}, scope {recipe['linear_scope']}, objective {recipe.get('objective', 'fm')}"
               if recipe else
               ("; rows tuned with different recipes" if recipes else ""))
            + f". Classifier accuracy on real frames: {m['classifier_acc_real']:.3f}.")
        for tag, rec in sorted(tagged.items()):
            diff = {k: v for k, v in rec.items() if recipe is None or recipe.get(k) != v}
            lines.append(f"Rows tagged +{tag}: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.items())) + ".")
        lines.append("")
        lines.append("| Variant | Val. loss | Val. loss, proj_l = 0 | PSNR vs teacher (dB) | SSIM vs teacher "
                     "| Class acc. | ‖proj_l(lin)‖/‖sparse‖ | n |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for variant, r in m["rows"].items():
            lines.append(
                f"| {_row_label(variant)} | {_fmt(r['val_loss'])} | {_fmt(r.get('val_loss_without_linear', []))} "
                f"| {_fmt(r.get('psnr', []), 2)} | {_fmt(r.get('ssim', []), 3)} | {_fmt(r.get('class_acc', []), 3)} "
                f"| {_fmt(r.get('linear_over_sparse', []), 3)} | {len(r['val_loss'])} |")
        lines.append("")
        lines += _diagnostics_table(data, length)
    # Wall times from the rows and teachers themselves: a stage stopped by its time budget logs no stage record.
    parts = []
    for length, teacher in data["teachers"].items():
        if teacher.get("wall_s"):
            parts.append(f"teacher {length} {sum(teacher['wall_s'].values()):.0f} s")
    for length in sorted({r["length"] for r in data["rows"].values()}):
        rows = [r for r in data["rows"].values() if r["length"] == length and r.get("wall_s")]
        total = sum(sum(r["wall_s"].values()) for r in rows)
        parts.append(f"tuning {length} {total:.0f} s over {len(rows)} rows ({total / max(len(rows), 1):.0f} s a row)")
    if parts:
        lines.append("GPU wall time: " + ", ".join(parts) + ".")
        lines.append("")
    return "\n".join(lines)


def _diagnostics_table(data: dict, length: str) -> list[str]:
    teacher = data["teachers"][length]
    probe = teacher["probe"]
    topks = sorted(probe, key=float)
    header = ["Layer"]
    for t in topks:
        pct = round(float(t) * 100)
        header += [f"mass outside {pct} %", f"‖dense−sparse‖/‖dense‖ {pct} %",
                   f"LS proj_l R² {pct} % (held out)", f"LS proj_l rms {pct} %"]
    lines = [("Teacher probe per layer (videos of its own): the attention mass outside the selected blocks (what "
              "the linear branch must stand in for); ‖dense − sparse‖/‖dense‖, the part of the output the sparse "
              "branch misses; R², the share of that part's energy that the best (ridge least-squares) proj_l over "
              "the linear branch's output explains, in-sample and, in parentheses, fitted on half the videos and "
              "scored on the other half (the ridge is chosen on that half); the rms of the fit's weight entries."),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i in range(len(probe[topks[0]])):
        cells = [str(i)]
        for t in topks:
            p = probe[t][i]
            held = p.get("lsfit_r2_heldout")
            cells += [f"{p['mass_outside']:.3f}", f"{p['resid_rel']:.3f}",
                      f"{p['lsfit_r2']:.3f} ({'–' if held is None else f'{held:.3f}'})",
                      f"{p.get('lsfit_weight_rms', float('nan')):.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    labels = list(probe[topks[0]][0].get("branches", {}))
    if labels:
        lines += [("The same held-out R² for other linear branches (feature map / scope), per layer 0, 1, …: "
                   "could another feature map or scope stand in for the missing part better?"), "",
                  "| Linear branch | " + " | ".join(f"held-out R², topk {round(float(t) * 100)} %" for t in topks)
                  + " |", "|---|" + "---|" * len(topks)]
        for label in labels:
            cells = [_cells([layer["branches"][label]["r2_heldout"] for layer in probe[t]], ".3f") for t in topks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    rows = [r for r in data["rows"].values() if r["length"] == length]
    sla_names = [v for v in _tuned_variants(data, length) if v.startswith("sla_")]
    if not sla_names:
        return lines
    lines += [("Tuned SLA rows, per layer 0, 1, …, mean over seeds: ‖proj_l(linear)‖/‖sparse output‖ on probe "
               "videos, the rms of proj_l's weight entries after tuning (Adam moves each by about lr per step, so "
               "at most about lr × steps from its start), and proj_l's gradient norm (mean over the tuning "
               "steps)."), "",
              "| Row | ‖proj_l(lin)‖/‖sparse‖ | proj_l rms | ‖∇proj_l‖ |", "|---|---|---|---|"]
    for name in sla_names:
        runs = [r for r in rows if r["variant"] == name]
        ratio = _layer_means([r.get("linear_over_sparse") for r in runs])
        rms = _layer_means([r.get("proj_l_weight_rms") for r in runs])
        grads = _layer_means([_mean_columns([w for _, w in r["proj_l_grad_norm"] if w]) for r in runs])
        lines.append(f"| {name} | {_cells(ratio, '.3f')} | {_cells(rms, '.3g')} | {_cells(grads, '.3g')} |")
    lines.append("")
    return lines


def _layer_means(per_run: list) -> list:
    return _mean_columns([r for r in per_run if r])


def _cells(values: list, spec: str) -> str:
    return " ".join("–" if v is None else format(v, spec) for v in values) or "–"


def _tuned_variants(data: dict, length: str) -> list[str]:
    preset = data["meta"]["preset_config"]
    names = {r["variant"] for r in data["rows"].values() if r["length"] == length}
    return sorted(names, key=lambda v: _variant_order(preset, v))


def plot_curves(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(data["teachers"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        teacher = data["teachers"][length]
        for k, variant in enumerate(_tuned_variants(data, length)):
            runs = [r for r in data["rows"].values() if r["length"] == length and r["variant"] == variant]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            curves = [[v for _, v in r["curve"]] for r in runs if [s for s, _ in r["curve"]] == steps]
            mean = [sum(c) / len(c) for c in zip(*curves)]
            std = [_stats(list(c))[1] for c in zip(*curves)]
            style = "--" if variant.startswith("sparse") else "-"
            line, = ax.plot(steps, mean, style, label=f"{variant} (n={len(curves)})", color=f"C{k}")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.axhline(teacher["val_loss"], color="black", lw=0.8, ls=":", label="teacher (not tuned)")
        ax.set_title(f"{teacher['tokens']} tokens")
        ax.set_xlabel("tuning step")
        ax.set_ylabel("held-out flow-matching loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(data: dict, samples: dict, length: str, path: Path, n_frames: int = 8) -> None:
    """Rows: teacher, untuned, each tuned variant (seed 0); columns: evenly spaced frames of two sample videos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("teacher", f"{length}/teacher")]
    keys += [(name, f"{length}/{name}") for name in data["teachers"][length]["untuned"]]
    for variant in _tuned_variants(data, length):
        seeds = sorted(r["seed"] for r in data["rows"].values() if r["length"] == length and r["variant"] == variant)
        if seeds:
            keys.append((f"{variant} (seed {seeds[0]})", f"{length}/{variant}/seed{seeds[0]}"))
    keys = [(label, key) for label, key in keys if key in samples]
    videos = list(range(min(2, samples[keys[0][1]].shape[0])))
    total = samples[keys[0][1]].shape[1]
    frames = sorted({round(i * (total - 1) / max(1, n_frames - 1)) for i in range(n_frames)})
    cols = len(videos) * len(frames)
    fig, axes = plt.subplots(len(keys), cols, figsize=(cols * 0.75, len(keys) * 0.8 + 0.4), squeeze=False)
    for r, (label, key) in enumerate(keys):
        for vi, v in enumerate(videos):
            for fi, f in enumerate(frames):
                ax = axes[r][vi * len(frames) + fi]
                if v < samples[key].shape[0]:
                    ax.imshow(samples[key][v, f].numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"v{v} f{f}", fontsize=6)
        axes[r][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"Samples from fixed noise, {data['teachers'][length]['tokens']} tokens", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_BLOCK = "quality-table"
README_START = f"<!-- {README_BLOCK}:start -->"
README_END = f"<!-- {README_BLOCK}:end -->"


def cmd_render(args) -> None:
    data, samples = load_runs(args.out)
    if not data["teachers"]:
        raise SystemExit("render: the log has no teacher yet; nothing to render.")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(data, samples)
    table = render_table(data, metrics)
    (figures / "quality_table.md").write_text(table + "\n")
    (figures / "quality_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_curves(data, figures / "quality_loss.png")
    for length in data["teachers"]:
        if f"{length}/teacher" in samples:
            plot_samples(data, samples, length, figures / f"quality_samples_{length}.png")
    if args.readme:
        readme = Path(args.readme)
        text = readme.read_text()
        start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"--readme: {readme} has no {start} ... {end} block to replace.")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        rel = Path(os.path.relpath(figures, readme.parent)).as_posix()
        images = [f"![Held-out loss against tuning steps]({rel}/quality_loss.png)"]
        images += [f"![Samples, {length}]({rel}/quality_samples_{length}.png)" for length in data["teachers"]
                   if (figures / f"quality_samples_{length}.png").exists()]
        block = table + "\n" + "\n\n".join(images) + "\n"
        readme.write_text(f"{head}{start}\n{block}{end}{tail}")
    print(table)
    log(f"render: wrote quality_table.md, quality_metrics.json, quality_loss.png and sample grids to {figures}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("teacher", "tune"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="Run folder: quality.json and samples.pt (created, resumed).")
        p.add_argument("--length", required=True, help="Sequence length preset: 4k or 16k (toy, toy2 for 'toy').")
        p.add_argument("--preset", default="study", choices=list(PRESETS))
        p.add_argument("--cache", default=".quality-cache", help="Teacher checkpoints (an ignored folder).")
        p.add_argument("--steps", type=int, default=None, help="Training steps (default: the preset's).")
        p.add_argument("--lr", type=float, default=None, help="Learning rate (default: the preset's).")
        p.add_argument("--time-budget-s", type=float, default=None,
                       help="Stop cleanly before this many seconds, writing what is done.")
        p.add_argument("--sample-steps", type=int, default=None, help="Euler steps when sampling.")
        p.add_argument("--probe-videos", type=int, default=8, help="Videos the probes run on.")
        p.add_argument("--lsfit-ridge", type=float, default=None,
                       help="Ridge of the teacher probe's least-squares proj_l, relative to mean(diag X^T X); "
                            f"default: the one of {list(RIDGES)} that scores best on the held-out half.")
        p.add_argument("--feature-map", default="softmax", choices=["softmax", "elu", "relu"])
        p.add_argument("--device", default=None)
        p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                       help="SLA backend of the tuned rows: auto = Triton on CUDA (the package default).")
        p.add_argument("--force", action="store_true", help="Redo what the log already has.")
        if name == "teacher":
            p.add_argument("--init-from", default=None, help="Start from the cached teacher of this length.")
        else:
            p.add_argument("--variants", nargs="*", default=None, help="Subset of rows (default: all).")
            p.add_argument("--seeds", nargs="*", type=int, default=None, help="Tuning seeds (default: 0 1 2).")
            p.add_argument("--proj-l-lr-mult", type=float, default=1.0, help="proj_l learning rate / the rest's.")
            p.add_argument("--proj-l-init", default="zero", choices=["zero", "lsfit"],
                           help="SLA rows' proj_l: zero (the package's) or the teacher probe's least-squares fit.")
            p.add_argument("--linear-scope", default="rest", choices=["rest", "all"], help="SLA rows' linear scope.")
            p.add_argument("--tag", default="",
                           help="Suffix of these rows' names (variant+TAG): a recipe kept beside the main rows.")
            p.add_argument("--objective", default="fm", choices=["fm", "distill"],
                           help="fm: the flow-matching loss on the data; distill: MSE to the teacher's velocity.")
    p = sub.add_parser("render")
    p.add_argument("--out", required=True, nargs="+", help="Run folder(s) written by teacher/tune.")
    p.add_argument("--figures", default="docs/figures", help="Where the table, plot and sample grid go.")
    p.add_argument("--readme", default=None, help="Also replace the marked Quality table block in this README.")
    p.add_argument("--block", default=README_BLOCK,
                   help="The marked block of --readme to replace: <!-- BLOCK:start --> ... <!-- BLOCK:end -->.")
    args = parser.parse_args(argv)
    {"teacher": cmd_teacher, "tune": cmd_tune, "render": cmd_render}[args.command](args)


if __name__ == "__main__":
    main()
