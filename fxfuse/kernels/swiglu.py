"""SwiGLU, `silu(gate) * up`, forward and backward as Triton kernels, with the numerics of stock PyTorch.

Hugging Face's LlamaMLP computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with act_fn = nn.SiLU:
two ops, each of which (for bf16/fp16 inputs) computes in fp32 and rounds its result:

    s = silu(gate) = gate / (1 + exp(-gate))        fp32, rounded to gate.dtype
    h = s * up                                       fp32, rounded

and autograd's backward of the two:

    d_up   = dh * s                                  rounded
    d_s    = dh * up                                 rounded
    d_gate = silu_backward(d_s, gate)                fp32, rounded once
           = d_s * sig * (1 + gate * (1 - sig)),  sig = 1 / (1 + exp(-gate))

(aten's CPU and CUDA silu kernels, op for op, in this order). The kernels make exactly these roundings.
A product of two 16-bit values is exact in fp32, so each rounding above is the stock op's one, and
h, d_up and d_s are the stock bits wherever s is. s and sig depend on the exp implementation: on the
GPU the kernels call libdevice's expf (what the stock CUDA kernel's `exp` compiles to) and divide with
IEEE rounding (as nvcc's default `/` does); on the CPU (Triton interpreter) they round the float64 exp
to float32, within torch's own CPU exp (Sleef, 1 ulp). `1 + gate * (1 - sig)` is one fused
multiply-add, as nvcc contracts it in the stock CUDA kernel and as torch's CPU build evidently does.

Measured against stock on CPU (2M random elements per dtype, |gate| up to ~15): h and d_up are
bit-equal in bf16 and fp16; d_gate is bit-equal in bf16 and differs in 19 fp16 elements (one ulp,
at rounding ties; 154 without the FMA). Not run on a GPU yet (compiled for sm_90: PTX and cubin).

Nothing is kept for the backward but gate and up (the caller saves them): the backward recomputes
sig and s from gate with the same ops as the forward, hence the same bits, instead of reading a
saved s or h (a tensor of the MLP's intermediate size less per layer). It writes d_gate and d_up
into fresh buffers.

fp32 inputs are computed in fp64, one rounding per output (as fxfuse's RMSNorm does): in fp32 the
kernels would round as often as the stock fp32 path, and pass or fail `fxfuse.testing.assert_exact`'s
1.25x bar by luck. fp32 is a side path (Llama training runs bf16); on GPUs with slow fp64 it may be
compute-bound.

    swiglu_forward(gate, up)              -> h
    swiglu_backward(dh, gate, up)         -> (d_gate, d_up)

This module knows nothing of graphs or autograd. Inputs are tensors of any shape whose rows (the last
dimension) are contiguous, each with a row stride of its own (one program per row and BLOCK columns on the GPU):
contiguous tensors, and the two column halves of one gate,up projection output, read in place.
bf16, fp16 or fp32, all of one dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import div_rn, interpreted, round_to

__all__ = ["swiglu_forward", "swiglu_backward"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Columns per program. 1024 with 4 warps is 8 contiguous elements per thread: one 16-byte vector
# load per operand for bf16/fp16 (when the row strides are multiples of 8). Not tuned on a GPU yet.
_BLOCK = 1024
_NUM_WARPS = 4
_INTERPRETED_ROWS = 32


@triton.jit
def _exp(x, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        # The interpreter runs numpy's float32 exp, a few ulp off: fp16 h then differed from stock in
        # 410 of 2M elements, against none with the float64 exp rounded to float32 (the correctly
        # rounded expf nearly always). libdevice does not exist in the interpreter.
        return tl.exp(x.to(tl.float64)).to(x.dtype)
    else:
        # libdevice's expf/exp (the CUDA math library's), not tl.exp: for fp32, tl.exp is
        # ex2.approx(x * log2e), off by up to ~|x| ulp, where the stock CUDA kernel calls expf.
        return libdevice.exp(x)


@triton.jit
def _fma(a, b, c, ACC: tl.constexpr, INTERPRETED: tl.constexpr):
    """a * b + c with one rounding (for fp32; the fp64 path needs no particular rounding)."""
    if INTERPRETED:
        # The interpreter's tl.fma multiplies, rounds, then adds. The product of two fp32 values is
        # exact in fp64, so the sum rounded to fp32 is the fused result (save for a double rounding
        # when the fp64 sum lands exactly on an fp32 tie).
        if ACC == tl.float32:
            return (a.to(tl.float64) * b.to(tl.float64) + c).to(tl.float32)
        else:
            return a * b + c
    else:
        return tl.fma(a, b, c)


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, H,
    n_rows, cols, stride_g, stride_u, stride_h,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # Program (ROWS rows, column block): rows of a row stride of their own, so that gate and up can be
    # the two halves of one [.., 2N] projection output (the gate,up group's) without a copy.
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    offs = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < n_rows) & (offs < cols)
    # Masked lanes load 0 (silu(0) = 0, no NaN to trip over) and are never stored.
    g = tl.load(GATE + rows * stride_g + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(UP + rows * stride_u + offs, mask=mask, other=0.0).to(ACC)
    dt = H.dtype.element_ty
    # silu as aten writes it: gate / (1 + exp(-gate)), not gate * sigmoid(gate) (other bits).
    s = div_rn(g, 1.0 + _exp(-g, INTERPRETED), ACC)
    if not WIDE:
        # The stock silu op rounds its output before the multiply; so must we. The product of two
        # bf16/fp16 values is then exact in fp32, and h below is rounded once, as stock's mul.
        s = round_to(s, dt, INTERPRETED).to(ACC)
    tl.store(H + rows * stride_h + offs, round_to(s * u, dt, INTERPRETED), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DH, GATE, UP, DGATE, DUP,
    n_rows, cols, stride_dh, stride_g, stride_u, stride_dg, stride_du,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    offs = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < n_rows) & (offs < cols)
    dh = tl.load(DH + rows * stride_dh + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(GATE + rows * stride_g + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(UP + rows * stride_u + offs, mask=mask, other=0.0).to(ACC)
    dt = DGATE.dtype.element_ty

    # One exp serves both: the forward's s (same ops, same bits) and silu_backward's sigmoid. (On
    # the GPU, LLVM fuses this add with expf's final scaling by 2^k into an fma; that scaling is
    # exact, so the sum is rounded once either way.)
    one_plus_e = 1.0 + _exp(-g, INTERPRETED)
    s = div_rn(g, one_plus_e, ACC)
    sig = div_rn(1.0, one_plus_e, ACC)
    # The gradients of the stock mul `s * up`, each rounded to the input dtype by the stock op.
    d_s = dh * u
    if not WIDE:
        s = round_to(s, dt, INTERPRETED).to(ACC)
        d_s = round_to(d_s, dt, INTERPRETED).to(ACC)
    d_up = dh * s
    # aten's silu_backward: dy * sig * (1 + x * (1 - sig)), multiplied left to right.
    d_gate = d_s * sig * _fma(g, 1.0 - sig, 1.0, ACC, INTERPRETED)

    tl.store(DGATE + rows * stride_dg + offs, round_to(d_gate, dt, INTERPRETED), mask=mask)
    tl.store(DUP + rows * stride_du + offs, round_to(d_up, dt, INTERPRETED), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    """Triton accumulation dtype for inputs of `dtype`: fp64 for fp32, else fp32."""
    return tl.float64 if dtype == torch.float32 else tl.float32


# Plain Python on the launch path: triton.cdiv goes through Triton's JIT-function call machinery.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"swiglu: {name} dtype {t.dtype} not supported (bf16, fp16 or fp32)")
    if row_stride(t) is None:
        raise ValueError(f"swiglu: {name} must have contiguous rows: unit last stride and one stride over the "
                         f"leading dimensions (shape {tuple(t.shape)}, strides {t.stride()})")


def row_stride(t: torch.Tensor) -> int | None:
    """The stride between t's rows when t is a stack of contiguous rows (unit last stride, the leading
    dimensions collapsible into one), as a contiguous tensor or a column slice of one is; else None."""
    if t.dim() == 0:
        return None
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    lead = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    for (n0, s0), (n1, s1) in zip(lead, lead[1:]):
        if s0 != s1 * n1:
            return None
    return lead[-1][1] if lead else max(t.shape[-1], 1)


def _check_like(name: str, t, ref: torch.Tensor) -> None:
    """`t` is a row-contiguous tensor of ref's shape, dtype and device."""
    _check_tensor(name, t)
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"swiglu: {name} must be {tuple(ref.shape)} {ref.dtype} on {ref.device} (as gate), "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two row-contiguous tensors share an element (disjoint column halves of one buffer do not)."""
    if not a.numel() or not b.numel() or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    sa, sb = row_stride(a), row_stride(b)
    ca, cb = a.shape[-1], b.shape[-1]
    ra, rb = a.numel() // ca, b.numel() // cb
    if sa != sb or ca > sa or cb > sb:
        # Unlike layouts: overlapping byte ranges count as shared.
        ea = a.storage_offset() + (ra - 1) * sa + ca
        eb = b.storage_offset() + (rb - 1) * sb + cb
        return a.storage_offset() < eb and b.storage_offset() < ea
    # Element (i, c) of a meets (j, c') of b where (i - j) * stride + (c - c') = offset(b) - offset(a).
    d = b.storage_offset() - a.storage_offset()
    for k in (d // sa, d // sa + 1):
        e = d - k * sa
        if -(rb - 1) <= k <= ra - 1 and -(cb - 1) <= e <= ca - 1:
            return True
    return False


def _check_own_buffer(name: str, buf: torch.Tensor, *others: torch.Tensor) -> None:
    # An output sharing memory with an input or another output would be read after being written
    # (or written twice): the caller must hand in memory the kernel owns.
    for o in others:
        if _overlap(buf, o):
            raise ValueError(f"swiglu: {name} shares memory with an input or another output")


def _launch(t: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """(grid, tile constexprs) for t's rows. On the GPU one row per program. Triton's interpreter runs
    each program's ops one by one in Python, so there a program takes a tile of _INTERPRETED_ROWS rows
    and just the row's width: the same code, on 2-D tiles, in a fraction of the programs (the CPU tests
    of whole models spent minutes here)."""
    cols = t.shape[-1]
    n_rows = t.numel() // cols
    if interpreted():
        rows, block = _INTERPRETED_ROWS, min(_BLOCK, 1 << (cols - 1).bit_length())
    else:
        rows, block = 1, _BLOCK
    return (_cdiv(n_rows, rows), _cdiv(cols, block)), dict(ROWS=rows, BLOCK=block)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(gate) * up, rounded as stock PyTorch rounds (silu's output, then the product).

    gate, up: same shape, same dtype (bf16, fp16 or fp32), same device, each a stack of contiguous
    rows (contiguous, or a column slice of a contiguous tensor: the halves of a gate,up output).
    Returns h of gate's shape and dtype; `out` is written if given (it must not share memory with
    gate or up).
    """
    _check_tensor("gate", gate)
    _check_like("up", up, gate)
    if out is None:
        out = torch.empty_like(gate)
    else:
        _check_like("out", out, gate)
        _check_own_buffer("out", out, gate, up)
    n = gate.numel()
    if n == 0:
        return out
    grid, tile = _launch(gate)
    _swiglu_fwd_kernel[grid](
        gate, up, out, n // gate.shape[-1], gate.shape[-1], row_stride(gate), row_stride(up), row_stride(out),
        **tile, ACC=_acc(gate.dtype), WIDE=gate.dtype == torch.float32, INTERPRETED=interpreted(),
        num_warps=_NUM_WARPS,
    )
    return out


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                    d_gate_out: torch.Tensor | None = None,
                    d_up_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of h = silu(gate) * up: (d_gate, d_up), rounded as stock autograd rounds.

    dh, gate, up: row-contiguous (as for swiglu_forward), same shape and dtype, on one device; gate and up are the forward's
    inputs (s is recomputed from gate, h is not needed). With sig = sigmoid(gate) and
    s = silu(gate) rounded: d_up = dh * s, d_gate = (dh * up, rounded) * sig * (1 + gate * (1 - sig)),
    each in fp32 (fp64 for fp32 inputs) and rounded once. The gradients go to fresh buffers, or to
    `d_gate_out` / `d_up_out` if given (which must not share memory with an input or each other; the
    two halves of one [.., 2N] buffer do not: the gradient of a gate,up output in one piece).
    """
    _check_tensor("gate", gate)
    _check_like("up", up, gate)
    _check_like("dh", dh, gate)
    if d_gate_out is None:
        d_gate_out = torch.empty_like(gate)
    else:
        _check_like("d_gate_out", d_gate_out, gate)
        _check_own_buffer("d_gate_out", d_gate_out, dh, gate, up)
    if d_up_out is None:
        d_up_out = torch.empty_like(gate)
    else:
        _check_like("d_up_out", d_up_out, gate)
        _check_own_buffer("d_up_out", d_up_out, dh, gate, up, d_gate_out)
    n = gate.numel()
    if n == 0:
        return d_gate_out, d_up_out
    grid, tile = _launch(gate)
    _swiglu_bwd_kernel[grid](
        dh, gate, up, d_gate_out, d_up_out, n // gate.shape[-1], gate.shape[-1], row_stride(dh), row_stride(gate),
        row_stride(up), row_stride(d_gate_out), row_stride(d_up_out),
        **tile, ACC=_acc(gate.dtype), WIDE=gate.dtype == torch.float32, INTERPRETED=interpreted(),
        num_warps=_NUM_WARPS,
    )
    return d_gate_out, d_up_out
