"""What a K-extended GEMM costs on this GPU: cuBLAS bf16 GEMMs at the Llama-3-8B LoRA shapes with
the reduction dimension widened by the adapter's columns (fxfuse/ops/nf4_lora.py folds the rank-r
adapter product into the frozen GEMM as 3r extra bf16 columns, padded), against the plain GEMM and
against addmm with a full [M, N] bias matrix (the alternative: adapter term, then the frozen product
added to it).

    python benchmarks/gemm_k_extension.py [--tokens 4096] [--json benchmarks/results/gemm_k_extension.json]

Measurement only: prints a markdown table of medians (CUDA events, L2 not flushed) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

# (name, M-side rows, N output columns, K reduction, layout): "TN" is y = x @ W^T (W [N, K] row-major,
# the forward), "NN" is dx = dy @ W (W [K, N] row-major, the backward).
SHAPES = [("gate/up fwd", 14336, 4096, "TN"), ("q,k,v group fwd", 6144, 4096, "TN"),
          ("gate,up group fwd", 28672, 4096, "TN"), ("down bwd (dx)", 14336, 4096, "NN")]
EXTENSIONS = (0, 48, 64, 96, 128, 144, 192, 256)


def _median_ms(fn, reps=50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "gemm_k_extension.json"))
    args = ap.parse_args()
    m = args.tokens
    rows = []
    for name, n, k, layout in SHAPES:
        row = {"case": name, "M": m, "N": n, "K": k}
        for ext in EXTENSIONS:
            a = torch.randn(m, k + ext, device="cuda", dtype=torch.bfloat16)
            if layout == "TN":
                w = torch.randn(n, k + ext, device="cuda", dtype=torch.bfloat16)
                row[f"+{ext}"] = _median_ms(lambda: torch.mm(a, w.t()))
            else:
                w = torch.randn(k + ext, n, device="cuda", dtype=torch.bfloat16)
                row[f"+{ext}"] = _median_ms(lambda: torch.mm(a, w))
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        c = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) if layout == "TN" else \
            torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        wt = w.t() if layout == "TN" else w
        row["addmm (bias copied)"] = _median_ms(lambda: torch.addmm(c, a, wt))
        row["addmm_ in place"] = _median_ms(lambda: c.addmm_(a, wt))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [f"+{e}" for e in EXTENSIONS] + ["addmm (bias copied)", "addmm_ in place"]
    print(f"\n| case ({m} tokens), ms | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['case']} {row['N']}x{row['K']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
