# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""How the sparse and linear branches are combined (`SLAConfig.fusion`), in plain PyTorch. See docs/fusion.md.

Notation, per query row i (scores s_ij = scale * q_i . k_j, S_i the keys of the selected blocks, R_i the rest):

    o_s     = sum_{j in S_i} exp(s_ij) v_j / Z_sel,   Z_sel = sum_{j in S_i} exp(s_ij),  lse = log Z_sel
    o_lin   = phi(q_i) sum_{j in R_i} phi(k_j)^T v_j / (phi(q_i) . sum_{j in R_i} phi(k_j) + eps)
    L       = o_lin + proj_l(o_lin)              the linear term: proj_l as a zero-initialised residual correction

    "sla"   : o = o_s + proj_l(o_lin)            (reference.py; not computed here)
    "mass"  : o = w o_s + (1 - w) L,  w = Z_sel / (Z_sel + Zhat_rest) = sigmoid(lse - log Zhat_rest)
    "ratio" : o = a o_s + (1 - a) L,  a = sigmoid(q_i . u + c), u (head_dim,) and c (1,) learnable float32

log Zhat_rest estimates log sum_{j in R_i} exp(s_ij) from per-block key moments: for a block b with n_b valid keys,
mean mu_b and per-dimension variance var_b, sum_{j in b} exp(s_ij) ~ n_b exp(scale q.mu_b + scale^2/2 q^2.var_b),
which is exact in expectation when the block's keys are Gaussian with diagonal covariance (docs/fusion.md).

The fusions need linear_scope "rest": with "all" the linear branch also covers the selected keys (their mass would be
counted twice) and "none" has no linear branch; `SLAConfig` rejects those combinations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ALLOWED_FUSIONS
from ..utils.import_utils import load_on_first_use, triton_kernels_run_on
from .branches import SCORE_ELEMENTS_PER_CHUNK, linear_attention_reference, pad_to_blocks, sparse_attention_reference
from .selection import num_blocks, select_blocks

FUSIONS = ALLOWED_FUSIONS
# Initial bias c of the "ratio" gate: sigmoid(3) = 0.95, so an untuned layer starts close to the sparse part alone
# (the strongest untuned baseline in our probes) and tuning moves weight to the linear term where it helps.
RATIO_BIAS_INIT = 3.0
# Stands in for log(0) where a query block has no rest key: finite, so that logsumexp and its gradient stay finite
# (exp(-1e30 - x) is 0), and sigmoid(lse + 1e30) is exactly 1.
_NO_MASS = -1e30
# the rest-mass kernels' largest head dim (`ops/rest_mass.py`; the Triton backend's too)
REST_MASS_KERNEL_MAX_HEAD_DIM = 128


def fusion_parameter_shapes(fusion: str, head_dim: int) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of the float32 parameters a fusion adds to each layer (beside `proj_l`)."""
    if fusion == "ratio":
        return {"fusion_ratio_weight": (head_dim,), "fusion_ratio_bias": (1,)}
    return {}


def check_fusion(fusion: str, linear_scope: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"`fusion` must be one of {list(FUSIONS)}, got {fusion!r}.")
    if fusion != "sla" and linear_scope != "rest":
        raise ValueError(f"`fusion={fusion!r}` needs `linear_scope='rest'`, got {linear_scope!r}.")


# ----- the rest's mass ----------------------------------------------------------------------------------------------


def _rest_log_mass_chunk(q_blocks, mean, var, log_count, rest, scale):
    # q_blocks (B, H, c, blkq, D); mean, var (B, H, n_k, D); log_count (n_k,); rest (B, H, c, n_k) bool
    terms = scale * (q_blocks @ mean.unsqueeze(2).transpose(-1, -2))  # (B, H, c, blkq, n_k)
    terms = terms + 0.5 * scale**2 * (q_blocks.square() @ var.unsqueeze(2).transpose(-1, -2)) + log_count
    return torch.logsumexp(terms.masked_fill(~rest[..., None, :], _NO_MASS), dim=-1)


def key_block_moments(k, blkk):
    """Each key block's mean and per-dimension variance over its valid keys, (B, H, n_k, D), and log of their count,
    (n_k,): in float32 (float64 for float64 k)."""
    k = k.to(torch.promote_types(k.dtype, torch.float32))
    Lk = k.shape[2]
    n_k = num_blocks(Lk, blkk)
    count = (Lk - torch.arange(n_k, device=k.device) * blkk).clamp(max=blkk).to(k.dtype)  # valid keys per block
    k_blocks = pad_to_blocks(k, blkk)  # padded rows are zero: sums over valid keys only
    mean = k_blocks.sum(dim=3) / count[:, None]
    var = (k_blocks.square().sum(dim=3) / count[:, None] - mean.square()).clamp_min(0.0)
    return mean, var, count.log()


def rest_blocks(lut, n_k):
    """(B, H, n_q, n_k) bool: True where query block i did not select key block b."""
    B, H, n_q, _ = lut.shape
    rest = torch.ones(B, H, n_q, n_k, dtype=torch.bool, device=lut.device)
    return rest.scatter_(-1, lut.long(), False)


def rest_mass_kernels_run(q, blkq) -> bool:
    """Whether `rest_log_mass` runs the Triton kernels (`ops/rest_mass.py`) for this q: where Triton runs them (CUDA
    tensors, or any under TRITON_INTERPRET=1), for the shapes they take, float64 aside (kept float64 here)."""
    return (triton_kernels_run_on(q.device) and q.dtype != torch.float64
            and q.shape[-1] <= REST_MASS_KERNEL_MAX_HEAD_DIM and blkq % 16 == 0)


def rest_log_mass(q, k, lut, blkq, blkk, scale, use_kernels=None):
    """log Zhat_rest, (B, H, Lq) in float32 (float64 for float64 q): the estimated log softmax mass of each query row
    over the key blocks not in `lut`, from each key block's mean and per-dimension variance (module docstring).
    _NO_MASS where nothing is left. `use_kernels`: None = the Triton kernels where `rest_mass_kernels_run(q, blkq)`,
    else this PyTorch path (the reference; both give the same values to float32 rounding); True / False force either.
    """
    B, H, Lq, _ = q.shape
    mean, var, log_count = key_block_moments(k, blkk)
    rest = rest_blocks(lut, mean.shape[2])
    if use_kernels is None:
        use_kernels = rest_mass_kernels_run(q, blkq)
    if use_kernels:
        kernels = load_on_first_use("diffusers_sla.ops.rest_mass:rest_log_mass")
        return kernels(q, mean.float(), var.float(), log_count.float(), rest, scale, blkq)
    n_q = rest.shape[2]
    q_blocks = pad_to_blocks(q.to(mean.dtype), blkq)
    chunk = max(1, SCORE_ELEMENTS_PER_CHUNK // (B * H * blkq * mean.shape[2]))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for start in range(0, n_q, chunk):
        args = (q_blocks[:, :, start : start + chunk], mean, var, log_count, rest[:, :, start : start + chunk], scale)
        parts.append(checkpoint(_rest_log_mass_chunk, *args, use_reentrant=False) if needs_grad
                     else _rest_log_mass_chunk(*args))
    return torch.cat(parts, dim=2).reshape(B, H, n_q * blkq)[:, :, :Lq]


# ----- combining ----------------------------------------------------------------------------------------------------


def combine(o_sparse, o_linear, proj_weight, proj_bias, *, fusion, lse=None, log_rest=None, q=None,
            ratio_weight=None, ratio_bias=None):
    """The fused output from the branch outputs (all in one float dtype, (B, H, Lq, D)); see the module docstring.
    "mass" needs lse and log_rest (B, H, Lq); "ratio" needs q and ratio_weight (D,), ratio_bias (1,)."""
    linear = o_linear + F.linear(o_linear, proj_weight, proj_bias)
    if fusion == "mass":
        weight = torch.sigmoid(lse - log_rest).unsqueeze(-1)
    elif fusion == "ratio":
        weight = torch.sigmoid(q @ ratio_weight + ratio_bias).unsqueeze(-1)
    else:
        raise ValueError(f"`fusion` must be 'mass' or 'ratio' here, got {fusion!r}.")
    return weight * o_sparse + (1.0 - weight) * linear


def fused_reference(q, k, v, proj_weight, proj_bias, *, topk, blkq, blkk, feature_map, linear_scope, fusion,
                    scale=None, lut=None, ratio_weight=None, ratio_bias=None):
    """The SLA operator with fusion "mass" or "ratio" in PyTorch: float32 (float64 for float64 inputs), autograd
    through every input and parameter, output in q's dtype."""
    check_fusion(fusion, linear_scope)
    if fusion == "ratio" and (ratio_weight is None or ratio_bias is None):
        raise ValueError("`fusion='ratio'` needs `ratio_weight` (head_dim,) and `ratio_bias` (1,).")
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if lut is None:
        lut = select_blocks(q, k, topk, blkq, blkk)
    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    o_sparse, lse = sparse_attention_reference(qc, kc, vc, lut, blkq, blkk, scale, return_lse=True)
    o_linear = linear_attention_reference(qc, kc, vc, lut, blkq, blkk, feature_map, linear_scope)
    extra = {}
    if fusion == "mass":
        # the PyTorch operator stays PyTorch throughout, on a GPU too: it is what the kernels are checked against
        extra = dict(lse=lse, log_rest=rest_log_mass(qc, kc, lut, blkq, blkk, scale, use_kernels=False))
    else:
        extra = dict(q=qc, ratio_weight=ratio_weight.to(compute_dtype), ratio_bias=ratio_bias.to(compute_dtype))
    o = combine(o_sparse, o_linear, proj_weight.to(compute_dtype), proj_bias.to(compute_dtype), fusion=fusion,
                **extra)
    return o.to(q.dtype)
