"""Pattern: SwiGLU, `silu(gate) * up`, as Hugging Face LlamaMLP writes it (also Mistral, Qwen2/3: the same code)."""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import constraints as C
from ..matcher import Pattern
from ..ops.swiglu import swiglu


def swiglu_reference(gate, up):
    # transformers' LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn = nn.SiLU
    # (nn.SiLU.forward is F.silu(input, inplace=False); either operand order matches).
    return torch.nn.functional.silu(gate) * up


def _examples():
    return torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)


def _same_shape(match):
    # The kernel is elementwise over two equal shapes; a broadcast `up` (or `gate`) is another op.
    g, u = match.value("gate"), match.value("up")
    if g.dim() != u.dim() or not all(statically_known_true(a == b) for a, b in zip(g.shape, u.shape)):
        return f"`gate` {tuple(g.shape)} and `up` {tuple(u.shape)} are not provably the same shape (broadcast)"


PATTERN = Pattern(
    name="swiglu",
    description="SwiGLU of HF LlamaMLP, silu(gate) * up (stock roundings; saves gate and up only)",
    reference=swiglu_reference,
    replacement=swiglu,
    example_inputs=_examples,
    # Bit-equal to the stock code on CPU; not yet measured against Inductor's fused elementwise code.
    enabled_by_default=False,
    constraints=(
        # fp32 runs in fp64 inside the kernel: not the stock bits, but never less exact (tested).
        C.dtype_in("gate", (torch.bfloat16, torch.float16, torch.float32)),
        C.same_dtype("gate", "up"),
        _same_shape,
        C.triton_device("gate", "up"),
    ),
)
