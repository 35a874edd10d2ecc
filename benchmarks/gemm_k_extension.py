"""What a K-extended GEMM costs on this GPU: cuBLAS bf16 GEMMs at the Llama-3-8B LoRA shapes with
the reduction dimension widened by the adapter's columns (fxfuse/ops/nf4_lora.py folds the rank-r
adapter product into the frozen GEMM as 3r extra bf16 columns, padded), against the plain GEMM and
against addmm with a full [M, N] bias matrix (the alternative: adapter term, then the frozen product
added to it).

    python benchmarks/gemm_k_extension.py [--tokens 4096] [--graph] [--json benchmarks/results/gemm_k_extension.json]

--graph: each K-extended GEMM launched eagerly and replayed from a CUDA graph, through cuBLAS and cuBLASLt.

Measurement only: prints a markdown table of medians (CUDA events, L2 not flushed) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from measure import capture_graph

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


def _graph_median_ms(fn, reps=50) -> float:
    """As _median_ms, of fn captured as a CUDA graph (how the training step's device time is measured)."""
    return _median_ms(capture_graph(fn), reps)


def graph_and_library(m: int) -> list:
    """The K-extended GEMMs launched eagerly and from a CUDA graph, through cuBLAS and cuBLASLt: whether
    capture or the library changes cuBLAS's choice at these shapes."""
    rows = []
    for name, n, k, layout in SHAPES:
        for ext in (0, 48, 64, 128):
            a = torch.randn(m, k + ext, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k + ext, device="cuda", dtype=torch.bfloat16) if layout == "TN" else \
                torch.randn(k + ext, n, device="cuda", dtype=torch.bfloat16)
            wt = w.t() if layout == "TN" else w
            row = {"case": name, "N": n, "K": k + ext}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[f"{lib} eager"] = _median_ms(lambda: torch.mm(a, wt))
                row[f"{lib} graph"] = _graph_median_ms(lambda: torch.mm(a, wt))
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "gemm_k_extension.json"))
    ap.add_argument("--graph", action="store_true", help="only: eager against CUDA-graph replay, cuBLAS and cuBLASLt")
    args = ap.parse_args()
    m = args.tokens
    if args.graph:
        rows = graph_and_library(m)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "graph_rows": rows}, f,
                      indent=1)
        return
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
