# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Text-to-video with Wan and SLA.

    python examples/inference_wan.py                                    # tiny offline pipeline, random weights
    python examples/inference_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" \
        --sla-weights user/wan-sla-finetune --device cuda --dtype bfloat16 --output cat.mp4

A pipeline saved after SLA fine-tuning carries `transformer/sla_attention.safetensors`: `enable_sla` finds and loads it
by itself. `--sla-weights` loads SLA weights published separately (a folder, a file or a Hub repo id).
"""

import argparse

import torch
from diffusers.utils import export_to_gif, export_to_video

from diffusers_sla import SLAConfig, enable_sla, load_sla, sla_summary
from diffusers_sla.tiny import build_tiny_pipeline, tiny_prompt_embeddings

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="Hub id or folder of a Wan pipeline (default: tiny offline pipeline)")
parser.add_argument("--sla-weights", help="folder, file or Hub repo id of sla_attention.safetensors")
parser.add_argument("--prompt", default="A cat walks on the grass, realistic")
parser.add_argument("--topk", type=float, default=None, help="override the stored/default topk (0.2)")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=81)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
parser.add_argument("--output", default="wan_sla.gif", help=".gif (Pillow) or .mp4 (needs imageio or opencv)")
args = parser.parse_args()

if args.model:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
else:  # tiny offline pipeline: small sizes, random prompt embeddings instead of a text encoder
    pipe = build_tiny_pipeline("wan")
    args.height, args.width, args.frames, args.steps = 256, 256, 9, 4
pipe.to(args.device)
inputs = {"prompt": args.prompt} if args.model else tiny_prompt_embeddings(pipe)

# One line: SLA on every attention module of the transformer (each layer with its own proj_l).
enable_sla(pipe, None if args.topk is None else SLAConfig(topk=args.topk))
if args.sla_weights:
    for loaded in load_sla(pipe, args.sla_weights):
        print(f"loaded SLA weights of {len(loaded.loaded_layers)} layers from {loaded.source}")

video = pipe(**inputs, height=args.height, width=args.width, num_frames=args.frames,
             num_inference_steps=args.steps, output_type="pil", generator=torch.Generator().manual_seed(0)).frames[0]
if args.output.endswith(".gif"):
    export_to_gif(video, args.output, fps=16)
else:
    export_to_video(video, args.output, fps=16)
print(sla_summary(pipe))
print(f"saved {args.output}")
