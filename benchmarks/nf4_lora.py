"""NF4 dequantization and LoRA-on-NF4 on the GPU: bit-exactness against bitsandbytes' CUDA kernels,
then forward+backward time and peak memory of `fxfuse::nf4_lora_linear` against the stock path
(bitsandbytes MatMul4Bit + PEFT's fp32 adapter path) at the Llama-3-8B projection shapes.

    python benchmarks/nf4_lora.py --json benchmarks/results/nf4_lora.json

Prints markdown tables; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from fxfuse.kernels.nf4 import dequantize_4bit  # noqa: E402
from fxfuse.ops.nf4_lora import nf4_lora_linear  # noqa: E402

SHAPES = {"q/o 4096->4096": (4096, 4096), "k/v 4096->1024": (1024, 4096), "gate/up 4096->14336": (14336, 4096),
          "down 14336->4096": (4096, 14336)}
TOKENS, RANK = 4096, 16


def quantize(w, double_quant):
    import bitsandbytes.functional as F
    return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def nested_of(st):
    return (st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize) if st.nested else None


def exactness() -> list:
    import bitsandbytes.functional as F
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for (out_f, in_f) in [(72, 200), (200, 72), (1024, 4096), (4096, 14336)]:
        for dq in (False, True):
            for dtype in (torch.bfloat16, torch.float16):
                w = torch.randn(out_f, in_f, generator=g, device="cuda").to(dtype)
                q, st = quantize(w, dq)
                ref = F.dequantize_4bit(q, st)
                ours = dequantize_4bit(q.view(torch.uint8).reshape(-1), st.absmax, st.shape, dtype,
                                       blocksize=st.blocksize, nested=nested_of(st))
                rows.append({"shape": [out_f, in_f], "double_quant": dq, "dtype": str(dtype),
                             "bit_equal": bool(torch.equal(ref.view(torch.int16), ours.view(torch.int16)))})
    return rows


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))


def time_shape(name, out_f, in_f) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(out_f, in_f, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    q, st = quantize(w, True)
    a = (torch.randn(RANK, in_f, generator=g, device="cuda") * 0.02).requires_grad_()
    b = (torch.randn(out_f, RANK, generator=g, device="cuda") * 0.02).requires_grad_()
    x = torch.randn(TOKENS, in_f, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    dy = torch.randn(TOKENS, out_f, generator=g, device="cuda").to(torch.bfloat16)
    s = 2.0
    nested = nested_of(st)
    args = (q, st.absmax, *nested[:3], a, b, s, "nf4", out_f, in_f, st.blocksize, nested[3])

    def stock():
        result = bnb.matmul_4bit(x, q.t(), quant_state=st).clone()
        y = result + (torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * s).to(x.dtype)
        torch.autograd.grad(y, (x, a, b), dy)

    def ours():
        torch.autograd.grad(nf4_lora_linear(x, *args), (x, a, b), dy)

    def dq_bnb():
        F.dequantize_4bit(q, st)

    def dq_ours():
        dequantize_4bit(q.view(torch.uint8).reshape(-1), st.absmax, st.shape, torch.bfloat16, blocksize=64,
                        nested=nested)

    out = {"name": name, "shape": [out_f, in_f], "tokens": TOKENS}
    for label, fn in (("stock", stock), ("fxfuse", ours)):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        out[f"{label}_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out[f"{label}_fwd_bwd_ms"] = bench(fn)
    out["dequant_bnb_us"] = 1e3 * bench(dq_bnb)
    out["dequant_fxfuse_us"] = 1e3 * bench(dq_ours)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "nf4_lora.json"))
    args = ap.parse_args()
    rows = exactness()
    ok = all(r["bit_equal"] for r in rows)
    print(f"NF4 dequantization bit-equal to bitsandbytes CUDA on {sum(r['bit_equal'] for r in rows)}/{len(rows)} "
          f"cases: {'PASS' if ok else 'FAIL'}")
    for r in rows:
        if not r["bit_equal"]:
            print("  FAIL", r)
    times = [time_shape(n, *s) for n, s in SHAPES.items()]
    print(f"\n| projection ({TOKENS} tokens, r={RANK}, NF4 double quant) | stock fwd+bwd ms | fxfuse fwd+bwd ms | "
          "ratio | stock extra peak MiB | fxfuse extra peak MiB | dequant bnb us | dequant fxfuse us |")
    print("|---|---|---|---|---|---|---|---|")
    for t in times:
        print(f"| {t['name']} | {t['stock_fwd_bwd_ms']:.3f} | {t['fxfuse_fwd_bwd_ms']:.3f} | "
              f"{t['fxfuse_fwd_bwd_ms'] / t['stock_fwd_bwd_ms']:.2f} | {t['stock_peak_extra_mib']:.0f} | "
              f"{t['fxfuse_peak_extra_mib']:.0f} | {t['dequant_bnb_us']:.1f} | {t['dequant_fxfuse_us']:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "exactness": rows,
                   "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
