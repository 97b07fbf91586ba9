"""A 20-second GPU check of the current tree's kernels (forward and backward, rest/none/mass) against the torch
operator in float32; exit 1 if any is off, so the calls can fall back to the pre-refactor tree."""
import sys
import torch
from diffusers_sla.ops import sparse_linear_attention as sla

torch.manual_seed(0)
B, H, L, D = 1, 2, 1024, 64
bad = 0
for scope, fusion, dtype in [("rest", "sla", torch.float16), ("none", "sla", torch.bfloat16), ("rest", "mass", torch.float16)]:
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    w = (torch.randn(D, D, device="cuda") * D**-0.5).requires_grad_(True)
    b = torch.randn(D, device="cuda").requires_grad_(True)
    kw = dict(topk=0.2, blkq=64, blkk=64, linear_scope=scope)
    if fusion != "sla":
        kw["fusion"] = fusion
    try:
        outs = {}
        for be in ("triton", "torch"):
            o = sla(q, k, v, w, b, backend=be, **kw)
            g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
            outs[be] = (o.float(), [x.float() for x in g])
        rel = lambda a, r: ((a - r).norm() / r.norm()).item()
        errs = [rel(outs["triton"][0], outs["torch"][0])] + [rel(a, r) for a, r in zip(outs["triton"][1], outs["torch"][1])]
        ok = all(e < 3e-2 for e in errs)
        print(scope, fusion, dtype, "rel errs", " ".join(f"{e:.2e}" for e in errs), "OK" if ok else "BAD")
        bad += not ok
    except Exception as exc:
        print(scope, fusion, dtype, "FAILED", repr(exc)[:400])
        bad += 1
sys.exit(1 if bad else 0)
