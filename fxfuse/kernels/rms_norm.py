"""RMSNorm forward and backward as Triton kernels, with the numerics of Hugging Face `LlamaRMSNorm`.

The stock module computes

    h = x.to(float32); var = h.pow(2).mean(-1, keepdim=True); h = h * torch.rsqrt(var + eps)
    y = weight * h.to(x.dtype)

that is, for bf16/fp16 x: the normalisation in fp32, one rounding of the normalised value to
x.dtype, then the weight multiply, formed in fp32 and rounded once more. The forward kernel makes
exactly those roundings (its y is bit-for-bit the stock one, up to the order of the row sum), while
reading each row once: a row of x lives in registers from load to store.

    rms_norm_forward(x, weight, eps)        -> (y, rstd)   rstd = 1/sqrt(mean(x^2) + eps), fp32 [M]
    rms_norm_backward(dy, x, weight, rstd)  -> (dx, dw)

The backward keeps no fp32 copy of x: it recomputes xhat = x * rstd from x and the saved rstd
(the same fp32 multiply as the forward's, hence the same bits), and does its math in fp32. Like
the stock backward, it rounds g = dy * weight to x.dtype first (the gradient of the low-precision
product `weight * h.to(x.dtype)`), so its dx equals the stock dx almost everywhere; dx is then
rounded once. dw is reduced without atomics, so it is deterministic: a fixed
number of persistent programs (one per SM on the GPU) each accumulate their rows into one row of
a small [num_programs, N] buffer, and a second kernel sums that buffer's columns.

The bar is `fxfuse.testing.assert_exact`: error against a float64 evaluation no larger than 1.25x
the stock path's. Two choices follow from it (both measured, see tests/test_rms_norm_kernel.py):
- dw sums dy * xhat with the *unrounded* xhat. The stock path multiplies by the bf16-rounded
  xhat; doing the same made dw's error depend on luck (up to 1.5x stock on some random inputs),
  whereas the unrounded sum, rounded once, is never less accurate than stock.
- fp32 inputs are computed in fp64 (one rounding per output; the backward recomputes rstd in fp64
  when given eps). In fp32 the kernels would make as many roundings as the stock fp32 path and
  pass or fail the bar by luck. fp32 is a side path: Llama training runs bf16.

This module knows nothing of graphs or autograd; callers own those. It supports 2-D contiguous
[M, N] inputs of bf16, fp16 or fp32 with N <= MAX_HIDDEN.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import div_rn, interpreted, launch, round_to

__all__ = ["MAX_HIDDEN", "rms_norm_forward", "rms_norm_backward"]

# The kernels hold a whole row in registers, so N is bounded by what one program can keep live.
# At N = 65536 a row is 64 Ki fp32 values; with 16 warps (512 threads) that is 128 registers per
# thread per live row-sized tensor, and the backward keeps about three (x, dy, the dw accumulator):
# far past the 255-register limit, so the compiler spills to local memory (slower, still correct:
# checked exact on an H200 for all three dtypes at N = 65536). Beyond that a one-pass design stops
# paying and a chunked two-pass kernel is the right tool. LLM hidden sizes (<= ~18432) fit easily.
MAX_HIDDEN = 65536

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# For small N, several rows share a program so that each program still moves a useful amount of
# data (and launches stay few); the tile is capped at this many elements.
_TILE_ELEMS = 4096

# Backward launch shape on the GPU, from a sweep on an H200 (benchmarks/rms_norm.py --sweep; bf16,
# M x N of 4096x4096, 8192x4096, 4096x8192). Persistent programs, one per SM, each walking its rows
# with the loads of the next row blocks issued ahead (STAGES=3 software pipelining, through
# shared memory) beat more programs without pipelining by ~30%: 36/60/61 us against 48/78/90 us
# for 4 programs/SM and no pipelining. One program per SM also keeps the dw partial buffer small.
_BWD_PROGRAMS_PER_SM = 1
_BWD_STAGES = 3
# The backward tile (rows per loop iteration x BLOCK_N): 2 rows of 4096 per iteration beat 1.
_BWD_TILE_ELEMS = 8192
# Pipelining keeps STAGES copies of the x and dy tiles in shared memory; past this budget (the
# H100/H200 have 228 KB per SM) it is turned off rather than failing to compile for large N.
_BWD_SMEM_BUDGET = 160 * 1024
# num_warps overrides for tuning sweeps (None: chosen from the tile size).
_BWD_WARPS = None
_FWD_WARPS = None
# Backward programs when interpreted (CPU): the interpreter runs programs one after another, so
# their count only sets the partial buffer's height; a few keep the row-striding path exercised.
_BWD_PROGRAMS_INTERPRETED = 3

# Column-block and row-block of the dw partial reduction.
_DW_BLOCK_C = 32
_DW_BLOCK_R = 64


@triton.jit
def _rstd(sum_sq, N, eps, ACC: tl.constexpr):
    """1 / sqrt(sum_sq / N + eps), each step correctly rounded in ACC."""
    # `/` and tl.sqrt on fp32 are approximate on NVIDIA GPUs (div.full, sqrt.approx); these run
    # once per row, so the correctly rounded forms cost nothing measurable. For fp64, `/` and
    # tl.sqrt already are the IEEE ones (sqrt_rn/div_rn accept only fp32).
    # N as a tensor of sum_sq's type: under Inductor a size it knows statically arrives as a constant,
    # which div_rn (tensors only) would refuse.
    n = tl.zeros_like(sum_sq) + N
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(sum_sq / n + eps)
    else:
        return tl.math.div_rn(tl.full(sum_sq.shape, 1.0, tl.float32), tl.sqrt_rn(tl.math.div_rn(sum_sq, n) + eps))


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, WIDE: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 before the multiply: row * N overflows int32 for tensors of more than 2^31 elements.
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

    # Padding lanes load 0 so they add nothing to the sum of squares.
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    rstd = _rstd(tl.sum(x * x, axis=1), N, eps, ACC)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    xhat = x * rstd[:, None]
    if WIDE:
        # fp32 input, fp64 math: one rounding at the end. HF's `.to(input_dtype)` is a no-op for
        # fp32, so there is no intermediate rounding to reproduce.
        y = w[None, :] * xhat
    else:
        # HF rounds the normalised value to x.dtype *before* the weight multiply; so must we.
        # The product of two bf16/fp16 values is exact in fp32, so y below is rounded once.
        y = w[None, :] * round_to(xhat, Y.dtype.element_ty, SOFT_BF16).to(ACC)

    tl.store(Y + offs, round_to(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)
    tl.store(RSTD + rows, rstd.to(tl.float32), mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NEED_DW: tl.constexpr,
    ACC: tl.constexpr, RECOMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # The weight is loaded once per program and reused for all of its rows.
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    # Kept 2-D so the cross-row reduction happens once, after the loop, not once per row block.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)

    # Persistent programs: a fixed, small number of programs walk the row blocks with a stride,
    # so the dw partial buffer has only num_programs rows whatever M is.
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for block in tl.range(pid, num_row_blocks, num_programs, num_stages=STAGES):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

        # Masked lanes load 0 (rstd too), so they contribute 0 to the row sums and to dw.
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        if RECOMPUTE:
            # The saved rstd was rounded to fp32; recompute it in fp64 from the row we hold anyway.
            rstd = _rstd(tl.sum(x * x, axis=1), N, eps, ACC)
            rstd = tl.where(row_mask, rstd, 0.0)
        else:
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        # Same multiply as in the forward, hence the same bits as the forward's xhat.
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        if not RECOMPUTE:
            # The stock backward rounds dy * w to x.dtype (it is the gradient of the bf16 product
            # `weight * h.to(x.dtype)`) before going on in fp32. Doing the same keeps dx bit-equal to
            # the stock dx almost everywhere, so whole-model gradients track eager's rounding for
            # rounding instead of drifting by an equally accurate but different one.
            g = round_to(g, DX.dtype.element_ty, SOFT_BF16).to(ACC)
        # d/dx of w * x * rstd(x): rstd * (g - xhat * mean(g * xhat)); eps is inside rstd.
        gx = tl.sum(g * xhat, axis=1)
        c = div_rn(gx, tl.zeros_like(gx) + N, ACC)
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(DX + offs, round_to(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)

        if NEED_DW:
            # The unrounded xhat: dw is then the float64 reference's sum up to fp32 accumulation
            # error, rounded once, so never less accurate than the stock path (which multiplies by
            # the bf16-rounded xhat and rounds each product). With the rounded xhat here, dw's
            # error reached 1.5x the stock error on some random inputs (see the module docstring).
            dw_acc += dy * xhat

    if NEED_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    P, DW,
    R, N,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & col_mask[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    # One rounding, accumulator -> weight dtype, at the very end.
    dw = tl.sum(acc, axis=0)
    tl.store(DW + cols, round_to(dw, DW.dtype.element_ty, SOFT_BF16), mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------



def _acc(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype for inputs of `dtype`: fp64 for fp32, else fp32."""
    if dtype == torch.float32:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _num_warps(tile_elems: int) -> int:
    if tile_elems <= 2048:
        return 4
    if tile_elems <= 8192:
        return 8
    return 16


# Plain Python on the launch path: triton.cdiv and triton.next_power_of_2 go through Triton's
# JIT-function call machinery, a few microseconds each on every launch.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bwd_stages(block_m: int, block_n: int, elem_size: int) -> int:
    smem = _BWD_STAGES * block_m * block_n * 2 * elem_size  # x and dy tiles
    return _BWD_STAGES if smem <= _BWD_SMEM_BUDGET else 1


def _blocks(n: int, tile_elems: int | None = None) -> tuple[int, int]:
    block_n = 1 << (n - 1).bit_length()
    block_m = max(1, (tile_elems or _TILE_ELEMS) // block_n)
    return block_m, block_n


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_backward_programs(device: torch.device) -> int:
    if device.type == "cuda" and not interpreted():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = _sm_count(idx) * _BWD_PROGRAMS_PER_SM
    else:
        target = _BWD_PROGRAMS_INTERPRETED
    # Not fewer for a short M: the count must not depend on the token count (one compiled graph for
    # every length under torch.compile's dynamic shapes); a program without rows writes a zero partial.
    return max(1, target)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"rms_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"rms_norm: {name} must be 2-D [M, N], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: {name} dtype {t.dtype} not supported (bf16, fp16 or fp32)")
    if not t.is_contiguous():
        raise ValueError(f"rms_norm: {name} must be contiguous (strides {t.stride()})")


def _check_common(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    _check_2d("x", x)
    m, n = x.shape
    if n == 0:
        raise ValueError("rms_norm: hidden size N must be > 0")
    if n > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size N={n} exceeds MAX_HIDDEN={MAX_HIDDEN} "
                         f"supported by the one-pass kernels")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != n:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"rms_norm: weight must be 1-D of length N={n}, got {shape}")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if not weight.is_contiguous():
        raise ValueError("rms_norm: weight must be contiguous")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight on {weight.device}, x on {x.device}")
    return m, n


def _check_buffer(name: str, buf: torch.Tensor, shape, dtype, device) -> None:
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"rms_norm: {name} must be a torch.Tensor")
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
        raise ValueError(f"rms_norm: {name} must be {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    if not buf.is_contiguous():
        raise ValueError(f"rms_norm: {name} must be contiguous")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     out: torch.Tensor | None = None,
                     rstd_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), HF LlamaRMSNorm numerics.

    x: contiguous [M, N] (bf16, fp16 or fp32); weight: [N], same dtype; eps: python float.
    Returns (y [M, N] in x.dtype, rstd [M] float32). `out` / `rstd_out` are written if given.
    """
    m, n = _check_common(x, weight)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_buffer("out", out, (m, n), x.dtype, x.device)
    if rstd_out is None:
        rstd_out = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        _check_buffer("rstd_out", rstd_out, (m,), torch.float32, x.device)
    if m == 0:
        return out, rstd_out

    block_m, block_n = _blocks(n)
    grid = (_cdiv(m, block_m),)
    launch(_rms_norm_fwd_kernel, x)[grid](
        x, weight, out, rstd_out,
        m, n, float(eps),
        BLOCK_M=block_m, BLOCK_N=block_n,
        ACC=_acc(x.dtype)[0], WIDE=x.dtype == torch.float32, SOFT_BF16=interpreted(),
        num_warps=_FWD_WARPS or _num_warps(block_m * block_n),
    )
    return out, rstd_out


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                      need_weight_grad: bool = True,
                      dx_out: torch.Tensor | None = None,
                      eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of rms_norm_forward: (dx [M, N] in x.dtype, dw [N] in weight.dtype, or None).

    dy, x: contiguous [M, N] of x.dtype; rstd: the forward's float32 [M]. With xhat = x * rstd and
    g = dy * weight (rounded to x.dtype, as the stock backward does): dx = rstd * (g - xhat *
    mean(g * xhat)), dw = sum over rows of dy * xhat, in fp32 (fp64 for fp32 inputs), each output
    rounded once. `dx_out` is written if given.
    `eps` is used only for fp32 inputs: given, rstd is recomputed in fp64 from x instead of read
    from the fp32 `rstd` (whose rounding alone would cost fp32 gradients about half an ulp).
    """
    m, n = _check_common(x, weight)
    _check_2d("dy", dy)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"rms_norm: dy must match x ({tuple(x.shape)} {x.dtype} on {x.device}), "
                         f"got {tuple(dy.shape)} {dy.dtype} on {dy.device}")
    _check_buffer("rstd", rstd, (m,), torch.float32, x.device)
    if dx_out is None:
        dx_out = torch.empty_like(x)
    else:
        _check_buffer("dx_out", dx_out, (m, n), x.dtype, x.device)
    if m == 0:
        dw = torch.zeros(n, dtype=weight.dtype, device=x.device) if need_weight_grad else None
        return dx_out, dw

    block_m, block_n = _blocks(n, _BWD_TILE_ELEMS)
    programs = _num_backward_programs(x.device)
    acc_tl, acc_torch = _acc(x.dtype)
    soft = interpreted()
    recompute = x.dtype == torch.float32 and eps is not None
    # Every program stores its whole partial row (zeros if it had no rows): empty() is safe.
    # Without dw the kernel never touches the pointer; rstd stands in for it (not dx_out: an output
    # passed twice makes torch.compile copy it first).
    partial = torch.empty((programs, n), dtype=acc_torch, device=x.device) if need_weight_grad else rstd
    launch(_rms_norm_bwd_kernel, x)[(programs,)](
        dy, x, weight, rstd, dx_out, partial,
        m, n, float(eps) if recompute else 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, NEED_DW=bool(need_weight_grad),
        ACC=acc_tl, RECOMPUTE=recompute, SOFT_BF16=soft,
        STAGES=_bwd_stages(block_m, block_n, x.element_size()),
        num_warps=_BWD_WARPS or _num_warps(block_m * block_n),
    )
    if not need_weight_grad:
        return dx_out, None

    dw = torch.empty(n, dtype=weight.dtype, device=x.device)
    launch(_sum_partials_kernel, x)[(_cdiv(n, _DW_BLOCK_C),)](
        partial, dw, programs, n,
        BLOCK_R=_DW_BLOCK_R, BLOCK_C=_DW_BLOCK_C, ACC=acc_tl, SOFT_BF16=soft,
        num_warps=4,
    )
    return dx_out, dw
