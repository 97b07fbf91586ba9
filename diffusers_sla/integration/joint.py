# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Joint text+image attention: where each processor puts the text tokens, for `SLAConfig.protect_text`."""

from __future__ import annotations

import torch
from torch import nn

from diffusers_sla.config import SLAConfig

from .modules import INNER_PROCESSOR_ATTR

# Where each joint-attention processor puts the text tokens in the sequence it hands to SDPA (diffusers 0.42.1):
# Flux and QwenImage `cat([text, image])`, CogVideoX `cat([encoder_hidden_states, hidden_states])`, SD3's joint
# processors and HunyuanVideo's (double and single blocks) `cat([image, text])`. The text length is
# `encoder_hidden_states.shape[1]`, or, for Flux's single-stream blocks (whose processor gets the joint sequence with
# no `encoder_hidden_states`), the block's `encoder_hidden_states` recorded by `_record_single_block_text`.
JOINT_TEXT_POSITION = {
    "FluxAttnProcessor": "first", "FluxIPAdapterAttnProcessor": "first", "FluxAttnProcessor2_0": "first",
    "FusedFluxAttnProcessor2_0": "first", "QwenDoubleStreamAttnProcessor2_0": "first",
    "CogVideoXAttnProcessor2_0": "first", "FusedCogVideoXAttnProcessor2_0": "first",
    "JointAttnProcessor2_0": "last", "FusedJointAttnProcessor2_0": "last", "SD3IPAdapterJointAttnProcessor2_0": "last",
    "HunyuanVideoAttnProcessor2_0": "last",
}
# Blocks that concatenate text and image before their attention module: (class name, the attention child's name).
_SINGLE_STREAM_BLOCKS = {"FluxSingleTransformerBlock": "attn"}
_BLOCK_TEXT_ATTR = "_sla_block_text_tokens"


def is_joint_attention(attn: nn.Module) -> bool:
    """Whether `attn` runs a joint text+image processor, where `SLAConfig.protect_text` changes results."""
    return type(attn.__dict__.get(INNER_PROCESSOR_ATTR)).__name__ in JOINT_TEXT_POSITION


def operator_differences_for(attn: nn.Module, installed: SLAConfig, stored: SLAConfig) -> dict:
    """`installed.operator_differences(stored)`, less `protect_text` where `attn` has no text to protect."""
    differences = installed.operator_differences(stored)
    if "protect_text" in differences and not is_joint_attention(attn):
        del differences["protect_text"]
    return differences


def text_tokens(attn: nn.Module, inner, args: tuple, kwargs: dict) -> tuple | None:
    """("first" | "last", n): where a joint-attention call's n text tokens sit (`JOINT_TEXT_POSITION`), or None."""
    position = JOINT_TEXT_POSITION.get(type(inner).__name__)
    if position is None:
        return None
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[1] if len(args) > 1 else None)
    if isinstance(encoder, torch.Tensor) and encoder.ndim == 3:
        return (position, encoder.shape[1])
    recorded = attn.__dict__.get(_BLOCK_TEXT_ATTR)
    return None if recorded is None else (position, recorded)


def _record_single_block_text(block: nn.Module, args: tuple, kwargs: dict) -> None:
    # forward pre-hook of a single-stream block: its attention module sees text + image as one sequence
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[1] if len(args) > 1 else None)
    attn = block._modules.get(_SINGLE_STREAM_BLOCKS[type(block).__name__])
    if attn is not None:
        attn.__dict__[_BLOCK_TEXT_ATTR] = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None


def hook_single_stream_blocks(model: nn.Module) -> None:
    for block in model.modules():
        if type(block).__name__ in _SINGLE_STREAM_BLOCKS and not block.__dict__.get("_sla_text_hook"):
            block.register_forward_pre_hook(_record_single_block_text, with_kwargs=True)
            block.__dict__["_sla_text_hook"] = True
