"""RoPE for one of q or k as custom ops: `fxfuse::rope` and `fxfuse::rope_backward`.

`rope(x, cos, sin)` is the entry point the RoPE pattern inserts: bit-equal to HF's
`x * cos + rotate_half(x) * sin`, forward and backward (cos and sin take no gradient: transformers
computes them under no_grad).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import rope as kernels

__all__ = ["rope"]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("fxfuse::rope", mutates_args=())
def rope_op(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return kernels.rope_forward(_last_dim_contiguous(x), _last_dim_contiguous(cos), _last_dim_contiguous(sin))


@rope_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.custom_op("fxfuse::rope_backward", mutates_args=())
def rope_backward_op(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return kernels.rope_backward(_last_dim_contiguous(dy), _last_dim_contiguous(cos), _last_dim_contiguous(sin))


@rope_backward_op.register_fake
def _(dy, cos, sin):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.fxfuse.rope_backward(dy, cos, sin), None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF `x * cos + rotate_half(x) * sin` for x [B, H, T, D] and cos/sin [B or 1, 1, T, D]."""
    return torch.ops.fxfuse.rope(x, cos, sin)
