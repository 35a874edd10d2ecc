"""SwiGLU as custom ops: `fxfuse::swiglu` (forward) and `fxfuse::swiglu_backward` (both gradients), and
their forms over one gate,up projection output, `fxfuse::swiglu_halves` and its backward.

`swiglu(gate, up)` is the entry point the SwiGLU pattern inserts: `silu(gate) * up` with stock
PyTorch's roundings, forward and backward. Autograd saves gate and up only (not h, and not the silu
output the stock mul keeps): the backward recomputes what it needs from them.

`swiglu_halves(y)` is the same of y = [gate | up] (the output of a grouped gate,up projection, which
the pattern's post pass hands over whole): the kernels read the two halves in place, and the
backward writes d_gate and d_up into the two halves of one gradient of y, which the grouped
projection's backward reads as it is (no split of y, no concatenation of its gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import swiglu as kernels

__all__ = ["swiglu", "swiglu_halves"]


def _rows(t: Tensor) -> Tensor:
    # The kernels take any stack of contiguous rows; anything else is copied first.
    return t if kernels.row_stride(t) is not None else t.contiguous()


@torch.library.custom_op("fxfuse::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return kernels.swiglu_forward(_rows(gate), _rows(up))


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxfuse::swiglu_backward", mutates_args=())
def swiglu_backward_op(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    # Both gradients go to buffers the kernel allocates: never into a tensor the graph still reads.
    return kernels.swiglu_backward(_rows(dh), _rows(gate), _rows(up))


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


def _halves(y: Tensor) -> tuple[Tensor, Tensor]:
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu_halves: the last dimension of y must be even (gate | up), got {tuple(y.shape)}")
    n = y.shape[-1] // 2
    return y[..., :n], y[..., n:]


@torch.library.custom_op("fxfuse::swiglu_halves", mutates_args=())
def swiglu_halves_op(y: Tensor) -> Tensor:
    return kernels.swiglu_forward(*_halves(_rows(y)))


@swiglu_halves_op.register_fake
def _(y):
    return y.new_empty(*y.shape[:-1], y.shape[-1] // 2)


@torch.library.custom_op("fxfuse::swiglu_halves_backward", mutates_args=())
def swiglu_halves_backward_op(dh: Tensor, y: Tensor) -> Tensor:
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    d_gate, d_up = _halves(dy)
    kernels.swiglu_backward(_rows(dh), *_halves(_rows(y)), d_gate_out=d_gate, d_up_out=d_up)
    return dy


@swiglu_halves_backward_op.register_fake
def _(dh, y):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


@torch.library.custom_op("fxfuse::swiglu_halves_again", mutates_args=())
def swiglu_halves_again_op(y: Tensor, after: Tensor) -> Tensor:
    """`swiglu_halves(y)` formed again inside a backward (the LoRA op's `activation`, fxfuse/ops/nf4_lora.py),
    where the forward's h was not saved. `after` is a tensor of that backward, never read: the dependence
    keeps it there. Without it AOTAutograd's partitioner sees a function of forward values only, merges it
    with the forward's call (CSE) or computes it in the forward, and saves h after all (tests/test_traced_ops.py)."""
    return kernels.swiglu_forward(*_halves(_rows(y)))


@swiglu_halves_again_op.register_fake
def _(y, after):
    return y.new_empty(*y.shape[:-1], y.shape[-1] // 2)


def _setup_context_halves(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_halves(ctx, dh):
    (y,) = ctx.saved_tensors
    return torch.ops.fxfuse.swiglu_halves_backward(dh, y)


swiglu_halves_op.register_autograd(_backward_halves, setup_context=_setup_context_halves)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """HF LlamaMLP's `act_fn(gate) * up` with act_fn = nn.SiLU, i.e. `silu(gate) * up`."""
    return torch.ops.fxfuse.swiglu(gate, up)


def swiglu_halves(y: Tensor) -> Tensor:
    """`silu(gate) * up` of y = [gate | up] on the last dimension (a grouped gate,up projection's output)."""
    return torch.ops.fxfuse.swiglu_halves(y)
