# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Tiny, randomly initialised diffusers pipelines built from configs: no download, seconds on a CPU.

They are what `diffusers-sla demo` and the examples run when no real checkpoint is given. Text encoders are left out
(`None`): the callers pass random prompt embeddings, so no tokenizer or text-encoder weights are needed.
"""

from __future__ import annotations

import torch

TINY_FAMILIES = ("wan", "flux")


def build_tiny_pipeline(family: str = "wan", seed: int = 0):
    """A tiny `WanPipeline` (text-to-video) or `FluxPipeline` (text-to-image) with random weights."""
    torch.manual_seed(seed)
    if family == "wan":
        return _tiny_wan()
    if family == "flux":
        return _tiny_flux()
    raise ValueError(f"`family` must be one of {list(TINY_FAMILIES)}, got {family!r}.")


def tiny_prompt_embeddings(pipe, seed: int = 0, batch: int = 1, text_tokens: int = 16) -> dict:
    """Random prompt embeddings of the right shapes for `pipe`, as keyword arguments of its `__call__`, on the
    transformer's device (the pipelines do not move given embeddings; drawn on the CPU, so the same on any device)."""
    g = torch.Generator().manual_seed(seed)
    config = pipe.transformer.config
    if type(pipe).__name__ == "WanPipeline":
        shape = (batch, text_tokens, config.text_dim)
        embeds = {"prompt_embeds": torch.randn(shape, generator=g),
                  "negative_prompt_embeds": torch.randn(shape, generator=g)}
    else:
        embeds = {
            "prompt_embeds": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, config.pooled_projection_dim, generator=g),
        }
    return {name: tensor.to(pipe.transformer.device) for name, tensor in embeds.items()}


def _tiny_wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)


def _tiny_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
