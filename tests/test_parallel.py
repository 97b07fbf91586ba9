# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA and context parallelism, on real torch.distributed (gloo, two CPU processes): the head-sharded (Ulysses) SLA
call, a tiny Wan under diffusers' Ulysses `enable_parallelism` against one process, and the clear error for ring."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testing_utils import exit_without_teardown, free_port

from diffusers_sla.integration.parallel import heads_to_sequence, sequence_to_heads, ulysses_sparse_linear_attention
from diffusers_sla.ops.api import sparse_linear_attention

# float64: the comparison then measures the collectives and the sharding, not float32 summation order.
SETTINGS = dict(topk=0.25, blkq=32, blkk=32, backend="torch")
B, H, L, D, WORLD = 2, 4, 256, 16, 2


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    k = k + 2 * torch.randn(1, 1, L, 1, generator=gen, dtype=torch.float64)  # uneven block scores: topk matters
    weight = 0.3 * torch.randn(D, D, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    return q, k, v, weight, bias, grad_out


def _reference():
    q, k, v, weight, bias, grad_out = _inputs()
    leaves = [t.requires_grad_(True) for t in (q, k, v, weight, bias)]
    out = sparse_linear_attention(*leaves, **SETTINGS)
    out.backward(grad_out)
    per_rank_proj = []
    for rank in range(WORLD):  # proj_l's gradient from the heads rank `rank` holds under Ulysses
        heads = slice(rank * H // WORLD, (rank + 1) * H // WORLD)
        w, b_ = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        part = sparse_linear_attention(q.detach()[:, heads], k.detach()[:, heads], v.detach()[:, heads], w, b_,
                                       **SETTINGS)
        part.backward(grad_out[:, heads])
        per_rank_proj.append((w.grad, b_.grad))
    return out.detach(), [t.grad for t in leaves], per_rank_proj


@exit_without_teardown
def _ulysses_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        q, k, v, weight, bias, grad_out = _inputs()
        shard = slice(rank * L // world, (rank + 1) * L // world)
        local = [t[:, :, shard].clone().requires_grad_(True) for t in (q, k, v)]
        proj = [weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)]
        # the layout round trip alone is the identity
        torch.testing.assert_close(heads_to_sequence(sequence_to_heads(local[0].detach(), None), None),
                                   local[0].detach(), rtol=0, atol=0)
        with pytest.raises(ValueError, match="3 heads cannot be split over a Ulysses group of 2"):
            ulysses_sparse_linear_attention(*(t[:, :3] for t in local), **SETTINGS)
        out = ulysses_sparse_linear_attention(*local, *proj, **SETTINGS)
        out.backward(grad_out[:, :, shard])
        torch.save({"out": out.detach(), "grads": [t.grad for t in local + proj]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ulysses_sla_equals_single_process(tmp_path):
    mp.spawn(_ulysses_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    out, (dq, dk, dv, dweight, dbias), per_rank_proj = _reference()
    # The sparse branch keeps a quarter of the key blocks: the reference is not dense attention.
    dense = torch.nn.functional.scaled_dot_product_attention(*_inputs()[:3])
    assert (out - dense).norm() / dense.norm() > 1e-2
    for name, full, got in [("out", out, torch.cat([r["out"] for r in ranks], dim=2)),
                            ("dq", dq, torch.cat([r["grads"][0] for r in ranks], dim=2)),
                            ("dk", dk, torch.cat([r["grads"][1] for r in ranks], dim=2)),
                            ("dv", dv, torch.cat([r["grads"][2] for r in ranks], dim=2))]:
        assert (got - full).norm() / full.norm() < 1e-12, name
    for rank, r in enumerate(ranks):
        # each rank's proj_l gradient is its heads' part; their sum is the single-process gradient
        torch.testing.assert_close(r["grads"][3], per_rank_proj[rank][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["grads"][4], per_rank_proj[rank][1], rtol=1e-10, atol=1e-12)
        assert r["grads"][3].norm() > 0.1 * dweight.norm()
    torch.testing.assert_close(sum(r["grads"][3] for r in ranks), dweight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["grads"][4] for r in ranks), dbias, rtol=1e-10, atol=1e-12)


# ===== The guard: SLA refuses diffusers' context parallelism =====
#
# Ring needs several processes and a backend other than the native one to run at all; these tests set the state
# `enable_parallelism` sets, with diffusers' own config objects: `model._parallel_config` (what
# `_resolve_parallel_config` records) and `processor._parallel_config` on each attention module whose processor has
# the attribute (its loop over `model.modules()`).


def _simulate_enable_parallelism(model, **degrees):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    return config


def _tiny_wan():
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("wan", seed=0)


@pytest.mark.parametrize("degrees, why", [({"ring_degree": 2}, "ring attention gives each step one shard"),
                                          ({"ulysses_degree": 2, "ring_degree": 2}, "ring attention gives"),
                                          ({"ulysses_degree": 2, "ulysses_anything": True}, "ulysses_anything")])
def test_enable_sla_refuses_a_model_with_context_parallelism(degrees, why):
    from diffusers_sla import enable_sla

    model, _ = _tiny_wan()
    _simulate_enable_parallelism(model, **degrees)
    before = {name: type(p) for name, p in model.attn_processors.items()}
    expected = ", ".join(f"{k}={degrees.get(k, 1)}" for k in ("ulysses_degree", "ring_degree"))
    with pytest.raises(NotImplementedError, match=rf"enable_sla on WanTransformer3DModel: .*\({expected}\).*{why}"
                       r".*Supported: ulysses_degree >= 1 with ring_degree=1"):
        enable_sla(model, blkq=32, blkk=32, min_kv_blocks=2)
    assert {name: type(p) for name, p in model.attn_processors.items()} == before  # left as it was
    assert not any(name.endswith(".sla.proj_l.weight") for name, _ in model.named_parameters())


@pytest.mark.parametrize("degrees", [{"ring_degree": 2}, {"ulysses_degree": 2, "ring_degree": 2}])
def test_first_sla_call_refuses_ring_enabled_after_enable_sla(degrees):
    from diffusers_sla import disable_sla, enable_sla
    from diffusers_sla.integration.modules import INNER_PROCESSOR_ATTR
    from tests.tiny_models import forward_output

    model, make_inputs = _tiny_wan()
    enable_sla(model, blkq=32, blkk=32, min_kv_blocks=2)
    with torch.no_grad():
        forward_output(model, make_inputs())  # runs before parallelism
    config = _simulate_enable_parallelism(model, **degrees)
    with pytest.raises(NotImplementedError, match=r"SLAAttnProcessor in WanAttention: SLA does not support this "
                                                  r"context parallelism .*Supported: ulysses_degree >= 1"):
        with torch.no_grad():
            forward_output(model, make_inputs())
    # the wrapped processors got the config too: after `disable_sla` the model runs its parallelism
    attns = [m for m in model.modules() if hasattr(m, INNER_PROCESSOR_ATTR) and m.__dict__.get(INNER_PROCESSOR_ATTR)]
    assert attns and all(m.__dict__[INNER_PROCESSOR_ATTR]._parallel_config is config for m in attns)
    disable_sla(model)
    assert all(p._parallel_config is config for p in model.attn_processors.values())


def test_no_context_parallelism_is_allowed():
    from diffusers_sla.integration.parallel import check_context_parallel, context_parallel_degrees

    assert context_parallel_degrees(None) is None
    check_context_parallel(None, "here")

    class TensorParallelOnly:  # a ParallelConfig with tensor parallelism alone has no context_parallel_config
        context_parallel_config = None

    check_context_parallel(TensorParallelOnly(), "here")


# ===== SLA under diffusers' Ulysses, end to end =====
#
# diffusers' real `enable_parallelism` on two gloo processes. It picks the device `rank % accelerator.device_count()`,
# and a CPU-only torch counts 0 accelerators, so the worker makes that count 1 (the only change to diffusers' path).


def _sla_wan(seed: int = 0):
    from diffusers_sla import enable_sla
    from diffusers_sla.integration.layer import iter_sla_layers
    from tests.tiny_models import TEST_SLA_OVERRIDES

    model, make_inputs = _tiny_wan()
    enable_sla(model, topk=0.34, backend="torch", **TEST_SLA_OVERRIDES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking proj_l, so that the linear branch shows in outputs and gradients
        for _, _, layer in iter_sla_layers(model):
            layer.proj_l.weight.copy_(0.2 * torch.randn(layer.proj_l.weight.shape, generator=gen))
            layer.proj_l.bias.copy_(0.1 * torch.randn(layer.proj_l.bias.shape, generator=gen))
    return model, make_inputs


@exit_without_teardown
def _wan_ulysses_worker(rank: int, world: int, port: int, out_dir: str, sla_first: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1
    try:
        from diffusers import ContextParallelConfig

        from diffusers_sla import enable_sla, sla_summary
        from tests.tiny_models import TEST_SLA_OVERRIDES, forward_output

        if sla_first:
            model, make_inputs = _sla_wan()
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        else:  # parallelism first, then SLA on it (the same proj_l values: `_sla_wan` sets them after enable_sla)
            model, make_inputs = _tiny_wan()
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            enable_sla(model, topk=0.34, backend="torch", **TEST_SLA_OVERRIDES)
            gen = torch.Generator().manual_seed(0)
            from diffusers_sla.integration.layer import iter_sla_layers
            with torch.no_grad():
                for _, _, layer in iter_sla_layers(model):
                    layer.proj_l.weight.copy_(0.2 * torch.randn(layer.proj_l.weight.shape, generator=gen))
                    layer.proj_l.bias.copy_(0.1 * torch.randn(layer.proj_l.bias.shape, generator=gen))
        out = forward_output(model, make_inputs())
        out.square().mean().backward()
        summary = sla_summary(model)
        torch.save({"out": out.detach(), "sla_calls": summary.sla_calls,
                    "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sla_first", [True, False], ids=["enable_sla-then-parallelism", "parallelism-then-sla"])
def test_sla_under_diffusers_ulysses_equals_one_process(tmp_path, sla_first):
    from tests.tiny_models import forward_output

    mp.spawn(_wan_ulysses_worker, args=(WORLD, free_port(), str(tmp_path), sla_first), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, make_inputs = _sla_wan()
    out = forward_output(model, make_inputs())
    out.square().mean().backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # SLA, not dense: the same model without SLA gives another output
    dense_model, _ = _tiny_wan()
    with torch.no_grad():
        dense = forward_output(dense_model, make_inputs())
    assert (out - dense).norm() / out.norm() > 1e-3
    for r in ranks:
        assert (r["out"] - out).norm() / out.norm() < 1e-5  # every rank holds the gathered output
        assert r["sla_calls"] == 2  # each rank's two self-attention layers ran SLA (cross-attention: dense)
    assert set(ranks[0]["grads"]) == set(reference)
    proj = [n for n in reference if ".sla.proj_l." in n]
    assert len(proj) == 4 and all(reference[n].norm() > 0 for n in proj)
    for name, ref in reference.items():
        # each rank's gradient is its sequence shard's (its heads' for proj_l): summed, the one-process gradient
        total = sum(r["grads"][name] for r in ranks)
        assert (total - ref).norm() / ref.norm() < 1e-4, name
