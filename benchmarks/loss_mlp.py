"""The causal-LM loss and SwiGLU on the GPU: exactness, then time and peak memory against the stock
path, Inductor and Liger, each system in its own process.

    python benchmarks/loss_mlp.py [--json benchmarks/results/loss_mlp.json]

loss: batch 2 x 2048 tokens, hidden 4096, vocab 128256 (Llama-3-8B's lm_head, frozen as under LoRA):
      lm_head + ForCausalLMLoss ('mean') forward and backward to the hidden states.
        stock      logits = h @ W^T (bf16), logits.float(), F.cross_entropy
        fxfuse     the same lm_head, then fxfuse::cross_entropy on the bf16 logits (what the
                   causal_lm_loss pattern does; the logits still exist, as the graph returns them)
        fxfuse-flce  fxfuse::fused_linear_cross_entropy (no logits at all)
        liger      Liger Kernel's LigerFusedLinearCrossEntropyLoss (no logits either)
swiglu: silu(gate) * up at 4096 x 14336 bf16, forward and backward: HF eager, Inductor, fxfuse; and the same
of one [4096, 28672] gate,up output ("-halves": fxfuse's swiglu_halves, the others on its two slices).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from measure import peak_extra  # noqa: E402

N, H, V = 4096, 4096, 128256


def _bench(fn) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))


def _loss_inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(N, H, generator=g, device="cuda")).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    labels[:100] = -100
    return h, w, labels


def loss_system(system) -> dict:
    h, w, labels = _loss_inputs()
    if system == "stock":
        def fn():
            logits = h @ w.t()
            return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)
    elif system == "fxfuse":
        from fxfuse.ops.cross_entropy import causal_lm_cross_entropy

        def fn():
            return causal_lm_cross_entropy(h @ w.t(), labels)
    elif system == "fxfuse-flce":
        from fxfuse.ops.cross_entropy import fused_linear_cross_entropy

        def fn():
            return fused_linear_cross_entropy(h, w, labels)
    elif system == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def fn():
            return ce(w, h, labels)
    else:
        raise ValueError(system)

    def step():
        loss = fn()
        (dh,) = torch.autograd.grad(loss, (h,))
        return loss, dh
    loss, dh = step()
    peak = peak_extra(step, 2 ** 30)
    out = {"fwd_bwd_ms": _bench(step), "peak_extra_gib": peak, "loss": float(loss)}
    # exactness of the loss and dh against float64 (same inputs in every process)
    h64 = h.detach().double().requires_grad_()
    loss64 = torch.nn.functional.cross_entropy(h64 @ w.double().t(), labels, ignore_index=-100)
    (dh64,) = torch.autograd.grad(loss64, (h64,))
    out["loss_err"] = abs(float(loss) - float(loss64))
    out["dh_rms_err"] = float((dh.double() - dh64).pow(2).mean().sqrt())
    out["dh_max_err"] = float((dh.double() - dh64).abs().max())
    return out


def swiglu_system(system) -> dict:
    """One system's SwiGLU at 4096 x 14336 bf16. "-halves": gate and up as the two halves of one
    [N, 2 x 14336] output (a grouped gate,up projection's), the gradient taken for that output: stock
    autograd assembles it from the two slices' gradients; fxfuse's swiglu_halves reads the halves in
    place and writes the gradient in one buffer."""
    from fxfuse.ops.swiglu import swiglu, swiglu_halves
    g = torch.Generator(device="cuda").manual_seed(1)
    gate = torch.randn(N, 14336, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    up = torch.randn(N, 14336, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    dh = torch.randn(N, 14336, generator=g, device="cuda").to(torch.bfloat16)

    def silu_mul(a, b):
        return torch.nn.functional.silu(a) * b
    system, halves = system.removesuffix("-halves"), system.endswith("-halves")
    if halves:
        n = gate.shape[1]
        inputs = (torch.cat([gate.detach(), up.detach()], -1).requires_grad_(),)

        def ref(t):
            return silu_mul(t[:, :n], t[:, n:])
        ours = swiglu_halves
    else:
        inputs, ref, ours = (gate, up), silu_mul, swiglu
    if system not in ("eager", "inductor", "fxfuse"):
        raise ValueError(system)
    fn = {"eager": ref, "fxfuse": ours}.get(system) or torch.compile(ref)

    def step():
        h = fn(*inputs)
        return (h, *torch.autograd.grad(h, inputs, dh))
    outs = step()
    stock = (ref(*inputs), *torch.autograd.grad(ref(*inputs), inputs, dh))
    bit_equal = [bool(torch.equal(a, b)) for a, b in zip(outs, stock)]
    return {"fwd_bwd_ms": _bench(step), "fwd_ms": _bench(lambda: fn(*inputs)), "bit_equal_to_eager": bit_equal}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "loss_mlp.json"))
    ap.add_argument("--only", choices=("loss", "swiglu"), help="run one section")
    args = ap.parse_args()
    if args.part:
        kind, system = args.part.split(":")
        res = loss_system(system) if kind == "loss" else swiglu_system(system)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    swiglu_parts = ("swiglu:eager", "swiglu:inductor", "swiglu:fxfuse", "swiglu:eager-halves",
                    "swiglu:inductor-halves", "swiglu:fxfuse-halves")
    loss_parts = ("loss:stock", "loss:fxfuse", "loss:fxfuse-flce", "loss:liger")
    for part in loss_parts + swiglu_parts:
        if args.only and not part.startswith(args.only + ":"):
            results[part] = {"error": "not run (--only)"}
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", part], capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[part] = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-700:]}
        print(part, results[part], flush=True)
    print(f"\n| loss section (2 x 2048 tokens, vocab {V}, lm_head frozen) | fwd+bwd ms | vs stock | extra peak GiB | "
          "loss abs error | dh RMS error | dh max error |")
    print("|---|---|---|---|---|---|---|")
    s = results["loss:stock"] if "error" not in results["loss:stock"] else {}
    for part in ("loss:stock", "loss:fxfuse", "loss:fxfuse-flce", "loss:liger"):
        r = results[part]
        if "error" in r:
            print(f"| {part} | error: {r['error'][-120:]!r} |")
            continue
        print(f"| {part[5:]} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ms'] / s.get('fwd_bwd_ms', float('nan')):.2f} | "
              f"{r['peak_extra_gib']:.2f} | {r['loss_err']:.2e} | {r['dh_rms_err']:.2e} | {r['dh_max_err']:.2e} |")
    print("\n| SwiGLU 4096 x 14336 bf16 (-halves: of one [4096, 28672] gate,up output) | fwd+bwd ms | fwd ms | "
          "bit-equal to eager (h, dgate, dup; -halves: h, dy) |")
    print("|---|---|---|---|")
    for part in swiglu_parts:
        r = results[part]
        if "error" in r:
            print(f"| {part} | error: {r['error'][-120:]!r} |")
            continue
        print(f"| {part[7:]} | {r['fwd_bwd_ms']:.3f} | {r['fwd_ms']:.3f} | {r['bit_equal_to_eager']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
