import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from diffusers import WanTransformer3DModel
from benchmarks.e2e_wan import WAN_1_3B, gpu_time_split
m = WanTransformer3DModel(**WAN_1_3B).to("cuda", torch.bfloat16)
x = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
t = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
ts = torch.tensor([500], device="cuda")
def f():
    with torch.no_grad():
        m(hidden_states=x, encoder_hidden_states=t, timestep=ts, return_dict=False)
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    f(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        f(); torch.cuda.synchronize()
ev = prof.events()
print("split", gpu_time_split(ev))
raw = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
print("raw kineto device events", len(raw), "sum ms", sum(e.duration_ns() for e in raw) / 1e6)
cuda_fe = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
print("CUDA FunctionEvents", len(cuda_fe), "sum device_time ms", sum(e.device_time for e in cuda_fe) / 1e3)
owners = {}
for e in ev:
    if e.device_type == torch.autograd.DeviceType.CPU and e.kernels:
        owners.setdefault(e.name, [0, 0.0]); owners[e.name][0] += len(e.kernels); owners[e.name][1] += sum(k.duration for k in e.kernels) / 1e3
for name, (n, ms) in sorted(owners.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{ms:9.1f} ms {n:5d} {name[:90]}")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)[:6000])
