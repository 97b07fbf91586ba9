# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SLAConfig.fusion` ("mass", "ratio"; `ops/fusion.py`): the PyTorch operator against a dense float64 restatement,
gradients by gradcheck, the mass estimate against the true rest mass, the default "sla" unchanged, the layer's gate
parameters, the Triton backend's logged fallback and the sidecar round trip. The fusions on the Triton kernels:
`tests/kernels/test_fusion_kernels.py`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from testing_utils import rel_err
from tiny_models import TEST_SLA_OVERRIDES, build_tiny_model, forward_output

from diffusers_sla import SLAConfig, SparseLinearAttention, sparse_linear_attention
from diffusers_sla.config import SLA_WEIGHTS_NAME
from diffusers_sla.integration.install import enable_sla
from diffusers_sla.integration.layer import iter_sla_layers
from diffusers_sla.ops import fusion as fusion_ops
from diffusers_sla.ops.reference import LINEAR_EPS, apply_feature_map, sla_reference
from diffusers_sla.ops.selection import lut_to_block_map, select_blocks
from diffusers_sla.utils.import_utils import is_triton_available
from diffusers_sla.weights.format import read_sla_file
from diffusers_sla.weights.io import get_sla_state_dict


def dense_fused(q, k, v, weight, bias, block_map, blkq, blkk, feature_map, scale, fusion, u=None, c=None):
    """The fusions written over full (Lq, Lk) matrices in float64, the rest's moments block by block in a loop."""
    q, k, v, weight, bias = (x.double() for x in (q, k, v, weight, bias))
    Lq, Lk = q.shape[2], k.shape[2]
    exact = block_map[:, :, torch.arange(Lq) // blkq][:, :, :, torch.arange(Lk) // blkk]  # (B, H, Lq, Lk)
    scores = (q @ k.transpose(-1, -2)) * scale
    z_sel = scores.masked_fill(~exact, float("-inf")).exp().sum(-1)
    o_sparse = (scores.masked_fill(~exact, float("-inf")).exp() @ v) / z_sel[..., None]

    kernel = (apply_feature_map(q, feature_map) @ apply_feature_map(k, feature_map).transpose(-1, -2)) * ~exact
    o_linear = (kernel @ v) / (kernel.sum(-1, keepdim=True) + LINEAR_EPS)
    linear = o_linear + o_linear @ weight.T + bias

    if fusion == "mass":
        B, H = q.shape[:2]
        z_rest = torch.zeros(B, H, Lq, dtype=torch.float64)
        for start in range(0, Lk, blkk):
            block = k[:, :, start : start + blkk]  # (B, H, n, D)
            mean, var = block.mean(2), block.var(2, unbiased=False)
            term = block.shape[2] * torch.exp(scale * q @ mean[..., None] + 0.5 * scale**2 * q**2 @ var[..., None])
            in_rest = ~exact[:, :, :, start]  # a block is selected or not as a whole
            z_rest += term[..., 0] * in_rest
        w = z_sel / (z_sel + z_rest)
    else:
        w = torch.sigmoid(q @ u.double() + c.double())
    return w[..., None] * o_sparse + (1 - w[..., None]) * linear


def inputs(B, H, Lq, Lk, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for L in (Lq, Lk, Lk))
    weight = torch.randn(D, D, generator=g, dtype=dtype) / D**0.5
    bias = torch.randn(D, generator=g, dtype=dtype) * 0.1
    u = torch.randn(D, generator=g, dtype=dtype) * 0.3
    c = torch.tensor([0.5], dtype=dtype)
    return q, k, v, weight, bias, u, c


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("Lq,Lk", [(128, 128), (100, 75)])  # partial last blocks on both sides
def test_operator_matches_dense_float64_restatement(fusion, feature_map, Lq, Lk):
    q, k, v, weight, bias, u, c = inputs(2, 2, Lq, Lk, 16, seed=Lq + Lk)
    blkq, blkk, scale = 32, 16, 16**-0.5
    lut = select_blocks(q, k, 0.4, blkq, blkk)
    out = sla_reference(q, k, v, weight, bias, topk=0.4, blkq=blkq, blkk=blkk, feature_map=feature_map,
                        linear_scope="rest", scale=scale, lut=lut, fusion=fusion, ratio_weight=u, ratio_bias=c)
    block_map = lut_to_block_map(lut, k.shape[2] // blkk + (k.shape[2] % blkk > 0))
    ref = dense_fused(q, k, v, weight, bias, block_map, blkq, blkk, feature_map, scale, fusion, u, c)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    # the fusion changes the output: the comparison would catch an operator that ignored it
    sla = sla_reference(q, k, v, weight, bias, topk=0.4, blkq=blkq, blkk=blkk, feature_map=feature_map,
                        linear_scope="rest", scale=scale, lut=lut)
    assert rel_err(sla, ref) > 1e-2


@pytest.mark.parametrize("fusion", ["mass", "ratio"])
def test_gradcheck_float64(fusion):
    # two query blocks, three key blocks (the last partial), one kept: every term of the fusion is exercised
    q, k, v, weight, bias, u, c = (x.requires_grad_() for x in inputs(1, 1, 20, 36, 4, seed=3))
    lut = select_blocks(q.detach(), k.detach(), 0.5, 16, 16)

    def fn(q, k, v, weight, bias, u, c):
        return sla_reference(q, k, v, weight, bias, topk=0.5, blkq=16, blkk=16, feature_map="softmax",
                             linear_scope="rest", lut=lut, fusion=fusion, ratio_weight=u, ratio_bias=c)

    args = (q, k, v, weight, bias, u, c) if fusion == "ratio" else (q, k, v, weight, bias)
    if fusion == "mass":
        u, c = u.detach(), c.detach()
    assert torch.autograd.gradcheck(lambda *a: fn(*a, u, c) if fusion == "mass" else fn(*a), args, atol=1e-7,
                                     fast_mode=True)


def test_rest_mass_estimate_tracks_the_true_mass():
    """On keys drawn around per-block centres (the local structure of video tokens), the block-moment estimate of
    log sum exp over the rest is within a few percent of the true value, where the sparse branch's own normaliser
    misses the rest's mass entirely."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D, blk = 1, 2, 512, 32, 32
    centres = torch.randn(B, H, L // blk, 1, D, generator=g, dtype=torch.float64)
    k = (centres + 0.5 * torch.randn(B, H, L // blk, blk, D, generator=g, dtype=torch.float64)).reshape(B, H, L, D)
    q = k + 0.5 * torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    scale = D**-0.5
    lut = select_blocks(q, k, 0.1, blk, blk)
    block_map = lut_to_block_map(lut, L // blk)
    rest = ~block_map[:, :, torch.arange(L) // blk][:, :, :, torch.arange(L) // blk]
    true = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~rest, float("-inf")).logsumexp(-1)
    est = fusion_ops.rest_log_mass(q, k, lut, blk, blk, scale)
    assert (est - true).abs().mean() < 0.05  # log space: about 5 % of the mass
    assert rel_err(est.exp(), true.exp()) < 0.1


def test_mass_fusion_is_closer_to_full_attention_than_sla_at_init():
    """Untuned (proj_l zero), "mass" restores the rest's share of the output that the sparse branch's normalisation
    drops, so it is closer to full attention than SLA's sum (= the sparse part alone at zero proj_l)."""
    g = torch.Generator().manual_seed(1)
    B, H, L, D = 1, 2, 512, 32
    centres = torch.randn(B, H, L // 32, 1, D, generator=g)
    k = (centres + 0.7 * torch.randn(B, H, L // 32, 32, D, generator=g)).reshape(B, H, L, D)
    q = k + 0.7 * torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    full = torch.softmax((q @ k.transpose(-1, -2)) * D**-0.5, dim=-1) @ v
    zero_w, zero_b = torch.zeros(D, D), torch.zeros(D)
    kw = dict(topk=0.1, blkq=32, blkk=32, feature_map="softmax", linear_scope="rest")
    sla = sla_reference(q, k, v, zero_w, zero_b, **kw)
    mass = sla_reference(q, k, v, zero_w, zero_b, fusion="mass", **kw)
    assert rel_err(mass, full) < 0.8 * rel_err(sla, full)


def test_rest_mass_with_nothing_left_gives_the_sparse_part():
    q, k, v, weight, bias, _, _ = inputs(1, 2, 64, 64, 8)
    kw = dict(blkq=32, blkk=32, feature_map="softmax", linear_scope="rest")
    mass = sla_reference(q, k, v, weight, bias, topk=1.0, fusion="mass", **kw)
    none = sla_reference(q, k, v, weight, bias, topk=1.0, **{**kw, "linear_scope": "none"})
    assert torch.allclose(mass, none, rtol=0, atol=1e-12)
    q.requires_grad_()
    sla_reference(q, k, v, weight, bias, topk=1.0, fusion="mass", **kw).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_rest_mass_runs_the_pytorch_path_where_no_kernel_runs(monkeypatch):
    """Without a GPU or the Triton interpreter (and for float64 anywhere) `rest_log_mass` is this PyTorch path; the
    kernels' side is `tests/kernels/test_rest_mass_kernels.py`."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 90, 16)
    lut = select_blocks(q, k, 0.5, 32, 32)
    assert not fusion_ops.rest_mass_kernels_run(q, 32) and not fusion_ops.rest_mass_kernels_run(q.double(), 32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fusion_ops.rest_mass_kernels_run(q, 32) == is_triton_available()
    assert not fusion_ops.rest_mass_kernels_run(q.double(), 32) and not fusion_ops.rest_mass_kernels_run(q, 8)
    assert not fusion_ops.rest_mass_kernels_run(torch.randn(1, 1, 8, 256), 32)
    monkeypatch.delenv("TRITON_INTERPRET")
    out = fusion_ops.rest_log_mass(q, k, lut, 32, 32, 0.25)
    assert torch.equal(out, fusion_ops.rest_log_mass(q, k, lut, 32, 32, 0.25, use_kernels=False))


# ----- the default is unchanged ------------------------------------------------------------------------------------


def test_default_fusion_is_sla_and_bit_identical():
    assert SLAConfig().fusion == "sla"
    q, k, v, weight, bias, _, _ = (x.float() for x in inputs(1, 2, 96, 96, 16))
    layer = SparseLinearAttention(16, topk=0.3, blkq=32, blkk=32, backend="torch")
    with torch.no_grad():
        layer.proj_l.weight.copy_(weight)
        layer.proj_l.bias.copy_(bias)
        out = layer(q, k, v)
    expected = sla_reference(q, k, v, weight, bias, topk=0.3, blkq=32, blkk=32, feature_map="softmax",
                             linear_scope="rest")
    assert torch.equal(out, expected)
    assert [n for n, _ in layer.named_parameters()] == ["proj_l.weight", "proj_l.bias"]
    assert layer.sla_parameter_names == ("proj_l.weight", "proj_l.bias")


# ----- config, layer, functional form ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fusion": "sum"}, r"`fusion` must be one of \['sla', 'mass', 'ratio'\], got 'sum'"),
        ({"fusion": "mass", "linear_scope": "all"}, r"`fusion='mass'` needs `linear_scope='rest'`, got .*'all'"),
        ({"fusion": "ratio", "linear_scope": "none"}, r"`fusion='ratio'` needs `linear_scope='rest'`"),
    ],
)
def test_config_rejects_bad_fusions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLAConfig(**kwargs)


def test_config_fusion_round_trips_and_is_an_operator_field():
    cfg = SLAConfig.from_json('{"fusion": "MASS"}')
    assert cfg.fusion == "mass" and cfg.operator_dict()["fusion"] == "mass"
    assert SLAConfig().operator_differences(cfg) == {"fusion": ("sla", "mass")}
    assert SLAConfig.from_json(cfg.to_json()) == cfg


def test_ratio_layer_owns_float32_gate_and_trains_it():
    layer = SparseLinearAttention(16, topk=0.3, blkq=32, blkk=32, fusion="ratio", backend="torch")
    assert layer.sla_parameter_names[2:] == ("fusion_ratio_weight", "fusion_ratio_bias")
    assert torch.equal(layer.fusion_ratio_bias, torch.tensor([fusion_ops.RATIO_BIAS_INIT]))
    layer.to(torch.bfloat16)
    assert layer.fusion_ratio_weight.dtype == torch.float32 and layer.fusion_ratio_bias.dtype == torch.float32
    q, k, v = (torch.randn(1, 2, 96, 16, dtype=torch.bfloat16) for _ in range(3))
    layer(q, k, v).float().square().sum().backward()
    assert layer.fusion_ratio_weight.grad.abs().sum() > 0 and layer.fusion_ratio_bias.grad.abs().sum() > 0
    # switching the fusion away keeps the trained gate; switching back finds it
    gate = layer.fusion_ratio_weight
    layer.config = SLAConfig(topk=0.3, blkq=32, blkk=32)
    assert layer.sla_parameter_names == ("proj_l.weight", "proj_l.bias")
    layer.config = SLAConfig(topk=0.3, blkq=32, blkk=32, fusion="ratio")
    assert layer.fusion_ratio_weight is gate


def test_functional_ratio_needs_its_parameters():
    q = k = v = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="`fusion='ratio'` needs `ratio_weight`"):
        sparse_linear_attention(q, k, v, fusion="ratio", blkq=32, blkk=32)
    with pytest.raises(ValueError, match=r"`ratio_weight` must have shape \(8,\)"):
        sparse_linear_attention(q, k, v, fusion="ratio", blkq=32, blkk=32, ratio_weight=torch.zeros(4),
                                ratio_bias=torch.zeros(1))


# ----- sidecar ------------------------------------------------------------------------------------------------------


def test_ratio_gate_round_trips_through_the_sidecar(tmp_path):
    tiny = build_tiny_model("wan", seed=0)
    enable_sla(tiny.model, **{**TEST_SLA_OVERRIDES, "fusion": "ratio"})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tensor in get_sla_state_dict(tiny.model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    inputs_ = tiny.make_inputs(seed=3)
    with torch.no_grad():
        expected = forward_output(tiny.model, inputs_)
    tiny.model.save_pretrained(tmp_path)
    n_layers = len(list(iter_sla_layers(tiny.model)))
    weights = read_sla_file(tmp_path / SLA_WEIGHTS_NAME)
    assert weights.config.fusion == "ratio" and len(weights.tensors) == 4 * n_layers
    assert {t.dtype for t in weights.tensors.values()} == {torch.float32}
    with safe_open(str(tmp_path / SLA_WEIGHTS_NAME), framework="pt") as handle:
        assert '"fusion": "ratio"' in handle.metadata()["sla_config"]

    loaded = type(tiny.model).from_pretrained(tmp_path).eval()
    enable_sla(loaded)  # the stored config: fusion "ratio", gate parameters loaded
    assert all(layer.config.fusion == "ratio" for _, _, layer in iter_sla_layers(loaded))
    with torch.no_grad():
        assert torch.equal(forward_output(loaded, inputs_), expected)
    default = type(tiny.model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`fusion` \(installed 'sla', file 'ratio'\)"):
        enable_sla(default, **TEST_SLA_OVERRIDES)


# ----- benchmarks/lab/fusion_probe.py -------------------------------------------------------------------------------


def test_fusion_probe_runs_and_mass_beats_sla_untuned(capsys):
    from benchmarks.lab import fusion_probe

    fusion_probe.main(["--length", "512", "--head-dim", "16", "--block", "32", "--topks", "0.125", "--spreads", "0.5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.5 |")]
    assert len(rows) == 1
    cells = [float(x) for x in rows[0].strip("| ").split(" | ")]
    assert 0 < cells[2] < 1 and cells[3] < 0.2  # mass outside; the estimate's log error on tight blocks
    assert cells[5] < cells[4]  # mass closer to full attention than SLA at zero proj_l
