# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Tiny diffusers transformers (and two tiny pipelines) built from configs: offline, float32, fast on a CPU.

Every builder returns a `TinyModel(model, make_inputs)`: `make_inputs(seed=0, batch_size=2)` gives the keyword
arguments of `model(**inputs)`, with random (never zero) tensors. Sequence lengths are chosen so that the joint or
self-attention key sequence spans at least two key blocks of 32 (the block size of `TEST_SLA_CONFIG`), and RoPE
inputs are non-trivial, so that a processor that lost RoPE, a mask or a branch changes the output.

    from tiny_models import build_tiny_model, forward_output
    model, make_inputs = build_tiny_model("flux", seed=0)
    out = forward_output(model, make_inputs(seed=1))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

FAMILIES = ("flux", "sd3", "sd35", "wan", "qwenimage", "hunyuanvideo", "cogvideox", "ltx", "pixart", "sana")
PIPELINE_FAMILIES = ("flux", "wan")

# Small blocks and a low `min_kv_blocks`, so that SLA engages on sequences of 64+ tokens.
TEST_SLA_OVERRIDES = {"blkq": 32, "blkk": 32, "min_kv_blocks": 2}


class TinyModel(NamedTuple):
    model: torch.nn.Module
    make_inputs: Callable[..., dict]


def forward_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Run `model(**inputs)` and return its main output tensor, whatever wrapper the model returns it in."""
    output = model(**inputs, return_dict=False)
    return output[0] if isinstance(output, (tuple, list)) else output


def randomize_proj_l(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every SLA layer's `proj_l` non-zero weights, so that the linear branch changes the output."""
    from diffusers_sla import iter_sla_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(model):
            layer.proj_l.weight.copy_(torch.randn(layer.proj_l.weight.shape, generator=gen) * 0.5)
            layer.proj_l.bias.copy_(torch.randn(layer.proj_l.bias.shape, generator=gen) * 0.1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _timesteps(gen: torch.Generator, batch_size: int, scale: float = 1000.0) -> torch.Tensor:
    return torch.rand(batch_size, generator=gen) * scale


# ===== Builders: each returns (model, make_inputs) =====


def _flux_image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _build_flux() -> TinyModel:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    grid, text_len = 8, 8  # 64 image tokens + 8 text tokens

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        txt_ids = torch.zeros(text_len, 3)
        txt_ids[:, 0] = torch.arange(text_len)
        return {
            "hidden_states": _randn(gen, batch_size, grid * grid, 16),
            "encoder_hidden_states": _randn(gen, batch_size, text_len, 32),
            "pooled_projections": _randn(gen, batch_size, 32),
            "timestep": torch.rand(batch_size, generator=gen),
            "img_ids": _flux_image_ids(grid, grid),
            "txt_ids": txt_ids,
        }

    return TinyModel(model, make_inputs)


def _build_sd3(dual_attention: bool) -> TinyModel:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    )

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        return {
            "hidden_states": _randn(gen, batch_size, 4, 16, 16),  # 64 image tokens
            "encoder_hidden_states": _randn(gen, batch_size, 8, 32),
            "pooled_projections": _randn(gen, batch_size, 32),
            "timestep": _timesteps(gen, batch_size),
        }

    return TinyModel(model, make_inputs)


def _build_wan() -> TinyModel:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        return {
            "hidden_states": _randn(gen, batch_size, 4, 2, 12, 12),  # 2 x 6 x 6 = 72 video tokens
            "timestep": _timesteps(gen, batch_size),
            "encoder_hidden_states": _randn(gen, batch_size, 8, 32),
        }

    return TinyModel(model, make_inputs)


def _build_qwenimage() -> TinyModel:
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )
    grid, text_len = 8, 10

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        # Text padding differs per sample: the joint attention gets a real key padding mask.
        text_mask = torch.ones(batch_size, text_len, dtype=torch.long)
        text_mask[-1, -3:] = 0
        return {
            "hidden_states": _randn(gen, batch_size, grid * grid, 16),
            "encoder_hidden_states": _randn(gen, batch_size, text_len, 32),
            "encoder_hidden_states_mask": text_mask,
            "timestep": torch.rand(batch_size, generator=gen),
            "img_shapes": [[(1, grid, grid)]] * batch_size,
        }

    return TinyModel(model, make_inputs)


def _build_hunyuanvideo() -> TinyModel:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    )
    text_len = 8

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        text_mask = torch.ones(batch_size, text_len, dtype=torch.long)
        text_mask[-1, -3:] = 0  # the last sample has 3 padding tokens
        return {
            "hidden_states": _randn(gen, batch_size, 4, 2, 12, 12),  # 2 x 6 x 6 = 72 video tokens
            "timestep": _timesteps(gen, batch_size),
            "encoder_hidden_states": _randn(gen, batch_size, text_len, 32),
            "encoder_attention_mask": text_mask,
            "pooled_projections": _randn(gen, batch_size, 16),
            "guidance": torch.full((batch_size,), 3500.0),
        }

    return TinyModel(model, make_inputs)


def _build_cogvideox() -> TinyModel:
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    head_dim, frames, grid = 16, 2, 6
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=12, sample_height=12, sample_frames=5, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True,
    )

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        rotary = get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid), temporal_size=frames
        )
        return {
            "hidden_states": _randn(gen, batch_size, frames, 4, 2 * grid, 2 * grid),  # 72 video tokens
            "encoder_hidden_states": _randn(gen, batch_size, 8, 32),
            "timestep": _timesteps(gen, batch_size),
            "image_rotary_emb": rotary,
        }

    return TinyModel(model, make_inputs)


def _build_ltx() -> TinyModel:
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    )
    frames, grid = 2, 6

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        return {
            "hidden_states": _randn(gen, batch_size, frames * grid * grid, 8),  # 72 video tokens
            "encoder_hidden_states": _randn(gen, batch_size, 8, 32),
            "timestep": _timesteps(gen, batch_size),
            "encoder_attention_mask": torch.ones(batch_size, 8),
            "num_frames": frames,
            "height": grid,
            "width": grid,
            "rope_interpolation_scale": (8 / 25, 32, 32),
        }

    return TinyModel(model, make_inputs)


def _build_pixart() -> TinyModel:
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=16, patch_size=2, caption_channels=32,
    )

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        return {
            "hidden_states": _randn(gen, batch_size, 4, 16, 16),  # 64 image tokens
            "encoder_hidden_states": _randn(gen, batch_size, 8, 32),
            "timestep": _timesteps(gen, batch_size),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return TinyModel(model, make_inputs)


def _build_sana() -> TinyModel:
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8, patch_size=1,
    )

    def make_inputs(seed: int = 0, batch_size: int = 2) -> dict:
        gen = _generator(seed)
        # Sana's self-attention is linear attention; its softmax attention is the cross-attention to the text,
        # so the text is long enough (72 tokens) for SLA to engage there when `cross_attention="sla"`.
        return {
            "hidden_states": _randn(gen, batch_size, 4, 8, 8),
            "encoder_hidden_states": _randn(gen, batch_size, 72, 32),
            "timestep": _timesteps(gen, batch_size),
        }

    return TinyModel(model, make_inputs)


_BUILDERS: dict[str, Callable[[], TinyModel]] = {
    "flux": _build_flux,
    "sd3": lambda: _build_sd3(dual_attention=False),
    "sd35": lambda: _build_sd3(dual_attention=True),
    "wan": _build_wan,
    "qwenimage": _build_qwenimage,
    "hunyuanvideo": _build_hunyuanvideo,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "pixart": _build_pixart,
    "sana": _build_sana,
}


def build_tiny_model(family: str, seed: int = 0) -> TinyModel:
    """A tiny float32 transformer of `family` (one of `FAMILIES`) in eval mode, weights drawn from `seed`."""
    if family not in _BUILDERS:
        raise ValueError(f"`family` must be one of {list(FAMILIES)}, got {family!r}.")
    torch.manual_seed(seed)
    tiny = _BUILDERS[family]()
    tiny.model.eval()
    return tiny


# ===== Pipelines: tiny components, no text encoder (prompt embeddings are passed in) =====
# Not `diffusers_sla.tiny`'s (the demo's, whose Wan latents are wider): each of these holds the transformer
# `build_tiny_model` builds, so that a test can move inputs and SLA weights between a model and a pipeline.

# The size of a call: 64+ image tokens per step, so that SLA engages at `TEST_SLA_OVERRIDES`.
_PIPELINE_CALLS = {
    "flux": {"height": 32, "width": 32, "guidance_scale": 1.0},  # latents 16 x 16 -> 8 x 8 = 64 packed tokens
    # latents 12 x 12 -> 6 x 6 = 36 tokens per frame, 2 latent frames
    "wan": {"height": 96, "width": 96, "num_frames": 5, "guidance_scale": 2.0},
}


def build_tiny_pipeline(family: str, seed: int = 0):
    """`(pipeline, make_call_kwargs)` for `family` in `PIPELINE_FAMILIES`. The pipeline has no text encoder or
    tokenizer; `make_call_kwargs(seed=0)` gives prompt embeddings, a small size, 2 steps and `output_type="pt"`."""
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"`family` must be one of {list(PIPELINE_FAMILIES)}, got {family!r}.")
    torch.manual_seed(seed)
    pipe = _build_flux_pipeline() if family == "flux" else _build_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def make_call_kwargs(seed: int = 0) -> dict:
        gen = _generator(seed)
        embeds = {"prompt_embeds": _randn(gen, 1, 8, 32)}
        if family == "flux":
            embeds["pooled_prompt_embeds"] = _randn(gen, 1, 32)
        else:
            embeds["negative_prompt_embeds"] = _randn(gen, 1, 8, 32)
        return {**embeds, **_PIPELINE_CALLS[family], "num_inference_steps": 2, "output_type": "pt",
                "generator": _generator(seed + 1)}

    return pipe, make_call_kwargs


def _build_flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = _build_flux().model
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )


def _build_wan_pipeline():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    transformer = _build_wan().model
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 2.0, 1.0, 2.5],
    )
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=UniPCMultistepScheduler(flow_shift=3.0),
        transformer=transformer,
    )
