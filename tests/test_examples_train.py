# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`examples/train_sla.py` end to end, with its tiny default, as CI and users run it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from safetensors.torch import load_file

from diffusers_sla import SLAConfig, enable_sla, iter_sla_layers
from diffusers_sla.config import SLA_WEIGHTS_NAME

from testing_utils import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "train_sla.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_sla_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{pattern!r} not found in the example's output:\n{text}"
    return float(match.group(1))


def test_train_sla_example_default_run(tmp_path):
    out_dir = tmp_path / "tuned"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output-dir", str(out_dir)],
        check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path,  # a hang guard, not a timing check
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr

    # The student's loss falls and tuned SLA ends closer to full attention than untuned SLA.
    untuned = _number(r"^untuned SLA vs full attention: relative error ([0-9.]+)", log)
    tuned = _number(r"^tuned SLA vs full attention: relative error ([0-9.]+)", log)
    first = _number(r"mean loss of the first \d+ steps ([0-9.e+-]+)", log)
    last = _number(r"-> last \d+ steps ([0-9.e+-]+)", log)
    assert 0 < tuned < untuned and last < first, log
    densities = [float(d) for d in re.findall(r"measured SLA density ([0-9.]+)", log)]
    assert densities and all(0 < d < 1 for d in densities), log
    steps = _load_example().parse_args([]).steps
    assert "SLA fine-tuning: 100%" in log and f"{steps}/{steps}" in log  # the progress bar ran every step

    # Saved for inference: plain diffusers weights without SLA keys, and the SLA weights beside them.
    sla_file = load_file(out_dir / SLA_WEIGHTS_NAME)
    assert sla_file and all(t.abs().sum() > 0 for t in sla_file.values())
    backbone = load_file(out_dir / "diffusion_pytorch_model.safetensors")
    assert not any(".sla." in key for key in backbone)

    # from_pretrained + enable_sla() picks the tuned weights and their SLA config up: the reloaded model has the
    # tuned error.
    example = _load_example()
    args = example.parse_args(["--output-dir", str(out_dir)])
    # on the example's default device (a GPU when there is one), where the subprocess measured `tuned`
    teacher = example.load_transformer(args).to(args.device)
    reloaded = type(teacher).from_pretrained(out_dir).to(args.device)
    enable_sla(reloaded)
    assert next(iter_sla_layers(reloaded))[2].config.operator_dict() == SLAConfig(
        topk=args.topk, blkq=args.block_size, blkk=args.block_size).operator_dict()
    assert all(layer.proj_l.weight.abs().sum() > 0 for _, _, layer in iter_sla_layers(reloaded))
    error = example.relative_error(reloaded, teacher, example.held_out_batches(teacher.config, args), args)
    assert abs(error - tuned) < 1e-4, (error, tuned)
