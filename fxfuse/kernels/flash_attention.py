"""Exact flash attention (forward and FlashAttention-2 backward) as Triton kernels.

For q [B, Hq, S, D] and k, v [B, Hkv, S, D] (grouped-query attention: Hq a multiple of Hkv, query head
h reads key/value head h // (Hq // Hkv); k and v are never repeated in memory) the kernels compute

    out = softmax(scale * q @ k^T + mask) @ v,    lse = logsumexp of the masked, scaled scores

with fp32 accumulation and the output rounded once to the input dtype, and the gradients dq, dk, dv
in fp32, each rounded once. The mask is the conjunction of four optional parts:
- causal: key j is visible to query i only if j <= i;
- key padding: a boolean [B, S] (True = a real token, the convention of Hugging Face's
  `attention_mask`); a False key is invisible to every query of its batch row. Left and right
  padding are both just this mask;
- segments: int32 [B, S] segment ids (packed sequences, TRL's padding-free batches): key j is
  visible to query i only if both carry the same id;
- a dense attn_mask [B or 1, Hq or 1, S, S], either boolean (SDPA's boolean `attn_mask`: True = query
  i may attend to key j), for masks that the per-token parts cannot express, or additive in the input
  dtype (eager attention's: 0 or the dtype's minimum), added in fp32 to the scaled scores before the
  softmax, so a row whose keys all carry the minimum gets the stock eager answer, a uniform average.
  Either is read through its strides (a size-1 dim with stride 0), so an `expand`ed mask is never
  materialized. Since a boolean mask can blank out whole tiles anywhere, a (query block, key block)
  tile with no visible pair skips its dots (a scalar branch on the tile); without a boolean mask the
  branch is a constant and folds away, leaving the other masks' code as it was. The branch stops Triton 3.6 from
  software-pipelining the loop's loads (no cp.async), a trade measured on an H200 (2 x 32/8 heads,
  D 128, S 2048 and 8192, fwd + bwd): an all-True mask under `causal` costs 8-12% over `causal`
  alone, while a causal mask given densely (causal=False) takes 0.48-0.54x the time it takes with
  no skipping (pipelined), and a four-document block-diagonal mask 0.47x.

RoPE on load (optional cos, sin of [B or 1, S, D], Hugging Face's rotary embedding output before its
unsqueeze(1)): q and k are passed unrotated and every q or k tile is rotated as it is loaded, with
the roundings of fxfuse/kernels/rope.py (each product rounded to the 16-bit dtype, then the sum), so
the rotated tiles are bit-equal to what the stock RoPE writes and the rotated q and k never touch
memory. The backward returns the gradients of the unrotated q and k: dq (dk after the GQA group
sum) is rounded to the dtype, as the stock SDPA backward hands it to RoPE's backward, then goes
through that backward with its roundings. Fused, forward and backward are therefore bit-equal to
HF's RoPE (torch eager) + attention and attention backward + RoPE's autograd backward (checked on an
H200), and to rope_forward / rope_backward around the attention (tested under the interpreter). The
rotation reloads the tile at its partner columns (d +- D/2) and loads cos and sin: with them the
kernels pipeline two stages, not three, to stay within an A100's shared memory. Cost: the streamed
operand (k in the forward and dq kernels, q in the dk/dv kernel) is rotated again for every tile
it meets; on an H200 at 2 x 32/8 heads, S 4096, D 128, causal, the forward took 3.27 ms against
1.17 ms unrotated and the backward 13.1 ms against 8.8 ms (at S 2048, fwd + bwd 4.67 ms against
3.00 ms for rope.py's kernels around the attention).

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

NaN: a NaN in a query row makes that output row and its lse NaN, as stock (unless the row sees no
key at all: then it is 0 here, NaN in the math backend). In the backward the NaN lse makes
exp(s - lse) NaN for every key of the blocks the row's loops visit, masked or not, as in the math
backend (whose additive mask gives NaN + -inf = NaN); key blocks that the causal bounds skip, and
tiles that a dense mask blanks out, stay finite, so under those masks dk and dv can have fewer NaN
than the math backend's, never more. Without a causal or dense mask the gradients' NaN pattern is
the stock one (tested).

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

# Tiles and launch shapes on the GPU (tl.dot needs every dimension >= 16), picked by
# `benchmarks/attention.py --sweep` on an H200 from GPU_CONFIG_CANDIDATES (RESULTS.md, "Attention").
# Stages: the software pipeline's depth; with RoPE on load one less (see _stages).
# Swept 2026-12-03 (RoPE fused, causal, 2 x 32/8 heads, D 128, S 2048 and 8192): the 128-row forward
# with 8 warps took 0.56-0.65x the 64-row one; no backward candidate beat 64 x 64, 4 warps, 3 stages.
GPU_CONFIG = dict(fwd_block_m=128, fwd_block_n=64, fwd_warps=8, fwd_stages=2,
                  bwd_block_m=64, bwd_block_n=64, bwd_warps=4, bwd_stages=3)
GPU_CONFIG_CANDIDATES = [
    {},
    dict(fwd_block_m=128, fwd_warps=8),
    dict(fwd_block_m=128, fwd_block_n=32, fwd_warps=4),
    dict(fwd_block_m=128, fwd_block_n=64, fwd_warps=8, fwd_stages=2),
    dict(bwd_warps=8),
    dict(bwd_block_m=32, bwd_block_n=64),
    dict(bwd_block_m=64, bwd_block_n=128, bwd_warps=8),
    dict(bwd_block_m=32, bwd_block_n=128, bwd_warps=8),
    dict(bwd_stages=2),
]
# Interpreted (CPU), small tiles keep the tests' short sequences spread over several blocks, so the
# loops, their causal bounds and the tail masks are all exercised.
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
def _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, AM, b, h, S, seg_q, samb, samh, sams, samn,
             CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr):
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
    if HAS_MASK:
        # Broadcast dims of the dense mask come with stride 0; int64 offsets, as S * S can pass 2^31.
        am = tl.load(AM + b * samb + h * samh + offs_m.to(tl.int64)[:, None] * sams
                     + offs_n.to(tl.int64)[None, :] * samn, mask=m_mask[:, None] & n_mask[None, :], other=0)
        valid = valid & (am != 0)
    return valid


@triton.jit
def _add_mask(s, AM, rows, cols, r_mask, c_mask, s_row, s_col, shift, MASK_ADD: tl.constexpr):
    """s plus the additive mask's tile at rows x cols (AM already at the (batch, head) slice), in fp32
    as eager attention adds it to the scaled scores, less the mask's row maximum `shift` (broadcast
    to the tile); s itself without a mask.

    Why the shift: a softmax is blind to a constant per row, but the logsumexp saved for the backward
    is not. Where a row's keys all carry the dtype's minimum (-3.4e38 in bf16), every s + mask rounds
    to that minimum, in fp32 as in the stock bf16 and the float64 evaluations (all uniform rows);
    lse = max + log(count) would round to max, and the backward's exp(s - lse) would be 1, not
    1/count. Less the shift the row is all 0 and its lse log(count). Rows with an ordinary 0 in the
    mask have shift 0, and nothing changes."""
    if MASK_ADD:
        bias = tl.load(AM + rows.to(tl.int64)[:, None] * s_row + cols.to(tl.int64)[None, :] * s_col,
                       mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        s = (s + bias.to(tl.float32)) - shift
    return s


@triton.jit
def _mask_shift(AMX, offs_m, m_mask, MASK_ADD: tl.constexpr):
    """The additive mask's row maxima for queries offs_m (AMX at the (batch, head) slice)."""
    shift = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    if MASK_ADD:
        shift = tl.load(AMX + offs_m, mask=m_mask, other=0.0)
    return shift


@triton.jit
def _any_visible(valid, HAS_MASK: tl.constexpr):
    """Whether a tile has a visible pair, to skip the dots of one that has none. Only a dense mask
    makes that common and arbitrary (causal's empty tiles are outside the loop bounds); without one
    the answer is a constant and the branch folds away, leaving the other masks' code as it was."""
    if HAS_MASK:
        return tl.max(valid.to(tl.int32)) != 0
    else:
        return tl.full([], 1, tl.int1)


@triton.jit
def _load_rows(base, offs, stride, offs_d, mask, COS, SIN, b, scb, scs, ssb, sss, D,
               ROPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Rows `offs` of one head of q or k ([rows, BLOCK_D], the input dtype); with ROPE rotated on the
    way in, bit-equal to what fxfuse/kernels/rope.py (and HF's apply_rotary_pos_emb) would have written:
    x * cos + rotate_half(x) * sin, each product rounded to the dtype, then the sum rounded."""
    rows = offs.to(tl.int64)[:, None]
    x = tl.load(base + rows * stride + offs_d[None, :], mask=mask, other=0.0)
    if ROPE:
        half = D // 2
        first = offs_d < half
        # rotate_half(x)[d] = -x[d + D/2] in the first half, x[d - D/2] in the second: the same rows
        # loaded again at the partner columns (the same cache lines), the sign applied below.
        partner = tl.where(first, offs_d + half, offs_d - half)
        xp = tl.load(base + rows * stride + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + b * scb + rows * scs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * ssb + rows * sss + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dt = base.dtype.element_ty
        # Products of two 16-bit floats are exact in fp32, so each round_to is the stock rounding.
        # Keep the sum's sign in a select between two sums: written as one add of a signed product,
        # LLVM narrows round(a*b) + round(c*d) to bf16 ops and contracts them into one fma.rn.bf16x2,
        # dropping a product's rounding (sm_90, Triton 3.6: off by an ulp on ~20% of the elements;
        # rope.py's own kernels launch with FP contraction off instead, which here would reach the
        # softmax too). Checked on an H200: this form is bit-equal to HF's.
        xc = round_to(x.to(tl.float32) * c, dt, SOFT_BF16).to(tl.float32)
        xs = round_to(xp * s, dt, SOFT_BF16).to(tl.float32)
        x = round_to(tl.where(first[None, :], xc - xs, xc + xs), dt, SOFT_BF16)
    return x


@triton.jit
def _store_grad(PTR, ptr_offs, mask, g, offs, offs_d, COS, SIN, b, scb, scs, ssb, sss, D,
                ROPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Store the fp32 gradient g of rows `offs` rounded to the dtype; with ROPE, g is the gradient of
    the rotated q or k, and what is stored is the gradient of the unrotated one."""
    dt = PTR.dtype.element_ty
    g = round_to(g, dt, SOFT_BF16)
    if ROPE:
        # Rounded first, as the stock SDPA backward hands RoPE's backward a 16-bit gradient; then
        # that backward with its roundings (BACKWARD in fxfuse/kernels/rope.py), on full rows:
        # dx = round(dy * cos) + round(dy[partner] * sin[partner]) in the first half, minus in the
        # second. The partner columns of a register tile come by a gather along the row.
        half = D // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        gf = g.to(tl.float32)
        gp = tl.gather(gf, tl.broadcast_to(partner[None, :], gf.shape), axis=1)
        rows = offs.to(tl.int64)[:, None]
        c = tl.load(COS + b * scb + rows * scs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        sp = tl.load(SIN + b * ssb + rows * sss + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        # The select keeps the products' roundings from being contracted away (see _load_rows).
        gc = round_to(gf * c, dt, SOFT_BF16).to(tl.float32)
        gs = round_to(gp * sp, dt, SOFT_BF16).to(tl.float32)
        g = round_to(tl.where(first[None, :], gc + gs, gc - gs), dt, SOFT_BF16)
    tl.store(PTR + ptr_offs, g, mask=mask)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, SEG, AM, AMX, COS, SIN,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                samb, samh, sams, samn, sxb, sxh, scb, scs, ssb, sss,
                H, GROUP, S, D, scale,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
                MASK_ADD: tl.constexpr, ROPE: tl.constexpr,
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
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, m_mask[:, None] & d_mask[None, :],
                   COS, SIN, b, scb, scs, ssb, sss, D, ROPE, SOFT_BF16)
    seg_q = offs_m  # placeholder when there are no segments; never read
    shift = _mask_shift(AMX + b * sxb + h * sxh, offs_m, m_mask, MASK_ADD)
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
        k = _load_rows(k_base, offs_n, sks, offs_d, kv_mask, COS, SIN, b, scb, scs, ssb, sss, D, ROPE, SOFT_BF16)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, AM, b, h, S, seg_q, samb, samh, sams, samn,
                         CAUSAL, HAS_KPM, HAS_SEG, HAS_MASK)
        # A tile with no visible pair would leave m, l and acc as they are (p = 0, alpha = 1).
        if _any_visible(valid, HAS_MASK):
            s = _dot_lowp(q, tl.trans(k), FP32_DOT) * scale
            s = _add_mask(s, AM + b * samb + h * samh, offs_m, offs_n, m_mask, n_mask, sams, samn, shift[:, None],
                          MASK_ADD)
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
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, SEG, AM, AMX, COS, SIN,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                     samb, samh, sams, samn, sxb, sxh, scb, scs, ssb, sss,
                     H, HKV, GROUP, S, D, scale,
                     CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
                     MASK_ADD: tl.constexpr, ROPE: tl.constexpr,
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
    k = _load_rows(K + b * skb + hk * skh, offs_n, sks, offs_d, kv_mask, COS, SIN, b, scb, scs, ssb, sss, D,
                   ROPE, SOFT_BF16)
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
            q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, qm, COS, SIN, b, scb, scs, ssb, sss, D,
                           ROPE, SOFT_BF16)
            do = tl.load(DO + (bh * S + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :], mask=qm, other=0.0)
            lse = tl.load(LSE + bh * S + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + bh * S + offs_m, mask=m_mask, other=0.0)
            seg_q = offs_m
            shift = _mask_shift(AMX + b * sxb + h * sxh, offs_m, m_mask, MASK_ADD)
            if HAS_SEG:
                seg_q = tl.load(SEG + b * S + offs_m, mask=m_mask, other=-1)
            valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, AM, b, h, S, seg_q, samb, samh, sams, samn,
                             CAUSAL, HAS_KPM, HAS_SEG, HAS_MASK)
            # A tile with no visible pair adds exactly 0 to dk and dv (p = 0).
            if _any_visible(valid, HAS_MASK):
                s_t = _dot_lowp(k, tl.trans(q), FP32_DOT) * scale
                s_t = _add_mask(s_t, AM + b * samb + h * samh, offs_n, offs_m, n_mask, m_mask, samn, sams,
                                shift[None, :], MASK_ADD)
                s_t = tl.where(tl.trans(valid), s_t, float("-inf"))
                # exp(-inf - lse) = 0 for invisible pairs, including rows with no visible key (lse = +inf).
                p_t = tl.exp(s_t - lse[None, :])
                dv += _dot_f32(p_t, do, FP32_DOT)
                dp_t = _dot_lowp(v, tl.trans(do), FP32_DOT)
                # Where p = 1 (a row that sees one key) the exact dS is 0, but this dP and the dq kernel's,
                # which delta sums, are two dots rounded apart: their difference would leave ~1e-7 |dP|
                # where the stock softmax backward gives exactly 0. Elsewhere in such a row p < 2^-24.
                ds_t = tl.where(p_t == 1.0, 0.0, p_t * (dp_t - delta[None, :]))
                dk += _dot_f32(ds_t, q, FP32_DOT)
    dk = dk * scale
    out_offs = (bhk.to(tl.int64) * S + offs_n.to(tl.int64))[:, None] * D + offs_d[None, :]
    _store_grad(DK, out_offs, kv_mask, dk, offs_n, offs_d, COS, SIN, b, scb, scs, ssb, sss, D, ROPE, SOFT_BF16)
    tl.store(DV + out_offs, round_to(dv, DV.dtype.element_ty, SOFT_BF16), mask=kv_mask)


@triton.jit
def _dq_tiles(k_base, v_base, offs_m, m_mask, seg_q, offs_d, d_mask, sks, svs, start_n,
              KPM, SEG, AM, b, h, S, samb, samh, sams, samn, COS, SIN, scb, scs, ssb, sss, D,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
              MASK_ADD: tl.constexpr, ROPE: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one key block of the dq kernel: the keys, the values and which pairs are visible."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < S
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = _load_rows(k_base, offs_n, sks, offs_d, kv_mask, COS, SIN, b, scb, scs, ssb, sss, D, ROPE, SOFT_BF16)
    v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    valid = _visible(offs_m, offs_n, m_mask, n_mask, KPM, SEG, AM, b, h, S, seg_q, samb, samh, sams, samn,
                     CAUSAL, HAS_KPM, HAS_SEG, HAS_MASK)
    return k, v, valid, offs_n, n_mask


@triton.jit
def _dq_p_dp(q, do, lse, k, v, valid, scale, AM_bh, offs_m, offs_n, m_mask, n_mask, sams, samn, shift,
             MASK_ADD: tl.constexpr, FP32_DOT: tl.constexpr):
    """P (recomputed from the scores and lse) and dP of one key block of the dq kernel."""
    s = _dot_lowp(q, tl.trans(k), FP32_DOT) * scale
    s = _add_mask(s, AM_bh, offs_m, offs_n, m_mask, n_mask, sams, samn, shift[:, None], MASK_ADD)
    s = tl.where(valid, s, float("-inf"))
    p = tl.exp(s - lse[:, None])
    dp = _dot_lowp(do, tl.trans(v), FP32_DOT)
    return p, dp


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, SEG, AM, AMX, COS, SIN,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                   samb, samh, sams, samn, sxb, sxh, scb, scs, ssb, sss,
                   H, GROUP, S, D, scale,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
                   MASK_ADD: tl.constexpr, ROPE: tl.constexpr,
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
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, qm, COS, SIN, b, scb, scs, ssb, sss, D,
                   ROPE, SOFT_BF16)
    row_offs = (bh * S + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :]
    do = tl.load(DO + row_offs, mask=qm, other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=m_mask, other=0.0)
    shift = _mask_shift(AMX + b * sxb + h * sxh, offs_m, m_mask, MASK_ADD)
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
    # Tiles with no visible pair add exactly 0 (p = 0) to delta and dq and are skipped.
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, v, valid, offs_n, n_mask = _dq_tiles(
            k_base, v_base, offs_m, m_mask, seg_q, offs_d, d_mask, sks, svs, start_n,
            KPM, SEG, AM, b, h, S, samb, samh, sams, samn, COS, SIN, scb, scs, ssb, sss, D,
            CAUSAL, HAS_KPM, HAS_SEG, HAS_MASK, MASK_ADD, ROPE, SOFT_BF16, BLOCK_N)
        if _any_visible(valid, HAS_MASK):
            p, dp = _dq_p_dp(q, do, lse, k, v, valid, scale, AM + b * samb + h * samh, offs_m, offs_n, m_mask,
                             n_mask, sams, samn, shift, MASK_ADD, FP32_DOT)
            delta += tl.sum(p * dp, axis=1)
    # The dk/dv kernel, launched after this one, reads it.
    tl.store(DELTA + bh * S + offs_m, delta, mask=m_mask)

    # Second pass: dq = scale * sum_j dS_ij k_j with dS = P * (dP - delta).
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, v, valid, offs_n, n_mask = _dq_tiles(
            k_base, v_base, offs_m, m_mask, seg_q, offs_d, d_mask, sks, svs, start_n,
            KPM, SEG, AM, b, h, S, samb, samh, sams, samn, COS, SIN, scb, scs, ssb, sss, D,
            CAUSAL, HAS_KPM, HAS_SEG, HAS_MASK, MASK_ADD, ROPE, SOFT_BF16, BLOCK_N)
        if _any_visible(valid, HAS_MASK):
            p, dp = _dq_p_dp(q, do, lse, k, v, valid, scale, AM + b * samb + h * samh, offs_m, offs_n, m_mask,
                             n_mask, sams, samn, shift, MASK_ADD, FP32_DOT)
            ds = p * (dp - delta[:, None])
            dq += _dot_f32(ds, k, FP32_DOT)
    dq = dq * scale
    _store_grad(DQ, row_offs, qm, dq, offs_m, offs_d, COS, SIN, b, scb, scs, ssb, sss, D, ROPE, SOFT_BF16)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(fwd: bool, flags) -> dict:
    """BLOCK_M, BLOCK_N, num_warps and num_stages of the forward's or the backward's kernels."""
    if interpreted():
        return dict(BLOCK_M=_INTERPRETED_BLOCK, BLOCK_N=_INTERPRETED_BLOCK, num_warps=4, num_stages=1)
    c, pre = GPU_CONFIG, "fwd_" if fwd else "bwd_"
    # RoPE pipelines four more tiles per block (the partner columns, cos, sin: q's or k's again), which
    # at 3 stages took 225 KiB of shared memory per block, past the 163 KiB of an A100 (sm_80).
    stages = min(c[pre + "stages"], 2) if flags["ROPE"] else c[pre + "stages"]
    return dict(BLOCK_M=c[pre + "block_m"], BLOCK_N=c[pre + "block_n"], num_warps=c[pre + "warps"],
                num_stages=stages)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, segment_ids,
           attn_mask=None, cos=None, sin=None) -> tuple[int, ...]:
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
    if attn_mask is not None:
        m = attn_mask
        # Any strides (an expanded mask has stride 0); broadcast dims must be given with size 1.
        if (not isinstance(m, torch.Tensor) or m.dtype not in (torch.bool, q.dtype) or m.dim() != 4
                or m.shape[0] not in (1, b)
                or m.shape[1] not in (1, hq) or m.shape[2] != s or m.shape[3] != s or m.device != q.device):
            got = f"{m.dtype} {tuple(m.shape)} on {m.device}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"flash_attention: attn_mask must be [{b} or 1, {hq} or 1, {s}, {s}] on {q.device}, "
                             f"bool (True = attend) or additive in {q.dtype}, got {got}")
        if m.requires_grad:
            raise ValueError("flash_attention: attn_mask is a constant here; it must not require grad")
    if (cos is None) != (sin is None):
        raise ValueError("flash_attention: cos and sin must be given together")
    if cos is not None:
        if d % 2:
            raise ValueError(f"flash_attention: RoPE (cos, sin) needs an even head_dim, got {d}")
        for name, c in (("cos", cos), ("sin", sin)):
            if (not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[0] not in (1, b) or c.shape[1] != s
                    or c.shape[2] != d or c.dtype != q.dtype or c.device != q.device or c.stride(2) != 1):
                got = (f"{c.dtype} {tuple(c.shape)} strides {c.stride()} on {c.device}"
                       if isinstance(c, torch.Tensor) else type(c).__name__)
                raise ValueError(f"flash_attention: {name} must be [{b} or 1, {s}, {d}] in {q.dtype} on {q.device} "
                                 f"with its last dim contiguous, got {got}")
    return b, hq, hkv, s, d


def _buffer(name: str, buf, shape, dtype, device) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"flash_attention: {name} must be a contiguous {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


def _extra_args(q, key_padding_mask, segment_ids, attn_mask, cos, sin):
    """The kernels' mask and RoPE arguments: (pointers, strides, flags)."""
    # A kernel never reads a pointer whose HAS_* / ROPE flag is off; q stands in for it. Bool tensors
    # are passed as uint8 views (same bytes, any strides).
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    seg = segment_ids if segment_ids is not None else q
    amx, amx_strides = q, (0, 0)
    if attn_mask is not None:
        am = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        # A broadcast dim of size 1 is read at index 0 only: stride 0 whatever torch reports for it.
        am_strides = tuple(attn_mask.stride(i) if attn_mask.shape[i] > 1 else 0 for i in range(4))
        if attn_mask.dtype != torch.bool:
            # The additive mask's row maxima, subtracted from every score of the row (see _add_mask); a
            # row of -inf (nothing visible) keeps its -inf scores.
            amx = attn_mask.amax(dim=-1).float()
            amx = torch.where(amx == float("-inf"), 0.0, amx).contiguous()
            amx_strides = (amx.stride(0) if amx.shape[0] > 1 else 0, amx.stride(1) if amx.shape[1] > 1 else 0)
    else:
        am, am_strides = q, (0, 0, 0, 0)
    flags = dict(HAS_KPM=key_padding_mask is not None, HAS_SEG=segment_ids is not None,
                 HAS_MASK=attn_mask is not None and attn_mask.dtype == torch.bool,
                 MASK_ADD=attn_mask is not None and attn_mask.dtype != torch.bool, ROPE=cos is not None)
    if cos is not None:
        # cos/sin broadcast over heads always, and over the batch when theirs is 1.
        rope_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
                        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))
    else:
        cos, sin, rope_strides = q, q, (0, 0, 0, 0)
    return (kpm, seg, am, amx, cos, sin), am_strides + amx_strides + rope_strides, flags


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                            key_padding_mask: torch.Tensor | None = None,
                            segment_ids: torch.Tensor | None = None,
                            attn_mask: torch.Tensor | None = None,
                            cos: torch.Tensor | None = None,
                            sin: torch.Tensor | None = None,
                            out: torch.Tensor | None = None,
                            lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q @ k^T, masked) @ v. Returns (out [B, Hq, S, D] contiguous in q.dtype,
    lse [B, Hq, S] float32, +inf for rows with no visible key). `attn_mask` [B or 1, Hq or 1, S, S]: bool,
    True = attend, ANDed with the other masks; or additive in q.dtype, added to the scaled scores (lse is
    then that of the scores less the mask's row maximum: see _add_mask). `cos`, `sin` ([B or 1, S, D],
    q's dtype): q and k are rotated (HF RoPE) as they are loaded. `out` / `lse_out` are written if given."""
    b, hq, hkv, s, d = _check(q, k, v, key_padding_mask, segment_ids, attn_mask, cos, sin)
    out = _buffer("out", out, (b, hq, s, d), q.dtype, q.device)
    lse = _buffer("lse_out", lse_out, (b, hq, s), torch.float32, q.device)
    if b * hq * s == 0:
        return out, lse
    ptrs, extra_strides, flags = _extra_args(q, key_padding_mask, segment_ids, attn_mask, cos, sin)
    launch = _launch(True, flags)
    interp = interpreted()
    _fwd_kernel[(_cdiv(s, launch["BLOCK_M"]), b * hq)](
        q, k, v, out, lse, *ptrs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *extra_strides,
        hq, hq // hkv, s, d, float(scale),
        CAUSAL=bool(causal), **flags, **launch, BLOCK_D=triton.next_power_of_2(d),
        FP32_DOT=interp, SOFT_BF16=interp)
    return out, lse


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool, scale: float,
                             key_padding_mask: torch.Tensor | None = None,
                             segment_ids: torch.Tensor | None = None,
                             attn_mask: torch.Tensor | None = None,
                             cos: torch.Tensor | None = None,
                             sin: torch.Tensor | None = None,
                             dq_out: torch.Tensor | None = None,
                             dk_out: torch.Tensor | None = None,
                             dv_out: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of flash_attention_forward: (dq, dk, dv), contiguous, in q.dtype; dk and dv summed
    over the query heads of each GQA group. `lse` is the forward's; the output itself is not needed.
    With `cos`, `sin`, q and k are the unrotated inputs and dq, dk their gradients (RoPE's backward
    applied to the rounded gradients of the rotated ones). `dq_out` / `dk_out` / `dv_out` are
    written if given."""
    b, hq, hkv, s, d = _check(q, k, v, key_padding_mask, segment_ids, attn_mask, cos, sin)
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
    ptrs, extra_strides, flags = _extra_args(q, key_padding_mask, segment_ids, attn_mask, cos, sin)
    launch = _launch(False, flags)
    block_d = triton.next_power_of_2(d)
    interp = interpreted()
    # Written by the dq kernel, read by the dk/dv kernel.
    delta = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), *extra_strides)
    flags = dict(CAUSAL=bool(causal), **flags, **launch, BLOCK_D=block_d, FP32_DOT=interp, SOFT_BF16=interp)
    _bwd_dq_kernel[(_cdiv(s, launch["BLOCK_M"]), b * hq)](
        q, k, v, dout, lse, delta, dq, *ptrs, *strides,
        hq, hq // hkv, s, d, float(scale), **flags)
    _bwd_dkdv_kernel[(_cdiv(s, launch["BLOCK_N"]), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, *ptrs, *strides,
        hq, hkv, hq // hkv, s, d, float(scale), **flags)
    return dq, dk, dv
