"""Pattern: HF `apply_rotary_pos_emb`'s `q * cos + rotate_half(q) * sin`, for q and for k."""
from __future__ import annotations

import torch

from .. import constraints as C
from ..kernels.rope import MAX_HEAD_DIM
from ..matcher import Pattern
from ..ops.rope import rope


def rotate_half(x):
    # transformers.models.llama.modeling_llama.rotate_half, verbatim
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(x, cos, sin):
    # apply_rotary_pos_emb for one of q, k; cos/sin already unsqueezed on the head dim
    return (x * cos) + (rotate_half(x) * sin)


def _examples():
    return (torch.randn(2, 3, 5, 16, dtype=torch.bfloat16), torch.randn(2, 1, 5, 16, dtype=torch.bfloat16),
            torch.randn(2, 1, 5, 16, dtype=torch.bfloat16))


def _shapes(match):
    x, cos, sin = (match.value(n) for n in ("x", "cos", "sin"))
    if x.dim() != 4:
        return f"x has {x.dim()} dims, the kernel takes [batch, heads, tokens, head_dim]"
    d = x.shape[-1]
    if not isinstance(d, int) or d % 2 or d > MAX_HEAD_DIM:
        return f"head_dim {d} is not an even number <= {MAX_HEAD_DIM}"
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 4 or c.shape[1] != 1 or c.shape[-1] != d or c.shape[2] != x.shape[2] \
                or c.shape[0] not in (1, x.shape[0]):
            return f"{name} of shape {tuple(c.shape)} does not broadcast over the heads of x {tuple(x.shape)}"
        if c.requires_grad:
            return f"{name} requires grad (the kernel treats cos/sin as constants)"


PATTERN = Pattern(
    name="rope",
    description="HF rotary embedding, x * cos + rotate_half(x) * sin (q and k each)",
    reference=rotary_embedding,
    replacement=rope,
    example_inputs=_examples,
    # Bit-equal to the stock code, not yet measured against Inductor's fused elementwise code.
    enabled_by_default=False,
    constraints=(
        C.dtype_in("x", (torch.bfloat16, torch.float16)),
        C.same_dtype("x", "cos", "sin"),
        C.triton_device("x", "cos", "sin"),
        _shapes,
    ),
)
