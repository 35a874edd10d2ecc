"""The causal-LM loss and SwiGLU on the GPU: exactness, then time and peak memory against the stock
path, Inductor and Liger, each system in its own process.

    python benchmarks/loss_mlp.py [--json benchmarks/results/loss_mlp.json]

loss: batch 2 x 2048 tokens, hidden 4096, vocab 128256 (Llama-3-8B's lm_head, frozen as under LoRA): the tail of
      LlamaForCausalLM.forward, lm_head then ForCausalLMLoss ('mean', labels shifted), returning the loss and the
      logits as the model does; the caller drops the logits and takes the gradient of the hidden states.
        stock        eager
        inductor     torch.compile (Inductor), the stock loss
        fxfuse       torch.compile(backend="fxfuse") with causal_lm_loss on: fxfuse::lm_head_cross_entropy
        fxfuse-ce    fxfuse::cross_entropy on the eager lm_head's logits (the pattern without its lm_head pass)
        fxfuse-flce  fxfuse::fused_linear_cross_entropy (no logits returned at all)
        liger        Liger Kernel's LigerFusedLinearCrossEntropyLoss (no logits returned either)
      A compiled graph that returns the logits gets a zero [N, V] gradient for them from autograd when the caller
      drops them (AOTAutograd's compiled function materialises it); eager does not: the table counts it.
swiglu: silu(gate) * up at 4096 x 14336 bf16, forward and backward: HF eager, Inductor, fxfuse; and the same
of one [4096, 28672] gate,up output ("-halves": fxfuse's swiglu_halves, the others on its two slices). Device
time: the sum of the step's kernel times (torch.profiler); do_bench times beside it include the host's dispatch.
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
    h = (torch.randn(2, N // 2, H, generator=g, device="cuda")).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (2, N // 2), generator=g, device="cuda")
    labels[:, :50] = -100
    return h, w, labels


def _shift(labels):
    # ForCausalLMLoss's label shift: pad with ignore_index, drop the first position.
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()


def lm_head_and_loss(hidden, labels, weight):
    """LlamaForCausalLM.forward's tail, as transformers writes it: lm_head, then ForCausalLMLoss."""
    logits = torch.nn.functional.linear(hidden, weight)
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, V), _shift(labels).view(-1), ignore_index=-100)
    return loss, logits


def loss_system(system) -> dict:
    h, w, labels = _loss_inputs()
    extra = {}
    if system == "stock":
        fn = lm_head_and_loss
    elif system == "inductor":
        fn = torch.compile(lm_head_and_loss)
    elif system == "fxfuse":
        import fxfuse
        fn = torch.compile(lm_head_and_loss, backend="fxfuse", options={"enable": ["causal_lm_loss"]})
    elif system == "fxfuse-ce":
        from fxfuse.ops.cross_entropy import causal_lm_cross_entropy

        def fn(hidden, labels, weight):
            logits = torch.nn.functional.linear(hidden, weight)
            return causal_lm_cross_entropy(logits.view(-1, V), _shift(labels).view(-1)), logits
    elif system == "fxfuse-flce":
        from fxfuse.ops.cross_entropy import fused_linear_cross_entropy

        def fn(hidden, labels, weight):
            return fused_linear_cross_entropy(hidden.view(-1, H), weight, _shift(labels).view(-1)), None
    elif system == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def fn(hidden, labels, weight):
            return ce(weight, hidden.view(-1, H), _shift(labels).view(-1)), None
    else:
        raise ValueError(system)

    def step():
        loss, logits = fn(h, labels, w)
        del logits  # as the Trainer does before its backward
        (dh,) = torch.autograd.grad(loss, (h,))
        return loss, dh
    loss, dh = step()
    if system == "fxfuse":
        report = fxfuse.last_report()
        extra = {"fired": report.counts(), "post_passes": report.post_passes}
    peak = peak_extra(step, 2 ** 30)
    out = {"fwd_bwd_ms": _bench(step), "peak_extra_gib": peak, "loss": float(loss), **extra}
    # exactness of the loss and dh against float64 (same inputs in every process)
    h64 = h.detach().double().requires_grad_()
    logits64 = torch.nn.functional.linear(h64, w.double())
    loss64 = torch.nn.functional.cross_entropy(logits64.view(-1, V), _shift(labels).view(-1), ignore_index=-100)
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
    # do_bench's times include the host's dispatch (the custom ops' Python path, Dynamo's guards), which
    # these short kernels do not hide; the profiler's kernel times give the device's share alone.
    from kernel_profile import profile
    _, table = profile(step, warmup=3, iters=20)
    return {"fwd_bwd_ms": _bench(step), "fwd_ms": _bench(lambda: fn(*inputs)), "bit_equal_to_eager": bit_equal,
            "fwd_bwd_kernel_ms": table["busy_ms"], "kernels": table["top"][:6]}


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
    loss_parts = ("loss:stock", "loss:inductor", "loss:fxfuse", "loss:fxfuse-ce", "loss:fxfuse-flce", "loss:liger")
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
    for part in loss_parts:
        r = results[part]
        if "error" in r:
            print(f"| {part} | error: {r['error'][-120:]!r} |")
            continue
        print(f"| {part[5:]} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ms'] / s.get('fwd_bwd_ms', float('nan')):.2f} | "
              f"{r['peak_extra_gib']:.2f} | {r['loss_err']:.2e} | {r['dh_rms_err']:.2e} | {r['dh_max_err']:.2e} |")
    print("\n| SwiGLU 4096 x 14336 bf16 (-halves: of one [4096, 28672] gate,up output) | fwd+bwd kernel ms | "
          "fwd+bwd ms | fwd ms | bit-equal to eager (h, dgate, dup; -halves: h, dy) |")
    print("|---|---|---|---|---|")
    for part in swiglu_parts:
        r = results[part]
        if "error" in r:
            print(f"| {part} | error: {r['error'][-120:]!r} |")
            continue
        device = r.get("fwd_bwd_kernel_ms")
        print(f"| {part[7:]} | {'-' if device is None else f'{device:.3f}'} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_ms']:.3f} | {r['bit_equal_to_eager']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
