"""RMSNorm as custom ops: `fxfuse::rms_norm` (forward, also returns rstd) and `fxfuse::rms_norm_backward`.

`rms_norm(x, weight, eps)` is the entry point the RMSNorm pattern inserts into graphs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import rms_norm as kernels
from .library import triton_op_or_custom_op

__all__ = ["rms_norm"]


def _rows(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _forward_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


# Opaque (traced=False): Inductor's compile of its copy of the forward kernel failed on the H200
# (2026-12-01, at the rstd helper's division); until that is checked there, these stay custom ops.
@triton_op_or_custom_op("fxfuse::rms_norm", fake=_forward_fake, traced=False)
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, rstd = kernels.rms_norm_forward(_rows(x), weight.contiguous(), eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _backward_fake(dy, x, weight, rstd, need_weight_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))


@triton_op_or_custom_op("fxfuse::rms_norm_backward", fake=_backward_fake, traced=False)
def rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                         need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    dx, dw = kernels.rms_norm_backward(_rows(dy), _rows(x), weight.contiguous(), rstd.contiguous().view(-1),
                                       need_weight_grad=need_weight_grad)
    # An op cannot return None: an empty tensor stands for "no weight gradient".
    return dx.view(x.shape), dw if dw is not None else weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.fxfuse.rms_norm_backward(dy, x, weight, rstd, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm: `weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`."""
    return torch.ops.fxfuse.rms_norm(x, weight, eps)[0]
