"""GPU checks and timings for the backend foundation (issue: backend + RMSNorm), in one go.

    python benchmarks/foundation.py --out benchmarks/results/foundation.json

Runs each part in its own process (fresh CUDA context, fresh Dynamo caches) and collects JSON:
  grad      whole-model gradient check on a 4-layer Llama-3-8B-shaped QLoRA model: every LoRA
            gradient after torch.compile(backend="fxfuse") against a float64 twin, compared with
            the stock bf16 path's error (criterion of fxfuse.testing; RMS statistic).
  step:X    training-step time of that model (AdamW on the adapters, checkpointing on) for
            X in: stock (no compile), fxfuse-eager, fxfuse-aot_eager, fxfuse-inductor. Median of
            the steps after warm-up, first-step time (compile included), peak memory.
  rms_norm  the RMSNorm kernel microbenchmark (benchmarks/rms_norm.py).
Then appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

# Llama-3-8B shapes, 4 layers (the full vocabulary: the final norm and lm_head are part of the check).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)


DEVICE = os.environ.get("FXFUSE_BENCH_DEVICE", "cuda")  # "cpu" (tiny shapes) only to try the script out
SHAPES = LLAMA3_8B if DEVICE == "cuda" else {}


def _build(layers, checkpointing, twin):
    from qlora_llama import build
    return build(layers=layers, checkpointing=checkpointing, double_quant=True, device=DEVICE, twin=twin,
                 rank=16, **SHAPES)


def _vocab():
    from qlora_llama import CONFIG
    return SHAPES.get("vocab_size", CONFIG["vocab_size"])


def _sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def part_grad(args) -> dict:
    import torch
    import fxfuse
    from fxfuse.testing import assert_exact, error_of
    from qlora_llama import batch, lora_grads
    model, twin = _build(args.layers, args.checkpointing, True)
    inputs = batch(vocab=_vocab(), b=args.batch, t=args.grad_seq, seed=1, device=DEVICE)
    ref = lora_grads(twin, inputs)
    del twin
    stock = lora_grads(model, inputs)
    fxfuse.last_report().graphs.clear()
    ours = lora_grads(torch.compile(model, backend="fxfuse"), inputs)
    rows, failures = [], []
    for name in ref:
        e, s = error_of(ours[name], ref[name], "rms"), error_of(stock[name], ref[name], "rms")
        rows.append({"param": name, "rms_error": e, "stock_rms_error": s, "ratio": e / s if s else float("nan")})
        try:
            assert_exact(name, ours[name], ref[name], stock[name], max_factor=None)
        except AssertionError as exc:
            failures.append(str(exc))
    ratios = [r["ratio"] for r in rows]
    from fxfuse.backend import DEFAULT_INNER
    return {"part": "grad", "inner": DEFAULT_INNER, "layers": args.layers, "batch": args.batch, "seq": args.grad_seq,
            "checkpointing": args.checkpointing, "post_passes": fxfuse.last_report().post_passes,
            "params_checked": len(rows), "failures": failures, "worst_ratio": max(ratios),
            "median_ratio": statistics.median(ratios), "rms_norm_fired": fxfuse.last_report().counts().get("rms_norm", 0),
            "report": str(fxfuse.last_report())}


def part_step(args, variant) -> dict:
    import torch
    import fxfuse
    from qlora_llama import batch
    model, _ = _build(args.layers, True, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch(vocab=_vocab(), b=args.batch, t=args.seq, seed=1, device=DEVICE)
    run = model
    if variant != "stock":
        # "fxfuse-<inner>[+pattern+...]": the inner compiler, then patterns that are off by default
        inner, *enable = variant.split("-", 1)[1].split("+")
        run = torch.compile(model, backend="fxfuse", options={"inner": inner, "enable": enable})
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = run(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"part": f"step:{variant}", "layers": args.layers, "batch": args.batch, "seq": args.seq,
            "first_step_s": times[0], "median_step_ms": 1e3 * statistics.median(times[args.warmup:]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan"), "losses": losses,
            "fired": fxfuse.last_report().counts() if variant != "stock" else {},
            "post_passes": fxfuse.last_report().post_passes if variant != "stock" else []}


def _child(part, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--grad-seq", str(args.grad_seq)] + ([] if args.checkpointing else ["--no-checkpointing"])
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr[-3000:])
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.time() - t0
            return out
    return {"part": part, "error": (p.stderr or p.stdout)[-2000:]}


def _gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def write_results(results: list, path: str) -> None:
    date = datetime.date.today().isoformat()
    env = next((r["env"] for r in results if r.get("env")), "")
    lines = [f"\n## Foundation: backend + RMSNorm ({date}, {env})\n",
             "Command: `python benchmarks/foundation.py` (JSON in benchmarks/results/).\n"]
    for r in results:
        if r.get("error"):
            lines.append(f"- `{r['part']}` failed: `{r['error'][-300:]!r}`")
    for grad in [r for r in results if r["part"] == "grad" and "error" not in r]:
        ckpt = "on" if grad.get("checkpointing", True) else "off"
        lines.append(f"Inner compiler `{grad.get('inner', 'default')}`. "
                     f"Whole-model gradient check, {grad['layers']}-layer Llama-3-8B-shaped QLoRA (NF4 double "
                     f"quant, LoRA r=16 on all linears, checkpointing {ckpt}), batch {grad['batch']} x {grad['seq']}: "
                     f"{grad['params_checked']} LoRA gradients, RMS error ratio to the stock bf16 path "
                     f"median {grad['median_ratio']:.3f}, worst {grad['worst_ratio']:.3f} (bound 1.25): "
                     f"{'PASS' if not grad['failures'] else 'FAIL'}; RMSNorm fired {grad['rms_norm_fired']}x.\n")
    steps = [r for r in results if r["part"].startswith("step:") and "error" not in r]
    if steps:
        base = next((r for r in steps if r["part"] == "step:stock"), None)
        lines.append("| inner compiler (rest of the graph) | median step ms | vs stock | first step s | peak GiB | loss step 1 |")
        lines.append("|---|---|---|---|---|---|")
        for r in steps:
            ratio = f"{r['median_step_ms'] / base['median_step_ms']:.3f}" if base else "-"
            lines.append(f"| {r['part'][5:]} | {r['median_step_ms']:.1f} | {ratio} | {r['first_step_s']:.1f} | "
                         f"{r['peak_gib']:.2f} | {r['losses'][0]:.4f} |")
        lines.append(f"\n({steps[0]['layers']} layers, batch {steps[0]['batch']} x {steps[0]['seq']}, AdamW, "
                     f"checkpointing on; median of {args_steps(steps[0])} steps after warm-up.)\n")
    rms = next((r for r in results if r["part"] == "rms_norm" and "error" not in r), None)
    if rms and rms.get("table"):
        lines.append("RMSNorm kernel, forward+backward:\n")
        lines.append(rms["table"])
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def args_steps(r) -> int:
    return len(r["losses"]) - r.get("warmup", 3)


def part_rms_norm(args) -> dict:
    out = os.path.join(args.tmp, "rms_norm.json")
    p = subprocess.run([sys.executable, os.path.join(HERE, "rms_norm.py"), "--json", out],
                       capture_output=True, text=True)
    sys.stderr.write(p.stdout[-4000:] + p.stderr[-2000:])
    if p.returncode != 0 or not os.path.exists(out):
        return {"part": "rms_norm", "error": (p.stdout + p.stderr)[-2000:]}
    with open(out) as f:
        data = json.load(f)
    # The script prints its exactness verdicts and a markdown table: keep those lines for RESULTS.md.
    keep = [l for l in p.stdout.splitlines() if l.startswith(("|", "exactness", "further", "times in"))]
    return {"part": "rms_norm", "data": data, "table": "\n".join(keep) + "\n"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default=None)
    ap.add_argument("--parts", default="grad,step:stock,step:fxfuse-eager,step:fxfuse-aot_eager,"
                                       "step:fxfuse-inductor,rms_norm")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--grad-seq", type=int, default=1024)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="the grad part without gradient checkpointing (the step parts always checkpoint)")
    ap.add_argument("--report", nargs="*", default=None,
                    help="only write RESULTS.md from these JSON files (runs split over several calls)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "foundation.json"))
    ap.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--tmp", default="/tmp")
    args = ap.parse_args()
    if args.report is not None:
        results = []
        for path in args.report:
            with open(path) as f:
                results += json.load(f)["results"]
        write_results(results, args.results_md)
        return
    if args.part:
        if args.part == "grad":
            res = part_grad(args)
        elif args.part.startswith("step:"):
            res = part_step(args, args.part[5:])
            res["warmup"] = args.warmup
        elif args.part == "rms_norm":
            res = part_rms_norm(args)
        else:
            raise SystemExit(f"unknown part {args.part}")
        import torch
        import triton
        import transformers
        res["env"] = (f"{_gpu_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                      f"transformers {transformers.__version__}")
        print("RESULT " + json.dumps(res))
        return
    results = []
    for part in args.parts.split(","):
        r = _child(part, args) if part != "rms_norm" else part_rms_norm(args)
        print(json.dumps({k: v for k, v in r.items() if k not in ("report", "data")})[:1500], flush=True)
        results.append(r)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:  # after every part: a run cut short still leaves its results
            json.dump({"date": datetime.date.today().isoformat(), "gpu": _gpu_name(), "results": results}, f,
                      indent=1)
    write_results(results, args.results_md)


if __name__ == "__main__":
    main()
