# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/render_results.py`: the README's and RESULTS.md's benchmark sections come from the run logs, the
layer table with every provider row `benchmarks/kernel.py bench` logged (the sparse-only "none" row included)."""

import sys

import pytest

from benchmarks import render_results

# the lines `kernel.py all` logs, in its order (numbers made up)
LAYER_ROWS = """provider                       fwd ms   bwd ms  fwd+bwd cuDNN/x fwd cuDNN/x bwd
SDPA flash                     18.058   52.345   70.404        0.65        0.58
SDPA cuDNN                     11.821   30.266   42.088        1.00        1.00
SLA ours (rest)                 1.229    2.900    4.129        9.62       10.44
SLA ours (all)                  1.053    2.681    3.734       11.22       11.29
{none}{fusion}SLA public reference (all)      2.101    9.908   12.009        5.63        3.05
public reference / ours(rest): fwd 1.71x, bwd 3.42x
public reference / ours(all):  fwd 1.99x, bwd 3.70x
{none_line}kernels ('auto'): hopper"""
NONE_ROW = "SLA ours (none)                 0.811    2.012    2.823       14.58       15.04\n"
FUSION_ROWS = ("SLA ours (mass)                 2.000    5.000    7.000        5.91        6.05\n"
               "SLA ours (ratio)                1.900    4.800    6.700        6.22        6.31\n")
NONE_LINE = "linear branch (ours(rest) - ours(none)): fwd 0.418 ms, bwd 0.888 ms\n"
KERNEL_LOG = """GPU Test GPU (132 SMs), torch 2.13.0, triton 3.9.0, CUDA 13.0, cuDNN 91900
public SLA reference: found
[check ok] B2 H3 Lq1000 Lk777 D128 128x64 top0.2 softmax rest bfloat16: o=1.0e-03
[check ok] B1 H2 Lq4096 Lk4096 D128 128x64 top0.05 softmax none bfloat16 strided: o=1.0e-03 dW=None db=None
check: 0 failure(s)
== Wan2.1-1.3B self-attention layer: B=1 H=12 L=32760 D=128 bf16 topk=0.05 blocks 128x64 feature_map=softmax ==
{layer}
breakdown, ours (rest):
  sla_fwd (inference)             0.900 ms
== sweep over L and topk ==
  4096  0.05     0.500     1.000    0.400    0.900    1.2    1.1    0.600    1.500       1.50       1.67
total 100 s
"""
E2E_LOG = """Wan2.1-T2V-1.3B transformer, 32760 tokens, bf16, Test GPU, blocks 128x64
| attention | forward ms | forward speed-up | train step ms | train speed-up | self-attn core ms x 30 |
| --- | --- | --- | --- | --- | --- |
| sdpa-cudnn | 628.2 | 1.00x | 2733.4 | 1.00x | 365.6 |
| SLA topk=0.05 | 316.1 | 1.99x | 1244.4 | 2.20x | 44.6 |
sdpa-cudnn in model: self-attention is 54% of the forward's GPU time; free self-attention bounds the forward at 2.17x (GPU time; SLA topk=0.05 stands at 1.94x)
Forward with every transformer block compiled (torch.compile, mode default), and a train step, same run:
| attention | compiled forward ms | compiled speed-up | compiled train step ms | train speed-up |
| --- | --- | --- | --- | --- |
| sdpa-cudnn | 540.4 | 1.00x | 2421.2 | 1.00x |
| SLA topk=0.05 | 216.7 | 2.49x | 918.5 | 2.64x |
sdpa-cudnn (compiled) in model: self-attention is 60% of the forward's GPU time; free self-attention bounds the forward at 2.50x
"""


@pytest.mark.parametrize("with_none", [True, False])
def test_layer_table_renders_every_provider_row(tmp_path, monkeypatch, with_none):
    layer = LAYER_ROWS.format(none=NONE_ROW if with_none else "", none_line=NONE_LINE if with_none else "",
                              fusion=FUSION_ROWS if with_none else "")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text(
        "# x\n\n## Benchmarks\n\nold numbers\n\n## Quality\n\nstudy table\n\n## Limits\n\nnone\n")
    kernel_log, e2e_log = tmp_path / "kernel.log", tmp_path / "e2e.log"
    kernel_log.write_text(KERNEL_LOG.format(layer=layer))
    e2e_log.write_text(E2E_LOG)
    monkeypatch.setattr(render_results, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["render_results.py", "--kernel-log", str(kernel_log), "--e2e-log",
                                      str(e2e_log), "--commit", "abc1234"])
    render_results.main()
    readme = (tmp_path / "README.md").read_text()
    results = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert "old numbers" not in readme and readme.endswith("## Quality\n\nstudy table\n\n## Limits\n\nnone\n")
    for text in (readme, results):
        assert layer in text  # the whole table, every row and line as logged
        assert ('"ours (none)" the sparse part alone' in text) == with_none
        assert ('"ours (mass)" and "ours (ratio)" are `fusion="mass"`' in text) == with_none
        assert "1.23 ms (rest), 1.05 ms (all) | FAIL" in text  # targets stay judged on "rest"
    if not with_none:  # logs from before scope "none": the README's words as they were
        assert "\"ours\" is the whole operator; the last two columns are cuDNN's time over each\nprovider's." in readme
    assert "none bfloat16 strided: o=1.0e-03 dW=None db=None" in results
