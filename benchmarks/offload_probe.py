"""Temporary probe: where the layer-input offload's time goes (8 layers of the step workload)."""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import torch
import step as S

ap = argparse.ArgumentParser(); ap.add_argument("--layers", type=int, default=8); ap.add_argument("--options", default="{}")
a = ap.parse_args()
args = argparse.Namespace(layers=a.layers, batch=2, seq=2048, checkpointing=True, tmp="/tmp")
path = S.prepare(args)
model = S._load("fxfuse", path, args)
import fxfuse
from fxfuse import regional
stats = {"pack_s": 0.0, "unpack_s": 0.0, "pack_n": 0, "unpack_n": 0}
P, U = regional.LayerInputOffload.pack, regional.LayerInputOffload.unpack
def pack(self, *x):
    t0 = time.perf_counter(); r = P(self, *x); stats["pack_s"] += time.perf_counter() - t0; stats["pack_n"] += 1; return r
def unpack(self, *x):
    t0 = time.perf_counter(); r = U(self, *x); stats["unpack_s"] += time.perf_counter() - t0; stats["unpack_n"] += 1; return r
regional.LayerInputOffload.pack, regional.LayerInputOffload.unpack = pack, unpack
run = torch.compile(model, backend="fxfuse", options=json.loads(a.options))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
from qlora_llama import batch
inputs = batch(vocab=S._shapes(1)["vocab_size"], b=2, t=2048, seed=1, device="cuda")
def step():
    loss = run(**inputs).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for i in range(6):
    for k in stats: stats[k] = 0 if k.endswith("_n") else 0.0
    torch.cuda.synchronize(); t0 = time.perf_counter(); step(); torch.cuda.synchronize()
    print(f"step {i}: {1e3*(time.perf_counter()-t0):.1f} ms", {k: round(v, 4) for k, v in stats.items()},
          {k: v for k, v in torch.cuda.host_memory_stats().items() if k in ("num_host_alloc", "num_host_free", "allocated_bytes.current")} if hasattr(torch.cuda, "host_memory_stats") else "", flush=True)
print([str(g.regional) for g in fxfuse.last_report().graphs])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step(); torch.cuda.synchronize()
ka = prof.key_averages()
rows = sorted([(e.key, e.count, e.cpu_time_total / 1e3, getattr(e, "device_time_total", 0) / 1e3) for e in ka], key=lambda r: -r[2])
for r in rows:
    if r[0].startswith("cuda") or "Memcpy" in r[0] or "pin" in r[0].lower() or "empty" in r[0] or "copy_" in r[0] or "to" == r[0] or "record_stream" in r[0]:
        print(f"{r[0][:60]:60s} n={r[1]:5d} cpu_ms={r[2]:9.2f} dev_ms={r[3]:9.2f}")
# streams of the memcpys
for e in prof.events():
    pass
kinds = {}
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        s = getattr(e, "device_resource_id", None)
        kinds.setdefault((s, "Memcpy" in e.name), [0, 0.0]); kinds[(s, "Memcpy" in e.name)][0] += 1; kinds[(s, "Memcpy" in e.name)][1] += e.time_range.elapsed_us() / 1e3
print("per stream (id, memcpy): count, ms", kinds)
