"""Benchmark the fxfuse RMSNorm Triton kernels against HF eager and torch.compile (Inductor).

For the GPU machine (H200). For bf16 x of [M, N] in SHAPES, with a weight that requires grad:
  (a) HF LlamaRMSNorm eager, (b) torch.compile of it (Inductor, default mode), (c) the fxfuse kernels
  called directly (rms_norm_forward, then rms_norm_backward).
Times: forward + backward (y.backward(dy)) and forward only (under no_grad for (a) and (b)), the
median over many runs (triton.testing.do_bench, which flushes L2 before each run), and the fwd+bwd
again replayed as CUDA graphs (device time without host launch overhead, which the plain timings
include whenever the GPU work is shorter than the Python launch path). Also reports the fxfuse
fwd+bwd bandwidth against the H200's ~4.8 TB/s, and runs the exactness check
(fxfuse.testing.assert_exact of y, dx, dw against float64) on the GPU, for 4096x4096 bf16 and for
further shapes and dtypes.

    python benchmarks/rms_norm.py [--json benchmarks/rms_norm.json] [--sweep]

Prints a markdown table and writes the numbers to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from fxfuse.kernels import rms_norm as K  # noqa: E402
from fxfuse.kernels.rms_norm import rms_norm_backward, rms_norm_forward  # noqa: E402
from fxfuse.testing import ExactnessError, assert_exact  # noqa: E402

SHAPES = [(4096, 4096), (8192, 4096), (4096, 8192)]
EPS = 1e-6
PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e, vendor datasheet
DTYPE = torch.bfloat16


def hf_rms_norm(x, w, eps, compute_dtype=torch.float32):
    """transformers' LlamaRMSNorm.forward, verbatim but for `compute_dtype` (HF: torch.float32)."""
    input_dtype = x.dtype
    hidden_states = x.to(compute_dtype)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return w * hidden_states.to(input_dtype)


def reference(x, w):
    return hf_rms_norm(x, w, EPS)


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn() after warm-up, timed with CUDA events."""
    try:
        return float(triton.testing.do_bench(fn, warmup=100, rep=500, grad_to_none=grad_to_none,
                                             return_mode="median"))
    except TypeError:  # an older triton without return_mode
        pass
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(200):
        for t in grad_to_none or ():
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_graph_ms(fn) -> float | None:
    """Median ms of fn replayed as a CUDA graph (launch overhead removed), or None if unavailable."""
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=500, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a diagnostic column only
        print(f"  (CUDA-graph timing unavailable: {type(e).__name__}: {e})")
        return None


def copy_bandwidth_GBps(nbytes: int = 2 ** 30) -> float:
    """Achievable HBM bandwidth, measured: a device-to-device copy of `nbytes` (far beyond L2),
    replayed as a CUDA graph; counts the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_graph_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bandwidth_table() -> tuple[str, dict]:
    """fxfuse fwd+bwd device time (CUDA graph) at SHAPES against the measured copy bandwidth."""
    copy = copy_bandwidth_GBps()
    rows, data = [], {"copy_GBps": copy, "shapes": []}
    for m, n in SHAPES:
        x, w, dy = make_inputs(m, n, DTYPE, seed=m * 100003 + n)

        def fx_fwd_bwd():
            _, rstd = rms_norm_forward(x, w, EPS)
            rms_norm_backward(dy, x, w, rstd)

        ms = bench_graph_ms(fx_fwd_bwd)
        nb = fxfuse_bytes(m, n, DTYPE)
        gbps = (nb["forward"] + nb["backward"]) / (ms * 1e-3) / 1e9
        data["shapes"].append({"shape": [m, n], "fwd_bwd_ms": ms, "GBps": gbps})
        rows.append(f"| {m} x {n} | {ms * 1e3:.1f} | {gbps:.0f} | {100 * gbps / copy:.0f}% |")
    table = (f"Measured copy bandwidth (1 GiB device-to-device copy, CUDA graph): {copy:.0f} GB/s.\n\n"
             "| M x N (bf16) | fxfuse fwd+bwd us (CUDA graph) | GB/s | of measured copy |\n|---|---|---|---|\n"
             + "\n".join(rows) + "\n")
    return table, data


def make_inputs(m, n, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, n, generator=g, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype)
    dy = torch.randn(m, n, generator=g, device=device).to(dtype)
    return x, w, dy


def fxfuse_bytes(m, n, dtype) -> dict:
    """Bytes the fxfuse kernels must move: the forward reads x, w and writes y, rstd; the backward
    reads dy, x, w, rstd and writes dx and the [programs, N] fp32 dw partials (the small partials
    reduction, reading them back and writing dw, is counted separately)."""
    e = torch.empty((), dtype=dtype).element_size()
    programs = K._num_backward_programs(torch.device("cuda"))
    acc = 8 if dtype == torch.float32 else 4
    fwd = 2 * m * n * e + n * e + m * 4
    bwd = 3 * m * n * e + n * e + m * 4 + programs * n * acc
    reduce = programs * n * acc + n * e
    return {"forward": fwd, "backward": bwd, "partials_reduction": reduce, "programs": programs}


def exactness(m, n, dtype, seed=1234) -> dict:
    """assert_exact of the fxfuse y, dx, dw against float64, next to the stock path, on the GPU."""
    x, w, dy = make_inputs(m, n, dtype, seed)
    y, rstd = rms_norm_forward(x, w, EPS)
    dx, dw = rms_norm_backward(dy, x, w, rstd, eps=EPS)

    def through_autograd(xx, ww, dd, compute_dtype):
        xx, ww = xx.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        out = hf_rms_norm(xx, ww, EPS, compute_dtype)
        out.backward(dd)
        return out.detach(), xx.grad, ww.grad

    ref = through_autograd(x.double(), w.double(), dy.double(), torch.float64)
    stock = through_autograd(x, w, dy, torch.float32)
    result = {"shape": [m, n], "dtype": str(dtype).replace("torch.", ""), "passed": True, "outputs": {}}
    for name, ours, r64, st in zip(("y", "dx", "dw"), (y, dx, dw), ref, stock):
        try:
            errs = assert_exact(name, ours, r64, st)
            result["outputs"][name] = {k: v for k, v in errs.items() if k != "name"}
        except ExactnessError as exc:
            result["passed"] = False
            result["outputs"][name] = {"failure": str(exc)}
    return result


def time_shape(m, n, compiled) -> dict:
    x, w, dy = make_inputs(m, n, DTYPE, seed=m * 100003 + n)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()

    def eager_fwd_bwd():
        reference(xg, wg).backward(dy)

    def compiled_fwd_bwd():
        compiled(xg, wg).backward(dy)

    def eager_fwd():
        with torch.no_grad():
            reference(x, w)

    def compiled_fwd():
        with torch.no_grad():
            compiled(x, w)

    def fx_fwd_bwd():
        _, rstd = rms_norm_forward(x, w, EPS)
        rms_norm_backward(dy, x, w, rstd)

    def fx_fwd():
        rms_norm_forward(x, w, EPS)

    _, rstd = rms_norm_forward(x, w, EPS)

    def fx_bwd():
        rms_norm_backward(dy, x, w, rstd)

    # For the CUDA-graph timings (device time without host launch overhead), autograd.grad rather
    # than .backward, so that replays do not accumulate into .grad.
    def eager_grads():
        torch.autograd.grad(reference(xg, wg), (xg, wg), dy)

    def compiled_grads():
        torch.autograd.grad(compiled(xg, wg), (xg, wg), dy)

    t = {
        "eager_fwd_bwd": bench_ms(eager_fwd_bwd, grad_to_none=[xg, wg]),
        "compiled_fwd_bwd": bench_ms(compiled_fwd_bwd, grad_to_none=[xg, wg]),
        "fxfuse_fwd_bwd": bench_ms(fx_fwd_bwd),
        "eager_fwd": bench_ms(eager_fwd),
        "compiled_fwd": bench_ms(compiled_fwd),
        "fxfuse_fwd": bench_ms(fx_fwd),
        "fxfuse_bwd": bench_ms(fx_bwd),
        "eager_fwd_bwd_cudagraph": bench_graph_ms(eager_grads),
        "compiled_fwd_bwd_cudagraph": bench_graph_ms(compiled_grads),
        "fxfuse_fwd_bwd_cudagraph": bench_graph_ms(fx_fwd_bwd),
    }
    print(f"  timed {m}x{n}: " + ", ".join(f"{k} {'n/a' if v is None else f'{v * 1e3:.1f}'}" for k, v in t.items()))
    nbytes = fxfuse_bytes(m, n, DTYPE)
    moved = nbytes["forward"] + nbytes["backward"]
    gbps = moved / (t["fxfuse_fwd_bwd"] * 1e-3) / 1e9
    graph = t["fxfuse_fwd_bwd_cudagraph"]
    gbps_graph = None if graph is None else moved / (graph * 1e-3) / 1e9
    return {"shape": [m, n], "dtype": "bfloat16", "times_ms": t, "bytes": nbytes,
            "fxfuse_fwd_bwd_GBps": gbps, "fraction_of_peak": gbps * 1e9 / PEAK_BYTES_PER_S,
            "fxfuse_fwd_bwd_cudagraph_GBps": gbps_graph,
            "fraction_of_peak_cudagraph": None if gbps_graph is None else gbps_graph * 1e9 / PEAK_BYTES_PER_S,
            "fxfuse_fwd_GBps": nbytes["forward"] / (t["fxfuse_fwd"] * 1e-3) / 1e9}


def _sweep(label, fn, knobs, grid) -> list:
    """Median time of fn() for each setting of the module's tuning knobs in grid."""
    saved = {k: getattr(K, k) for k in knobs}
    rows = []
    try:
        for values in grid:
            for k, v in zip(knobs, values):
                setattr(K, k, v)
            setting = dict(zip(knobs, values))
            try:
                ms = bench_ms(fn)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  sweep {label} {setting}: {type(e).__name__}")
                continue
            rows.append({"what": label, **setting, "ms": ms})
            print(f"  sweep {label} {setting}: {ms * 1e3:7.1f} us")
    finally:
        for k, v in saved.items():
            setattr(K, k, v)
    return rows


def sweep_kernels(m, n) -> list:
    """fxfuse forward and backward times over their tuning knobs (to choose the defaults)."""
    x, w, dy = make_inputs(m, n, DTYPE, seed=7)
    _, rstd = rms_norm_forward(x, w, EPS)
    bwd_grid = [(p, s, t) for p in (1, 2) for s in (3, 4) for t in (8192, 16384)]
    fwd_grid = [(t, wp) for t in (4096, 8192, 16384) for wp in (None, 4, 16)]
    return (_sweep(f"backward {m}x{n}", lambda: rms_norm_backward(dy, x, w, rstd),
                   ("_BWD_PROGRAMS_PER_SM", "_BWD_STAGES", "_BWD_TILE_ELEMS"), bwd_grid)
            + _sweep(f"forward {m}x{n}", lambda: rms_norm_forward(x, w, EPS),
                     ("_TILE_ELEMS", "_FWD_WARPS"), fwd_grid))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "rms_norm.json"))
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernels' tuning knobs")
    ap.add_argument("--bandwidth-only", action="store_true",
                    help="only the fxfuse bandwidth against the measured copy bandwidth (about 20 s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/rms_norm.py needs a CUDA GPU")
    if args.bandwidth_only:
        table, data = bandwidth_table()
        print(table)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": data}, f, indent=2)
        return

    device = torch.cuda.get_device_name()
    print(f"# RMSNorm, {device}, torch {torch.__version__}, triton {triton.__version__}\n")

    checks = [exactness(4096, 4096, torch.bfloat16)]
    main_check = checks[0]
    print(f"exactness 4096x4096 bf16 (y, dx, dw vs float64): {'PASS' if main_check['passed'] else 'FAIL'}")
    for name, o in main_check["outputs"].items():
        print(f"  {name}: " + (o["failure"] if "failure" in o else
                               ", ".join(f"{k} {v:.3e}" for k, v in o.items())))
    # Further checks of the compiled (not interpreted) kernels: odd shapes, every dtype, N = 1.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n in ((1, 1), (3, 72), (17, 200), (33, 96), (5, 1000), (1000, 4100), (2, K.MAX_HIDDEN)):
            if (m, n) == (1, 1):  # dx cancels to ~eps there: only check it runs and y is right
                x, w, _ = make_inputs(1, 1, dtype, 0)
                y, _ = rms_norm_forward(x, w, EPS)
                ok = torch.equal(y, hf_rms_norm(x, w, EPS))
                checks.append({"shape": [1, 1], "dtype": str(dtype), "passed": ok, "outputs": {}})
                continue
            checks.append(exactness(m, n, dtype))
    bad = [c for c in checks[1:] if not c["passed"]]
    print(f"further exactness checks: {len(checks) - 1 - len(bad)}/{len(checks) - 1} passed")
    for c in bad:
        print(f"  FAIL {c['dtype']} {c['shape']}: {c['outputs']}")
    print()

    # One compiled function for all shapes (dynamic=False: one specialised graph per shape, as a
    # training run with a fixed shape gets). Timed in two rounds; the first only warms everything
    # up (compilation, Inductor's worker pool, clocks) and is kept in the JSON for reference.
    compiled = torch.compile(reference, dynamic=False)
    warmup_round = [time_shape(m, n, compiled) for m, n in SHAPES]
    results = [time_shape(m, n, compiled) for m, n in SHAPES]
    sweeps = []
    if args.sweep:
        for m, n in SHAPES:
            sweeps += sweep_kernels(m, n)

    us = lambda ms: "n/a" if ms is None else f"{ms * 1e3:.1f}"  # noqa: E731
    print("| M x N (bf16) | eager fwd+bwd | compile fwd+bwd | fxfuse fwd+bwd | eager fwd | compile fwd "
          "| fxfuse fwd | fxfuse bwd | fxfuse fwd+bwd GB/s | of 4.8 TB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["times_ms"]
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {us(t['eager_fwd_bwd'])} | {us(t['compiled_fwd_bwd'])} "
              f"| {us(t['fxfuse_fwd_bwd'])} | {us(t['eager_fwd'])} | {us(t['compiled_fwd'])} "
              f"| {us(t['fxfuse_fwd'])} | {us(t['fxfuse_bwd'])} "
              f"| {r['fxfuse_fwd_bwd_GBps']:.0f} | {100 * r['fraction_of_peak']:.0f}% |")
    print("\nMicroseconds, median (triton do_bench: L2 flushed before each run, host launch time "
          "included when the GPU outruns it); forward-only for eager/compile under torch.no_grad().")
    print("\nSame fwd+bwd replayed as CUDA graphs (device time only):\n")
    print("| M x N (bf16) | eager | compile | fxfuse | fxfuse GB/s | of 4.8 TB/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t = r["times_ms"]
        g, frac = r["fxfuse_fwd_bwd_cudagraph_GBps"], r["fraction_of_peak_cudagraph"]
        gb = "n/a" if g is None else f"{g:.0f}"
        pct = "n/a" if frac is None else f"{100 * frac:.0f}%"
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {us(t['eager_fwd_bwd_cudagraph'])} "
              f"| {us(t['compiled_fwd_bwd_cudagraph'])} | {us(t['fxfuse_fwd_bwd_cudagraph'])} | {gb} | {pct} |")
    print()
    table, bandwidth = bandwidth_table()
    print(table)

    out = {"device": device, "bandwidth": bandwidth, "torch": torch.__version__, "triton": triton.__version__,
           "peak_bytes_per_s": PEAK_BYTES_PER_S, "exactness_4096x4096_bf16": main_check,
           "further_checks": checks[1:], "results": results, "warmup_round": warmup_round,
           "sweep": sweeps}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {args.json}")
    if not all(c["passed"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
