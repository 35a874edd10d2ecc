"""Exact flash attention (forward and FlashAttention-2 backward) as Triton kernels.

For q [B, Hq, S, D] and k, v [B, Hkv, S, D] (grouped-query attention: Hq a multiple of Hkv, query head
h reads key/value head h // (Hq // Hkv); k and v are never repeated in memory) the kernels compute

    out = softmax(scale * q @ k^T + mask) @ v,    lse = logsumexp of the masked, scaled scores

with fp32 accumulation and the output rounded once to the input dtype, and the gradients dq, dk, dv
in fp32, each rounded once. The mask is the conjunction of three optional parts, all per token:
- causal: key j is visible to query i only if j <= i;
- key padding: a boolean [B, S] (True = a real token, the convention of Hugging Face's
  `attention_mask`); a False key is invisible to every query of its batch row. Left and right
  padding are both just this mask;
- segments: int32 [B, S] segment ids (packed sequences, TRL's padding-free batches): key j is
  visible to query i only if both carry the same id.

The bar is `fxfuse.testing.assert_exact` against a float64 evaluation, with the stock path being
SDPA's math backend, which for bf16/fp16 upcasts to fp32 and rounds once at the end (measured on
torch 2.13): so every product here must be fp32-accurate, not just fp32-accumulated. Scores q @ k^T
and dP = dO @ v^T multiply two 16-bit tiles (each product is exact in fp32) and go through tl.dot
directly. The products with an fp32 operand (P @ V, P^T @ dO, dS @ K, dS^T @ Q) split that operand
into hi + lo 16-bit halves and make two tensor-core dots: hi + lo carries ~16 bits of the fp32
value, against the 8 (bf16) the usual single cast would keep, which alone costs more error than the
final rounding of the output. Under Triton's interpreter, whose bf16 tl.dot is wrong in 3.6, the
fp32 operand and the 16-bit tile are upcast and multiplied as fp32 instead (the GPU path's numerics
are emulated in tests/test_flash_attention.py: with a single cast the errors reached 1.35-2.2x the
stock path's, with the split they equal it). fp16 caveat: dS is split into fp16 halves, so a
|dS| = |P (dP - delta)| beyond 65504 would overflow (stock fp16 flash kernels share this).

Rows with no visible key (e.g. a left-padded first token under a causal mask) give out = 0, a zero
dq, and contribute nothing to dk and dv; their lse is stored as +inf so that the backward's
exp(s - lse) is 0 there without a special case. Stock SDPA (torch 2.13, math and CPU flash
backends) also returns 0 and zero gradients there (its `_safe_softmax`); older torch and a plain
softmax give NaN.

NaN: a NaN in a query row makes that output row and its lse NaN, as stock. In the backward the
NaN lse makes exp(s - lse) NaN for every key of the blocks the row's loops visit, masked or not, as
in the math backend (whose additive mask gives NaN + -inf = NaN); key blocks that the causal bounds
skip stay finite, so under a causal mask dk and dv can have fewer NaN than the math backend's.
Without a causal mask the gradients' NaN pattern is the stock one (tested).

Backward (FlashAttention-2, no atomics, deterministic): one kernel per query block loops over the
key blocks twice, first for the row term delta = sum_j P_ij dP_ij (in fp32 from the scores, not the
usual rowsum(dO * O) of the rounded output: see _bwd_dq_kernel), then for dq; then one kernel per
key block of one kv head loops over the Hq / Hkv query heads of its group and over the query
blocks, accumulating dk and dv in registers (the GQA sum over the group is a plain loop in a fixed
order). The backward needs q, k, v, dO and lse, not the output. Knows nothing of graphs or autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import div_rn, interpreted, round_to

__all__ = ["MIN_HEAD_DIM", "MAX_HEAD_DIM", "flash_attention_forward", "flash_attention_backward"]

# Llama-family head dims are 64..128; D is padded to the next power of two (80 and 96 run in a 128
# block with the tail masked). Above 128 the backward's register tiles would spill badly.
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128

# Tile sizes. tl.dot needs every dimension >= 16. Interpreted (CPU), small tiles keep the tests'
# short sequences spread over several blocks, so the loops, their causal bounds and the tail
# masks are all exercised; on the GPU, the usual FlashAttention-2 shapes for D <= 128.
_FWD_BLOCK_M, _FWD_BLOCK_N = 64, 64
_BWD_BLOCK_M, _BWD_BLOCK_N = 64, 64
_INTERPRETED_BLOCK = 16


@triton.jit
def _dot_lowp(a, b, FP32_DOT: tl.constexpr):
    """a @ b for two 16-bit tiles: the products are exact in fp32, accumulated in fp32."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_f32(a, b, FP32_DOT: tl.constexpr):
    """a @ b for an fp32 tile a and a 16-bit tile b, about fp32-accurate.

    a = hi + lo with hi = a rounded to b's dtype and lo the rounded remainder: two 16-bit dots
    (tensor cores) carry 2 x 8 (bf16) or 2 x 11 (fp16) bits of a, where a single cast would keep 8
    or 11 and cost more error than the output's own rounding."""
    if FP32_DOT:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return tl.dot(lo, b, tl.dot(hi, b))


@triton.jit
def _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, b, S, seg_q,
             CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: query offs_m may see key offs_n (both in range, and every mask agrees)."""
    valid = m_mask[:, None] & n_mask[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_KPM:
        keep = tl.load(KPM + b * S + offs_n, mask=n_mask, other=0)
        valid = valid & (keep != 0)[None, :]
    if HAS_SEG:
        # Out-of-range keys load -2 and out-of-range queries -1: never equal to each other, and the
        # range masks above already exclude both.
        seg_k = tl.load(SEG + b * S + offs_n, mask=n_mask, other=-2)
        valid = valid & (seg_q[:, None] == seg_k[None, :])
    return valid


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, SEG,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                H, GROUP, S, D, scale,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                FP32_DOT: tl.constexpr, SOFT_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < D
    q_ptrs = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    seg_q = offs_m  # placeholder when there are no segments; never read
    if HAS_SEG:
        seg_q = tl.load(SEG + b * S + offs_m, mask=m_mask, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causal: key blocks past this query block's last row are invisible to all of its rows.
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot_lowp(q, tl.trans(k), FP32_DOT) * scale
        valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, b, S, seg_q, CAUSAL, HAS_KPM, HAS_SEG)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While a row has seen no visible key its max is -inf; subtracting 0 instead keeps
        # exp(-inf - -inf) = NaN out (p and alpha are then exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_f32(p, v, FP32_DOT)
        m_i = m_new

    # l == 0 only for a row with no visible key (otherwise its max term contributes exp(0) = 1):
    # out = 0 there (acc is 0) and lse = +inf so that the backward's exp(s - lse) is 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    out = div_rn(acc, l_safe[:, None], tl.float32)
    lse = tl.where(empty, float("inf"), m_fin + tl.log(l_safe))
    # O and LSE are contiguous [B, H, S, D] and [B, H, S].
    o_ptrs = O + (bh.to(tl.int64) * S + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, round_to(out, O.dtype.element_ty, SOFT_BF16), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=m_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, SEG,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                     H, HKV, GROUP, S, D, scale,
                     CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     FP32_DOT: tl.constexpr, SOFT_BF16: tl.constexpr):
    # One program per (key block, batch, kv head); the tiles are kept transposed ([keys, queries])
    # so that every fp32 operand enters tl.dot on the left without a transpose.
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < S
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Causal: query blocks wholly before this key block cannot see any of its keys.
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        for start_m in range(lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < S
            qm = m_mask[:, None] & d_mask[None, :]
            q_ptrs = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :]
            q = tl.load(q_ptrs, mask=qm, other=0.0)
            do = tl.load(DO + (bh * S + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :], mask=qm, other=0.0)
            lse = tl.load(LSE + bh * S + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + bh * S + offs_m, mask=m_mask, other=0.0)
            seg_q = offs_m
            if HAS_SEG:
                seg_q = tl.load(SEG + b * S + offs_m, mask=m_mask, other=-1)
            valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, b, S, seg_q, CAUSAL, HAS_KPM, HAS_SEG)
            s_t = _dot_lowp(k, tl.trans(q), FP32_DOT) * scale
            s_t = tl.where(tl.trans(valid), s_t, float("-inf"))
            # exp(-inf - lse) = 0 for invisible pairs, including rows with no visible key (lse = +inf).
            p_t = tl.exp(s_t - lse[None, :])
            dv += _dot_f32(p_t, do, FP32_DOT)
            dp_t = _dot_lowp(v, tl.trans(do), FP32_DOT)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot_f32(ds_t, q, FP32_DOT)
    dk = dk * scale
    out_offs = (bhk.to(tl.int64) * S + offs_n.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(DK + out_offs, round_to(dk, DK.dtype.element_ty, SOFT_BF16), mask=kv_mask)
    tl.store(DV + out_offs, round_to(dv, DV.dtype.element_ty, SOFT_BF16), mask=kv_mask)


@triton.jit
def _dq_block(q, do, lse, k_base, v_base, start_n, offs_m, offs_d, m_mask, d_mask, sks, svs, scale,
              KPM, SEG, b, S, seg_q, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
              FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one key block of the dq kernel: the keys, P (recomputed from the scores and lse) and dP."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < S
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _dot_lowp(q, tl.trans(k), FP32_DOT) * scale
    valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, b, S, seg_q, CAUSAL, HAS_KPM, HAS_SEG)
    s = tl.where(valid, s, float("-inf"))
    p = tl.exp(s - lse[:, None])
    dp = _dot_lowp(do, tl.trans(v), FP32_DOT)
    return k, p, dp


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, SEG,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                   H, GROUP, S, D, scale,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   FP32_DOT: tl.constexpr, SOFT_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < D
    qm = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :], mask=qm, other=0.0)
    row_offs = (bh * S + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :]
    do = tl.load(DO + row_offs, mask=qm, other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=m_mask, other=0.0)
    seg_q = offs_m
    if HAS_SEG:
        seg_q = tl.load(SEG + b * S + offs_m, mask=m_mask, other=-1)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    # First pass: delta = sum_j P_ij dP_ij, the softmax backward's row term, in fp32. The usual
    # rowsum(dO * O) reads the output *rounded* to bf16, and that rounding alone put dq's and dk's
    # RMS error at 1.3-1.4x the stock path's (which does this sum in fp32); recomputing it from the
    # scores costs two dots per block and keeps it fp32-accurate (and the backward never reads O).
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, p, dp = _dq_block(q, do, lse, k_base, v_base, start_n, offs_m, offs_d, m_mask, d_mask, sks, svs, scale,
                             KPM, SEG, b, S, seg_q, CAUSAL, HAS_KPM, HAS_SEG, FP32_DOT, BLOCK_N)
        delta += tl.sum(p * dp, axis=1)
    # The dk/dv kernel, launched after this one, reads it.
    tl.store(DELTA + bh * S + offs_m, delta, mask=m_mask)

    # Second pass: dq = scale * sum_j dS_ij k_j with dS = P * (dP - delta).
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, p, dp = _dq_block(q, do, lse, k_base, v_base, start_n, offs_m, offs_d, m_mask, d_mask, sks, svs, scale,
                             KPM, SEG, b, S, seg_q, CAUSAL, HAS_KPM, HAS_SEG, FP32_DOT, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot_f32(ds, k, FP32_DOT)
    dq = dq * scale
    tl.store(DQ + row_offs, round_to(dq, DQ.dtype.element_ty, SOFT_BF16), mask=qm)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(fwd: bool) -> tuple[int, int]:
    if interpreted():
        return _INTERPRETED_BLOCK, _INTERPRETED_BLOCK
    return (_FWD_BLOCK_M, _FWD_BLOCK_N) if fwd else (_BWD_BLOCK_M, _BWD_BLOCK_N)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, segment_ids) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be 4-D [B, H, S, D], got {shape}")
        if t.stride(3) != 1:
            raise ValueError(f"flash_attention: {name}'s last dim must be contiguous (strides {t.stride()})")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype of bf16/fp16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flash_attention: q, k, v on {q.device}, {k.device}, {v.device}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"flash_attention: k and v must be [B, Hkv, S, D] for q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"flash_attention: query heads {hq} must be a multiple of kv heads {hkv}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim {d} must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.dtype != torch.bool or tuple(m.shape) != (b, s) or m.device != q.device or not m.is_contiguous():
            raise ValueError(f"flash_attention: key_padding_mask must be a contiguous bool [{b}, {s}] on {q.device}, "
                             f"got {m.dtype} {tuple(m.shape)} on {m.device}")
    if segment_ids is not None:
        g = segment_ids
        if g.dtype != torch.int32 or tuple(g.shape) != (b, s) or g.device != q.device or not g.is_contiguous():
            raise ValueError(f"flash_attention: segment_ids must be a contiguous int32 [{b}, {s}] on {q.device}, "
                             f"got {g.dtype} {tuple(g.shape)} on {g.device}")
    return b, hq, hkv, s, d


def _buffer(name: str, buf, shape, dtype, device) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"flash_attention: {name} must be a contiguous {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


def _mask_args(q, key_padding_mask, segment_ids):
    # A kernel never reads a pointer whose HAS_* flag is off; q stands in for it.
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    seg = segment_ids if segment_ids is not None else q
    return kpm, seg, key_padding_mask is not None, segment_ids is not None


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                            key_padding_mask: torch.Tensor | None = None,
                            segment_ids: torch.Tensor | None = None,
                            out: torch.Tensor | None = None,
                            lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q @ k^T, masked) @ v. Returns (out [B, Hq, S, D] contiguous in q.dtype,
    lse [B, Hq, S] float32, +inf for rows with no visible key). `out` / `lse_out` are written if given."""
    b, hq, hkv, s, d = _check(q, k, v, key_padding_mask, segment_ids)
    out = _buffer("out", out, (b, hq, s, d), q.dtype, q.device)
    lse = _buffer("lse_out", lse_out, (b, hq, s), torch.float32, q.device)
    if b * hq * s == 0:
        return out, lse
    kpm, seg, has_kpm, has_seg = _mask_args(q, key_padding_mask, segment_ids)
    block_m, block_n = _blocks(True)
    interp = interpreted()
    _fwd_kernel[(_cdiv(s, block_m), b * hq)](
        q, k, v, out, lse, kpm, seg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, hq // hkv, s, d, float(scale),
        CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_SEG=has_seg,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
        FP32_DOT=interp, SOFT_BF16=interp, num_warps=4)
    return out, lse


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool, scale: float,
                             key_padding_mask: torch.Tensor | None = None,
                             segment_ids: torch.Tensor | None = None,
                             dq_out: torch.Tensor | None = None,
                             dk_out: torch.Tensor | None = None,
                             dv_out: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of flash_attention_forward: (dq, dk, dv), contiguous, in q.dtype; dk and dv summed
    over the query heads of each GQA group. `lse` is the forward's; the output itself is not needed.
    `dq_out` / `dk_out` / `dv_out` are written if given."""
    b, hq, hkv, s, d = _check(q, k, v, key_padding_mask, segment_ids)
    if (tuple(dout.shape) != (b, hq, s, d) or dout.dtype != q.dtype or dout.device != q.device
            or not dout.is_contiguous()):
        raise ValueError(f"flash_attention: dout must be a contiguous {(b, hq, s, d)} {q.dtype} on {q.device}, "
                         f"got {tuple(dout.shape)} {dout.dtype}")
    if tuple(lse.shape) != (b, hq, s) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"flash_attention: lse must be a contiguous float32 {(b, hq, s)}")
    dq = _buffer("dq_out", dq_out, (b, hq, s, d), q.dtype, q.device)
    dk = _buffer("dk_out", dk_out, (b, hkv, s, d), q.dtype, q.device)
    dv = _buffer("dv_out", dv_out, (b, hkv, s, d), q.dtype, q.device)
    if b * hq * s == 0:
        return dq, dk, dv
    kpm, seg, has_kpm, has_seg = _mask_args(q, key_padding_mask, segment_ids)
    block_m, block_n = _blocks(False)
    block_d = triton.next_power_of_2(d)
    interp = interpreted()
    # Written by the dq kernel, read by the dk/dv kernel.
    delta = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    flags = dict(CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_SEG=has_seg, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=block_d, FP32_DOT=interp, SOFT_BF16=interp, num_warps=4)
    _bwd_dq_kernel[(_cdiv(s, block_m), b * hq)](
        q, k, v, dout, lse, delta, dq, kpm, seg, *strides,
        hq, hq // hkv, s, d, float(scale), **flags)
    _bwd_dkdv_kernel[(_cdiv(s, block_n), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, kpm, seg, *strides,
        hq, hkv, hq // hkv, s, d, float(scale), **flags)
    return dq, dk, dv
