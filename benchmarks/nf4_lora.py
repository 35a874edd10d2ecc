"""LoRA on NF4 on the GPU: exactness, then forward+backward time and peak memory of fxfuse's
`fxfuse::lora_linear` against the stock path (bitsandbytes MatMul4Bit + PEFT's fp32 adapter path)
and Unsloth's fast LoRA kernels, at the Llama-3-8B projection shapes, each system in its own process.

    python benchmarks/nf4_lora.py [--tokens 4096] [--rank 16] [--repeats 3] [--widening-variants 1]
                                  [--json benchmarks/results/nf4_lora.json]

Cases: the four projection shapes alone, and the groups that share their input (q/k/v, gate/up),
which stock and Unsloth's LoRA_W run one projection at a time, and fxfuse in one call. Systems:
stock, fxfuse (the op called eagerly), fxfuse-compiled (the op inside torch.compile, as the backend
runs it: Inductor traces into it), Unsloth (--unsloth-site). Prints markdown tables; writes JSON.
`--dequant-only`: the dequantization's bit-equality and speed against bitsandbytes. `--gemm-floor`: the two bf16
GEMMs every path runs, alone, against the stock step (benchmarks/RESULTS.md, fifth pass).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from measure import graph_replay_ms, peak_extra  # noqa: E402

SINGLE = {"q/o 4096->4096": [(4096, 4096)], "k/v 4096->1024": [(1024, 4096)],
          "gate/up 4096->14336": [(14336, 4096)], "down 14336->4096": [(4096, 14336)]}
GROUPS = {"q,k,v group 4096->4096+1024+1024": [(4096, 4096), (1024, 4096), (1024, 4096)],
          "gate,up group 4096->2x14336": [(14336, 4096), (14336, 4096)]}
CASES = {**SINGLE, **GROUPS}
SCALING = 2.0
EXACTNESS_CASES = ("q/o 4096->4096", "down 14336->4096", "gate,up group 4096->2x14336")
SYSTEMS = ("stock", "fxfuse", "fxfuse-compiled", "unsloth")


def _quantize(w):
    import bitsandbytes.functional as F
    return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def _nested(st):
    return (st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize)


def _make(shapes, tokens, rank, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    in_f = shapes[0][1]
    x = torch.randn(tokens, in_f, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    projs = []
    for out_f, _ in shapes:
        w = (torch.randn(out_f, in_f, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        q, st = _quantize(w)
        a = (torch.randn(rank, in_f, generator=g, device="cuda") * 0.02).requires_grad_()
        b = (torch.randn(out_f, rank, generator=g, device="cuda") * 0.02).requires_grad_()
        projs.append((q, st, a, b))
    dys = [torch.randn(tokens, out_f, generator=g, device="cuda").to(torch.bfloat16) for out_f, _ in shapes]
    return x, projs, dys


def _system_fns(system, x, projs):
    """A function computing every projection's output from x, for `system`."""
    if system == "stock":
        import bitsandbytes as bnb

        def run():
            outs = []
            for q, st, a, b in projs:
                result = bnb.matmul_4bit(x, q.t(), quant_state=st).clone()
                lora = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * SCALING
                outs.append(result + lora.to(x.dtype))
            return outs
        return run
    if system in ("fxfuse", "fxfuse-compiled"):
        from fxfuse.ops.nf4_lora import lora_linear_group
        sizes = [st.shape[0] for _, st, _, _ in projs]
        st0 = projs[0][1]

        def run():
            # One output for the group, its gradient one tensor: in a model the consumers read slices
            # of it, and the compiled backward writes their gradients into one buffer (no split/cat).
            return [lora_linear_group(x, [q for q, *_ in projs], [st.absmax for _, st, _, _ in projs],
                                      *[[_nested(st)[i] for _, st, _, _ in projs] for i in range(3)],
                                      [a for *_, a, _ in projs], [b for *_, b in projs], None, SCALING, "nf4",
                                      sizes, st0.shape[1], 64, st0.state2.blocksize)]
        if system == "fxfuse-compiled":
            # As the fxfuse backend runs it: the op inside an Inductor graph, which traces into it and
            # launches its kernels from generated code.
            return torch.compile(run, fullgraph=True, dynamic=False)
        return run
    if system == "unsloth":
        import unsloth  # noqa: F401  (patches; must come before the kernels)
        from unsloth.kernels.fast_lora import LoRA_W

        x3 = x.view(1, *x.shape)  # LoRA_W's backward reads (batch, seq, hidden) from X

        def run():
            # As unsloth's apply_lora_o calls it: the packed Params4bit, its quant state, A, B, s.
            return [LoRA_W.apply(x3, q, st, a, b, SCALING).view(x.shape[0], -1) for q, st, a, b in projs]
        return run
    raise ValueError(system)


def _grads_for(system, dys):
    """The output gradients as `system` receives them (fxfuse: one tensor for the group)."""
    return [torch.cat(dys, dim=-1)] if system.startswith("fxfuse") and len(dys) > 1 else dys


def time_system(system, tokens, rank) -> dict:
    import triton
    if "@" in system:
        # A variant of the compiled op: "fxfuse-compiled@W" K-extends the forward where y is at
        # least W times wider than x (fxfuse/ops/nf4_lora.py; 1 extends every widening forward).
        import fxfuse.ops.nf4_lora as op
        system, widening = system.split("@")
        op._EXTEND_FORWARD_MIN_WIDENING = float(widening)
    out = {}
    for name, shapes in CASES.items():
        x, projs, dys = _make(shapes, tokens, rank)
        dys = _grads_for(system, dys)
        try:
            run = _system_fns(system, x, projs)
        except Exception as e:  # e.g. Unsloth not installed
            return {"error": f"{type(e).__name__}: {e}"}
        params = [x] + [t for _, _, a, b in projs for t in (a, b)]

        def step():
            torch.autograd.grad(run(), params, dys)
        try:
            step()
            torch.cuda.synchronize()
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        peak = peak_extra(step)
        ms = float(triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median"))
        fwd_ms = float(triton.testing.do_bench(lambda: run(), warmup=10, rep=100, return_mode="median"))
        graph = graph_replay_ms(step)
        out[name] = {"fwd_bwd_ms": ms, "fwd_ms": fwd_ms, "peak_extra_mib": peak,
                     "device_ms": graph and graph[0], "device_ms_alone": graph and graph[1]}
        del x, projs, dys, run
        torch.cuda.empty_cache()
    return out


def exactness(tokens, rank) -> dict:
    """y, dx, dA, dB of fxfuse and stock against float64 for EXACTNESS_CASES (RMS and max errors)."""
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    from fxfuse.testing import assert_exact
    res = {}
    systems = ("stock", "fxfuse", "fxfuse-compiled")
    # One case per GEMM form of the op: the adapter term both ways (q/o), a K-extended backward
    # (down), a K-extended forward (the gate,up group).
    for case in EXACTNESS_CASES:
        x, projs, dys = _make(CASES[case], tokens, rank, seed=7)
        params = [x] + [t for _, _, a, b in projs for t in (a, b)]
        dy = torch.cat(dys, dim=-1)
        ys = {s: torch.cat(_system_fns(s, x, projs)(), dim=-1) for s in systems}
        grads = {s: torch.autograd.grad(ys[s], params, dy) for s in ys}
        p64 = [t.detach().double().requires_grad_() for t in params]
        y64 = torch.cat([p64[0] @ bnb_dequantize(q, st).double().t() + (p64[0] @ p64[1 + 2 * i].t())
                         @ p64[2 + 2 * i].t() * SCALING for i, (q, st, _, _) in enumerate(projs)], dim=-1)
        g64 = torch.autograd.grad(y64, p64, dy.double())
        names = ["dx"] + [f"{n}{i}" if len(projs) > 1 else n for i in range(len(projs)) for n in ("dA", "dB")]
        for system in systems[1:]:
            for name, ours, ref, stock in (("y", ys[system], y64, ys["stock"]),
                                           *[(n, grads[system][i], g64[i], grads["stock"][i])
                                             for i, n in enumerate(names)]):
                try:
                    e = assert_exact(name, ours, ref, stock)
                    e["pass"] = True
                except AssertionError as err:
                    e = {"pass": False, "error": str(err)}
                res[f"{case}: {system} {name}"] = e
        del x, projs, dys, ys, grads, p64, y64, g64
        torch.cuda.empty_cache()
    return res


def dequant_bit_equal() -> list:
    import bitsandbytes.functional as F
    from fxfuse.kernels.nf4 import dequantize_4bit
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for (out_f, in_f) in [(72, 200), (200, 72), (1024, 4096), (4096, 14336)]:
        for dq in (False, True):
            for dtype in (torch.bfloat16, torch.float16):
                w = torch.randn(out_f, in_f, generator=g, device="cuda").to(dtype)
                q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
                ref = F.dequantize_4bit(q, st)
                ours = dequantize_4bit(q.view(torch.uint8).reshape(-1), st.absmax, st.shape, dtype,
                                       blocksize=st.blocksize, nested=_nested(st) if dq else None)
                rows.append({"shape": [out_f, in_f], "double_quant": dq, "dtype": str(dtype),
                             "bit_equal": bool(torch.equal(ref.view(torch.int16), ours.view(torch.int16)))})
    return rows


def dequant_speed() -> list:
    """Time of one dequantization of a Llama-3-8B gate_proj weight (14336 x 4096, NF4 double quant, bf16 out):
    fxfuse's fast path (whole words), its general path (forced by an output one element off alignment), and
    bitsandbytes' CUDA kernel; bandwidth counts the packed bytes and absmax read plus the output written."""
    import bitsandbytes.functional as F
    import triton
    from fxfuse.kernels.nf4 import dequantize_4bit
    rows = []
    for out_f, in_f in [(14336, 4096), (4096, 4096)]:
        w = torch.randn(out_f, in_f, device="cuda").to(torch.bfloat16) * 0.02
        q, st = _quantize(w)
        n = out_f * in_f
        nbytes = n // 2 + st.absmax.numel() + 2 * n
        fast = torch.empty(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        buf = torch.empty(n + 1, dtype=torch.bfloat16, device="cuda")
        general = buf[1:].view(out_f, in_f)
        args = (q.view(torch.uint8).reshape(-1), st.absmax, (out_f, in_f), torch.bfloat16)
        fns = {"fxfuse fast": lambda: dequantize_4bit(*args, nested=_nested(st), out=fast),
               "fxfuse general": lambda: dequantize_4bit(*args, nested=_nested(st), out=general),
               "bitsandbytes": lambda: F.dequantize_4bit(q, st)}
        ref = F.dequantize_4bit(q, st)
        for name, fn in fns.items():
            fn()
            ms = float(triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median"))
            equal = None if name == "bitsandbytes" else bool(torch.equal(
                (fast if name == "fxfuse fast" else general).view(torch.int16), ref.view(torch.int16)))
            rows.append({"shape": [out_f, in_f], "system": name, "us": 1e3 * ms, "GB/s": nbytes / ms / 1e6,
                         "bit_equal": equal})
    return rows


def gemm_floor(tokens, rank) -> dict:
    """The two bf16 GEMMs every path runs (y = x W^T, dx = dy W with the dequantized weights and this
    benchmark's inputs), alone, against the stock step, both as back-to-back CUDA-graph replays (sustained,
    so at the clock the GPU's power cap allows): the floor under any exact path that keeps cuBLAS's GEMMs."""
    import bitsandbytes.functional as F
    out = {}
    for name in ("down 14336->4096", "gate/up 4096->14336", "gate,up group 4096->2x14336", "q/o 4096->4096"):
        x, projs, dys = _make(CASES[name], tokens, rank)
        w = torch.cat([F.dequantize_4bit(q, st) for q, st, _, _ in projs], 0)
        dy, xd = torch.cat(dys, -1), x.detach()
        gemms = graph_replay_ms(lambda: (torch.mm(xd, w.t()), torch.mm(dy, w)))
        params = [x] + [t for _, _, a, b in projs for t in (a, b)]
        run = _system_fns("stock", x, projs)
        stock = graph_replay_ms(lambda: torch.autograd.grad(run(), params, dys))
        out[name] = {"gemms_ms": gemms[0], "stock_ms": stock[0], "ratio": gemms[0] / stock[0]}
        print(f"{name}: two GEMMs {gemms[0]:.3f} ms, stock step {stock[0]:.3f} ms, GEMMs / stock "
              f"{gemms[0] / stock[0]:.3f}", flush=True)
    return out


def _median_of_runs(runs: list) -> dict:
    """One system's results over repeated runs: per case and figure the median, the runs kept beside."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    out = {}
    for case in good[0]:
        entries = [r[case] for r in good if case in r and "error" not in r[case]]
        if not entries:
            out[case] = good[-1][case]
            continue
        merged = {}
        for key in entries[0]:
            vals = sorted(e[key] for e in entries if e.get(key) is not None)
            merged[key] = vals[len(vals) // 2] if vals else None
            merged[key + "_runs"] = [e.get(key) for e in entries]
        out[case] = merged
    return out


def results_table(systems: dict, tokens: int, rank: int) -> str:
    """Markdown: per case, device time (CUDA-graph replays back to back) and wall time (do_bench) of every system,
    fxfuse's ratios to stock, and the extra peak memory."""
    def get(system, name, key):
        v = systems.get(system, {})
        return None if "error" in v else v.get(name, {}).get(key)

    def fmt(v, f=".3f"):
        return "n/a" if v is None else format(v, f)

    lines = [f"| case ({tokens} tokens, r={rank}) | device ms: stock / fxfuse / Unsloth | fxfuse / stock (device) | "
             "wall ms: stock / fxfuse eager / fxfuse compiled / Unsloth | compiled / stock (wall) | "
             "peak MiB: stock / fxfuse / Unsloth |", "|---|---|---|---|---|---|"]
    for name in CASES:
        dev = {sy: get(sy, name, "device_ms") for sy in SYSTEMS}
        wall = {sy: get(sy, name, "fwd_bwd_ms") for sy in SYSTEMS}
        peak = {sy: get(sy, name, "peak_extra_mib") for sy in SYSTEMS}
        fx_dev = dev["fxfuse-compiled"] or dev["fxfuse"]
        ratio = fx_dev / dev["stock"] if fx_dev and dev["stock"] else None
        wratio = wall["fxfuse-compiled"] / wall["stock"] if wall["fxfuse-compiled"] and wall["stock"] else None
        lines.append(f"| {name} | {fmt(dev['stock'])} / {fmt(fx_dev)} / {fmt(dev['unsloth'])} | {fmt(ratio, '.2f')} | "
                     f"{fmt(wall['stock'])} / {fmt(wall['fxfuse'])} / {fmt(wall['fxfuse-compiled'])} / "
                     f"{fmt(wall['unsloth'])} | {fmt(wratio, '.2f')} | {fmt(peak['stock'], '.0f')} / "
                     f"{fmt(peak['fxfuse-compiled'] or peak['fxfuse'], '.0f')} / {fmt(peak['unsloth'], '.0f')} |")
    # One decoder layer's LoRA projections as fxfuse runs them: the two groups, o_proj and down_proj.
    layer = ("q,k,v group 4096->4096+1024+1024", "q/o 4096->4096", "gate,up group 4096->2x14336", "down 14336->4096")
    tot = {}
    for sy in SYSTEMS:
        vals = [get(sy, name, "device_ms") for name in layer]
        if sy == "fxfuse-compiled" and None in vals:
            vals = [get("fxfuse", name, "device_ms") for name in layer]
        tot[sy] = sum(vals) if None not in vals else None
    ratio = tot["fxfuse-compiled"] / tot["stock"] if tot["fxfuse-compiled"] and tot["stock"] else None
    lines.append(f"| one layer (q,k,v + o + gate,up + down) | {fmt(tot['stock'])} / {fmt(tot['fxfuse-compiled'])} / "
                 f"{fmt(tot['unsloth'])} | {fmt(ratio, '.2f')} | | | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--unsloth-site", help="a folder with the Unsloth wheels installed (it pins other trl/datasets "
                    "versions, so only its child process sees it)")
    ap.add_argument("--system", help=argparse.SUPPRESS)  # child process: time one system, print JSON
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "nf4_lora.json"))
    ap.add_argument("--dequant-only", action="store_true", help="only the dequantization checks and timing")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="only the two bf16 GEMMs every path runs, against the stock step (sustained)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time stock, fxfuse-compiled and the variants this many times, interleaved, each in a fresh "
                         "process; the tables give medians (a single run's figures moved by up to 6%% between "
                         "machines)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated systems to time (of {', '.join(SYSTEMS)})")
    ap.add_argument("--widening-variants", default="",
                    help="comma-separated W: also time fxfuse-compiled@W, the forward K-extended where y is at least "
                         "W times wider than x")
    args = ap.parse_args()
    if args.dequant_only:
        rows = dequant_bit_equal()
        print(f"NF4 dequantization bit-equal to bitsandbytes CUDA: {sum(r['bit_equal'] for r in rows)}/{len(rows)}")
        print("| weight | system | us | GB/s | bit-equal |\n|---|---|---|---|---|")
        for r in dequant_speed():
            print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['system']} | {r['us']:.1f} | {r['GB/s']:.0f} | {r['bit_equal']} |")
        return
    if args.system:
        print("RESULT " + json.dumps(time_system(args.system, args.tokens, args.rank)))
        return
    if args.gemm_floor:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "gemm_floor": gemm_floor(args.tokens, args.rank)}, f,
                      indent=1)
        return

    rows = dequant_bit_equal()
    n_eq = sum(r["bit_equal"] for r in rows)
    print(f"NF4 dequantization bit-equal to bitsandbytes CUDA: {n_eq}/{len(rows)}")
    exact = exactness(args.tokens, args.rank)
    print(f"exactness, {args.tokens} tokens (fxfuse vs stock, RMS error against float64):")
    for k, v in exact.items():
        print(f"  {k}: {'PASS' if v['pass'] else 'FAIL'} " +
              (f"rms {v['rms']:.3e} vs stock {v['stock_rms']:.3e}; max {v['max']:.3e} vs {v['stock_max']:.3e}"
               if v["pass"] else v["error"]))

    variants = [f"fxfuse-compiled@{w}" for w in args.widening_variants.split(",") if w]
    chosen = [sy for sy in args.systems.split(",") if sy]
    if not set(chosen) <= set(SYSTEMS) or "stock" not in chosen:
        ap.error(f"--systems: stock and any of {SYSTEMS}, got {args.systems}")
    runs = {system: [] for system in (*chosen, *variants)}
    for rep in range(args.repeats):
        for system in runs:
            if rep and system in ("fxfuse", "unsloth"):
                continue  # repeated: the figures the ratios are made of (stock, compiled, variants)
            env = dict(os.environ)
            if system == "unsloth" and args.unsloth_site:
                env["PYTHONPATH"] = os.pathsep.join([args.unsloth_site, env.get("PYTHONPATH", "")])
                env.update(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--system", system, "--tokens",
                                   str(args.tokens), "--rank", str(args.rank)], capture_output=True, text=True,
                                  env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"error": (proc.stderr or proc.stdout)[-600:]}
            runs[system].append(res)
            print(f"{system}: {'ok' if 'error' not in res else res['error']}", flush=True)
    systems = {system: _median_of_runs(rs) for system, rs in runs.items()}

    table = results_table(systems, args.tokens, args.rank)
    print("\n" + table)
    if variants:
        print("\n| case | device ms: stock / fxfuse-compiled / " + " / ".join(variants) + " |\n|---|---|")
        for name in CASES:
            vals = [systems[sy].get(name, {}).get("device_ms") for sy in ("stock", "fxfuse-compiled", *variants)]
            print(f"| {name} | " + " / ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
                   "rank": args.rank, "dequant_bit_equal": rows, "exactness": exact, "systems": systems}, fh, indent=1)


if __name__ == "__main__":
    main()
