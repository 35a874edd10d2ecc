"""Flash attention on the GPU: exactness of fxfuse's kernel against float64 and SDPA, then forward+backward
time against SDPA (its default backend choice and each backend it has) and Inductor, at the Llama-3-8B
attention shape (batch 2, 32 query heads, 8 KV heads, head_dim 128, causal), sequences 2048 and 8192.

    python benchmarks/attention.py [--seqs 2048,8192] [--json benchmarks/results/attention.json]
    TRITON_INTERPRET=1 python benchmarks/attention.py --smoke      # tiny CPU run of the same code paths

Exactness: out, dq, dk, dv of fxfuse and of stock SDPA (bf16, the backend torch picks) against float64,
with fxfuse.testing.assert_exact (RMS and max error at most 1.25x stock's), for causal, right-padded,
packed (segment ids) and head_dim 64 cases. Timing: triton.testing.do_bench medians of one fwd+bwd;
peak memory above the inputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxfuse.ops.attention import flash_attention, segment_ids_from_position_ids  # noqa: E402
from fxfuse.testing import ExactnessError, assert_exact  # noqa: E402
from measure import peak_extra  # noqa: E402


def _inputs(b, hq, hkv, s, d, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g, device=device).to(torch.bfloat16).requires_grad_()
    k = torch.randn(b, hkv, s, d, generator=g, device=device).to(torch.bfloat16).requires_grad_()
    v = torch.randn(b, hkv, s, d, generator=g, device=device).to(torch.bfloat16).requires_grad_()
    dout = torch.randn(b, hq, s, d, generator=g, device=device).to(torch.bfloat16)
    return q, k, v, dout


def _mask(b, s, device, kind):
    """(bool mask [B, 1, S, S] for SDPA and the reference, fxfuse keyword arguments)."""
    i = torch.arange(s, device=device)
    causal = (i[None, :] <= i[:, None])[None, None].expand(b, 1, s, s)
    if kind == "causal":
        return causal, {}
    if kind == "padded":
        # Right padding (every query still sees key 0, so no row is empty for any SDPA backend).
        lengths = torch.tensor([s, max(1, s - s // 3)], device=device)[:b]
        kpm = i[None, :] < lengths[:, None]
        return causal & kpm[:, None, None, :], {"key_padding_mask": kpm}
    if kind == "packed":
        # Three packed sequences per row, position ids restarting at 0 (TRL padding-free batches).
        cuts = [0, s // 3, s // 3 + s // 4, s]
        pos = torch.cat([torch.arange(cuts[j + 1] - cuts[j], device=device) for j in range(3)])[None].expand(b, s)
        seg = segment_ids_from_position_ids(pos)
        return causal & (seg[:, None, :, None] == seg[:, None, None, :]), {"segment_ids": seg}
    raise ValueError(kind)


def _reference64(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    scores = (q64 @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv
    return out, (q64, k64, v64)


def _sdpa(q, k, v, mask, causal_only):
    if causal_only:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def exactness(device, cases) -> dict:
    res = {}
    for name, (b, hq, hkv, s, d, kind) in cases.items():
        q, k, v, dout = _inputs(b, hq, hkv, s, d, device, seed=len(res))
        mask, kw = _mask(b, s, device, kind)
        ref, leaves = _reference64(q, k, v, mask)
        g64 = torch.autograd.grad(ref, leaves, dout.double())
        ours = flash_attention(q, k, v, causal=True, **kw)
        g_ours = torch.autograd.grad(ours, (q, k, v), dout)
        stock = _sdpa(q, k, v, mask, kind == "causal")
        g_stock = torch.autograd.grad(stock, (q, k, v), dout)
        for label, a, r, st in (("out", ours, ref, stock), *[(n, g_ours[i], g64[i], g_stock[i])
                                                              for i, n in enumerate(("dq", "dk", "dv"))]):
            key = f"{name}: {label}"
            try:
                res[key] = {"pass": True, **assert_exact(label, a, r, st)}
            except ExactnessError as e:
                res[key] = {"pass": False, "error": str(e)}
            print(f"  {key}: {'PASS' if res[key]['pass'] else 'FAIL ' + res[key]['error']}"
                  + (f" rms {res[key]['rms']:.3e} vs stock {res[key]['stock_rms']:.3e}" if res[key]["pass"] else ""),
                  flush=True)
        del ref, leaves, g64
    return res


def _eager_attention(q, k, v):
    """transformers' eager_attention_forward (repeat_kv, matmul, causal mask add, fp32 softmax, matmul)."""
    group = q.shape[1] // k.shape[1]
    b, hkv, s, d = k.shape
    kk = k[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
    vv = v[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(s, device=q.device)
    scores = scores + torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(scores.dtype)
    p = torch.softmax(scores.float(), -1).to(q.dtype)
    return p @ vv


def _systems():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    return {
        "fxfuse": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "sdpa (default)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "inductor (eager attention)": torch.compile(_eager_attention, fullgraph=True, dynamic=False),
    }


def timing(seqs, b=2, hq=32, hkv=8, d=128) -> dict:
    import triton
    out = {}
    for s in seqs:
        q, k, v, dout = _inputs(b, hq, hkv, s, d, "cuda", seed=3)
        flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal fwd (2 GEMMs) + bwd (5 GEMMs), half the square
        for name, fn in _systems().items():
            if name.startswith("inductor") and s > 4096:
                continue  # the [B, H, S, S] fp32 scores alone would take 17 GiB at 8192
            def step():
                torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
            try:
                step()
                peak = peak_extra(step)
                ms = float(triton.testing.do_bench(step, warmup=25, rep=300, return_mode="median"))
                fwd = float(triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=200, return_mode="median"))
                out[f"{name} @ {s}"] = {"fwd_bwd_ms": ms, "fwd_ms": fwd, "peak_extra_mib": peak,
                                        "TFLOP/s": flops / ms / 1e9}
                print(f"  {name} @ {s}: fwd+bwd {ms:.3f} ms (fwd {fwd:.3f}), {flops / ms / 1e9:.0f} TFLOP/s, "
                      f"peak +{peak:.0f} MiB", flush=True)
            except Exception as e:  # a backend that does not take this shape/GQA
                out[f"{name} @ {s}"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                print(f"  {name} @ {s}: {out[f'{name} @ {s}']['error']}", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "attention.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    args = ap.parse_args()
    if args.smoke:
        cases = {"causal": (1, 4, 2, 40, 32, "causal"), "padded": (2, 2, 1, 37, 16, "padded"),
                 "packed": (1, 2, 2, 45, 16, "packed")}
        exactness("cpu", cases)
        return
    cases = {"causal 2x32/8x2048x128": (2, 32, 8, 2048, 128, "causal"),
             "causal odd 1x8/2x1000x128": (1, 8, 2, 1000, 128, "causal"),
             "padded 2x8/2x777x128": (2, 8, 2, 777, 128, "padded"),
             "packed 2x8/2x1024x128": (2, 8, 2, 1024, 128, "packed"),
             "causal hd64 1x8/8x512x64": (1, 8, 8, 512, 64, "causal")}
    print(f"exactness on {torch.cuda.get_device_name()} (fxfuse vs stock SDPA, against float64):", flush=True)
    exact = exactness("cuda", cases)
    print("fwd+bwd timing:", flush=True)
    times = timing([int(s) for s in args.seqs.split(",")])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "exactness": exact,
                   "timing": times}, fh, indent=1)
    n_fail = sum(not v["pass"] for v in exact.values())
    print(f"exactness: {len(exact) - n_fail}/{len(exact)} pass")


if __name__ == "__main__":
    main()
