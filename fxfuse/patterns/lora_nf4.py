"""Pattern: PEFT `lora.Linear4bit.forward` on a bitsandbytes NF4 base (one adapter, dropout 0)."""
from __future__ import annotations

import torch

from .. import constraints as C
from ..canonicalize import linear_4bit_info
from ..matcher import Pattern
from ..ops.nf4_lora import nf4_lora_linear
from .markers import linear_4bit


def peft_lora_linear_4bit(x, weight, lora_A, lora_B, scaling):
    # peft.tuners.lora.bnb.Linear4bit.forward, vanilla LoRA, one active adapter, no autocast
    result = linear_4bit(x, weight)
    result = result.clone()
    expected_dtype = result.dtype
    x = x.to(lora_A.dtype)
    output = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    output = output.to(expected_dtype)
    return result + output


def _examples():
    return (torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16),
            torch.randn(4, 16), torch.randn(24, 4), 2.0)


def _spec(match):
    return linear_4bit_info(match.user_node("linear_4bit"))


def _4bit_without_bias(match):
    spec = _spec(match)
    if spec is None:
        return "the 4-bit linear's quantization state could not be read"
    if spec.quant_type not in ("nf4", "fp4"):
        return f"quant_type {spec.quant_type!r}: NF4 and FP4 are supported"
    if spec.bias is not None:
        return "the 4-bit base layer has a bias (not supported yet)"
    if len(spec.shape) != 2:
        return f"weight shape {spec.shape} is not 2-D"


def _adapter_shapes(match):
    a, b, x = match.value("lora_A"), match.value("lora_B"), match.value("x")
    out_f, in_f = _spec(match).shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        return f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base {out_f}x{in_f}"
    if x.shape[-1] != in_f:
        return f"input features {x.shape[-1]} != {in_f}"


def _arguments(match):
    spec = _spec(match)
    s2_absmax, s2_code, offset, blocksize2 = spec.nested or (None, None, None, 0)
    return (match.bindings["x"], spec.weight, spec.absmax, s2_absmax, s2_code, offset, match.bindings["lora_A"],
            match.bindings["lora_B"], match.bindings["scaling"], spec.quant_type, spec.shape[0], spec.shape[1],
            spec.blocksize, blocksize2)


PATTERN = Pattern(
    name="nf4_lora",
    description="PEFT LoRA on a bitsandbytes NF4 Linear4bit (base GEMM, clone, fp32 adapter path, add)",
    reference=peft_lora_linear_4bit,
    replacement=nf4_lora_linear,
    example_inputs=_examples,
    scalars=("scaling",),
    arguments=_arguments,
    # Exact, but not yet faster than the stock path: it runs when asked for
    # (options={"enable": ["nf4_lora"]}) until the fused kernels land.
    enabled_by_default=False,
    constraints=(
        _4bit_without_bias,
        C.dtype_in("x", (torch.bfloat16, torch.float16)),
        C.dtype_in("lora_A", (torch.float32,)),
        C.same_dtype("lora_A", "lora_B"),
        C.triton_device("x", "lora_A", "lora_B"),
        _adapter_shapes,
    ),
)
