"""RoPE as custom ops: `fxfuse::rope` / `fxfuse::rope_backward` for one of q or k, and
`fxfuse::rope_qk` / `fxfuse::rope_qk_backward` for q and k together (one launch each way).

`rope(x, cos, sin)` is the entry point the RoPE pattern inserts, `rope_qk(q, k, cos, sin)` what its
post pass makes of the q and k calls that share cos and sin: bit-equal to HF's
`x * cos + rotate_half(x) * sin`, forward and backward (cos and sin take no gradient: transformers
computes them under no_grad).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import rope as kernels

__all__ = ["rope", "rope_qk"]


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


@torch.library.custom_op("fxfuse::rope_qk", mutates_args=())
def rope_qk_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return kernels.rope_qk_forward(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(cos),
                                   _last_dim_contiguous(sin))


@rope_qk_op.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fxfuse::rope_qk_backward", mutates_args=())
def rope_qk_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return kernels.rope_qk_backward(_last_dim_contiguous(dq), _last_dim_contiguous(dk), _last_dim_contiguous(cos),
                                    _last_dim_contiguous(sin))


@rope_qk_backward_op.register_fake
def _(dq, dk, cos, sin):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup_context_qk(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward_qk(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dxq, dxk = torch.ops.fxfuse.rope_qk_backward(dq, dk, cos, sin)
    return dxq, dxk, None, None


rope_qk_op.register_autograd(_backward_qk, setup_context=_setup_context_qk)


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`rope(q, cos, sin), rope(k, cos, sin)` in one launch each way (k may have fewer heads than q)."""
    return torch.ops.fxfuse.rope_qk(q, k, cos, sin)
