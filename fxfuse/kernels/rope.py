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

__all__ = ["rope_forward", "rope_backward", "rope_qk_forward", "rope_qk_backward", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_ROWS = 16  # rows (one head of one token each) per program


@triton.jit
def _rope_rows(X, COS, SIN, OUT, pid, R, H, T, sxb, sxh, sxt, scb, sct, ssb, sst,
               HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
               BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Rows pid * BLOCK_R ... of one [B, H, T, D] tensor: rotated (or, BACKWARD, un-rotated) into OUT."""
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
    # Products of two 16-bit floats are exact in fp32: each round_to below is the one rounding the stock
    # op makes. LLVM narrows round(a*b) + round(c*d) to 16-bit ops (exact) and would then contract them
    # into one fma.rn.bf16x2, dropping a product's rounding (sm_90, Triton 3.6: an ulp off on ~20% of
    # the elements): the launches turn FP contraction off (enable_fp_fusion=False).
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


# Sizes and strides are not specialised (Triton would otherwise compile a new kernel whenever the
# batch or the sequence length changes whether it is 1 or a multiple of 16).
@triton.jit(do_not_specialize=["R", "H", "T", "sxb", "sxh", "sxt", "scb", "sct", "ssb", "sst"])
def _rope_kernel(X, COS, SIN, OUT,
                 R, H, T,
                 sxb, sxh, sxt, scb, sct, ssb, sst,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                 BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr):
    _rope_rows(X, COS, SIN, OUT, tl.program_id(0), R, H, T, sxb, sxh, sxt, scb, sct, ssb, sst,
               HALF, BLOCK_HALF, BLOCK_R, BACKWARD, SOFT_BF16)


@triton.jit(do_not_specialize=["RQ", "HQ", "RK", "HK", "T", "PQ", "sqb", "sqh", "sqt", "skb", "skh", "skt",
                               "scb", "sct", "ssb", "sst"])
def _rope_qk_kernel(Q, K, COS, SIN, OUT_Q, OUT_K,
                    RQ, HQ, RK, HK, T, PQ,
                    sqb, sqh, sqt, skb, skh, skt, scb, sct, ssb, sst,
                    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                    BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr):
    # q and k in one launch: the first PQ programs take q's rows, the rest k's (GQA: k has fewer heads).
    pid = tl.program_id(0)
    if pid < PQ:
        _rope_rows(Q, COS, SIN, OUT_Q, pid, RQ, HQ, T, sqb, sqh, sqt, scb, sct, ssb, sst,
                   HALF, BLOCK_HALF, BLOCK_R, BACKWARD, SOFT_BF16)
    else:
        _rope_rows(K, COS, SIN, OUT_K, pid - PQ, RK, HK, T, skb, skh, skt, scb, sct, ssb, sst,
                   HALF, BLOCK_HALF, BLOCK_R, BACKWARD, SOFT_BF16)


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
                       BACKWARD=backward, SOFT_BF16=interpreted(), enable_fp_fusion=False)
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out=None) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rounded as the stock code rounds; returns a contiguous tensor."""
    return _launch(x, cos, sin, False, out)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out=None) -> torch.Tensor:
    """The gradient of rope_forward with respect to x (cos and sin are constants of the step)."""
    return _launch(dy, cos, sin, True, out)



def _launch_qk(q, k, cos, sin, backward: bool, out_q=None, out_k=None):
    _check(q, cos, sin)
    _check(k, cos, sin)
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share "
                         "batch, tokens, head_dim, dtype and device")
    b, hq, t, d = q.shape
    hk = k.shape[1]
    out_q = out_q if out_q is not None else torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    out_k = out_k if out_k is not None else torch.empty((b, hk, t, d), dtype=k.dtype, device=k.device)
    for name, o, x in (("out_q", out_q, q), ("out_k", out_k, k)):
        if tuple(o.shape) != tuple(x.shape) or o.dtype != x.dtype or not o.is_contiguous():
            raise ValueError(f"rope_qk: {name} must be a contiguous {tuple(x.shape)} {x.dtype}")
    rq, rk = b * hq * t, b * hk * t
    if rq + rk == 0:
        return out_q, out_k
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    half = d // 2
    pq = triton.cdiv(rq, _ROWS)
    grid = (pq + triton.cdiv(rk, _ROWS),)
    _rope_qk_kernel[grid](q, k, cos, sin, out_q, out_k, rq, hq, rk, hk, t, pq,
                          q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          cb, cos.stride(2), sb, sin.stride(2), HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
                          BLOCK_R=_ROWS, BACKWARD=backward, SOFT_BF16=interpreted(), enable_fp_fusion=False)
    return out_q, out_k


def rope_qk_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out_q=None,
                    out_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_forward of q [B, Hq, T, D] and of k [B, Hk, T, D] with the same cos/sin, in one launch."""
    return _launch_qk(q, k, cos, sin, False, out_q, out_k)


def rope_qk_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out_q=None,
                     out_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_backward of dq and of dk, in one launch."""
    return _launch_qk(dq, dk, cos, sin, True, out_q, out_k)
