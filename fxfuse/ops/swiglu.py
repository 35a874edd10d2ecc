"""SwiGLU as custom ops: `fxfuse::swiglu` (forward) and `fxfuse::swiglu_backward` (both gradients).

`swiglu(gate, up)` is the entry point the SwiGLU pattern inserts: `silu(gate) * up` with stock
PyTorch's roundings, forward and backward. Autograd saves gate and up only (not h, and not the silu
output the stock mul keeps): the backward recomputes what it needs from them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import swiglu as kernels

__all__ = ["swiglu"]


@torch.library.custom_op("fxfuse::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return kernels.swiglu_forward(gate.contiguous(), up.contiguous())


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxfuse::swiglu_backward", mutates_args=())
def swiglu_backward_op(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    # Both gradients go to buffers the kernel allocates: never into a tensor the graph still reads.
    return kernels.swiglu_backward(dh.contiguous(), gate.contiguous(), up.contiguous())


@swiglu_backward_op.register_fake
def _(dh, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    # One kernel computes both gradients (they share the loads of dh, gate and up); a gradient
    # nobody asked for is dropped here.
    d_gate, d_up = torch.ops.fxfuse.swiglu_backward(dh, gate, up)
    return (d_gate if ctx.needs_input_grad[0] else None), (d_up if ctx.needs_input_grad[1] else None)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """HF LlamaMLP's `act_fn(gate) * up` with act_fn = nn.SiLU, i.e. `silu(gate) * up`."""
    return torch.ops.fxfuse.swiglu(gate, up)
