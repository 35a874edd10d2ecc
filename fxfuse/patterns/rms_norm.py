"""Pattern: Hugging Face `LlamaRMSNorm.forward` (also Mistral, Qwen2/3, Phi-3: the same code)."""
from __future__ import annotations

import torch

from .. import constraints as C
from ..kernels.rms_norm import MAX_HIDDEN
from ..matcher import Pattern
from ..ops.rms_norm import rms_norm


def llama_rms_norm(hidden_states, weight, eps):
    # transformers.models.llama.modeling_llama.LlamaRMSNorm.forward, verbatim
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _examples():
    return torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16), 1e-6


PATTERN = Pattern(
    name="rms_norm",
    description="HF LlamaRMSNorm (fp32 variance, rsqrt, cast back, weight multiply)",
    reference=llama_rms_norm,
    replacement=rms_norm,
    example_inputs=_examples,
    scalars=("eps",),
    # Every RMSNorm-like region has an rsqrt; one left in the graph is a norm in another form.
    anchor="rsqrt",
    anchor_reason=("an rsqrt outside HF LlamaRMSNorm's form (another norm, e.g. Gemma's fp32 (1 + weight) "
                   "norm, or a changed op): stock path"),
    constraints=(
        C.dtype_in("hidden_states", (torch.bfloat16, torch.float16)),
        C.same_dtype("hidden_states", "weight"),
        C.triton_device("hidden_states", "weight"),
        C.last_dim_at_most("hidden_states", MAX_HIDDEN),
        C.shape_equals_last_dim("weight", "hidden_states"),
    ),
)
