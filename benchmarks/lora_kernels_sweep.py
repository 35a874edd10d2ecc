"""Launch-configuration sweep of the LoRA-on-NF4 kernels at the Llama-3-8B shapes (4096 tokens), on the GPU.

    python benchmarks/lora_kernels_sweep.py [--json benchmarks/results/lora_kernels_sweep.json]

Each kernel is launched directly (no host wrapper) over a grid of block sizes, warps and pipeline
stages; each configuration is checked against the default one (the same outputs) and timed with
`triton.testing.do_bench` (median). Prints, per kernel and shape, the default's and the best
configuration's time and bandwidth (the fewest bytes the kernel must move, over its time): what
kernels/lora_matmul.py and kernels/nf4.py use as their launch defaults comes from here.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

import fxfuse.kernels.lora_matmul as L  # noqa: E402
import fxfuse.kernels.nf4 as Q  # noqa: E402

M = 4096


def _time(fn):
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def sweep(name, nbytes, run, configs, default):
    """run(config) -> output tensor; configs: list of dicts. Returns a result row."""
    try:
        ref = run(default)
    except Exception as e:
        print(f"{name}: the default configuration fails: {type(e).__name__}: {str(e)[:120]}")
        return {"kernel": name, "error": str(e)[:300]}
    if default not in configs:
        configs = [default] + configs
    rows = []
    for cfg in configs:
        try:
            out = run(cfg)
            torch.cuda.synchronize()
            ok = bool(torch.allclose(out.float(), ref.float(), rtol=1e-5, atol=1e-6)) if out.dtype.is_floating_point \
                else bool(torch.equal(out, ref))
            ms = _time(lambda: run(cfg))
            rows.append({"config": cfg, "ms": ms, "GB/s": nbytes / ms / 1e6, "same_output": ok})
        except Exception as e:  # out of shared memory and the like
            rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:100]}"})
    good = [r for r in rows if "ms" in r and r["same_output"]]
    best = min(good, key=lambda r: r["ms"]) if good else None
    dflt = next((r for r in rows if r["config"] == default and "ms" in r), None)
    print(f"{name}: default {dflt['ms'] * 1e3 if dflt else float('nan'):.1f} us "
          f"({dflt['GB/s'] if dflt else 0:.0f} GB/s); best {best['ms'] * 1e3:.1f} us ({best['GB/s']:.0f} GB/s) "
          f"{best['config']}" if best else f"{name}: no valid config", flush=True)
    return {"kernel": name, "bytes": nbytes, "default": dflt, "best": best, "all": rows}


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, v)) for v in itertools.product(*axes.values())]


def sweep_dequant(results):
    import bitsandbytes.functional as F
    n_out, k = 14336, 4096
    w = (torch.randn(n_out, k, device="cuda") * 0.02).to(torch.bfloat16)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    n = n_out * k
    words = q.view(torch.uint8).reshape(-1).view(torch.int32)
    offset = st.offset.reshape(1).float()
    out = torch.empty(n // 2, dtype=torch.int32, device="cuda")


    def run(cfg):
        Q._dequant_4bit_words_kernel[(triton.cdiv(n // 8, cfg["BLOCK_WORDS"]),)](
            words, st.absmax, st.state2.absmax, st.state2.code, offset, out, 0, n // 8, k // 8, 0,
            OUT_KIND=0, IS_FP4=False, QBLOCK=64, BLOCK_WORDS=cfg["BLOCK_WORDS"], NESTED=True, QBLOCK2=256,
            LOOKUP=cfg["LOOKUP"], INTERPRETED=False, PADDED=False, num_warps=cfg["num_warps"])
        return out
    results.append(sweep("dequant 14336x4096 (words)", n // 2 + n // 64 + 2 * n, run,
                         grid(LOOKUP=[False, True], BLOCK_WORDS=[512, 1024], num_warps=[4, 8]),
                         dict(LOOKUP=Q._LOOKUP, BLOCK_WORDS=Q._WORDS_PER_PROGRAM, num_warps=Q._NUM_WARPS)))
    ref = F.dequantize_4bit(q, st)
    ms = _time(lambda: F.dequantize_4bit(q, st))
    print(f"  bitsandbytes dequantize_4bit: {ms * 1e3:.1f} us ({(n // 2 + n // 64 + 2 * n) / ms / 1e6:.0f} GB/s); "
          f"fxfuse bit-equal: {torch.equal(out.view(torch.bfloat16).view(n_out, k).view(torch.int16), ref.view(torch.int16))}")


def sweep_project(results):
    # (K, whether x is copied as it is read: the K-extended forward of the gate,up group)
    for k, copy in ((14336, False), (4096, True)):
        x = torch.randn(M, k, device="cuda").to(torch.bfloat16)
        a = torch.randn(16, k, device="cuda") * 0.02
        q = a.t()
        x_ext = torch.empty(M, k + 48, device="cuda", dtype=torch.bfloat16)

        def run(cfg):
            kps = cfg["K_PER_SPLIT"]
            split = triton.cdiv(k, kps)
            part = torch.empty(split, M, 16, device="cuda")
            L._rank_r_project_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), split)](
                x, q, part, x_ext if copy else q, M, k, 16, kps, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
                part.stride(0), part.stride(1), part.stride(2), x_ext.stride(0), 1.0, BLOCK_M=cfg["BLOCK_M"],
                BLOCK_K=cfg["BLOCK_K"], RANK_P=16, FP32_DOT=False, P_BF16=True, COPY_P=copy,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return part.sum(0)
        default_kps = (2 * L._K_PER_SPLIT if k >= 8192 else L._K_PER_SPLIT)
        results.append(sweep(f"rank_r_project x {M}x{k}{' copied' if copy else ''}", M * k * (4 if copy else 2), run,
                             grid(BLOCK_M=[64, 128], BLOCK_K=[128], K_PER_SPLIT=sorted({1024, 2048, default_kps}),
                                  num_warps=[4, 8], num_stages=[2, 3, 4]),
                             dict(BLOCK_M=64, BLOCK_K=128, K_PER_SPLIT=default_kps, num_warps=4, num_stages=2)))


def sweep_weight_grad(results):
    for k in (14336, 4096):
        x = torch.randn(M, k, device="cuda").to(torch.bfloat16)
        low = torch.randn(M, 16, device="cuda")

        def run(cfg):
            n_tiles = triton.cdiv(k, cfg["BLOCK_N"])
            split = cfg["SPLIT"]
            part = torch.empty(split, 16, k, device="cuda")
            L._rank_r_weight_grad_kernel[(n_tiles, split)](
                x, low, part, M, k, 16, split, x.stride(0), x.stride(1), low.stride(0), low.stride(1),
                part.stride(0), part.stride(2), part.stride(1), 1.0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                RANK_P=16, FP32_DOT=False, P_BF16=True, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return part.sum(0)
        results.append(sweep(f"rank_r_weight_grad (dA) x {M}x{k}", M * k * 2, run,
                             grid(BLOCK_M=[64, 128], BLOCK_N=[64, 128], SPLIT=[1, 2], num_warps=[4, 8],
                                  num_stages=[2, 3]),
                             dict(BLOCK_M=128, BLOCK_N=64, SPLIT=triton.cdiv(264, triton.cdiv(k, 64)), num_warps=4,
                                  num_stages=3)))


def sweep_dy(results):
    # (N, rank, whether dy is copied as it is read: down_proj's K-extended backward)
    for n, r, copy in ((14336, 16, False), (4096, 16, True)):
        rp = max(16, triton.next_power_of_2(r))
        dy = torch.randn(M, n, device="cuda").to(torch.bfloat16)
        b = torch.randn(n, r, device="cuda") * 0.02
        xa = torch.randn(M, r, device="cuda")
        dy_ext = torch.empty(M, n + 48, device="cuda", dtype=torch.bfloat16)

        def run(cfg):
            splits = cfg["SPLITS"]
            nps = triton.cdiv(triton.cdiv(n, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
            mb = triton.cdiv(M, 2 * cfg["BLOCK_M"])
            dxa = torch.empty(splits, M, r, device="cuda")
            db = torch.empty(mb, n, r, device="cuda")
            L._lora_dy_kernel[(mb, splits)](
                dy, b, xa, dxa, db, dy_ext if copy else b, M, n, r, nps, dy.stride(0), dy.stride(1), b.stride(0),
                b.stride(1), xa.stride(0), xa.stride(1), dxa.stride(0), dxa.stride(1), dxa.stride(2), db.stride(0),
                db.stride(1), db.stride(2), dy_ext.stride(0), 1.0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                RANK_P=rp, FP32_DOT=False, DY_BF16=True, COPY_DY=copy, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
            return torch.cat([dxa.sum(0).flatten(), db.sum(0).flatten()])
        results.append(sweep(f"lora_dy dy {M}x{n} r={r}{' copied' if copy else ''}", M * n * (4 if copy else 2), run,
                             grid(BLOCK_M=[64, 128], BLOCK_N=[32, 64, 128], SPLITS=[16, 32], num_warps=[4, 8],
                                  num_stages=[2, 3]),
                             dict(BLOCK_M=128 if rp <= 64 else 64, BLOCK_N=64 if rp <= 64 else 32,
                                  SPLITS=min(16, triton.cdiv(n, 256)), num_warps=4, num_stages=2)))


def sweep_outer(results):
    for n in (14336, 4096):
        low = torch.randn(M, 16, device="cuda")
        right = torch.randn(16, n, device="cuda")
        out = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)

        def run(cfg):
            L._lora_outer_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))](
                low, right, low, out, M, n, 16, n, n, 16, 16, low.stride(0), low.stride(1), right.stride(0),
                right.stride(1), out.stride(0), out.stride(1), 1.0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                RANK_P=16, GROUPS=1, HAS_BIAS=False, FP32_DOT=False, SOFT_BF16=False, num_warps=cfg["num_warps"])
            return out
        results.append(sweep(f"lora_outer out {M}x{n}", M * n * 2, run,
                             grid(BLOCK_M=[64, 128], BLOCK_N=[64, 128], num_warps=[4, 8]),
                             dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "lora_kernels_sweep.json"))
    ap.add_argument("--only", default="dequant,project,weight_grad,dy,outer")
    args = ap.parse_args()
    results = []
    for part in args.only.split(","):
        globals()[f"sweep_{part}"](results)
    copy = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    ms = _time(lambda: copy.clone())
    print(f"copy bandwidth (256 MiB clone, read + write): {2 * 2 ** 28 / ms / 1e6:.0f} GB/s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": 2 * 2 ** 28 / ms / 1e6,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
