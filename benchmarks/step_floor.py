"""The floor under any exact QLoRA step: the bf16 GEMMs and the attention every such step must run.

    python benchmarks/step_floor.py [--layers 32] [--batch 2] [--seq 2048] [--json PATH]

For the workload of benchmarks/step.py (Llama-3-8B shape), with nothing but cuBLAS and SDPA (cuDNN):
per layer, the frozen products y = x W^T of the projections (grouped as fxfuse runs them: q,k,v as one
[6144, 4096] weight, gate,up as one [28672, 4096]), then dx = dy W of each, and causal GQA attention
forward and backward; then the lm_head's product and its dx. With gradient checkpointing the layers'
forward runs twice (the step's forward and the backward's recomputation). No dequantization, no
adapter, no norm, no loss, no optimizer: an exact path on a 4-bit base needs at least this. The time
is that of one CUDA graph holding the whole step's kernels, replayed back to back (as long as a real step,
so at training's sustained, power-capped clock), the median of several replays; the parts are timed
alone too (shorter: at a higher clock). Prints the floor with and without the recomputation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import capture_graph  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
# (name, N, K) of the frozen products of one layer, grouped as fxfuse's ops group them.
LAYER_GEMMS = [("q,k,v", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), ("o", HIDDEN, HEADS * HEAD_DIM),
               ("gate,up", 2 * MLP, HIDDEN), ("down", HIDDEN, MLP)]


def replay_ms(fn, reps: int = 7) -> float:
    """Median device ms of `fn` captured as a CUDA graph, over `reps` timed pairs of back-to-back replays."""
    replay = capture_graph(fn)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 2)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    m = args.batch * args.seq
    # One layer's weights, reused by every layer: the floor is compute, and 4 GiB of distinct bf16 weights
    # per 8 layers would not change it (each product reads its weight once either way).
    weights = {name: torch.randn(n, k, device=dev, dtype=bf16) / k ** 0.5 for name, n, k in LAYER_GEMMS}
    xs = {name: torch.randn(m, k, device=dev, dtype=bf16) for name, n, k in LAYER_GEMMS}
    dys = {name: torch.randn(m, n, device=dev, dtype=bf16) for name, n, k in LAYER_GEMMS}
    lm_head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=bf16) / HIDDEN ** 0.5
    h, dlogits = torch.randn(m, HIDDEN, device=dev, dtype=bf16), torch.randn(m, VOCAB, device=dev, dtype=bf16)
    q = torch.randn(args.batch, HEADS, args.seq, HEAD_DIM, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(args.batch, KV_HEADS, args.seq, HEAD_DIM, device=dev, dtype=bf16, requires_grad=True)
    v = torch.randn(args.batch, KV_HEADS, args.seq, HEAD_DIM, device=dev, dtype=bf16, requires_grad=True)
    do = torch.randn(args.batch, HEADS, args.seq, HEAD_DIM, device=dev, dtype=bf16)

    def forward_products():
        for name, _, _ in LAYER_GEMMS:
            torch.mm(xs[name], weights[name].t())

    def backward_products():
        for name, _, _ in LAYER_GEMMS:
            torch.mm(dys[name], weights[name])

    def attention_forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def attention_backward():  # the backward's own forward (saved statistics) plus its backward
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (q, k, v), do)

    def head():
        torch.mm(h, lm_head.t())
        torch.mm(dlogits, lm_head)

    def step(checkpointing: bool):
        def run():
            for _ in range(args.layers):  # the forward
                forward_products()
                attention_forward()
            head()
            for _ in range(args.layers):  # the backward, each layer's forward first again where checkpointed
                if checkpointing:
                    forward_products()
                attention_backward()
                backward_products()
        return run

    parts = {"layer forward products": forward_products, "layer backward products": backward_products,
             "attention forward": attention_forward, "attention forward+backward": attention_backward,
             "lm_head product and dx": head}
    ms = {name: replay_ms(fn) for name, fn in parts.items()}
    flops = 2 * m * sum(n * k for _, n, k in LAYER_GEMMS)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
           "batch": args.batch, "seq": args.seq, "parts_ms": ms,
           "layer_products_tflops": 2 * flops / (ms["layer forward products"] + ms["layer backward products"]) / 1e9,
           # The whole step's kernels in one graph: as long as a real step, so at a real step's clock.
           "floor_ms_checkpointing": replay_ms(step(True), reps=5),
           "floor_ms_no_checkpointing": replay_ms(step(False), reps=5)}
    print("| part | ms |\n|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.3f} |")
    print(f"\nlayer products at {out['layer_products_tflops']:.0f} TFLOP/s; floor of the step at {args.layers} "
          f"layers, {args.batch} x {args.seq}: {out['floor_ms_checkpointing']:.1f} ms with checkpointing, "
          f"{out['floor_ms_no_checkpointing']:.1f} ms without")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
