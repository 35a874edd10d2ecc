"""Flash attention with RoPE on the GPU: exactness of fxfuse's kernel against float64 and stock, then
forward+backward time of RoPE + attention against the stock paths, at the Llama-3-8B attention shape
(batch 2, 32 query heads, 8 KV heads, head_dim 128), sequences 2048 and 8192, in the two forms
transformers calls SDPA in:

- "causal": `scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`, no mask;
- "masked": the boolean mask transformers builds in the graph ([B, 1, S, S], causal here), K and V
  repeated to the query heads (`repeat_kv`), `is_causal=False` (transformers 5.17 training on CUDA).

Systems: fxfuse (RoPE rotated inside the kernel; and the kernel alone), stock (HF's RoPE in eager ops +
SDPA with the backend torch picks, and each SDPA backend forced), Inductor (RoPE + SDPA compiled).

    python benchmarks/attention.py [--seqs 2048,8192] [--json benchmarks/results/attention.json]
    python benchmarks/attention.py --sweep           # fxfuse's tile configurations, timed
    TRITON_INTERPRET=1 python benchmarks/attention.py --smoke      # tiny CPU run of the same code paths

Exactness: out, dq, dk, dv of fxfuse and of stock SDPA (bf16, the backend torch picks) against float64,
with fxfuse.testing.assert_exact (RMS and max error at most 1.25x stock's), for causal, right-padded,
packed (segment ids), dense-mask, RoPE-fused and head_dim 64 cases. Timing: triton.testing.do_bench
medians of one fwd+bwd; peak memory above the inputs.
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


def _record(res: dict, prefix: str, ours, ref, stock) -> None:
    """assert_exact on out, dq, dk, dv (each a 4-tuple), recorded in `res` under "<prefix>: <name>" and printed."""
    for label, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref, stock):
        key = f"{prefix}: {label}"
        try:
            res[key] = {"pass": True, **assert_exact(label, a, r, st)}
        except ExactnessError as e:
            res[key] = {"pass": False, "error": str(e)}
        print(f"  {key}: {'PASS' if res[key]['pass'] else 'FAIL ' + res[key]['error']}"
              + (f" rms {res[key]['rms']:.3e} vs stock {res[key]['stock_rms']:.3e}" if res[key]["pass"] else ""),
              flush=True)


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
        _record(res, name, (ours, *g_ours), (ref, *g64), (stock, *g_stock))
        del ref, leaves, g64
    return res


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (cos/sin [B or 1, S, D], unsqueezed on the head dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _cos_sin(s, d, device, b=1):
    # Llama's default rope (theta 500000), positions 0..S-1, in bf16 as the model hands them over.
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((ang, ang), -1)[None].expand(b, s, d)
    return emb.cos().to(torch.bfloat16).contiguous(), emb.sin().to(torch.bfloat16).contiguous()


def exactness_rope(device, b=2, hq=8, hkv=2, s=1000, d=128) -> dict:
    """RoPE fused into the kernel, against float64 RoPE + attention and stock bf16 RoPE + SDPA."""
    q, k, v, dout = _inputs(b, hq, hkv, s, d, device, seed=11)
    cos, sin = _cos_sin(s, d, device)
    mask, _ = _mask(b, s, device, "causal")
    res = {}
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    q64, k64 = _hf_rope(leaves64[0], leaves64[1], cos.double(), sin.double())
    ref, inner = _reference64(q64, k64, leaves64[2], mask)
    # _reference64 makes fresh leaves of what it is given: chain its gradients back through the RoPE.
    g_inner = torch.autograd.grad(ref, inner, dout.double())
    g64 = torch.autograd.grad((q64, k64, leaves64[2]), leaves64, g_inner)
    ours = flash_attention(q, k, v, causal=True, cos=cos, sin=sin)
    g_ours = torch.autograd.grad(ours, (q, k, v), dout)
    qs, ks = _hf_rope(q, k, cos, sin)
    stock = F.scaled_dot_product_attention(qs, ks, v, is_causal=True, enable_gqa=True)
    g_stock = torch.autograd.grad(stock, (q, k, v), dout)
    _record(res, f"rope fused causal {b}x{hq}/{hkv}x{s}x{d}", (ours, *g_ours), (ref, *g64), (stock, *g_stock))
    return res


def bit_equal_rope(device, b=2, hq=32, hkv=8, s=1000, d=128) -> dict:
    """fxfuse's RoPE kernels (q and k in one launch) against HF's apply_rotary_pos_emb in torch's eager
    bf16 ops, forward and backward, with packed position ids: must be bit-equal."""
    from fxfuse.kernels.rope import rope_qk_backward, rope_qk_forward
    g = torch.Generator(device=device).manual_seed(5)
    # q and k as the projections hand them over: [B, S, H*D] viewed and transposed (strided).
    q = torch.randn(b, s, hq * d, generator=g, device=device).to(torch.bfloat16).view(b, s, hq, d).transpose(1, 2)
    k = torch.randn(b, s, hkv * d, generator=g, device=device).to(torch.bfloat16).view(b, s, hkv, d).transpose(1, 2)
    pos = torch.cat([torch.arange(n, device=device) for n in (s // 2, s // 3, s - s // 2 - s // 3)])
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None]
    emb = torch.cat((ang, ang), -1)[None].expand(b, s, d)
    cos, sin = emb.cos().to(torch.bfloat16)[:, None], emb.sin().to(torch.bfloat16)[:, None]
    qs, ks = (t.detach().requires_grad_() for t in (q, k))
    rq, rk = _hf_rope(qs, ks, cos[:, 0], sin[:, 0])
    dq_out = torch.randn(rq.shape, generator=g, device=device).to(torch.bfloat16)
    dk_out = torch.randn(rk.shape, generator=g, device=device).to(torch.bfloat16)
    gq, gk = torch.autograd.grad((rq, rk), (qs, ks), (dq_out, dk_out))
    oq, ok = rope_qk_forward(q, k, cos, sin)
    bq, bk = rope_qk_backward(dq_out, dk_out, cos, sin)
    res = {f"rope_qk {b}x{hq}/{hkv}x{s}x{d} packed: {n}": {"pass": bool(torch.equal(a, r)),
                                                             "mismatches": int((a != r).sum())}
           for n, a, r in (("q", oq, rq), ("k", ok, rk), ("dq", bq, gq), ("dk", bk, gk))}
    for key, r in res.items():
        verdict = "bit-equal" if r["pass"] else "FAIL ({} elements differ)".format(r["mismatches"])
        print(f"  {key}: {verdict}", flush=True)
    return res


def exactness_additive(device, b=2, hq=8, hkv=2, s=777, d=128) -> dict:
    """The additive mask of transformers' eager attention (0 / bf16's minimum, left padding: rows that see
    nothing), against float64 and the stock eager formula in bf16."""
    q, k, v, dout = _inputs(b, hq, hkv, s, d, device, seed=21)
    i = torch.arange(s, device=device)
    keep = (i[None, :] <= i[:, None])[None, None] & (i >= s // 5)[None, None, None, :].expand(b, 1, s, s).clone()
    keep[0] |= (i[None, :] <= i[:, None])  # batch row 0 unpadded
    low = torch.finfo(torch.bfloat16).min
    bias = torch.zeros(b, 1, s, s, device=device, dtype=torch.bfloat16).masked_fill(~keep, low)

    def eager(q, k, v, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        n = q.shape[1] // k.shape[1]
        w = (q @ k.repeat_interleave(n, 1).transpose(2, 3)) / math.sqrt(d) + bias.to(dtype)
        out = torch.softmax(w, -1, dtype=torch.float32).to(dtype) @ v.repeat_interleave(n, 1)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.to(dtype)))

    ours_out = flash_attention(q, k, v, causal=False, attn_mask=bias)
    ours = (ours_out.detach(), *torch.autograd.grad(ours_out, (q, k, v), dout))
    ref, stock = eager(q, k, v, torch.float64), eager(q, k, v, torch.bfloat16)
    res = {}
    _record(res, f"eager additive mask, left-padded {b}x{hq}/{hkv}x{s}x{d}", ours, ref, stock)
    return res


def _systems(form: str, s: int, device="cuda"):
    """name -> fn(q, k, v, cos, sin) for one call form; q, k un-rotated, k and v with the KV heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    i = torch.arange(s, device=device)
    # transformers' in-graph mask: [B, 1, S, S] bool, expanded over the batch.
    mask = (i[None, :] <= i[:, None])[None, None].expand(2, 1, s, s)

    def stock(q, k, v, cos, sin):
        qr, kr = _hf_rope(q, k, cos, sin)
        if form == "causal":
            return F.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True)
        n = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(qr, _repeat_kv(kr, n), _repeat_kv(v, n), attn_mask=mask)

    def forced(backend):
        def run(*args):
            with sdpa_kernel([backend]):
                return stock(*args)
        return run

    if form == "causal":
        fused = lambda q, k, v, cos, sin: flash_attention(q, k, v, causal=True, cos=cos, sin=sin)  # noqa: E731
        alone = lambda q, k, v, cos, sin: flash_attention(q, k, v, causal=True)  # noqa: E731
    else:
        fused = lambda q, k, v, cos, sin: flash_attention(q, k, v, causal=False, attn_mask=mask, cos=cos,  # noqa
                                                          sin=sin)
        alone = lambda q, k, v, cos, sin: flash_attention(q, k, v, causal=False, attn_mask=mask)  # noqa: E731
    return {
        "fxfuse (RoPE fused)": fused,
        "fxfuse kernel alone (no RoPE)": alone,
        "stock: HF RoPE + SDPA (default)": stock,
        "stock, SDPA flash": forced(SDPBackend.FLASH_ATTENTION),
        "stock, SDPA cuDNN": forced(SDPBackend.CUDNN_ATTENTION),
        "stock, SDPA efficient": forced(SDPBackend.EFFICIENT_ATTENTION),
        "Inductor: RoPE + SDPA compiled": torch.compile(stock, fullgraph=True, dynamic=False),
    }


def _time(fn, q, k, v, cos, sin, dout):
    import triton

    def step():
        torch.autograd.grad(fn(q, k, v, cos, sin), (q, k, v), dout)
    step()
    peak = peak_extra(step)
    ms = float(triton.testing.do_bench(step, warmup=25, rep=300, return_mode="median"))
    fwd = float(triton.testing.do_bench(lambda: fn(q, k, v, cos, sin), warmup=25, rep=200, return_mode="median"))
    return ms, fwd, peak


def timing(seqs, forms=("causal", "masked"), b=2, hq=32, hkv=8, d=128) -> dict:
    out = {}
    for s in seqs:
        q, k, v, dout = _inputs(b, hq, hkv, s, d, "cuda", seed=3)
        cos, sin = _cos_sin(s, d, "cuda")
        flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal fwd (2 GEMMs) + bwd (5 GEMMs), half the square
        for form in forms:
            for name, fn in _systems(form, s).items():
                key = f"{form} | {name} @ {s}"
                try:
                    ms, fwd, peak = _time(fn, q, k, v, cos, sin, dout)
                    out[key] = {"fwd_bwd_ms": ms, "fwd_ms": fwd, "peak_extra_mib": peak, "TFLOP/s": flops / ms / 1e9}
                    print(f"  {key}: fwd+bwd {ms:.3f} ms (fwd {fwd:.3f}), {flops / ms / 1e9:.0f} TFLOP/s, "
                          f"peak +{peak:.0f} MiB", flush=True)
                except Exception as e:  # a backend that does not take this form
                    out[key] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                    print(f"  {key}: {out[key]['error']}", flush=True)
                torch.cuda.empty_cache()
        del q, k, v, dout
        torch.cuda.empty_cache()
    return out


def sweep(seqs, b=2, hq=32, hkv=8, d=128) -> dict:
    """fxfuse's forward and backward tile configurations, timed (RoPE fused, causal form); the fastest
    forward and backward changes are applied to fa.GPU_CONFIG for the rest of the run."""
    from fxfuse.kernels import flash_attention as fa
    out = {}
    for s in seqs:
        q, k, v, dout = _inputs(b, hq, hkv, s, d, "cuda", seed=3)
        cos, sin = _cos_sin(s, d, "cuda")
        fn = _systems("causal", s)["fxfuse (RoPE fused)"]
        for cfg in fa.GPU_CONFIG_CANDIDATES:
            saved = dict(fa.GPU_CONFIG)
            fa.GPU_CONFIG.update(cfg)
            try:
                ms, fwd, _ = _time(fn, q, k, v, cos, sin, dout)
                out[f"{cfg} @ {s}"] = {"fwd_bwd_ms": ms, "fwd_ms": fwd}
                print(f"  {cfg} @ {s}: fwd+bwd {ms:.3f} ms (fwd {fwd:.3f})", flush=True)
            except Exception as e:
                out[f"{cfg} @ {s}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"  {cfg} @ {s}: {out[f'{cfg} @ {s}']['error']}", flush=True)
            finally:
                fa.GPU_CONFIG.clear()
                fa.GPU_CONFIG.update(saved)
    # The candidates change either the forward's keys or the backward's: pick each half by its own time,
    # summed over the lengths.
    total = {}
    for cfg in fa.GPU_CONFIG_CANDIDATES:
        runs = [out[f"{cfg} @ {s}"] for s in seqs]
        if all("fwd_ms" in r for r in runs):
            total[str(cfg)] = (cfg, sum(r["fwd_ms"] for r in runs), sum(r["fwd_bwd_ms"] - r["fwd_ms"] for r in runs))
    best_fwd = min((v for v in total.values() if not any(k.startswith("bwd") for k in v[0])), key=lambda v: v[1])
    best_bwd = min((v for v in total.values() if not any(k.startswith("fwd") for k in v[0])), key=lambda v: v[2])
    fa.GPU_CONFIG.update(best_fwd[0])
    fa.GPU_CONFIG.update(best_bwd[0])
    print(f"  chosen: {fa.GPU_CONFIG}", flush=True)
    out["chosen"] = dict(fa.GPU_CONFIG)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--forms", default="causal,masked")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "attention.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    ap.add_argument("--sweep", action="store_true", help="time fxfuse's tile configurations first, run the rest "
                    "with the fastest")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--no-exactness", action="store_true")
    args = ap.parse_args()
    seqs = [int(x) for x in args.seqs.split(",")]
    if args.smoke:
        cases = {"causal": (1, 4, 2, 40, 32, "causal"), "padded": (2, 2, 1, 37, 16, "padded"),
                 "packed": (1, 2, 2, 45, 16, "packed")}
        exactness("cpu", cases)
        exactness_rope("cpu", b=1, hq=4, hkv=2, s=37, d=32)
        exactness_additive("cpu", b=2, hq=4, hkv=2, s=37, d=32)
        bit_equal_rope("cpu", b=1, hq=4, hkv=2, s=37, d=32)
        return
    import triton
    from fxfuse.kernels import flash_attention as fa
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if args.sweep or args.sweep_only:
        result["sweep"] = sweep(seqs)
    result["gpu_config"] = dict(fa.GPU_CONFIG)
    if not args.sweep_only:
        if not args.no_exactness:
            cases = {"causal 2x32/8x2048x128": (2, 32, 8, 2048, 128, "causal"),
                     "causal odd 1x8/2x1000x128": (1, 8, 2, 1000, 128, "causal"),
                     "padded 2x8/2x777x128": (2, 8, 2, 777, 128, "padded"),
                     "packed 2x8/2x1024x128": (2, 8, 2, 1024, 128, "packed"),
                     "causal hd64 1x8/8x512x64": (1, 8, 8, 512, 64, "causal")}
            print(f"exactness on {torch.cuda.get_device_name()} (fxfuse vs stock SDPA, against float64):", flush=True)
            exact = exactness("cuda", cases)
            exact.update(exactness_rope("cuda"))
            exact.update(exactness_additive("cuda"))
            exact.update(bit_equal_rope("cuda"))
            result["exactness"] = exact
            n_fail = sum(not v["pass"] for v in exact.values())
            print(f"exactness: {len(exact) - n_fail}/{len(exact)} pass", flush=True)
        print("fwd+bwd timing:", flush=True)
        result["timing"] = timing(seqs, forms=args.forms.split(","))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
