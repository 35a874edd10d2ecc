"""Rotary position embedding (HF `apply_rotary_pos_emb` with `rotate_half`) as Triton kernels.

The stock code computes, for one of q or k (x of [B, H, T, D], cos/sin of [B or 1, 1, T, D]):

    out = x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin

in x.dtype, each product rounded to x.dtype and then the sum rounded once more. These kernels make
exactly those roundings, so the result is bit-equal to the stock one; the backward likewise
reproduces the stock gradient: dx = dy * cos plus the rotated dy * sin, each rounded, then summed.

x may be strided (q and k are `view(...).transpose(1, 2)` of a projection's output): rows (b, h, t)
are addressed through the strides, and the output is written contiguous. cos/sin broadcast over heads
(and over the batch when their batch size is 1). Knows nothing of graphs or autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreted, round_to

__all__ = ["rope_forward", "rope_backward", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_ROWS = 16  # rows (one head of one token each) per program


@triton.jit
def _rope_kernel(X, COS, SIN, OUT,
                 R, H, T,
                 sxb, sxh, sxt, scb, sct, ssb, sst,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                 BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols < HALF)[None, :]
    t = rows % T
    h = (rows // T) % H
    b = rows // (T * H)
    x_row = b * sxb + h * sxh + t * sxt
    c_row = b * scb + t * sct
    s_row = b * ssb + t * sst
    # The last dim is contiguous for every operand (checked by the wrapper).
    x1 = tl.load(X + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + c_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + s_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + s_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    # Products of two 16-bit floats are exact in fp32: each round_to below is the one rounding
    # the stock op makes, so no FMA contraction can change the result.
    if BACKWARD:
        # x1 feeds out[..., D/2:] through sin's second half, x2 feeds out[..., :D/2] negated.
        o1 = round_to(x1 * c1, dt, SOFT_BF16).to(tl.float32) + round_to(x2 * s2, dt, SOFT_BF16).to(tl.float32)
        o2 = round_to(x2 * c2, dt, SOFT_BF16).to(tl.float32) - round_to(x1 * s1, dt, SOFT_BF16).to(tl.float32)
    else:
        o1 = round_to(x1 * c1, dt, SOFT_BF16).to(tl.float32) - round_to(x2 * s1, dt, SOFT_BF16).to(tl.float32)
        o2 = round_to(x2 * c2, dt, SOFT_BF16).to(tl.float32) + round_to(x1 * s2, dt, SOFT_BF16).to(tl.float32)
    out_row = rows * (2 * HALF)
    tl.store(OUT + out_row[:, None] + cols[None, :], round_to(o1, dt, SOFT_BF16), mask=mask)
    tl.store(OUT + out_row[:, None] + HALF + cols[None, :], round_to(o2, dt, SOFT_BF16), mask=mask)




def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"rope: x must be [B, H, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"rope: x, cos, sin must share a dtype of bf16/fp16, got {x.dtype}, {cos.dtype}, {sin.dtype}")
    b, _, t, d = x.shape
    if d % 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"rope: head_dim {d} must be even and <= {MAX_HEAD_DIM}")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 4 or c.shape[1] != 1 or c.shape[0] not in (1, b) or c.shape[2] != t or c.shape[3] != d:
            raise ValueError(f"rope: {name} must be [B or 1, 1, T, D] for x {tuple(x.shape)}, got {tuple(c.shape)}")
        if c.stride(3) != 1:
            raise ValueError(f"rope: {name}'s last dim must be contiguous")
    if x.stride(3) != 1:
        raise ValueError("rope: x's last dim must be contiguous")


def _launch(x, cos, sin, backward: bool, out=None) -> torch.Tensor:
    _check(x, cos, sin)
    b, h, t, d = x.shape
    if out is None:
        out = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    rows = b * h * t
    if rows == 0:
        return out
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    half = d // 2
    grid = (triton.cdiv(rows, _ROWS),)
    _rope_kernel[grid](x, cos, sin, out, rows, h, t, x.stride(0), x.stride(1), x.stride(2), cb, cos.stride(2),
                       sb, sin.stride(2), HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_R=_ROWS,
                       BACKWARD=backward, SOFT_BF16=interpreted())
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out=None) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rounded as the stock code rounds; returns a contiguous tensor."""
    return _launch(x, cos, sin, False, out)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out=None) -> torch.Tensor:
    """The gradient of rope_forward with respect to x (cos and sin are constants of the step)."""
    return _launch(dy, cos, sin, True, out)
