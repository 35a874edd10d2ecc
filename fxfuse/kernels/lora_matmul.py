"""The rank-r products of LoRA on a frozen base, in Triton, in fp32 without fp32 copies of x or dy.

A LoRA linear is y = x @ W^T + s * (x @ A^T) @ B^T, with W frozen [N, K] (here a dequantized NF4
weight), A [r, K] and B [N, r] trainable in fp32, r small (8 to 128). PEFT runs the adapter path
in fp32: it makes an fp32 copy of x (kept for backward), an fp32 copy of dy and an fp32 [M, K]
gradient. The kernels here compute every adapter product from x and dy as they lie (bf16/fp16),
and only rank-r tensors (or one low-precision [M, N] term) come out:

    rank_r_project(p, q, scale)           out[M, r] = scale * (p @ q)
        xa  = x @ A^T               (scale 1)
        dxa = s * (dy @ B)
    rank_r_weight_grad(p, low, scale)     out[n, j] = scale * sum_m p[m, n] * low[m, j]
        dA  = (x^T @ dxa)^T         [r, K]   (transpose=True)
    lora_dy_grads(dy, B, xa, s)           (s * dy @ B, s * dy^T @ xa) from one read of dy
        dxa [M, r] and dB [N, r]: dy is the widest tensor of the backward (N = 14336 for gate/up),
        so reading it once instead of twice is the saving that matters
    lora_outer(low, right, scale, dtype)  out[M, N] = (scale * (low @ right) + bias).to(dtype)
        the adapter term of y (xa, B^T, s) and of dx (dxa, A, 1), to which the caller adds the
        frozen product inside cuBLAS's fp32 epilogue (an in-place addmm), so the sum is rounded once.
    split_columns_(dst, src, start, width, scale, left)   the bf16 parts of a rank-r factor as extra
        reduction columns of a bf16 GEMM operand (a K-extended GEMM: the adapter product
        accumulated with the frozen one, no [M, N] adapter term at all); rank_r_project and
        lora_dy_grads store the copy of x / dy that becomes the operand's first columns.

Precision. dA and dB are fp32 results, and PEFT computes them with fp32 GEMMs (cuBLAS SGEMM: IEEE
FMAs). The kernels match that on tensor cores: x and dy are exact in bf16 (fp16 splits exactly into
two bf16 parts), and the fp32 operand splits exactly into three bf16 parts (24 mantissa bits = 3 x 8),
so every product is exact. What must not happen is one MMA accumulator running through the whole
reduction: the H200's MMA pipeline keeps fewer than fp32's bits as it accumulates (measured at
K=4096: 33x SGEMM's error with one chained Triton accumulator, 4.4x through cuBLAS's bf16 GEMM). Each
block of the reduction (BLOCK_K or BLOCK_M = 128 wide) therefore gets a fresh accumulator, added to
the running sum with an fp32 add: 0.2x to 0.47x SGEMM's error at the Llama-3-8B shapes (a CUDA-core
FMA version was as exact and 5 to 10x slower). The reductions are split over programs until the SMs
are covered twice; the fp32 partials are summed in a fixed order (deterministic). The result of
lora_outer is rounded to bf16/fp16, far above any of those errors, so it uses tensor cores on a
two-part split of each operand (hi*hi + hi*lo + lo*hi: 16 mantissa bits per factor).

The scale is applied to the fp32 result (PEFT scales dy before its GEMM; the two orders differ by
one fp32 rounding, far below either result's own error). This module knows nothing of NF4 or
autograd. Interpreted (TRITON_INTERPRET=1), whose bf16 tl.dot is wrong in Triton 3.6, each block's
dot is one fp64 dot rounded to fp32 (the products exact, as on the tensor cores; the fp32 sums of
the blocks and of the partials as on the GPU): the CPU tests check the algorithm (indexing, masks,
splits, partial sums), the GPU run checks the tensor-core path's precision.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import interpreted, launch, round_to

__all__ = ["rank_r_project", "rank_r_weight_grad", "lora_dy_grads", "lora_outer", "split_columns_", "MAX_RANK"]

# Rank tiles are [*, RANK_P], RANK_P the next power of two >= max(r, 16) (tl.dot needs 16).
MAX_RANK = 128
# rank_r_project: the reduction over K is cut in pieces of this length (a program each), twice that
# for K >= 8192 (benchmarks/lora_kernels_sweep.py: 52 against 57 us at x 4096x14336 on the H200).
_K_PER_SPLIT = 1024
# lora_dy_grads: the columns of dy are shared out over at most _DY_SPLITS programs per row block,
# each taking at least _DY_COLS_PER_SPLIT_MIN columns (the dxa partials cost M * r * 4 bytes each).
_DY_SPLITS = 16
_DY_COLS_PER_SPLIT_MIN = 256
# Above this rank tile the two single-product kernels are faster than the fused one.
_DY_FUSED_MAX_RANK = 32


@triton.jit
def _split2(v):
    """Two bf16 tensors hi, lo with hi + lo = v to 16 mantissa bits (v fp32)."""
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _split3(v):
    """Three bf16 tensors whose fp32 sum is exactly v (fp32): 24 mantissa bits = 3 x 8."""
    v1 = v.to(tl.bfloat16)
    rest = v - v1.to(tl.float32)  # exact; at most 16 significant bits remain
    v2 = rest.to(tl.bfloat16)
    v3 = (rest - v2.to(tl.float32)).to(tl.bfloat16)  # at most 8 significant bits: exact in bf16
    return v1, v2, v3


@triton.jit
def _split3_for_dot(v, FP32_DOT: tl.constexpr):
    """_split3 of an fp32 operand that several dots reuse (FP32_DOT: v itself, three times)."""
    if FP32_DOT:
        return v, v, v
    else:
        return _split3(v)


@triton.jit
def _block_dot_split(a, b1, b2, b3, FP32_DOT: tl.constexpr, A_BF16: tl.constexpr):
    """a @ (b1 + b2 + b3) for one block, the fp32 operand given as its exact 3-way bf16 split."""
    if FP32_DOT:
        # Interpreted: the block's products summed in fp64 and rounded once (numpy's fp32 dot would
        # stand in for the GPU's exact-product MMA with a CPU summation order of its own).
        part = tl.dot(a.to(tl.float64), b1.to(tl.float64)).to(tl.float32)
    elif A_BF16:
        part = tl.dot(a, b3)
        part = tl.dot(a, b2, part)
        part = tl.dot(a, b1, part)
    else:
        a1, a2 = _split2(a.to(tl.float32))
        part = tl.dot(a2, b3)
        part = tl.dot(a2, b2, part)
        part = tl.dot(a1, b3, part)
        part = tl.dot(a2, b1, part)
        part = tl.dot(a1, b2, part)
        part = tl.dot(a1, b1, part)
    return part


@triton.jit
def _block_dot_exact(a, b, FP32_DOT: tl.constexpr, A_BF16: tl.constexpr):
    """a @ b for one block, a bf16/fp16 [X, BK], b fp32 [BK, Y]: exact products, fp32 sums.

    A fresh accumulator per block (the caller adds it to its running fp32 sum): chained through a
    whole reduction, the MMA accumulator loses bits (see the module docstring)."""
    b1, b2, b3 = _split3_for_dot(b, FP32_DOT)
    return _block_dot_split(a, b1, b2, b3, FP32_DOT, A_BF16)


@triton.jit
def _rank_r_project_kernel(
    P, Q, OUT, P_COPY, M, K, RANK, K_PER_SPLIT,
    stride_pm, stride_pk, stride_qk, stride_qr, stride_os, stride_om, stride_or, stride_cm,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
    FP32_DOT: tl.constexpr, P_BF16: tl.constexpr, COPY_P: tl.constexpr,
):
    """OUT[split] = scale * P[:, this split's K range] @ Q[range]; with COPY_P each tile of P read is
    also stored into P_COPY (row stride stride_cm): every element of P exactly once."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_P)
    m_mask = offs_m < M
    r_mask = offs_r < RANK
    rows = offs_m.to(tl.int64)
    k_start = pid_s * K_PER_SPLIT
    k_end = min(K, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, RANK_P), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        p = tl.load(P + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(Q + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if COPY_P:
            tl.store(P_COPY + rows[:, None] * stride_cm + offs_k[None, :], p, mask=m_mask[:, None] & k_mask[None, :])
        acc += _block_dot_exact(p, q, FP32_DOT, P_BF16)
    tl.store(OUT + pid_s * stride_os + rows[:, None] * stride_om + offs_r[None, :] * stride_or, acc * scale,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _rank_r_weight_grad_kernel(
    P, L, OUT, M, N, RANK, SPLITS,
    stride_pm, stride_pn, stride_lm, stride_lr, stride_os, stride_on, stride_or,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_P: tl.constexpr,
    FP32_DOT: tl.constexpr, P_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_P)
    n_mask = offs_n < N
    r_mask = offs_r < RANK
    acc = tl.zeros((BLOCK_N, RANK_P), dtype=tl.float32)
    # The tokens are shared out here, not by the caller: their number may change from call to
    # call under torch.compile's dynamic shapes while the grid stays the same.
    m_per_split = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_M) * BLOCK_M
    m_start = pid_s * m_per_split
    m_end = min(M, m_start + m_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        rows = offs_m.to(tl.int64)
        p = tl.load(P + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        low = tl.load(L + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc += _block_dot_exact(tl.trans(p), low, FP32_DOT, P_BF16)
    tl.store(OUT + pid_s * stride_os + offs_n[:, None] * stride_on + offs_r[None, :] * stride_or, acc * scale,
             mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _dy_rows(DY, B, DY_COPY, rows, offs_n, m_mask, n_mask, r_mask, offs_r, stride_dym, stride_dyn, stride_bn,
             stride_br, stride_cm, xa1, xa2, xa3, FP32_DOT: tl.constexpr, DY_BF16: tl.constexpr,
             COPY_DY: tl.constexpr):
    """For one [BLOCK_M, BLOCK_N] tile of dy: (dy @ B[cols], dy^T @ xa[rows]), each a fresh block
    (and, with COPY_DY, the tile stored into DY_COPY)."""
    dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                 mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    if COPY_DY:
        tl.store(DY_COPY + rows[:, None] * stride_cm + offs_n[None, :], dy, mask=m_mask[:, None] & n_mask[None, :])
    b = tl.load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    part_dxa = _block_dot_exact(dy, b, FP32_DOT, DY_BF16)
    part_db = _block_dot_split(tl.trans(dy), xa1, xa2, xa3, FP32_DOT, DY_BF16)
    return part_dxa, part_db


@triton.jit
def _lora_dy_kernel(
    DY, B, XA, DXA_PART, DB_PART, DY_COPY, M, N, RANK, N_PER_SPLIT,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xm, stride_xr,
    stride_das, stride_dam, stride_dar, stride_dbs, stride_dbn, stride_dbr, stride_cm,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_P: tl.constexpr,
    FP32_DOT: tl.constexpr, DY_BF16: tl.constexpr, COPY_DY: tl.constexpr,
):
    """dxa = scale * dy @ B and dB = scale * dy^T @ xa from ONE read of dy (the widest tensor of
    the LoRA backward): program (i, j) takes rows [2*BLOCK_M*i, +2*BLOCK_M) of dy and the j-th
    range of N_PER_SPLIT columns, in [BLOCK_M, BLOCK_N] tiles (two row halves: each dot's reduction
    stays BLOCK_M long, see the module docstring). It writes its partial dxa [rows, r] (summed over
    its columns) to DXA_PART[j] and, per column tile, its partial dB [cols, r] (summed over its
    rows) to DB_PART[i]; the caller adds the partials in a fixed order. With COPY_DY, dy is also
    stored into DY_COPY (row stride stride_cm) as it is read."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_r = tl.arange(0, RANK_P)
    r_mask = offs_r < RANK
    rows_a = pid_m * (2 * BLOCK_M) + tl.arange(0, BLOCK_M)
    rows_b = rows_a + BLOCK_M
    ma = rows_a < M
    mb = rows_b < M
    rows_a = rows_a.to(tl.int64)
    rows_b = rows_b.to(tl.int64)
    xa_a = tl.load(XA + rows_a[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                   mask=ma[:, None] & r_mask[None, :], other=0.0)
    xa_b = tl.load(XA + rows_b[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                   mask=mb[:, None] & r_mask[None, :], other=0.0)
    # xa's exact 3-way bf16 split, once for all the column tiles.
    a1, a2, a3 = _split3_for_dot(xa_a, FP32_DOT)
    b1, b2, b3 = _split3_for_dot(xa_b, FP32_DOT)
    acc_a = tl.zeros((BLOCK_M, RANK_P), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, RANK_P), dtype=tl.float32)
    n_start = pid_s * N_PER_SPLIT
    n_end = min(N, n_start + N_PER_SPLIT)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        dxa_a, db_a = _dy_rows(DY, B, DY_COPY, rows_a, offs_n, ma, n_mask, r_mask, offs_r, stride_dym, stride_dyn,
                               stride_bn, stride_br, stride_cm, a1, a2, a3, FP32_DOT, DY_BF16, COPY_DY)
        dxa_b, db_b = _dy_rows(DY, B, DY_COPY, rows_b, offs_n, mb, n_mask, r_mask, offs_r, stride_dym, stride_dyn,
                               stride_bn, stride_br, stride_cm, b1, b2, b3, FP32_DOT, DY_BF16, COPY_DY)
        acc_a += dxa_a
        acc_b += dxa_b
        cols = offs_n.to(tl.int64)
        tl.store(DB_PART + pid_m * stride_dbs + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                 (db_a + db_b) * scale, mask=n_mask[:, None] & r_mask[None, :])
    tl.store(DXA_PART + pid_s * stride_das + rows_a[:, None] * stride_dam + offs_r[None, :] * stride_dar,
             acc_a * scale, mask=ma[:, None] & r_mask[None, :])
    tl.store(DXA_PART + pid_s * stride_das + rows_b[:, None] * stride_dam + offs_r[None, :] * stride_dar,
             acc_b * scale, mask=mb[:, None] & r_mask[None, :])


@triton.jit
def _outer_block(L, R, rows, cols, m_mask, col_mask, r_start, r_end, stride_lm, stride_lr, stride_rr, stride_rn,
                 RANK_P: tl.constexpr, FP32_DOT: tl.constexpr):
    """low[rows, r_start:r_end] @ right[r_start:r_end, cols] in fp32 (the columns outside col_mask read as 0)."""
    offs_r = r_start + tl.arange(0, RANK_P)
    r_mask = offs_r < r_end
    low = tl.load(L + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                  mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    right = tl.load(R + offs_r[:, None] * stride_rr + cols[None, :] * stride_rn,
                    mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    if FP32_DOT:
        acc = tl.dot(low, right, input_precision="ieee")
    else:
        l_hi, l_lo = _split2(low)
        r_hi, r_lo = _split2(right)
        acc = tl.dot(l_lo, r_hi)
        acc = tl.dot(l_hi, r_lo, acc)
        acc = tl.dot(l_hi, r_hi, acc)
    return acc


@triton.jit
def _lora_outer_kernel(
    L, R, BIAS, OUT, M, N, RANK, G1_COL, G2_COL, G1_RANK, G2_RANK,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_P: tl.constexpr, GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """OUT = rnd(scale * low @ right (+ bias)), one [BLOCK_M, BLOCK_N] tile each.

    With GROUPS > 1 the columns are GROUPS side-by-side projections (starting at 0, G1_COL, G2_COL)
    with ranks [0, G1_RANK), [G1_RANK, G2_RANK), [G2_RANK, RANK): a column reads only its own
    projection's rank rows, so a tile does the dot of its own projection (two where it straddles a
    boundary), never the whole block-diagonal rank."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :] * stride_on
    if GROUPS == 1:
        acc = _outer_block(L, R, rows, cols, m_mask, n_mask, 0, RANK, stride_lm, stride_lr, stride_rr, stride_rn,
                           RANK_P, FP32_DOT)
    else:
        tile_lo = pid_n * BLOCK_N
        tile_hi = tile_lo + BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            if g == 0:
                c0, c1, r0, r1 = 0, G1_COL, 0, G1_RANK
            elif g == 1:
                c0, c1, r0, r1 = G1_COL, N, G1_RANK, RANK
                if GROUPS == 3:
                    c1, r1 = G2_COL, G2_RANK
            else:
                c0, c1, r0, r1 = G2_COL, N, G2_RANK, RANK
            if (tile_lo < c1) & (tile_hi > c0):
                acc += _outer_block(L, R, rows, cols, m_mask, n_mask & (offs_n >= c0) & (offs_n < c1), r0, r1,
                                    stride_lm, stride_lr, stride_rr, stride_rn, RANK_P, FP32_DOT)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, round_to(acc, OUT.dtype.element_ty, SOFT_BF16), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_columns_kernel(
    SRC, DST, N_I, RANK, WIDTH, start,
    stride_si, stride_sj, stride_di, stride_dc,
    scale,
    LEFT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """DST[i, start + c] for c < WIDTH: the bf16 parts of v = scale * SRC[i, j] (hi = rnd(v),
    lo = rnd(v - hi)) in three blocks of RANK columns, (hi, hi, lo) for the left operand of a GEMM
    and (hi, lo, hi) for the right one, then zeros up to WIDTH: the GEMM over those columns adds
    hi*hi + hi*lo + lo*hi, the adapter product to 16 bits per factor."""
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i_mask = offs_i < N_I
    c_mask = offs_c < WIDTH
    part = offs_c // RANK
    j = offs_c - part * RANK
    ii = offs_i.to(tl.int64)
    v = tl.load(SRC + ii[:, None] * stride_si + j[None, :] * stride_sj,
                mask=i_mask[:, None] & (c_mask & (part < 3))[None, :], other=0.0) * scale
    hi = round_to(v, tl.bfloat16, SOFT_BF16)
    lo = round_to(v - hi.to(tl.float32), tl.bfloat16, SOFT_BF16)
    lo_part: tl.constexpr = 2 if LEFT else 1
    value = tl.where((part == lo_part)[None, :], lo, hi)
    tl.store(DST + ii[:, None] * stride_di + (start + offs_c).to(tl.int64)[None, :] * stride_dc, value,
             mask=i_mask[:, None] & c_mask[None, :])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _rank_p(rank: int) -> int:
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"LoRA rank {rank} not supported (1 to {MAX_RANK})")
    return max(16, triton.next_power_of_2(rank))


def lora_dy_can_copy(rank: int) -> bool:
    """Whether lora_dy_grads takes copy_to at this rank (only its fused kernel stores dy)."""
    return _rank_p(rank) <= _DY_FUSED_MAX_RANK


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_type: str, index) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 4


def _check(name: str, p: torch.Tensor, fp32: torch.Tensor) -> None:
    if p.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: the activation operand must be bf16 or fp16, got {p.dtype}")
    if fp32.dtype != torch.float32:
        raise ValueError(f"{name}: the adapter operand must be fp32, got {fp32.dtype}")
    if p.device != fp32.device:
        raise ValueError(f"{name}: operands on {p.device} and {fp32.device}")


def rank_r_project(p: torch.Tensor, q: torch.Tensor, scale: float = 1.0, copy_to: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """out[M, r] = scale * (p @ q) in fp32. p [M, K] bf16/fp16; q [K, r] fp32; any strides.

    copy_to: a [M, >= K] tensor of p's dtype with unit column stride, whose first K columns receive
    p as it is read (the left operand of a K-extended GEMM, without a second read of p)."""
    _check("rank_r_project", p, q)
    M, K = p.shape
    r = q.shape[1]
    if q.shape[0] != K:
        raise ValueError(f"rank_r_project: p {tuple(p.shape)} and q {tuple(q.shape)} do not chain")
    _check_copy("rank_r_project", copy_to, p, K)
    rank_p = _rank_p(r)
    interp = interpreted()
    block_m, block_k = (16, 32) if interp else (64, 128)
    # The reduction is split in pieces of _K_PER_SPLIT (from K alone, so the grid does not depend on
    # the token count); the fp32 partials are added below in a fixed order (deterministic).
    # (Interpreted, pieces of 128 keep the partial sums exercised at test sizes.)
    piece = 128 if interp else (2 * _K_PER_SPLIT if K >= 8192 else _K_PER_SPLIT)
    k_per_split = max(block_k, min(triton.cdiv(max(K, 1), block_k) * block_k, piece))
    split = triton.cdiv(max(K, 1), k_per_split)
    partial = torch.empty((split, M, r), dtype=torch.float32, device=p.device)
    if M == 0:
        return partial[0]
    launch(_rank_r_project_kernel, p)[(triton.cdiv(M, block_m), split)](
        # Without a copy P_COPY is never written; `q` stands in.
        p, q, partial, copy_to if copy_to is not None else q, M, K, r, k_per_split, p.stride(0), p.stride(1),
        q.stride(0), q.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        copy_to.stride(0) if copy_to is not None else 0, float(scale),
        BLOCK_M=block_m, BLOCK_K=block_k, RANK_P=rank_p, FP32_DOT=interp, P_BF16=p.dtype == torch.bfloat16,
        COPY_P=copy_to is not None, num_warps=4, num_stages=2)
    return partial[0] if split == 1 else partial.sum(0)


def _check_copy(name: str, copy_to: torch.Tensor | None, p: torch.Tensor, cols: int) -> None:
    if copy_to is None:
        return
    if copy_to.dtype != p.dtype or copy_to.device != p.device or copy_to.dim() != 2 or \
            copy_to.shape[0] != p.shape[0] or copy_to.shape[1] < cols or copy_to.stride(1) != 1:
        raise ValueError(f"{name}: copy_to must be a [{p.shape[0]}, >= {cols}] {p.dtype} tensor with unit column "
                         f"stride, got {copy_to.dtype} {tuple(copy_to.shape)} strides {copy_to.stride()}")


def rank_r_weight_grad(p: torch.Tensor, low: torch.Tensor, scale: float = 1.0, transpose: bool = False
                       ) -> torch.Tensor:
    """out[n, j] = scale * sum_m p[m, n] * low[m, j], fp32.

    p [M, N] bf16/fp16, low [M, r] fp32. Returns [N, r], or with transpose=True its transpose
    [r, N] (contiguous: dA's layout).
    """
    _check("rank_r_weight_grad", p, low)
    M, N = p.shape
    r = low.shape[1]
    if low.shape[0] != M:
        raise ValueError(f"rank_r_weight_grad: p {tuple(p.shape)} and low {tuple(low.shape)} do not chain")
    rank_p = _rank_p(r)
    interp = interpreted()
    block_n, block_m = (32, 32) if interp else (64, 128)
    n_tiles = triton.cdiv(N, block_n)
    # Enough programs to cover the SMs twice: each sums its share of the tokens into its own fp32
    # partial, and the partials are added below in a fixed order (deterministic).
    split = max(1, triton.cdiv(2 * _sm_count(p.device), max(n_tiles, 1)))
    partial = torch.empty((split, r, N) if transpose else (split, N, r), dtype=torch.float32, device=p.device)
    s_on, s_or = (partial.stride(2), partial.stride(1)) if transpose else (partial.stride(1), partial.stride(2))
    if N == 0:
        return partial[0]
    launch(_rank_r_weight_grad_kernel, p)[(n_tiles, split)](
        p, low, partial, M, N, r, split,
        p.stride(0), p.stride(1), low.stride(0), low.stride(1), partial.stride(0), s_on, s_or,
        float(scale), BLOCK_M=block_m, BLOCK_N=block_n, RANK_P=rank_p, FP32_DOT=interp,
        P_BF16=p.dtype == torch.bfloat16, num_warps=4)
    return partial[0] if split == 1 else partial.sum(0)


def lora_dy_grads(dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, scale: float,
                  copy_to: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxa, dB) = (scale * dy @ b, scale * dy^T @ xa) in fp32 from one read of dy.

    dy [M, N] bf16/fp16, b [N, r] fp32 (LoRA's B, or the block diagonal of a group's), xa [M, r]
    fp32. Returns dxa [M, r] and dB [N, r]. The same products as rank_r_project(dy, b, scale) and
    rank_r_weight_grad(dy, xa, scale), with the same precision (fresh accumulators per block).
    copy_to: as for rank_r_project, receives dy in its first N columns (only with the fused kernel,
    rank tiles up to 32)."""
    _check("lora_dy_grads", dy, b)
    _check("lora_dy_grads", dy, xa)
    M, N = dy.shape
    r = b.shape[1]
    if b.shape[0] != N or xa.shape != (M, r):
        raise ValueError(f"lora_dy_grads: dy {tuple(dy.shape)}, b {tuple(b.shape)} and xa {tuple(xa.shape)} "
                         f"do not chain")
    rank_p = _rank_p(r)
    interp = interpreted()
    _check_copy("lora_dy_grads", copy_to, dy, N)
    if not lora_dy_can_copy(r):
        if copy_to is not None:
            raise ValueError(f"lora_dy_grads: copy_to needs a rank of at most {_DY_FUSED_MAX_RANK}, got {r}")
        # Wide rank tiles (a q/k/v group: r = 48 -> 64) make the fused kernel slower than two passes
        # (benchmarks/lora_kernels_sweep.py: 147 us at dy 4096x6144 on the H200).
        return rank_r_project(dy, b, scale), rank_r_weight_grad(dy, xa, scale)
    # Launch shape from benchmarks/lora_kernels_sweep.py (H200): 4 warps and 2 stages beat 8 and 3 by
    # 30% at dy 4096x14336.
    block_m, block_n = (16, 32) if interp else (128, 64)
    # Columns shared out statically (from N only: the token count may change under dynamic shapes);
    # rows in blocks of 2 * block_m. Partials: dxa [n_splits, M, r], dB [row blocks, N, r].
    n_splits = max(1, min(triton.cdiv(N, 64 if interp else _DY_COLS_PER_SPLIT_MIN), _DY_SPLITS))
    n_per_split = triton.cdiv(triton.cdiv(max(N, 1), n_splits), block_n) * block_n
    m_blocks = triton.cdiv(M, 2 * block_m)
    dxa_part = torch.empty((n_splits, M, r), dtype=torch.float32, device=dy.device)
    db_part = torch.empty((m_blocks, N, r), dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0:
        return dxa_part.new_zeros(M, r), db_part.new_zeros(N, r)
    launch(_lora_dy_kernel, dy)[(m_blocks, n_splits)](
        # Without a copy DY_COPY is never written; `b` stands in.
        dy, b, xa, dxa_part, db_part, copy_to if copy_to is not None else b, M, N, r, n_per_split,
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), xa.stride(0), xa.stride(1),
        dxa_part.stride(0), dxa_part.stride(1), dxa_part.stride(2), db_part.stride(0), db_part.stride(1),
        db_part.stride(2), copy_to.stride(0) if copy_to is not None else 0, float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, RANK_P=rank_p, FP32_DOT=interp, DY_BF16=dy.dtype == torch.bfloat16,
        COPY_DY=copy_to is not None, num_warps=4, num_stages=2)
    return (dxa_part[0] if n_splits == 1 else dxa_part.sum(0)), (db_part[0] if m_blocks == 1 else db_part.sum(0))


def lora_outer(low: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype,
               bias: torch.Tensor | None = None, groups: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """out[M, N] = (scale * (low @ right) + bias).to(dtype): low [M, r], right [r, N] fp32, any
    strides; bias [N] (any float dtype, contiguous) or None. Computed in fp32, rounded once.

    groups: the (columns, rank) of side-by-side projections (at most 3) whose adapters share low
    and right block-diagonally (a q/k/v or gate/up group): each column then reads only its own
    block, so a tile does its projection's products, not the group's whole rank, and right's
    blocks off the diagonal are never read."""
    if low.dtype != torch.float32 or right.dtype != torch.float32:
        raise ValueError(f"lora_outer: operands must be fp32, got {low.dtype} and {right.dtype}")
    M, r = low.shape
    if right.shape[0] != r:
        raise ValueError(f"lora_outer: low {tuple(low.shape)} and right {tuple(right.shape)} do not chain")
    N = right.shape[1]
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"lora_outer: bias must be a contiguous [{N}] tensor, got {tuple(bias.shape)}")
    groups = list(groups) if groups is not None and len(groups) > 1 else [(N, r)]
    if sum(n for n, _ in groups) != N or sum(k for _, k in groups) != r or len(groups) > 3:
        raise ValueError(f"lora_outer: groups {groups} do not partition [{r}, {N}] in at most 3 blocks")
    out = torch.empty((M, N), dtype=dtype, device=low.device)
    if M == 0 or N == 0:
        return out
    col_starts, rank_starts = [0], [0]
    for n, k in groups[:-1]:
        col_starts.append(col_starts[-1] + n)
        rank_starts.append(rank_starts[-1] + k)
    col_starts += [N] * (3 - len(col_starts))
    rank_starts += [r] * (3 - len(rank_starts))
    interp = interpreted()
    block_m, block_n = (16, 32) if interp else (64, 128)
    launch(_lora_outer_kernel, low)[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        # Without a bias the kernel never reads BIAS; `low` stands in (not `out`: an output passed as
        # a second argument too makes torch.compile copy it first, as if the kernel read it).
        low, right, bias if bias is not None else low, out, M, N, r, col_starts[1], col_starts[2], rank_starts[1],
        rank_starts[2], low.stride(0), low.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        float(scale), BLOCK_M=block_m, BLOCK_N=block_n, RANK_P=_rank_p(max(k for _, k in groups)),
        GROUPS=len(groups), HAS_BIAS=bias is not None, FP32_DOT=interp, SOFT_BF16=interp, num_warps=4)
    return out


def split_columns_(dst: torch.Tensor, src: torch.Tensor, start: int, width: int, scale: float, left: bool,
                   transposed: bool = False) -> torch.Tensor:
    """Write the bf16 split of scale * src into columns [start, start + width) of dst, in place.

    For a rank-r product folded into a bf16 GEMM as extra reduction columns (a K-extended GEMM):
    with r = src.shape[1], the columns hold three blocks of r, (hi, hi, lo) of each value when
    left (the GEMM's left operand) and (hi, lo, hi) when not, then zeros up to width (>= 3r). So
    the GEMM adds hi*hi + hi*lo + lo*hi, the product to 16 bits per factor, in its fp32
    accumulator with the frozen product, and the output is rounded once. dst: bf16 [n, >= start +
    width] (with transposed, dst's rows are the columns written: the extra rows of a right operand
    [K, N] stored as [N, K]); src: fp32 [n, r], any strides."""
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        raise ValueError(f"split_columns_: dst must be bf16 and src fp32, got {dst.dtype} and {src.dtype}")
    n_i, r = src.shape
    stride_di, stride_dc = (dst.stride(1), dst.stride(0)) if transposed else (dst.stride(0), dst.stride(1))
    rows, cols = (dst.shape[1], dst.shape[0]) if transposed else tuple(dst.shape)
    if rows != n_i or start + width > cols or width < 3 * r:
        raise ValueError(f"split_columns_: src {tuple(src.shape)} does not fit columns [{start}, {start + width}) of "
                         f"dst {tuple(dst.shape)}{' (transposed)' if transposed else ''}")
    if n_i == 0 or width == 0:
        return dst
    interp = interpreted()
    block_i, block_c = (16, 32) if interp else (64, 64)
    launch(_split_columns_kernel, src)[(triton.cdiv(n_i, block_i), triton.cdiv(width, block_c))](
        src, dst, n_i, max(r, 1), width, start, src.stride(0), src.stride(1), stride_di, stride_dc, float(scale),
        LEFT=left, BLOCK_I=block_i, BLOCK_C=block_c, SOFT_BF16=interp, num_warps=4)
    return dst
