"""What each fxfuse Triton kernel costs in registers, spills and shared memory on sm_90 (or another
NVIDIA target), with no GPU.

    python benchmarks/sm90_resources.py [--only lora,nf4,rms_norm,rope,swiglu,cross_entropy,attention] [--json PATH]
                                        [--arch 80|86|89|90]

Runs the kernels' host functions at the Llama-3-8B shapes on meta tensors, with a stand-in Triton
driver that names an sm_90 target (--arch: another), so every launch compiles (pointer alignment and integer
divisibility specialized as a real launch specializes them) and nothing runs. For each compiled
kernel it prints the launch configuration, registers per thread, spill stack, dynamic shared memory,
the programs that fit on one SM by registers and by shared memory, and static SASS instruction counts
(cp.async LDGSTS, TMA UTMALDG, wgmma HGMMA, local-memory LDL/STL) read with the nvdisasm that ships
with Triton. A kernel below copy bandwidth with spills or one program per SM has a reason to be
slow that costs no device time to find (METHOD.md: read what costs no device time). With --arch it
compiles for another GPU and names the kernels whose shared memory that GPU's blocks cannot hold.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024  # H100/H200: 228 KiB per SM, of which 227 KiB per block, 1 KiB reserved per block
MAX_WARPS_PER_SM = 64
# The most dynamic shared memory one block may opt in to, per compute capability (CUDA programming
# guide): a kernel compiled for such a GPU that asks for more fails to launch (OutOfResources).
SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SASS_OPS = ("LDGSTS", "UTMALDG", "HGMMA", "LDL", "STL")


class _StandInDriver:
    """Enough of a Triton driver for JITFunction.warmup: a target (sm_<arch>), a device, a stream."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


class _Compile:
    """Stands in for a kernel at its launch sites: `kernel[grid](*args)` compiles (warmup) and records."""

    def __init__(self, kernel, records):
        self.kernel, self.records = kernel, records

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            launch = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            constexprs = {k: v for k, v in kwargs.items() if k not in launch}
            self.records.append((self.kernel.fn.__name__, launch, constexprs, compiled))
        return compile_only


def _patch(modules, records):
    """Every `*_kernel` JIT function of the modules, and their `launch` helper, compile instead of running."""
    from triton.runtime.jit import JITFunction
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and isinstance(obj, JITFunction):
                setattr(mod, name, _Compile(obj, records))
        if hasattr(mod, "launch"):
            mod.launch = lambda kernel, probe: kernel if isinstance(kernel, _Compile) else _Compile(kernel, records)


def _sass_counts(cubin: bytes) -> tuple[dict, dict]:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    counts = {op: len(re.findall(r"\b" + op + r"[.\s]", sass)) for op in SASS_OPS}
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    return counts, {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))} if m else {}


def report(label, records) -> list[dict]:
    rows = []
    for name, launch, constexprs, compiled in records:
        counts, usage = _sass_counts(compiled.asm["cubin"])
        warps = compiled.metadata.num_warps
        launch = {"num_warps": warps, "num_stages": compiled.metadata.num_stages}
        smem = compiled.metadata.shared
        regs = usage.get("registers", 0)
        # Registers are allocated per warp in units of 256.
        regs_per_warp = -(-regs * 32 // 256) * 256
        by_regs = REGS_PER_SM // max(1, regs_per_warp * warps)
        by_smem = SMEM_PER_SM // (smem + 1024)
        fit = min(by_regs, by_smem, MAX_WARPS_PER_SM // warps)
        row = {"case": label, "kernel": name, **launch,
               "constexprs": {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in constexprs.items()},
               **usage, "shared_bytes": smem, "programs_per_sm": fit, "limited_by": "registers" if by_regs <= by_smem
               else "shared memory", "warps_per_sm": fit * warps, **counts}
        rows.append(row)
        spill = f", {usage['stack_bytes']} B stack" if usage.get("stack_bytes") else ""
        print(f"| {label} | {name} | {warps} warps, {launch['num_stages']} stages | {regs}{spill} | "
              f"{smem // 1024} KiB | {fit} ({row['limited_by']}), {fit * warps} warps | "
              + " ".join(f"{op} {counts[op]}" for op in SASS_OPS) + " |", flush=True)
    return rows


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def cases_lora():
    from fxfuse.kernels import lora_matmul as L
    bf = torch.bfloat16
    m, r = 4096, 16
    yield "xa = x @ A^T, x 4096x14336", lambda: L.rank_r_project(_meta(m, 14336, dtype=bf), _meta(r, 14336).t())
    yield "xa with the copy of x (K-extended fwd)", lambda: L.rank_r_project(
        _meta(m, 4096, dtype=bf), _meta(2 * r, 4096).t(), copy_to=_meta(m, 4096 + 96, dtype=bf))
    yield "dA = dxa^T @ x, x 4096x14336", lambda: L.rank_r_weight_grad(_meta(m, 14336, dtype=bf), _meta(m, r), 2.0,
                                                                        transpose=True)
    yield "lora_dy, dy 4096x14336", lambda: L.lora_dy_grads(_meta(m, 14336, dtype=bf), _meta(14336, r), _meta(m, r), 2.0)
    yield "lora_dy with the copy of dy (down bwd)", lambda: L.lora_dy_grads(
        _meta(m, 4096, dtype=bf), _meta(4096, r), _meta(m, r), 2.0, copy_to=_meta(m, 4096 + 48, dtype=bf))
    yield "lora_outer 4096x14336", lambda: L.lora_outer(_meta(m, r), _meta(r, 14336), 2.0, bf)
    yield "split_columns_", lambda: L.split_columns_(_meta(m, 4096 + 48, dtype=bf), _meta(m, r), 4096, 48, 2.0, True)


def cases_nf4():
    from fxfuse.kernels import nf4 as Q
    n, k = 14336, 4096
    nested = (_meta(n * k // 64 // 256), _meta(256), _meta(()), 256)
    yield "dequantize 14336x4096 NF4 double quant", lambda: Q.dequantize_4bit(
        _meta(n * k // 2, dtype=torch.uint8), _meta(n * k // 64, dtype=torch.uint8), (n, k), torch.bfloat16,
        blocksize=64, nested=nested)


def cases_rms_norm():
    from fxfuse.kernels import rms_norm as N
    x, w = _meta(4096, 4096, dtype=torch.bfloat16), _meta(4096, dtype=torch.bfloat16)
    yield "rms_norm fwd 4096x4096", lambda: N.rms_norm_forward(x, w, 1e-5)
    yield "rms_norm bwd 4096x4096", lambda: N.rms_norm_backward(x, x, w, _meta(4096))


def cases_rope():
    from fxfuse.kernels import rope as R
    x, c = _meta(2, 32, 2048, 128, dtype=torch.bfloat16), _meta(2, 1, 2048, 128, dtype=torch.bfloat16)
    yield "rope fwd 2x32x2048x128", lambda: R.rope_forward(x, c, c)
    k = _meta(2, 8, 2048, 128, dtype=torch.bfloat16)
    yield "rope_qk fwd 2x32/8x2048x128", lambda: R.rope_qk_forward(x, k, c, c)


def cases_swiglu():
    from fxfuse.kernels import swiglu as S
    g = _meta(4096, 14336, dtype=torch.bfloat16)
    yield "swiglu fwd 4096x14336", lambda: S.swiglu_forward(g, g)
    yield "swiglu bwd 4096x14336", lambda: S.swiglu_backward(g, g, g)


def cases_cross_entropy():
    from fxfuse.kernels import cross_entropy as X
    logits, labels = _meta(4096, 128256, dtype=torch.bfloat16), _meta(4096, dtype=torch.int64)
    yield "cross_entropy fwd 4096x128256", lambda: X.cross_entropy_forward(logits, labels, validate_labels=False)
    yield "cross_entropy bwd 4096x128256", lambda: X.cross_entropy_backward(_meta(4096, dtype=torch.float64), logits,
                                                                            labels, _meta(4096))


def cases_attention():
    from fxfuse.kernels import flash_attention as F
    q = _meta(2, 32, 2048, 128, dtype=torch.bfloat16)
    kv = _meta(2, 8, 2048, 128, dtype=torch.bfloat16)
    yield "flash attention fwd 2x32/8x2048x128", lambda: F.flash_attention_forward(q, kv, kv, causal=True, scale=0.088)
    yield "flash attention bwd", lambda: F.flash_attention_backward(q, q, kv, kv, _meta(2, 32, 2048), causal=True,
                                                                    scale=0.088)
    # The variants the patterns launch: RoPE on load, transformers' bool mask, eager's additive mask.
    rope = dict(cos=_meta(1, 2048, 128, dtype=torch.bfloat16), sin=_meta(1, 2048, 128, dtype=torch.bfloat16))
    yield "flash attention fwd, RoPE fused", lambda: F.flash_attention_forward(q, kv, kv, causal=True, scale=0.088,
                                                                               **rope)
    yield "flash attention bwd, RoPE fused", lambda: F.flash_attention_backward(
        q, q, kv, kv, _meta(2, 32, 2048), causal=True, scale=0.088, **rope)
    for kind, dtype in (("bool", torch.bool), ("additive", torch.bfloat16)):
        mask = _meta(2, 1, 2048, 2048, dtype=dtype)
        yield f"flash attention fwd, {kind} mask", lambda m=mask: F.flash_attention_forward(
            q, kv, kv, causal=False, scale=0.088, attn_mask=m, **rope)
        yield f"flash attention bwd, {kind} mask", lambda m=mask: F.flash_attention_backward(
            q, q, kv, kv, _meta(2, 32, 2048), causal=False, scale=0.088, attn_mask=m, **rope)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="lora,nf4,rms_norm,rope,swiglu,cross_entropy,attention")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_PER_BLOCK),
                    help="compute capability to compile for (80 A100, 86/89 consumer Ampere/Ada, 90 H100/H200); "
                         "the programs-per-SM column stays an sm_90 estimate")
    args = ap.parse_args()
    triton.runtime.driver.set_active(_StandInDriver(args.arch))
    import fxfuse.kernels.cross_entropy as ce
    import fxfuse.kernels.flash_attention as fa
    import fxfuse.kernels.lora_matmul as lm
    import fxfuse.kernels.nf4 as nf
    import fxfuse.kernels.rms_norm as rn
    import fxfuse.kernels.rope as ro
    import fxfuse.kernels.swiglu as sw
    records: list = []
    _patch([lm, nf, rn, ro, sw, fa, ce], records)
    print("| case | kernel | launch | registers | shared | programs per SM | SASS (static counts) |\n"
          "|---|---|---|---|---|---|---|")
    rows = []
    limit = SMEM_PER_BLOCK[args.arch]
    for part in args.only.split(","):
        for label, run in globals()[f"cases_{part}"]():
            records.clear()
            try:
                run()
            except Exception as e:  # a host function that needs data (a meta tensor has none)
                print(f"| {label} | failed: {type(e).__name__}: {str(e)[:100]} | | | | | |")
                continue
            rows += report(label, records)
    too_big = [r for r in rows if r["shared_bytes"] > limit]
    for r in too_big:
        print(f"sm_{args.arch}: {r['kernel']} ({r['case']}) asks for {r['shared_bytes'] // 1024} KiB of shared memory "
              f"per block; the GPU allows {limit // 1024} KiB: it would not launch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": f"sm_{args.arch}", "smem_per_block_limit": limit, "triton": triton.__version__,
                       "rows": rows, "over_the_shared_memory_limit": [r["kernel"] for r in too_big]}, f, indent=1)


if __name__ == "__main__":
    main()
