# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Text-to-image with Flux and SLA.

    python examples/inference_flux.py                                   # tiny offline pipeline, random weights
    python examples/inference_flux.py --model black-forest-labs/FLUX.1-dev --prompt "a red fox" --device cuda

Same pattern as `inference_wan.py`: `set_attn_processor(SLAAttnProcessor(...))` installs SLA; weights saved beside
the transformer are loaded by `enable_sla` (or explicitly by `load_sla`).
"""

import argparse

import torch

from diffusers_sla import SLAAttnProcessor, load_sla, sla_summary
from diffusers_sla.tiny import build_tiny_pipeline, tiny_prompt_embeddings

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="Hub id or folder of a Flux pipeline (default: tiny offline pipeline)")
parser.add_argument("--sla-weights", help="folder, file or Hub repo id of sla_attention.safetensors")
parser.add_argument("--prompt", default="A photo of a red fox in the snow")
parser.add_argument("--topk", type=float, default=0.2)
parser.add_argument("--size", type=int, default=1024)
parser.add_argument("--steps", type=int, default=28)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output", default="flux_sla.png")
args = parser.parse_args()

if args.model:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
else:  # tiny offline pipeline: small sizes, random prompt embeddings instead of text encoders
    pipe = build_tiny_pipeline("flux")
    args.size, args.steps = 256, 4
pipe.to(args.device)
inputs = {"prompt": args.prompt} if args.model else tiny_prompt_embeddings(pipe)

# The diffusers-native way: one processor object for all modules; each layer still gets its own SLA state.
pipe.transformer.set_attn_processor(SLAAttnProcessor(topk=args.topk))
if args.sla_weights:
    for loaded in load_sla(pipe, args.sla_weights):
        print(f"loaded SLA weights of {len(loaded.loaded_layers)} layers from {loaded.source}")

image = pipe(**inputs, height=args.size, width=args.size, num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(args.output)
print(sla_summary(pipe))
print(f"saved {args.output}")
