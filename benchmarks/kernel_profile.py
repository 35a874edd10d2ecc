"""Where a step's GPU time goes: torch.profiler kernel tables for the QLoRA training step and the LoRA op.

    python benchmarks/kernel_profile.py step [--layers 4] [--variant fxfuse] [--options '{"disable": ["nf4_lora"]}']
    python benchmarks/kernel_profile.py lora [--case "gate,up group"] [--graph] [--timeline]

`step`: the training step of benchmarks/foundation.py (Llama-3-8B shapes, NF4 double quant, LoRA r=16 on all
linears, batch 2 x 2048, checkpointing, AdamW), warmed up, then profiled over a few steps. Prints the wall
time per step, the GPU's busy time per step (the sum of kernel times: their difference is time the GPU
waited for the host), kernel time by category, and the top kernels. `lora`: the same for one fwd+bwd of
`fxfuse::lora_linear` (and of the stock path) at the projection shapes of benchmarks/nf4_lora.py; with
--graph, of the step's CUDA-graph replay (the device time nf4_lora.py reports), with --timeline the kernels
of one iteration in order, with the idle gaps between them.
Writes JSON with --json. Measurement only: no pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from measure import capture_graph  # noqa: E402

# Kernel name -> category. First match wins.
CATEGORIES = [
    ("gemm (cuBLAS/CUTLASS)", r"gemm|nvjet|cutlass|sm90_xmma|xmma_|cublas|gemv|splitKreduce"),
    ("attention", r"flash|fmha|attention|cudnn|sdpa"),
    ("fxfuse dequant", r"_dequant_4bit"),
    ("fxfuse rank-r", r"_rank_r|_lora_outer|_lora_dy"),
    ("fxfuse other", r"_rms_norm|_rope|_swiglu|_cross_entropy|_flash_attn|_fxfuse"),
    ("bitsandbytes", r"kDequantize|kgemm_4bit|dequantize|bnb"),
    ("inductor triton", r"^triton_"),
    ("copies/casts (aten)", r"copy|cast|convert|to_copy|CatArrayBatched|cat_"),
    ("elementwise/reduce (aten)", r"elementwise|vectorized|reduce|unrolled|Reduce|index|scatter|gather|fill"),
    ("optimizer", r"adam|multi_tensor|foreach"),
]


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if re.search(rx, name, re.IGNORECASE):
            return cat
    return "other"


def kernel_table(prof, iters: int) -> dict:
    """Per-iteration device time (ms) by kernel name and by category, from a finished profiler."""
    per_kernel = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        name = evt.name
        k = per_kernel.setdefault(name, [0.0, 0])
        k[0] += t / 1e3 / iters
        k[1] += 1 / iters
    cats = {}
    for name, (ms, _) in per_kernel.items():
        cats[categorize(name)] = cats.get(categorize(name), 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    return {"busy_ms": sum(v[0] for v in per_kernel.values()),
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n[:110], "ms": v[0], "calls": v[1]} for n, v in top]}


def print_timeline(rows: list) -> None:
    print("\n| # | kernel | start us | us | gap before us |\n|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | `{r['kernel'][:70]}` | {r['start_us']:.1f} | {r['us']:.1f} | {r['gap_us']:.1f} |")
    print(f"\nspan {rows[-1]['start_us'] + rows[-1]['us']:.1f} us, busy {sum(r['us'] for r in rows):.1f} us, "
          f"gaps {sum(max(r['gap_us'], 0) for r in rows):.1f} us" if rows else "no kernels")


def print_table(title: str, wall_ms: float, table: dict) -> None:
    print(f"\n### {title}\n")
    print(f"wall {wall_ms:.2f} ms per iteration; GPU busy {table['busy_ms']:.2f} ms "
          f"({100 * table['busy_ms'] / wall_ms:.0f}%)\n")
    print("| category | ms | share of busy |\n|---|---|---|")
    for cat, ms in table["categories"].items():
        print(f"| {cat} | {ms:.3f} | {100 * ms / table['busy_ms']:.1f}% |")
    print("\n| kernel | ms | calls |\n|---|---|---|")
    for row in table["top"][:20]:
        print(f"| `{row['kernel']}` | {row['ms']:.3f} | {row['calls']:.0f} |")


def timeline(prof, iters: int) -> list:
    """The last iteration's kernels in launch order: (name, start offset us, duration us, gap before us).
    The gaps show where the GPU waited between kernels (host launches; in a graph, the graph's own)."""
    evts = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    per_iter = len(evts) // max(iters, 1)
    last = evts[-per_iter:] if per_iter else []
    rows, t0, prev_end = [], (last[0].time_range.start if last else 0), None
    for e in last:
        start, end = e.time_range.start, e.time_range.end
        rows.append({"kernel": e.name[:90], "start_us": start - t0, "us": end - start,
                     "gap_us": 0.0 if prev_end is None else start - prev_end})
        prev_end = end if prev_end is None else max(prev_end, end)
    return rows


def profile(fn, warmup: int, iters: int, graph: bool = False):
    from torch.profiler import ProfilerActivity, profile as tprofile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        fn = capture_graph(fn)
        fn()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / iters
    with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return wall, {**kernel_table(prof, iters), "timeline": timeline(prof, iters)}


def memory_at_peak(step, top: int = 25) -> dict:
    """What is allocated at the peak of one call of `step` (beyond what was allocated before it), from the
    caching allocator's history: the largest blocks live at that moment, each with the source line that
    allocated it (for Inductor's generated code, the line of its `call` that makes the buffer)."""
    import linecache
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, peak_at = {}, 0, 0, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for ev in trace[:peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)

    def origin(ev):
        for fr in ev.get("frames", []):
            f = fr["filename"]
            # Python frames only (the history's C++ frames name the allocator, on the H200 run of 2026-12-03
            # every block's first frame was memory_snapshot.cpp); Inductor's generated code, or user code.
            if f.endswith(".py") and ("torchinductor" in f or ("/torch/" not in f and "/python3" not in f)):
                text = linecache.getline(f, fr["line"]).strip()
                return f"{os.path.basename(f)}:{fr['line']} {fr['name']}: {text[:110]}"
        return "?"
    blocks = sorted(live.values(), key=lambda ev: -ev["size"])
    rows = [{"MiB": ev["size"] / 2 ** 20, "origin": origin(ev)} for ev in blocks[:top]]
    print(f"\nallocated during the step, at its peak: {peak / 2 ** 30:.2f} GiB in {len(live)} blocks; the largest:")
    for r in rows:
        print(f"  {r['MiB']:8.1f} MiB  {r['origin']}")
    return {"step_peak_gib": peak / 2 ** 30, "blocks": len(live), "largest": rows}


def run_step(args) -> dict:
    import fxfuse
    from foundation import LLAMA3_8B
    from qlora_llama import batch, build
    model, _ = build(layers=args.layers, checkpointing=not args.no_ckpt, double_quant=True, device="cuda",
                     twin=False, rank=16, **LLAMA3_8B)
    model_gib = torch.cuda.memory_allocated() / 2 ** 30
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch(vocab=LLAMA3_8B["vocab_size"], b=args.batch, t=args.seq, seed=1, device="cuda")
    run = model
    if args.variant == "fxfuse":
        run = torch.compile(model, backend="fxfuse", options=json.loads(args.options or "{}"))
    elif args.variant == "inductor":
        run = torch.compile(model)

    def step():
        loss = run(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    profiler = None
    if args.cprofile:  # the first step's Python time by function: which compile phase grows with the layers
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if profiler is not None:
        import pstats
        profiler.disable()
        profiler.dump_stats(args.cprofile)
        for key in ("cumulative", "tottime"):
            pstats.Stats(profiler).sort_stats(key).print_stats(35)
    compile_split = {}
    if args.variant != "stock":  # where the first step's time went: Dynamo's phases, fxfuse's rewrite
        from torch._dynamo.utils import compile_times
        print(compile_times(repr="str", aggregate=True))
        compile_split["dynamo_phases_s"] = compile_times(repr="csv", aggregate=True)
        if args.variant == "fxfuse":
            graphs = fxfuse.last_report().graphs
            compile_split.update(rewrite_s=sum(g.rewrite_s for g in graphs),
                                 inner_forward_s=sum(g.inner_compile_s for g in graphs))
            print(f"fxfuse rewrite {compile_split['rewrite_s']:.1f} s, inner compile of the forward "
                  f"{compile_split['inner_forward_s']:.1f} s")
            from torch._higher_order_ops import triton_kernel_wrap as wrap
            for name in ("identify_accessed_tensors", "identify_mutated_tensors"):
                memoized = getattr(wrap, name, None)
                if hasattr(memoized, "fxfuse_memo"):
                    compile_split[name] = {"analysed": len(memoized.fxfuse_memo), "memoized": memoized.hits}
            print(f"kernel access analyses: {compile_split}")
    steady_gib = torch.cuda.memory_allocated() / 2 ** 30
    wall, table = profile(step, warmup=2, iters=args.iters)
    table.pop("timeline")
    memory = memory_at_peak(step) if args.memory else None
    title = f"step: {args.variant} {args.options or ''} ({args.layers} layers, {args.batch}x{args.seq}, " \
            f"ckpt {'off' if args.no_ckpt else 'on'})"
    print_table(title, wall, table)
    fired = fxfuse.last_report().counts() if args.variant == "fxfuse" else {}
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"\nfirst step {first:.1f} s; fired {fired}; memory: model {model_gib:.2f} GiB, after a step "
          f"{steady_gib:.2f} GiB, peak {peak_gib:.2f} GiB")
    return {"what": "step", "variant": args.variant, "options": args.options, "wall_ms": wall, "first_s": first,
            "compile": compile_split, "fired": fired, "model_gib": model_gib, "steady_gib": steady_gib,
            "peak_gib": peak_gib, "memory_at_peak": memory, **table}


def run_lora(args) -> dict:
    import nf4_lora as bench
    out = {}
    for name, shapes in bench.CASES.items():
        if args.case and not any(name.startswith(c) for c in args.case.split(",")):
            continue
        for system in args.systems.split(","):
            x, projs, dys = bench._make(shapes, args.tokens, 16)
            dys = bench._grads_for(system, dys)
            fn = bench._system_fns(system, x, projs)
            params = [x] + [t for _, _, a, b in projs for t in (a, b)]

            def step():
                torch.autograd.grad(fn(), params, dys)
            wall, table = profile(step, warmup=5, iters=args.iters, graph=args.graph)
            print_table(f"lora: {system}, {name}, {args.tokens} tokens{', CUDA graph' if args.graph else ''}",
                        wall, table)
            if args.timeline:
                print_timeline(table["timeline"])
            out[f"{system}: {name}"] = {"wall_ms": wall, **table}
            torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["step", "lora"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--variant", default="fxfuse", choices=["stock", "inductor", "fxfuse"])
    ap.add_argument("--options", default=None, help="fxfuse options as JSON")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="step: what is allocated at the step's peak")
    ap.add_argument("--cprofile", default=None, help="step: write cProfile stats of the first step here, print the top")
    ap.add_argument("--case", default=None, help="lora: the cases whose names start with these (comma-separated)")
    ap.add_argument("--systems", default="fxfuse-compiled,stock")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--graph", action="store_true", help="lora: profile replays of the step captured as a CUDA graph")
    ap.add_argument("--timeline", action="store_true", help="lora: print the last iteration's kernels in order")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = run_step(args) if args.what == "step" else run_lora(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
