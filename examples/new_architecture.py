"""Support for a new architecture variant, from outside the package: Gemma's RMSNorm.

transformers' GemmaRMSNorm (and Gemma2RMSNorm, Gemma3RMSNorm: the same code) differs from LlamaRMSNorm
in two places: the weight is applied as `(1 + weight)`, and the multiply happens in fp32 before the one
cast back (Llama casts first, then multiplies in bf16). So the built-in `rms_norm` pattern does not
match it, and its kernel, which rounds before the weight multiply, would not be faithful to it anyway.

This file adds a pattern for it with the public API only (`fxfuse.Pattern`, `fxfuse.explain`,
`fxfuse.testing.check_pattern`, the `extra_patterns` option), and prints what fxfuse does to a tiny
QLoRA Gemma 3 before and after. The replacement is plain PyTorch (no kernel): a forward bit-equal to
Gemma's, and a hand-written backward that keeps only x (bf16) and the fp32 row scale rstd for the
backward pass, where the stock autograd graph keeps fp32 copies of x and of the normalised x.

    python examples/new_architecture.py        # CPU, Triton interpreter, random weights, offline
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors: set before importing torch

import torch

import fxfuse
from fxfuse.testing import check_pattern


# 1. The reference: transformers' Gemma3RMSNorm.forward with `_norm` inlined, op for op.
def gemma_rms_norm(x, weight, eps):
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


# 2. The replacement: the same forward; a backward written out with the stock autograd formulas.
class _GemmaRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (h * rstd * (1.0 + weight.float())).type_as(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        h, g = x.float(), dy.float()
        gn = g * (1.0 + weight.float())  # d(output)/d(normalised x)
        dw = (g * (h * rstd)).sum(dim=tuple(range(x.dim() - 1))).to(weight.dtype)
        gvar = -0.5 * (gn * h).sum(-1, keepdim=True) * rstd.pow(3)  # rsqrt'
        dx = gn * rstd + (gvar / x.shape[-1]) * (2 * h)  # mean' and pow'
        return dx.to(x.dtype), dw, None


def gemma_rms_norm_replacement(x, weight, eps):
    return _GemmaRMSNorm.apply(x, weight, eps)


def _same_dtype(match):  # a constraint: None to accept, a sentence to decline
    x, w = match.value("x"), match.value("weight")
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return f"`x` is {x.dtype} and `weight` {w.dtype}; this replacement is for bf16/fp16 models"


def _weight_shape(match):
    x, w = match.value("x"), match.value("weight")
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"`weight` has shape {tuple(w.shape)}, expected ({x.shape[-1]},)"


GEMMA_RMS_NORM = fxfuse.Pattern(
    name="gemma_rms_norm",
    description="HF GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm: fp32 norm, x (1 + weight) in fp32, one cast",
    reference=gemma_rms_norm,
    replacement=gemma_rms_norm_replacement,
    example_inputs=lambda: (torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16), 1e-6),
    scalars=("eps",),
    constraints=(_same_dtype, _weight_shape),
)


def check_exact(shape=(4, 33, 64), dtype=torch.bfloat16, seed=0):
    """The reference is the oracle: check_pattern runs it in float64 and in `dtype` on random inputs of this
    shape and holds the replacement's output and gradients to the exactness criterion. The forward is bit-equal."""
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    results = check_pattern(GEMMA_RMS_NORM, (x, w, 1e-6), seeds=(seed,))
    assert torch.equal(gemma_rms_norm_replacement(x, w, 1e-6), gemma_rms_norm(x, w, 1e-6))
    return results


def tiny_qlora_gemma3():
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    base = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # random norm weights instead of the all-zero init
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(0.1 * torch.randn_like(p))
    path = tempfile.mkdtemp(prefix="fxfuse-gemma3-")
    base.save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = Gemma3ForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                              device_map="cpu", attn_implementation="sdpa")
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    # Train mode matters on CPU: in eval mode bitsandbytes repacks 4-bit weights for its CPU inference
    # kernel (gemv_4bit) on the first forward, a path the nf4_lora pattern does not know.
    return model.train()


def main():
    check_exact()
    print("gemma_rms_norm replacement: forward bit-equal, gradients exact (fxfuse.testing.check_pattern)\n")
    model = tiny_qlora_gemma3()
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    # inner="eager": skip Inductor's compile time; which patterns fire does not depend on it.
    print("before (built-in patterns only):")
    print(fxfuse.explain(model, input_ids=ids, labels=ids, options={"inner": "eager"}))
    torch._dynamo.reset()
    print("\nafter (options={'extra_patterns': [GEMMA_RMS_NORM]}):")
    print(fxfuse.explain(model, input_ids=ids, labels=ids, options={"inner": "eager", "extra_patterns": [GEMMA_RMS_NORM]}))
    # Training: torch.compile(model, backend="fxfuse", options={"extra_patterns": [GEMMA_RMS_NORM]})


if __name__ == "__main__":
    main()
