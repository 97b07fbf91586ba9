# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The inference examples run as users run them (a subprocess), in their tiny offline mode."""

import subprocess
import sys

import pytest
from PIL import Image

from testing_utils import REPO_ROOT


@pytest.mark.parametrize("script, output, check", [
    ("inference_flux.py", "flux.png", lambda path: Image.open(path).size == (256, 256)),
    ("inference_wan.py", "wan.gif", lambda path: Image.open(path).n_frames == 9),
])
def test_inference_example_tiny_mode(tmp_path, script, output, check):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script), "--output", str(tmp_path / output)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SLA calls" in result.stdout and f"saved {tmp_path / output}" in result.stdout
    # every self-attention layer ran SLA (the density column holds a number, not '-')
    total = [line for line in result.stdout.splitlines() if line.startswith("total")][0]
    assert float(total.split()[-1]) > 0
    assert check(tmp_path / output)


def test_inference_flux_loads_published_sla_weights(tmp_path):
    # `--sla-weights`: SLA installed with set_attn_processor, then weights published separately are loaded into it.
    import torch

    from diffusers_sla import enable_sla, iter_sla_layers
    from diffusers_sla.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux")
    enable_sla(pipe)
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(pipe.transformer):
            layer.proj_l.bias.fill_(0.25)
    pipe.transformer.save_pretrained(tmp_path / "published" / "transformer")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "inference_flux.py"), "--output", str(tmp_path / "f.png"),
         "--sla-weights", str(tmp_path / "published")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = tmp_path / "published" / "transformer" / "sla_attention.safetensors"
    assert f"loaded SLA weights of 2 layers from {sidecar}" in result.stdout
