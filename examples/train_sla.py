# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a Wan transformer with Sparse-Linear Attention (SLA) by distilling its own full-attention outputs.

SLA pays off after fine-tuning (arXiv 2509.24006): the backbone and SLA's float32 projections `proj_l` learn to make
up for what the sparse attention leaves out. The recipe: a frozen full-attention teacher, a student with SLA enabled
(initialised from the same weights), an MSE loss between their outputs, all parameters trained, a small learning rate.

    python examples/train_sla.py                       # tiny random Wan built from a config, on the CPU, ~1 minute
    python examples/train_sla.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda --dtype bfloat16 \\
        --frames 21 --height 60 --width 104 --steps 2000 --lr 1e-5 --topk 0.1 --block-size 64 \\
        --gradient-checkpointing --output-dir wan-sla

Inputs here are synthetic (random latents, timesteps and prompt embeddings) so that the script runs anywhere; for a
real fine-tune, replace `make_batch` with noisy latents and prompt embeddings from your data. The result is saved with
`save_pretrained`; `WanTransformer3DModel.from_pretrained(output_dir)` followed by `enable_sla(model)`
serves it with the tuned SLA weights (it finds `sla_attention.safetensors` and the SLA config stored in it).

Scaling out: SLA's `proj_l` are ordinary parameters, so DDP/FSDP and `accelerate` need nothing special, only this
order: `enable_sla(model)` -> optimizer -> `accelerator.prepare` -> `accelerator.load_state` (a resume).
`save_state` keeps the SLA weights inside the model state. Plain DDP needs every SLA layer to run SLA at every step:
a step whose sequences are shorter than `min_kv_blocks * blkk` keys runs dense and leaves `proj_l` without a
gradient (use `find_unused_parameters=True` if your batches can be that short).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from diffusers import WanTransformer3DModel
from tqdm.auto import tqdm

from diffusers_sla import SLAConfig, enable_sla, reset_sla_stats, sla_summary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Wan transformer or pipeline (path or Hub id); tiny if unset.")
    parser.add_argument("--subfolder", default=None,
                        help="Subfolder of --model; 'transformer' unless it has a config.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4, help="Use ~1e-5 for real checkpoints.")
    parser.add_argument("--topk", type=float, default=0.25, help="Fraction of key blocks attended exactly.")
    parser.add_argument("--block-size", type=int, default=32, help="SLA query/key block size (64 for real models).")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4, help="Latent frames.")
    parser.add_argument("--height", type=int, default=16, help="Latent height.")
    parser.add_argument("--width", type=int, default=16, help="Latent width.")
    parser.add_argument("--output-dir", default="sla-finetuned")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="Autocast compute dtype; weights and proj_l stay float32 (float16 adds a GradScaler).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="Recompute activations in backward (needed for real models at full resolution).")
    return parser.parse_args(argv)


def load_transformer(args) -> WanTransformer3DModel:
    if args.model is None:
        from diffusers_sla.tiny import build_tiny_pipeline

        return build_tiny_pipeline("wan", seed=args.seed).transformer  # random weights, built from a config
    subfolder = args.subfolder
    if subfolder is None and not os.path.isfile(os.path.join(args.model, "config.json")):
        subfolder = "transformer"  # a pipeline (Hub id or folder) rather than a bare transformer
    return WanTransformer3DModel.from_pretrained(args.model, subfolder=subfolder)


def make_batch(config, args, generator: torch.Generator) -> dict:
    """Synthetic inputs of the transformer's shapes: noisy video latents, timesteps and prompt embeddings."""
    b = args.batch_size
    return {
        "hidden_states": torch.randn(b, config.in_channels, args.frames, args.height, args.width, generator=generator),
        "timestep": torch.randint(0, 1000, (b,), generator=generator),
        "encoder_hidden_states": torch.randn(b, 32, config.text_dim, generator=generator),
    }


def held_out_batches(config, args, n: int = 4) -> list[dict]:
    """Fixed batches, never trained on, on which the error vs full attention is measured."""
    return [make_batch(config, args, torch.Generator().manual_seed(10_000 + i)) for i in range(n)]


def run(model, batch, args):
    batch = {k: v.to(args.device) for k, v in batch.items()}
    with torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype], enabled=args.dtype != "float32"):
        return model(**batch, return_dict=False)[0].float()


@torch.no_grad()
def relative_error(student, teacher, eval_batches, args) -> float:
    """‖student − teacher‖ / ‖teacher‖ over held-out batches: how far SLA is from full attention."""
    num = den = 0.0
    for batch in eval_batches:
        target = run(teacher, batch, args)
        num += (run(student, batch, args) - target).square().sum().item()
        den += target.square().sum().item()
    return (num / den) ** 0.5


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    teacher = load_transformer(args).to(args.device)
    # The student starts from the teacher's weights; only it runs SLA. Both keep float32 weights (AMP via autocast).
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False).eval()
    sla_config = SLAConfig(topk=args.topk, blkq=args.block_size, blkk=args.block_size)
    enable_sla(student, sla_config)  # before building the optimizer: it creates the SLA parameters (proj_l)
    student.train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()

    eval_batches = held_out_batches(teacher.config, args)
    untuned = relative_error(student, teacher, eval_batches, args)
    summary = sla_summary(student)
    if summary.sla_calls == 0:
        raise SystemExit(f"No attention call ran SLA, see the routing report:\n{summary}")
    print(f"untuned SLA vs full attention: relative error {untuned:.4f}")

    # Full-parameter fine-tuning: the SLA projections are ordinary parameters of the student.
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.dtype == "float16")
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    reset_sla_stats(student)
    for step in (progress := tqdm(range(1, args.steps + 1), desc="SLA fine-tuning")):
        batch = make_batch(teacher.config, args, generator)
        with torch.no_grad():
            target = run(teacher, batch, args)
        loss = torch.nn.functional.mse_loss(run(student, batch, args), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3e}")
        if step % args.log_every == 0 or step == args.steps:
            # Density = key blocks attended exactly / all key blocks, measured over the SLA calls since the last log.
            density = sla_summary(student).mean_density
            reset_sla_stats(student)
            tqdm.write(f"step {step}: loss {losses[-1]:.4e}, measured SLA density {density:.3f}")

    tuned = relative_error(student, teacher, eval_batches, args)
    window = max(1, min(20, len(losses) // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4e} -> last {window} steps {last:.4e}")
    print(f"tuned SLA vs full attention: relative error {tuned:.4f} (untuned {untuned:.4f}, {tuned / untuned:.0%})")

    # save_pretrained writes the backbone as diffusers does plus sla_attention.safetensors; enable_sla on the
    # reloaded model replays the latter (with the same SLA config).
    student.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}; serve with WanTransformer3DModel.from_pretrained({args.output_dir!r}) then "
          "enable_sla(model): it loads the tuned SLA weights and the SLA config they were trained with")
    if tuned >= untuned:
        raise SystemExit("Fine-tuning did not bring SLA closer to full attention: try more --steps or another --lr.")
    return {"untuned_error": untuned, "tuned_error": tuned, "first_loss": first, "last_loss": last}


if __name__ == "__main__":
    main()
