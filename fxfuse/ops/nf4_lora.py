"""LoRA on a bitsandbytes NF4 base as custom ops: `fxfuse::nf4_lora_linear` and its backward.

    y = x @ dequant(W)^T + ((x @ A^T) @ B^T * scaling).to(x.dtype)

with the stock path's roundings: the base product in x.dtype, the adapter product in the adapter
dtype (fp32 under PEFT's defaults), rounded once to x.dtype, then the sum rounded once. The
backward dequantizes W again rather than keeping it: only x and the rank-r product x @ A^T are saved.

This first implementation composes the Triton NF4 dequantization (bit-identical to bitsandbytes)
with torch GEMMs; it is exact and it is the contract that fused kernels must keep.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.nf4 import dequantize_4bit

__all__ = ["nf4_lora_linear"]


def _weight(packed, absmax, s2_absmax, s2_code, offset, quant_type, out_features, in_features, blocksize,
            blocksize2, dtype):
    nested = None if s2_absmax is None else (s2_absmax, s2_code, offset, blocksize2)
    return dequantize_4bit(packed.view(torch.uint8).reshape(-1), absmax, (out_features, in_features), dtype,
                           quant_type=quant_type, blocksize=blocksize, nested=nested)


@torch.library.custom_op("fxfuse::nf4_lora_linear", mutates_args=())
def nf4_lora_linear_op(x: Tensor, packed: Tensor, absmax: Tensor, s2_absmax: Optional[Tensor],
                       s2_code: Optional[Tensor], offset: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scaling: float, quant_type: str, out_features: int, in_features: int, blocksize: int,
                       blocksize2: int) -> tuple[Tensor, Tensor]:
    w = _weight(packed, absmax, s2_absmax, s2_code, offset, quant_type, out_features, in_features, blocksize,
                blocksize2, x.dtype)
    base = torch.nn.functional.linear(x, w)
    xa = torch.nn.functional.linear(x.to(lora_A.dtype), lora_A)
    lora = (torch.nn.functional.linear(xa, lora_B) * scaling).to(x.dtype)
    return base + lora, xa


@nf4_lora_linear_op.register_fake
def _(x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, scaling, quant_type, out_features, in_features,
      blocksize, blocksize2):
    return (x.new_empty(*x.shape[:-1], out_features),
            x.new_empty(*x.shape[:-1], lora_A.shape[0], dtype=lora_A.dtype))


@torch.library.custom_op("fxfuse::nf4_lora_linear_backward", mutates_args=())
def nf4_lora_linear_backward_op(dy: Tensor, x: Tensor, xa: Tensor, packed: Tensor, absmax: Tensor,
                                s2_absmax: Optional[Tensor], s2_code: Optional[Tensor], offset: Optional[Tensor],
                                lora_A: Tensor, lora_B: Tensor, scaling: float, quant_type: str,
                                out_features: int, in_features: int, blocksize: int, blocksize2: int,
                                need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    d_up = dy.to(lora_B.dtype) * scaling  # grad of (xa @ B^T) * s, in the adapter dtype
    d_up2 = d_up.reshape(-1, out_features)
    d_lora_B = d_up2.t() @ xa.reshape(-1, xa.shape[-1])
    d_xa = d_up @ lora_B  # [.., r]: the intermediates stay rank r
    d_lora_A = d_xa.reshape(-1, d_xa.shape[-1]).t() @ x.reshape(-1, in_features).to(lora_A.dtype)
    if need_dx:
        w = _weight(packed, absmax, s2_absmax, s2_code, offset, quant_type, out_features, in_features, blocksize,
                    blocksize2, x.dtype)
        # Two gradients of x meet here, each already in x.dtype, as autograd sums them in the stock graph.
        dx = (dy @ w) + (d_xa @ lora_A).to(x.dtype)
    else:
        dx = x.new_empty(0)
    return dx, d_lora_A, d_lora_B


@nf4_lora_linear_backward_op.register_fake
def _(dy, x, xa, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, scaling, quant_type, out_features,
      in_features, blocksize, blocksize2, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(lora_A), torch.empty_like(lora_B))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, *consts) = inputs
    ctx.save_for_backward(x, output[1], packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B)
    ctx.consts = tuple(consts)  # scaling, quant_type, out_features, in_features, blocksize, blocksize2


def _backward(ctx, dy, _dxa):
    x, xa, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b = torch.ops.fxfuse.nf4_lora_linear_backward(dy, x, xa, packed, absmax, s2_absmax, s2_code, offset,
                                                             lora_A, lora_B, *ctx.consts, need_dx)
    grads = [dx if need_dx else None] + [None] * 5 + [
        d_a if ctx.needs_input_grad[6] else None, d_b if ctx.needs_input_grad[7] else None] + [None] * 6
    return tuple(grads)


nf4_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def nf4_lora_linear(x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, scaling, quant_type,
                    out_features, in_features, blocksize, blocksize2):
    """PEFT `lora.Linear4bit.forward` (one active adapter, dropout 0) on a 4-bit (NF4 or FP4) base."""
    return torch.ops.fxfuse.nf4_lora_linear(x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B,
                                            scaling, quant_type, out_features, in_features, blocksize,
                                            blocksize2)[0]
