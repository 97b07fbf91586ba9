# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The `diffusers-sla` command: demo, inspect, convert, bench (`cli.py`, `demo.py`)."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusers_sla import cli
from diffusers_sla.cli import main
from diffusers_sla.tiny import build_tiny_pipeline
from testing_utils import REPO_ROOT


def test_demo_wan_end_to_end(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn1" in out and "cross_attention" in out  # per-layer table, with the dense reason
    assert "max abs difference 0.00e+00" in out  # save -> reload reproduced the SLA run exactly
    png, gif = tmp_path / "wan_dense_vs_sla.png", tmp_path / "wan_dense_vs_sla.gif"
    assert Image.open(png).size == (3 * 256 + 16, 256)
    assert Image.open(gif).n_frames == 9
    assert (tmp_path / "wan_pipeline" / "transformer" / "sla_attention.safetensors").is_file()


def test_demo_flux(tmp_path, capsys):
    assert main(["demo", "--family", "flux", "--output-dir", str(tmp_path), "--steps", "2", "--height", "256",
                 "--width", "256"]) == 0
    out = capsys.readouterr().out
    assert "single_transformer_blocks.0.attn" in out
    assert (tmp_path / "flux_dense_vs_sla.png").is_file()


@pytest.fixture
def saved_wan_transformer(tmp_path):
    from diffusers_sla import enable_sla, iter_sla_layers

    transformer = build_tiny_pipeline("wan").transformer
    enable_sla(transformer)
    with torch.no_grad():
        for _, _, layer in iter_sla_layers(transformer):
            layer.proj_l.weight.normal_()
            layer.proj_l.bias.fill_(0.5)
    transformer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_inspect_prints_config_layers_and_norms(saved_wan_transformer, capsys):
    assert main(["inspect", str(saved_wan_transformer)]) == 0
    out = capsys.readouterr().out
    assert "topk: 0.2" in out and "layers: 2" in out
    assert "blocks.1.attn1  32x32   32" in out
    assert f"{0.5 * 32 ** 0.5:.4g}" in out  # |b| of a bias filled with 0.5


def _inspect_tiny_wan(tmp_path, capsys, **overrides) -> str:
    """`diffusers-sla inspect`'s output for a tiny Wan transformer saved with SLA enabled with `overrides`."""
    from diffusers_sla import enable_sla

    transformer = build_tiny_pipeline("wan").transformer
    enable_sla(transformer, **overrides)
    transformer.save_pretrained(tmp_path / "model")
    assert main(["inspect", str(tmp_path / "model")]) == 0
    return capsys.readouterr().out


def test_inspect_shows_the_sparse_only_scope(tmp_path, capsys):
    out = _inspect_tiny_wan(tmp_path, capsys, linear_scope="none")
    assert "linear_scope: none" in out and "layers: 2" in out


def test_inspect_shows_the_ratio_gate(tmp_path, capsys):
    """A fusion="ratio" file holds two gate entries per layer beside proj_l: still one row per layer, with the gate."""
    out = _inspect_tiny_wan(tmp_path, capsys, fusion="ratio")
    assert "fusion: ratio" in out and "layers: 2" in out and "sigmoid(c)" in out
    assert "0.9526" in out  # sigmoid(3), the gate's initial bias


def test_inspect_missing_file_fails_clearly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no sla_attention.safetensors" in capsys.readouterr().err


def test_inspect_shows_extra_and_missing_entries(saved_wan_transformer, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved_wan_transformer / "sla_attention.safetensors"), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    del tensors["blocks.0.attn1.proj_l.bias"]
    tensors["blocks.0.attn1.proj_l.extra"] = torch.ones(3)
    tensors["stray"] = torch.ones(2)
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata=metadata)
    assert main(["inspect", str(tmp_path / "odd.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "blocks.0.attn1  32x32   -" in captured.out  # the missing bias
    assert "other entries (not loaded): ['blocks.0.attn1.proj_l.extra', 'stray']" in captured.out


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffusers_sla", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_convert_user_errors_are_one_line_not_tracebacks(saved_wan_transformer, tmp_path):
    legacy = tmp_path / "sla_attention.pt"
    torch.save({"settings": {}, "state": {"32:torch.bfloat16": {"proj_l.weight": torch.randn(32, 32),
                                                               "proj_l.bias": torch.randn(32)}}}, legacy)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    cases = [
        (("convert", legacy, a_file / "out", "--model", saved_wan_transformer), "a_file"),
        (("convert", legacy, tmp_path / "out", "--model", binary), "model.bin"),
        (("convert", legacy, tmp_path / "out", "--model", listed), "list.json"),
        (("convert", tmp_path / "missing.pt", tmp_path / "out", "--model", saved_wan_transformer), "missing.pt"),
        (("inspect", binary), "model.bin"),
    ]
    for args, named in cases:
        result = _run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr and "error:" in result.stderr and named in result.stderr, result.stderr


def test_convert_simpletuner_file(saved_wan_transformer, tmp_path, capsys):
    weight, bias = torch.randn(32, 32), torch.randn(32)
    legacy = tmp_path / "sla_attention.pt"
    torch.save({"settings": {"topk": 0.2}, "state": {"32:torch.bfloat16": {"proj_l.weight": weight,
                                                                          "proj_l.bias": bias}}}, legacy)
    out_dir = tmp_path / "converted"
    assert main(["convert", str(legacy), str(out_dir), "--model", str(saved_wan_transformer)]) == 0
    assert "2 layers" in capsys.readouterr().out
    from diffusers_sla import read_sla_file

    weights = read_sla_file(out_dir / "sla_attention.safetensors")
    assert torch.equal(weights.tensors["blocks.1.attn1.proj_l.weight"], weight)


def test_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err



def test_bench_from_an_installed_package_outside_a_clone_says_where_the_suite_is(tmp_path, monkeypatch, capsys):
    # the package imported from a folder that holds no benchmark suite (as from a wheel), run from another folder
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "diffusers_sla" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.benchmark_suite_root() is None
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "not part of the installed package" in err and "python -m benchmarks.kernel bench" in err


def test_bench_runs_the_clone_s_suite_as_a_package(tmp_path, monkeypatch):
    # installed outside the clone, run from the clone's root: the suite found there, run as `-m benchmarks.kernel`
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "diffusers_sla" / "cli.py"))
    monkeypatch.chdir(REPO_ROOT)
    assert cli.benchmark_suite_root() == REPO_ROOT
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU run itself is the lead's
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert main(["bench", "sweep", "--topks", "0.1"]) == 0
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "benchmarks.kernel", "sweep", "--topks", "0.1"]
    # that command imports the suite from any folder: its argument parsing answers without a GPU
    result = subprocess.run([*cmd[:3], "--help"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "{check,bench,sweep,all,quick}" in result.stdout


def test_module_entry_point_and_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "diffusers_sla", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout
    result = subprocess.run([sys.executable, "-m", "diffusers_sla", "demo", "--family", "sd9"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "invalid choice: 'sd9'" in result.stderr
