"""LoRA on a frozen base (NF4, FP4 or plain bf16/fp16) as custom ops: `fxfuse::lora_linear` and its backward.

One call computes one projection, or a group of projections that read the same x (q/k/v, gate/up):

    y[:, group g] = x @ W_g^T + bias_g + ((x @ A_g^T) @ B_g^T * s).to(x.dtype)

Forward: the 4-bit weights are dequantized (Triton, bit-identical to bitsandbytes) into one
buffer [sum N_g, K]; xa = x @ A_cat^T ([M, sum r_g], fp32) in one read of x; the adapter term
(fp32, plus the bias) is written once in x.dtype and cuBLAS adds the frozen product to it in its
fp32 epilogue, in place (`frozen_addmm_`): y = rnd(x W^T + rnd(adapter term)), where PEFT rounds the
frozen product, the adapter term and their sum. Saved for backward: x and xa. No fp32 copy of x, no
dequantized weight kept.

Backward (all rank-r intermediates in fp32, kernels in `kernels/lora_matmul.py`), per projection g:
    dxa_g = s * dy_g @ B_g                 [M, r_g]  } one read of dy
    dB_g  = s * dy_g^T @ xa_g                        }
    dA    = dxa^T @ x          (all projections' rows in one read of x)
    dx    = dy @ W_cat + dxa @ A_cat       (W dequantized again; dxa @ A_cat in the GEMM's epilogue)

Where the output is much wider than the GEMM's other operand (y of the gate,up group, dx of
down_proj), the adapter term is not formed at all: the GEMM is K-extended, its reduction widened by
the adapter factors as bf16 parts (`split_columns_`), e.g. y = [x | xa hi, hi, lo] @ [W | sB hi, lo,
hi]^T, so that cuBLAS accumulates the frozen product and the adapter product (16 bits per factor)
together and rounds y once. The copy of x (dy) is stored by the kernel that reads it for xa (dxa),
the dequantization writes into the padded buffer; `_extend_forward` / `_extend_backward` say where.

Stock PEFT rounds the adapter term to x.dtype, the frozen product, and their sum (and in the
backward the two dx terms) separately; here the frozen product, by far the larger term, is never
rounded on its own, so each output is at least as accurate (tests/test_nf4_lora.py measures both
against float64).

down_proj of a SwiGLU MLP can take [gate | up] instead of its input (`activation`, see ACTIVATIONS):
its input, the MLP's widest saved activation but one, is then not kept for the backward.

Both ops are registered through `library.triton_op_or_custom_op`: on the GPU torch.compile traces into
them and Inductor launches their kernels (no Python per call at run time, but for `frozen_addmm_`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.lora_matmul import (MAX_RANK, lora_dy_can_copy, lora_dy_grads, lora_outer, rank_r_project,
                                   rank_r_weight_grad, split_columns_)
from ..kernels.nf4 import dequantize_4bit_stacked
from .library import triton_op_or_custom_op

__all__ = ["nf4_lora_linear", "lora_linear_group", "MAX_GROUP_RANK", "ACTIVATIONS"]

# The sum of the ranks of a group: the rank-r kernels' tile limit.
MAX_GROUP_RANK = MAX_RANK


def _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features, blocksize,
                   blocksize2, dtype, row_pad=0, extra_rows=0):
    """The frozen weights of the group, stacked: [sum N_g, K] in `dtype` (4-bit bases: in the corner
    of a [sum N_g + extra_rows, K + row_pad] buffer, the rest for the caller to fill)."""
    if quant_type == "none":
        return weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    specs = [(w.view(torch.uint8).reshape(-1), a, None if a2 is None else (a2, c2, o, blocksize2), (n, in_features))
             for w, a, a2, c2, o, n in zip(weights, absmax, absmax2, code2, offset, out_features)]
    return dequantize_4bit_stacked(specs, dtype, quant_type=quant_type, blocksize=blocksize, row_pad=row_pad,
                                   extra_rows=extra_rows)


def _extension(rank: int) -> int:
    """Columns a K-extended GEMM adds for an adapter of this rank: 3 bf16 parts, padded to 8 (16 bytes)."""
    return -(-3 * rank // 8) * 8


# The forward is K-extended only where y is at least this many times wider than x. Measured on the H200
# (2026-12-02, benchmarks/nf4_lora.py, fwd+bwd device time, 4096 tokens): the gate,up group (7x)
# takes 3.10 to 3.19 ms extended against 3.31 ms with the adapter term; gate_proj alone (3.5x) 1.63 to
# 1.67 ms against 1.53, although its kernel profile adds up to less extended (1.44 against 1.47 ms
# busy): not understood yet, so the narrower projections keep the adapter term.
_EXTEND_FORWARD_MIN_WIDENING = 4


def _extend_forward(quant_type, dtype, bias, out_features, in_features) -> bool:
    """Whether y is one K-extended GEMM [x | xa parts] @ [W | s B parts]^T, with no [M, N] adapter
    term written and read back: for a 4-bit base (whose dequantization writes the padded rows at no
    cost) in bf16 (the parts are bf16), without a bias, where y is much wider than x (the copy of x
    is made by the kernel that reads x for xa anyway)."""
    return (quant_type != "none" and dtype == torch.bfloat16 and bias is None
            and sum(out_features) >= _EXTEND_FORWARD_MIN_WIDENING * in_features)


def _extend_backward(quant_type, dtype, out_features, in_features, lora_A) -> bool:
    """Whether dx is one K-extended GEMM [dy | dxa parts] @ [W ; A parts]: where dx is wider than dy
    (down_proj: 1.55 to 1.58 ms fwd+bwd against 1.58 with the adapter term, H200, 2026-12-02), for a
    single projection whose dy kernel can copy dy (`lora_dy_can_copy`); the weight's extra rows cost the
    dequantization nothing."""
    return (quant_type != "none" and dtype == torch.bfloat16 and len(out_features) == 1
            and in_features > out_features[0] and lora_dy_can_copy(lora_A[0].shape[0]))


# What the op's input is. "none": x itself. "swiglu_halves": y = [gate | up] of a grouped gate,up projection,
# and x = silu(gate) * up (down_proj's input). Then the op saves y, which the SwiGLU's backward needs anyway,
# instead of x: x (the MLP's intermediate size wide, a fifth of a Llama layer's saved activations
# without checkpointing) is formed again in the backward, for dA only, and freed before dx is allocated; the
# gradient of y comes out through the SwiGLU's backward. Bit for bit the results of the two ops in a row
# (the SwiGLU kernel is deterministic), at the cost of one more SwiGLU forward per backward.
ACTIVATIONS = ("none", "swiglu_halves")


def _activated(x: Tensor, activation: str, after: Optional[Tensor] = None) -> Tensor:
    """The projections' input from the op's input. In a backward, `after` is a tensor of that backward
    (fxfuse::swiglu_halves_again says why)."""
    if activation == "none":
        return x
    if activation == "swiglu_halves":
        return torch.ops.fxfuse.swiglu_halves(x) if after is None else torch.ops.fxfuse.swiglu_halves_again(x, after)
    raise ValueError(f"lora_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _block_diag(mats):
    return mats[0] if len(mats) == 1 else torch.block_diag(*mats)


def _cat(mats):
    return mats[0] if len(mats) == 1 else torch.cat(mats, 0)


def _cat_columns(mats):
    return mats[0] if len(mats) == 1 else torch.cat(mats, 1)


def _groups(lora_A, out_features):
    """The (columns, rank) blocks of a group's block-diagonal B^T, for lora_outer (which takes at
    most three; a larger group is one block of the whole rank: correct, the off-diagonal zeros included)."""
    return [(n, a.shape[0]) for a, n in zip(lora_A, out_features)] if len(lora_A) <= 3 else None


@torch.library.custom_op("fxfuse::frozen_addmm_", mutates_args=("out",))
def frozen_addmm_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b in cuBLAS's fp32 epilogue, in place (the frozen product added to the adapter term).

    An opaque op on purpose. Traced as `aten.addmm`, it is functionalized, and Inductor then calls
    cuBLAS with an output separate from the bias matrix, which ATen first copies into that output: a
    full [M, N] copy per call (H200, 2026-12-02: 72 us of a 1.67 ms gate_proj fwd+bwd). An op that
    mutates `out` is re-inplaced by Inductor instead (nothing else reads the adapter term), at the
    cost of one Python call per use."""
    out.addmm_(a, b)


@frozen_addmm_.register_fake
def _(out, a, b):
    return None


def _forward_fake(x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, scaling, quant_type,
                  out_features, in_features, blocksize, blocksize2, activation):
    m = x.numel() // x.shape[-1]
    return (x.new_empty(*x.shape[:-1], sum(out_features)),
            x.new_empty(m, sum(a.shape[0] for a in lora_A), dtype=torch.float32))


@triton_op_or_custom_op("fxfuse::lora_linear", fake=_forward_fake)
def lora_linear_op(x: Tensor, weights: list[Tensor], absmax: list[Optional[Tensor]],
                   absmax2: list[Optional[Tensor]], code2: list[Optional[Tensor]], offset: list[Optional[Tensor]],
                   lora_A: list[Tensor], lora_B: list[Tensor], bias: Optional[Tensor], scaling: float,
                   quant_type: str, out_features: list[int], in_features: int, blocksize: int,
                   blocksize2: int, activation: str) -> tuple[Tensor, Tensor]:
    x = _activated(x, activation)
    x2 = x.reshape(-1, in_features)
    a_cat = _cat(lora_A)
    if _extend_forward(quant_type, x.dtype, bias, out_features, in_features):
        # y = [x | xa parts] @ [W | s B parts]^T: one GEMM, one rounding, no [M, N] adapter term.
        pad = _extension(a_cat.shape[0])
        x_ext = x2.new_empty(x2.shape[0], in_features + pad)
        xa = rank_r_project(x2, a_cat.t(), copy_to=x_ext)
        w_ext = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features,
                               blocksize, blocksize2, x.dtype, row_pad=pad)
        split_columns_(x_ext, xa, in_features, pad, 1.0, left=True)
        split_columns_(w_ext, _block_diag(lora_B), in_features, pad, scaling, left=False)
        y = torch.mm(x_ext, w_ext.t())
    else:
        w = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features,
                           blocksize, blocksize2, x.dtype)
        xa = rank_r_project(x2, a_cat.t())
        y = lora_outer(xa, _block_diag(lora_B).t(), scaling, x.dtype, bias=bias,
                       groups=_groups(lora_A, out_features))
        torch.ops.fxfuse.frozen_addmm_(y, x2, w.t())
    return y.view(*x.shape[:-1], y.shape[-1]), xa


def _backward_fake(dy, x, xa, weights, absmax, absmax2, code2, offset, lora_A, lora_B, scaling, quant_type,
                   out_features, in_features, blocksize, blocksize2, activation, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), [torch.empty_like(a) for a in lora_A],
            [torch.empty_like(b) for b in lora_B])


@triton_op_or_custom_op("fxfuse::lora_linear_backward", fake=_backward_fake)
def lora_linear_backward_op(dy: Tensor, x: Tensor, xa: Tensor, weights: list[Tensor], absmax: list[Optional[Tensor]],
                            absmax2: list[Optional[Tensor]], code2: list[Optional[Tensor]],
                            offset: list[Optional[Tensor]], lora_A: list[Tensor], lora_B: list[Tensor],
                            scaling: float, quant_type: str, out_features: list[int], in_features: int,
                            blocksize: int, blocksize2: int, activation: str, need_dx: bool
                            ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    op_input = x
    x_shape, dtype = (*op_input.shape[:-1], in_features), op_input.dtype
    dy2 = dy.reshape(-1, sum(out_features))
    a_cat = _cat(lora_A)
    # Per projection, dxa_g and dB_g from one read of its columns of dy (a group's B taken block by
    # block, not as one block-diagonal matrix: that would do every projection's products at the
    # group's whole rank); then dA for all of them from one read of x.
    extend = need_dx and _extend_backward(quant_type, dtype, out_features, in_features, lora_A)
    if extend:
        pad = _extension(a_cat.shape[0])
        dy_ext = dy2.new_empty(dy2.shape[0], out_features[0] + pad)
    dxa_parts, d_b, row, col = [], [], 0, 0
    for b, n in zip(lora_B, out_features):
        r = b.shape[1]
        dxa_g, db_g = lora_dy_grads(dy2[:, row:row + n], b, xa[:, col:col + r], scaling,
                                    copy_to=dy_ext if extend else None)
        dxa_parts.append(dxa_g)
        d_b.append(db_g)
        row, col = row + n, col + r
    dxa = _cat_columns(dxa_parts)
    x = _activated(op_input, activation, after=dxa)  # formed again, not saved: see _activated
    x2 = x.reshape(-1, in_features)
    da_cat = rank_r_weight_grad(x2, dxa, 1.0, transpose=True)
    del x, x2  # x's last use: an activation formed again here is freed before dx is allocated
    # Copies (not views) when grouped: a custom op's outputs must not alias each other.
    d_a, col = [], 0
    for a in lora_A:
        d_a.append(da_cat[col:col + a.shape[0]].clone() if len(lora_A) > 1 else da_cat)
        col += a.shape[0]
    if extend:
        # dx = [dy | dxa parts] @ [W ; A parts]: one GEMM, one rounding, no [M, K] adapter term.
        n = out_features[0]
        w_ext = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features,
                               blocksize, blocksize2, dtype, extra_rows=pad)
        split_columns_(dy_ext, dxa, n, pad, 1.0, left=True)
        split_columns_(w_ext, a_cat.t(), n, pad, 1.0, left=False, transposed=True)
        dx = torch.mm(dy_ext, w_ext).view(x_shape)
    elif need_dx:
        w = _frozen_weight(weights, absmax, absmax2, code2, offset, quant_type, out_features, in_features,
                           blocksize, blocksize2, dtype)
        dx = lora_outer(dxa, a_cat, 1.0, dtype)
        torch.ops.fxfuse.frozen_addmm_(dx, dy2, w)
        dx = dx.view(x_shape)
    else:
        return op_input.new_empty(0), d_a, d_b
    if activation == "swiglu_halves":
        dx = torch.ops.fxfuse.swiglu_halves_backward(dx, op_input)
    return dx, d_a, d_b


_N_ARGS = 16


def _setup_context(ctx, inputs, output):
    (x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, *consts) = inputs
    ctx.n = len(weights)
    # Optional entries (None) cannot be saved: they are kept as a mask and re-inserted.
    state = [t for group in (weights, absmax, absmax2, code2, offset) for t in group]
    ctx.present = [t is not None for t in state]
    ctx.save_for_backward(x, output[1], *[t for t in state if t is not None], *lora_A, *lora_B)
    # scaling, quant_type, out_features, in_features, blocksize, blocksize2, activation
    ctx.consts = tuple(consts)


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
                      out_features, in_features, blocksize, blocksize2, activation="none"):
    """Several LoRA projections of the same x in one call: returns y with the groups' outputs
    side by side on the last dimension (the caller slices them). quant_type "nf4"/"fp4" (weights
    packed, absmax... per group) or "none" (weights plain bf16/fp16, the quantization lists None).
    activation "swiglu_halves": `x` is [gate | up] and the projections read silu(gate) * up (ACTIVATIONS).
    bf16 adapters (TRL's bf16=True) enter as their exact fp32 values: the products are computed as
    for fp32 ones, and autograd rounds dA and dB once back to bf16."""
    if lora_A[0].dtype == torch.bfloat16:
        lora_A = [a.float() for a in lora_A]
        lora_B = [b.float() for b in lora_B]
    return torch.ops.fxfuse.lora_linear(x, weights, absmax, absmax2, code2, offset, lora_A, lora_B, bias, scaling,
                                        quant_type, out_features, in_features, blocksize, blocksize2, activation)[0]


def nf4_lora_linear(x, packed, absmax, s2_absmax, s2_code, offset, lora_A, lora_B, scaling, quant_type,
                    out_features, in_features, blocksize, blocksize2, bias=None, activation="none"):
    """PEFT LoRA (one active adapter, dropout 0) of one projection: `lora.Linear4bit.forward` on a 4-bit
    (quant_type "nf4" or "fp4") base, or `lora.Linear.forward` on a plain one (quant_type "none":
    `packed` is the bf16/fp16 weight, the quantization arguments None/0). With activation="swiglu_halves"
    it is the projection of silu(gate) * up, `x` being [gate | up] (ACTIVATIONS)."""
    return lora_linear_group(x, [packed], [absmax], [s2_absmax], [s2_code], [offset], [lora_A], [lora_B], bias,
                             scaling, quant_type, [out_features], in_features, blocksize, blocksize2, activation)
