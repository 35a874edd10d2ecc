"""LoRA on a frozen base (NF4, FP4 or plain bf16/fp16) as custom ops: `fxfuse::lora_linear` and its backward.

One call computes one projection, or a group of projections that read the same x (q/k/v, gate/up):

    y[:, group g] = x @ W_g^T + bias_g + ((x @ A_g^T) @ B_g^T * s).to(x.dtype)

Forward: the 4-bit weights are dequantized (Triton, bit-identical to bitsandbytes) into one
buffer [sum N_g, K]; xa = x @ A_cat^T ([M, sum r_g], fp32) in one read of x; the adapter term
(fp32, plus the bias) is written once in x.dtype and cuBLAS adds the frozen product to it in its
fp32 epilogue (addmm): y = rnd(x W^T + rnd(adapter term)), where PEFT rounds the frozen product, the
adapter term and their sum. Saved for backward: x and xa. No fp32 copy of x, no dequantized weight
kept.

Backward (all rank-r intermediates in fp32, kernels in `kernels/lora_matmul.py`):
    dxa = s * dy @ blockdiag(B_g)          [M, sum r]   } one read of dy
    dB  = s * dy^T @ xa    (diagonal blocks)            }
    dA  = dxa^T @ x        (row blocks)
    dx  = dy @ W_cat + dxa @ A_cat          (W dequantized again; dxa @ A_cat in addmm's epilogue)

Stock PEFT rounds the adapter term to x.dtype, the frozen product, and their sum (and in the
backward the two dx terms) separately; here the frozen product, by far the larger term, is never
rounded on its own, so each output is at least as accurate (tests/test_nf4_lora.py measures both
against float64).

Both ops are registered through `library.triton_op_or_custom_op`: on the GPU torch.compile traces into
them and Inductor launches their kernels (no Python per call at run time).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.lora_matmul import MAX_RANK, lora_dy_grads, lora_outer, rank_r_project, rank_r_weight_grad
from ..kernels.nf4 import dequantize_4bit_stacked
from .library import triton_op_or_custom_op

__all__ = ["nf4_lora_linear", "lora_linear_group", "MAX_GROUP_RANK"]

# The sum of the ranks of a group: the rank-r kernels' tile limit.
MAX_GROUP_RANK = MAX_RANK


def _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features, blocksize,
                   blocksize2, dtype):
    """The frozen weights of the group, stacked: [sum N_g, K] in `dtype`."""
    if quant_type == "none":
        return weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    specs = [(w.view(torch.uint8).reshape(-1), a, None if a2 is None else (a2, c2, o, blocksize2), (n, in_features))
             for w, a, a2, c2, o, n in zip(weights, absmax, absmax2, code2, offset, out_features)]
    return dequantize_4bit_stacked(specs, dtype, quant_type=quant_type, blocksize=blocksize)


def _block_diag(mats):
    return mats[0] if len(mats) == 1 else torch.block_diag(*mats)


def _cat(mats):
    return mats[0] if len(mats) == 1 else torch.cat(mats, 0)


def _forward_fake(x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, scaling, quant_type,
                  out_features, in_features, blocksize, blocksize2):
    m = x.numel() // in_features
    return (x.new_empty(*x.shape[:-1], sum(out_features)),
            x.new_empty(m, sum(a.shape[0] for a in lora_A), dtype=torch.float32))


@triton_op_or_custom_op("fxfuse::lora_linear", fake=_forward_fake)
def lora_linear_op(x: Tensor, weights: list[Tensor], absmax: list[Optional[Tensor]],
                   absmax2: list[Optional[Tensor]], code2: list[Optional[Tensor]], offset: list[Optional[Tensor]],
                   lora_A: list[Tensor], lora_B: list[Tensor], bias: Optional[Tensor], scaling: float,
                   quant_type: str, out_features: list[int], in_features: int, blocksize: int,
                   blocksize2: int) -> tuple[Tensor, Tensor]:
    x2 = x.reshape(-1, in_features)
    w = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features, blocksize,
                       blocksize2, x.dtype)
    xa = rank_r_project(x2, _cat(lora_A).t())
    y = lora_outer(xa, _block_diag(lora_B).t(), scaling, x.dtype, bias=bias)
    y = torch.addmm(y, x2, w.t())
    return y.view(*x.shape[:-1], y.shape[-1]), xa


def _backward_fake(dy, x, xa, weights, absmax, absmax2, code2, offset, lora_A, lora_B, scaling, quant_type,
                   out_features, in_features, blocksize, blocksize2, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), [torch.empty_like(a) for a in lora_A],
            [torch.empty_like(b) for b in lora_B])


@triton_op_or_custom_op("fxfuse::lora_linear_backward", fake=_backward_fake)
def lora_linear_backward_op(dy: Tensor, x: Tensor, xa: Tensor, weights: list[Tensor], absmax: list[Optional[Tensor]],
                            absmax2: list[Optional[Tensor]], code2: list[Optional[Tensor]],
                            offset: list[Optional[Tensor]], lora_A: list[Tensor], lora_B: list[Tensor],
                            scaling: float, quant_type: str, out_features: list[int], in_features: int,
                            blocksize: int, blocksize2: int, need_dx: bool
                            ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    x2 = x.reshape(-1, in_features)
    dy2 = dy.reshape(-1, sum(out_features))
    a_cat = _cat(lora_A)
    # dxa and dB from one read of dy; dA from one read of x.
    dxa, db_full = lora_dy_grads(dy2, _block_diag(lora_B), xa, scaling)
    da_cat = rank_r_weight_grad(x2, dxa, 1.0, transpose=True)
    d_a, d_b, row, col = [], [], 0, 0
    for a, n in zip(lora_A, out_features):
        r = a.shape[0]
        # Copies (not views) when grouped: a custom op's outputs must not alias each other.
        d_a.append(da_cat[col:col + r].clone() if len(lora_A) > 1 else da_cat)
        d_b.append(db_full[row:row + n, col:col + r].clone() if len(lora_A) > 1 else db_full)
        row, col = row + n, col + r
    if need_dx:
        w = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features,
                           blocksize, blocksize2, x.dtype)
        dx = torch.addmm(lora_outer(dxa, a_cat, 1.0, x.dtype), dy2, w).view(x.shape)
    else:
        dx = x.new_empty(0)
    return dx, d_a, d_b


_N_ARGS = 15


def _setup_context(ctx, inputs, output):
    (x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, *consts) = inputs
    ctx.n = len(weights)
    # Optional entries (None) cannot be saved: they are kept as a mask and re-inserted.
    state = [t for group in (weights, absmax, absmax2, code2, offset) for t in group]
    ctx.present = [t is not None for t in state]
    ctx.save_for_backward(x, output[1], *[t for t in state if t is not None], *lora_A, *lora_B)
    ctx.consts = tuple(consts)  # scaling, quant_type, out_features, in_features, blocksize, blocksize2


def _backward(ctx, dy, _dxa):
    saved = list(ctx.saved_tensors)
    x, xa = saved[:2]
    rest = iter(saved[2:])
    state = [next(rest) if p else None for p in ctx.present]
    n = ctx.n
    weights, absmax, absmax2, code2, offset = (state[i * n:(i + 1) * n] for i in range(5))
    lora_A = [next(rest) for _ in range(n)]
    lora_B = [next(rest) for _ in range(n)]
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b = torch.ops.fxfuse.lora_linear_backward(dy, x, xa, weights, absmax, absmax2, code2, offset, lora_A,
                                                         lora_B, *ctx.consts, need_dx)
    # Each tensor-list input takes a list of gradients (None for the frozen state), except a list
    # holding no tensor at all (e.g. absmax2 without double quantization), which takes None.
    frozen = [[None] * n if any(t is not None for t in group) else None
              for group in (weights, absmax, absmax2, code2, offset)]
    return (dx if need_dx else None, *frozen, d_a, d_b) + (None,) * (_N_ARGS - 8)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_group(x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, scaling, quant_type,
                      out_features, in_features, blocksize, blocksize2):
    """Several LoRA projections of the same x in one call: returns y with the groups' outputs
    side by side on the last dimension (the caller slices them). quant_type "nf4"/"fp4" (weights
    packed, absmax... per group) or "none" (weights plain bf16/fp16, the quantization lists None)."""
    return torch.ops.fxfuse.lora_linear(x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, scaling,
                                        quant_type, out_features, in_features, blocksize, blocksize2)[0]


def nf4_lora_linear(x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, scaling, quant_type,
                    out_features, in_features, blocksize, blocksize2, bias=None):
    """PEFT LoRA (one active adapter, dropout 0) of one projection: `lora.Linear4bit.forward` on a 4-bit
    (quant_type "nf4" or "fp4") base, or `lora.Linear.forward` on a plain one (quant_type "none":
    `packed` is the bf16/fp16 weight, the quantization arguments None/0)."""
    return lora_linear_group(x, [packed], [absmax], [s2_absmax], [s2_code], [offset], [lora_A], [lora_B], bias,
                             scaling, quant_type, [out_features], in_features, blocksize, blocksize2)
