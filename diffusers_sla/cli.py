# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The `diffusers-sla` command (also `python -m diffusers_sla`).

    diffusers-sla demo [--family wan|flux]       offline: dense vs SLA on a tiny pipeline, images, save + reload
    diffusers-sla inspect FILE_OR_DIR_OR_REPO    what an sla_attention.safetensors holds
    diffusers-sla convert SRC OUT --model M      SimpleTuner sla_attention.pt / TurboDiffusion Wan .pth -> safetensors
    diffusers-sla bench [...]                    the kernel benchmark (a CUDA GPU and a clone of the repository)

Each subcommand is a small class with `register_subcommand(subparsers)` and `run()`, which imports what it runs
(torch and diffusers take seconds to import: `diffusers-sla --help` should not wait for them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


class DemoCommand:
    @staticmethod
    def register_subcommand(subparsers) -> None:
        parser = subparsers.add_parser("demo", help="offline demo: dense vs SLA on a tiny pipeline built from configs")
        parser.add_argument("--family", choices=["wan", "flux"], default="wan",
                            help="tiny Wan text-to-video (default) or Flux text-to-image pipeline")
        parser.add_argument("--output-dir", default="sla-demo-output", help="where images and the saved pipeline go")
        parser.add_argument("--topk", type=float, default=0.2, help="fraction of key blocks kept for exact attention")
        parser.add_argument("--steps", type=int, default=4, help="denoising steps")
        parser.add_argument("--height", type=int, default=None, help="default 256 (wan) / 512 (flux)")
        parser.add_argument("--width", type=int, default=None, help="default 256 (wan) / 512 (flux)")
        parser.add_argument("--frames", type=int, default=9, help="video frames (wan)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        parser.set_defaults(command=DemoCommand)

    def __init__(self, args):
        self.args = args

    def run(self) -> int:
        from .demo import run_demo

        a = self.args
        default_size = 256 if a.family == "wan" else 512
        result = run_demo(a.family, a.output_dir, topk=a.topk, steps=a.steps, height=a.height or default_size,
                          width=a.width or default_size, frames=a.frames, seed=a.seed, device=a.device)
        print(f"done: SLA ran with mean density {result.mean_density:.3f}; outputs in {result.output_dir}")
        return 0


class InspectCommand:
    @staticmethod
    def register_subcommand(subparsers) -> None:
        parser = subparsers.add_parser("inspect", help="show what an sla_attention.safetensors holds")
        parser.add_argument("source", help="the file, a model or pipeline folder, or a Hub repo id")
        parser.add_argument("--subfolder", default=None, help="folder inside SOURCE (e.g. transformer)")
        parser.set_defaults(command=InspectCommand)

    def __init__(self, args):
        self.args = args

    def run(self) -> int:
        import torch

        from .config import SLA_WEIGHTS_NAME
        from .weights.format import read_sla_file
        from .weights.hub import resolve_sla_file

        source, subfolder = self.args.source, self.args.subfolder
        path, where = resolve_sla_file(source, subfolder)
        if path is None and subfolder is None and Path(source, "transformer", SLA_WEIGHTS_NAME).is_file():
            path = str(Path(source, "transformer", SLA_WEIGHTS_NAME))  # a pipeline folder
        if path is None:
            print(f"no {SLA_WEIGHTS_NAME} at {where}", file=sys.stderr)
            return 1
        weights = read_sla_file(path)
        print(f"file: {weights.path}")
        for key, value in sorted(weights.metadata.items()):
            if key != "sla_config":
                print(f"  {key}: {value}")
        print("config:")
        for key, value in weights.config.to_dict().items():
            print(f"  {key}: {value}")
        # a damaged or hand-made file may lack a bias or hold entries of its own: show what is there
        entries = {"weight": {}, "bias": {}, "fusion_ratio_weight": {}, "fusion_ratio_bias": {}}
        others = []
        for name, tensor in weights.tensors.items():
            layer, _, param = name.rpartition(".proj_l.")
            if not layer:  # a fusion's parameters sit beside proj_l (`fusion="ratio"`: the gate's u and c)
                layer, _, param = name.rpartition(".")
                param = param if param.startswith("fusion_") else ""
            if layer and param in entries:
                entries[param][layer] = tensor
            else:
                others.append(name)
        layers = sorted(set(entries["weight"]) | set(entries["bias"]))
        gate = bool(entries["fusion_ratio_weight"] or entries["fusion_ratio_bias"])
        rows = [("layer", "weight", "bias", "|W|", "|b|", "dtype", "topk") + (("sigmoid(c)", "|u|") if gate else ())]
        for layer in layers:
            w, b = entries["weight"].get(layer), entries["bias"].get(layer)
            row = (layer, _shape(w), _shape(b), _norm(w), _norm(b),
                   str((w if w is not None else b).dtype).replace("torch.", ""),
                   f"{weights.config_for(layer).topk:g}")  # per layer: `layer_topk` saves its own
            if gate:
                u, c = entries["fusion_ratio_weight"].get(layer), entries["fusion_ratio_bias"].get(layer)
                row += ("-" if c is None else f"{float(torch.sigmoid(c.float()).flatten()[0]):.4g}", _norm(u))
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print(f"layers: {len(layers)}")
        for index, row in enumerate(rows):
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if index == 0:
                print("  " + "  ".join("-" * width for width in widths))
        if others:
            print(f"other entries (not loaded): {sorted(others)}")
        return 0


def _shape(tensor) -> str:
    return "-" if tensor is None else "x".join(map(str, tensor.shape)) or "scalar"


def _norm(tensor) -> str:
    return "-" if tensor is None else f"{tensor.float().norm():.4g}"


class ConvertCommand:
    @staticmethod
    def register_subcommand(subparsers) -> None:
        parser = subparsers.add_parser(
            "convert", help="convert SimpleTuner's sla_attention.pt or a TurboDiffusion Wan .pth to safetensors")
        parser.add_argument("source", help="sla_attention.pt (SimpleTuner) or a TurboDiffusion Wan .pth")
        parser.add_argument("output", help="output file or folder (sla_attention.safetensors is written there)")
        parser.add_argument("--model", required=True,
                            help="the diffusers model the weights are for: a model or pipeline folder")
        parser.add_argument("--format", choices=["auto", "simpletuner", "turbodiffusion"], default="auto",
                            help="source format (auto: by file name, .pt = SimpleTuner, .pth = TurboDiffusion)")
        parser.add_argument("--config", default=None,
                            help='SLA settings as JSON, e.g. \'{"topk": 0.1}\' (TurboDiffusion files store none)')
        parser.add_argument("--subfolder", default=None, help="model subfolder inside --model")
        parser.set_defaults(command=ConvertCommand)

    def __init__(self, args):
        self.args = args

    def run(self) -> int:
        from .weights.converters import convert_simpletuner_sla, convert_turbodiffusion_wan

        a = self.args
        kind = a.format
        if kind == "auto":
            kind = "simpletuner" if a.source.endswith(".pt") else "turbodiffusion"
        convert = convert_simpletuner_sla if kind == "simpletuner" else convert_turbodiffusion_wan
        result = convert(a.source, a.model, a.output, config=a.config, subfolder=a.subfolder)
        print(f"wrote {result.path}: {len(result.tensors) // 2} layers, config {result.config.operator_dict()}")
        for source, paths in result.matched.items():
            print(f"  {source} -> {len(paths)} layers")
        if result.unmatched_layers:
            print(f"  no weights for {len(result.unmatched_layers)} layers (they stay zero-initialised): "
                  + ", ".join(result.unmatched_layers[:8]))
        return 0


def benchmark_suite_root() -> Path | None:
    """The repository whose benchmark suite `bench` runs: the clone this package was imported from (an editable
    install, or the repository on PYTHONPATH), else the current folder; None when neither holds it (a wheel install:
    the suite is not packaged, it imports the package's internals and reads the repository's golden files)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "benchmarks" / "kernel.py").is_file():
            return root
    return None


class BenchCommand:
    @staticmethod
    def register_subcommand(subparsers) -> None:
        parser = subparsers.add_parser("bench", help="kernel benchmark vs SDPA flash/cuDNN (needs a CUDA GPU and a "
                                                     "clone of the repository: python -m benchmarks.kernel)")
        parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "sweep", "check", "all"])
        parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed on to python -m benchmarks.kernel")
        parser.set_defaults(command=BenchCommand)

    def __init__(self, args):
        self.args = args

    def run(self) -> int:
        import torch

        root = benchmark_suite_root()
        if root is None:
            print("diffusers-sla bench runs the repository's benchmark suite (`python -m benchmarks.kernel`), which "
                  "is not part of the installed package: run it from the root of a clone of the repository "
                  "(`python -m benchmarks.kernel bench`, or `diffusers-sla bench` there).", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("diffusers-sla bench needs a CUDA GPU (the Triton kernels are GPU code); none is visible here.",
                  file=sys.stderr)
            return 2
        # the suite is imported from `root` as a package, exactly as `python -m benchmarks.kernel` in that folder
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
        return subprocess.call([sys.executable, "-m", "benchmarks.kernel", self.args.mode, *self.args.extra], env=env)


COMMANDS = (DemoCommand, InspectCommand, ConvertCommand, BenchCommand)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-sla", description="Sparse-Linear Attention for Diffusers.")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for command in COMMANDS:
        command.register_subcommand(subparsers)
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 1
    try:
        return args.command(args).run()
    except (ValueError, OSError) as err:
        # a user error (a bad path or file, a bad value): one line, no traceback
        command = argv[0] if argv else (sys.argv[1] if len(sys.argv) > 1 else "")
        print(f"diffusers-sla {command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
