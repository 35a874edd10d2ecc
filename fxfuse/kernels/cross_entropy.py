"""Causal-LM cross-entropy forward and backward as Triton kernels, with the numerics of transformers'
`ForCausalLMLoss`.

The stock loss computes, for logits [N, V] (bf16 in training) and labels [N]:

    logp = log_softmax(logits.float(), -1); loss_i = -logp[i, labels[i]]   (0 where ignored)
    loss = sum(loss_i) / count          (reduction 'mean'; count = number of rows not ignored)
    loss = sum(loss_i) / num_items      (reduction 'sum', then HF divides by num_items_in_batch)

and its backward writes dlogits = (softmax - onehot) * dloss / count in fp32, then rounds it once to
the logits dtype (the backward of `.float()`). It materialises an fp32 copy of the logits, the fp32
log-softmax (kept for the backward) and an fp32 gradient: three [N, V] fp32 tensors. These kernels
keep none of them:

    cross_entropy_forward(logits, labels, ignore_index)                -> (loss [N], lse [N] fp32)
    cross_entropy_backward(dloss, logits, labels, lse, ignore_index)   -> dlogits [N, V], logits.dtype

The forward reads each row once, chunk by chunk (BLOCK_V columns at a time), with an online max and
sum of exponentials in fp32; no chunk is ever written back. The backward reads the row again and
writes dlogits = (exp(x - lse) - onehot) * scale straight in the logits dtype, computed in fp32 and
rounded once, as the stock path rounds it. `scale` is the per-row dloss (dloss / count for 'mean',
dloss / num_items for 'sum' / num_items: the caller's reduction supplies it) and 0 for ignored rows.

Numerics, measured against `fxfuse.testing.assert_exact` (tests/test_cross_entropy.py):
- The per-row loss is (max - x_target) + log(sum): for 16-bit logits the difference is exact in
  fp32, and the log of the fp32 sum is taken in fp64 (one log per row, nothing per element). The
  per-row loss is then *stored in fp64* (the caller may ask for fp32). The reason is the scalar:
  the stock path's fp32 sum and division make the mean loss a few tenths of an ulp off; summing
  fp64 rows in fp64 and rounding once gives the correctly rounded mean almost always. Rounding each
  row to fp32 first would make the scalar less exact than stock on about 1% of random inputs (a
  torch model of this arithmetic on 1500 random bf16 cases of 8-128 rows: 15 over the 1.25x bar
  with fp32 rows, none with fp64 rows).
- lse is saved in fp32: the 16-bit backward rounds its result to 8 or 11 bits, so lse's fp32
  rounding (relative ~6e-8 on p) is invisible there.
- fp32 logits are computed in fp64 throughout (as the RMSNorm kernels do), and their backward
  recomputes lse in fp64 from the row instead of reading the fp32 one: with fp32 math the kernels
  would make as many roundings as the stock fp32 path and pass or fail the bar by luck. fp32 logits
  are a side path; training logits are bf16.
- NaN and Inf propagate as in torch: a row holding NaN or +Inf has NaN loss and NaN dlogits, an
  all -Inf row is NaN too (torch's log_softmax is -inf - -inf there), a -Inf target gives +Inf.
  Ignored rows get loss 0 and dlogits (p - onehot) * 0, which is NaN where p is: torch's
  log_softmax backward also multiplies that row's softmax by a zero gradient.

Labels outside [0, V) that are not ignore_index are an error (`check_labels`; on CUDA an
asynchronous device assert, on CPU a ValueError). The kernels themselves write NaN loss and NaN
dlogits for such a row rather than read out of bounds, so a skipped check can never produce a
plausible wrong value.

This module knows nothing of graphs or autograd. logits are 2-D [N, V] of bf16, fp16 or fp32 with
unit column stride and any row stride (a slice of wider rows, every other row, a shifted view);
labels are 1-D int64 or int32 [N].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreted, round_to

__all__ = ["check_labels", "cross_entropy_forward", "cross_entropy_backward"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LABEL_DTYPES = (torch.int64, torch.int32)
_LOSS_DTYPES = (torch.float64, torch.float32)

# Columns per loop iteration. Vocabularies are 32000-256000 wide, far past what one program can
# hold in registers, so each row is walked in chunks of this many columns: 4096 bf16 values are
# 8 KiB per load, 16 per thread with 8 warps. Untuned: not yet measured on a GPU.
_BLOCK_V = 4096
_WARPS = 8


@triton.jit
def _row_max_sumexp(x_row, V, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """(m, s) for one row: m = max(x), s = sum(exp(x - m)), in one pass over BLOCK_V-wide chunks."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        # Padding lanes load -inf: exp(-inf - anything) is 0, so they add nothing to s.
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every value seen is -inf, m_new is -inf and x - m_new would be -inf - -inf = NaN;
        # any finite shift gives the right s (0) then. +Inf is kept: inf - inf = NaN is torch's
        # answer for a row holding +Inf too. NaN in x reaches s through exp(NaN - m) whatever
        # tl.max does with it (the GPU max ignores NaN, the interpreter's propagates it).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(x - m_shift), axis=0)
        m = m_new
    return m, s


@triton.jit
def _ce_fwd_kernel(
    X, LABELS, LOSS, LSE,
    V, stride_x, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    # One program per row: a row of a 128k vocabulary is 250 KiB of bf16, enough work for one.
    row = tl.program_id(0).to(tl.int64)
    # int64 row offset: row * stride passes 2^31 for logits of more than 2^31 elements.
    x_row = X + row * stride_x
    label = tl.load(LABELS + row).to(tl.int64)

    m, s = _row_max_sumexp(x_row, V, BLOCK_V, ACC)
    # One fp64 log per row: s carries ~1e-8 relative error, an fp32 log would add ~3e-8 absolute
    # more per row, enough to move the mean off its correctly rounded value (module docstring).
    log_s = tl.log(s.to(tl.float64))
    lse = m.to(tl.float64) + log_s

    ignored = label == ignore_index
    valid = (label >= 0) & (label < V)
    x_t = tl.load(x_row + tl.where(valid, label, 0), mask=valid, other=0.0).to(ACC)
    # max - x_t first: for 16-bit logits both are exactly representable and so is their difference
    # in fp32, so the loss is rounded once, in fp64, instead of through lse.
    loss = (m - x_t).to(tl.float64) + log_s
    # `where`, not a multiply: an ignored row contributes exactly 0 even when its logits are NaN,
    # as in torch (nll_loss skips it). An invalid label gives NaN, never a plausible value.
    loss = tl.where(valid, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + row, loss.to(LOSS.dtype.element_ty))
    tl.store(LSE + row, lse.to(tl.float32))


@triton.jit
def _ce_bwd_kernel(
    X, LABELS, LSE, DLOSS, DX,
    V, stride_x, stride_dx, stride_dloss, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, RECOMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    label = tl.load(LABELS + row).to(tl.int64)

    if RECOMPUTE:
        # fp32 logits: the saved lse was rounded to fp32, which alone would cost p about an ulp;
        # recompute it in fp64 from the row (one more read of the row, on the side path only).
        m, s = _row_max_sumexp(x_row, V, BLOCK_V, ACC)
        lse = m + tl.log(s)
    else:
        lse = tl.load(LSE + row).to(ACC)

    # dloss is the per-row gradient of the caller's reduction (fp64 or fp32, stride 0 when it is
    # an expanded scalar). Converting it to fp32 rounds it once, as the stock path's fp32
    # dloss / count does.
    dloss = tl.load(DLOSS + row * stride_dloss).to(ACC)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V)
    scale = tl.where(valid, dloss, float("nan"))
    # 0 for ignored rows, but still multiplied in below: torch's ignored rows are (p - 0) * 0, NaN
    # where the row's softmax is NaN.
    scale = tl.where(ignored, 0.0, scale)

    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        mask = c < V
        x = tl.load(x_row + c, mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - lse)
        g = (p - tl.where(c == label, 1.0, 0.0)) * scale
        # All math above is fp32 (fp64 for fp32 logits); this is the one rounding the stock
        # backward makes (its fp32 gradient cast to the logits dtype by `.float()`'s backward).
        tl.store(dx_row + c, round_to(g, DX.dtype.element_ty, SOFT_BF16), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    """Triton accumulation dtype for logits of `dtype`: fp64 for fp32, else fp32."""
    return tl.float64 if dtype == torch.float32 else tl.float32


def _block_v(v: int) -> int:
    # Plain Python: triton.next_power_of_2 goes through the JIT call machinery on every launch.
    return min(_BLOCK_V, 1 << (v - 1).bit_length())


def _check_logits(name: str, t: torch.Tensor) -> tuple[int, int]:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"cross_entropy: {name} must be 2-D [N, V], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"cross_entropy: {name} dtype {t.dtype} not supported (bf16, fp16 or fp32)")
    n, v = t.shape
    if v == 0:
        raise ValueError(f"cross_entropy: vocabulary size V must be > 0, {name} is {tuple(t.shape)}")
    # Rows may be anywhere (any row stride); within a row the kernels step one element at a time.
    if v > 1 and t.stride(1) != 1:
        raise ValueError(f"cross_entropy: {name} must have unit column stride (strides {t.stride()})")
    return n, v


def _check_labels_arg(labels: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"cross_entropy: labels must be 1-D of length N={n}, got {shape}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"cross_entropy: labels dtype {labels.dtype} not supported (int64 or int32)")
    if not labels.is_contiguous():
        raise ValueError("cross_entropy: labels must be contiguous")
    if labels.device != device:
        raise ValueError(f"cross_entropy: labels on {labels.device}, logits on {device}")


def _check_buffer(name: str, buf: torch.Tensor, shape, dtypes, device) -> None:
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"cross_entropy: {name} must be a torch.Tensor")
    if tuple(buf.shape) != tuple(shape) or buf.dtype not in dtypes or buf.device != device:
        raise ValueError(f"cross_entropy: {name} must be {tuple(shape)} {' or '.join(map(str, dtypes))} on "
                         f"{device}, got {tuple(buf.shape)} {buf.dtype} on {buf.device}")


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise if a label is outside [0, vocab_size) and is not ignore_index (torch raises there too).

    On CPU: a ValueError naming the first bad label. On CUDA: a device-side assert queued on the
    stream (torch._assert_async), so the check costs no host synchronisation; it fires at the
    next synchronising call, as torch's own out-of-bounds target check does.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    message = (f"cross_entropy: label out of range: every label must be in [0, {vocab_size}) or equal "
               f"ignore_index={ignore_index}")
    if labels.device.type == "cpu":
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{message}; row {i} has label {int(labels[i])}")
    else:
        torch._assert_async(~bad.any(), message)


def cross_entropy_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                          loss_out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
                          validate_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of `logits` [N, V] against `labels` [N], and the rows' logsumexp.

    Returns (loss [N], lse [N] float32): loss_i = lse_i - logits[i, labels[i]] (0 where labels[i] ==
    ignore_index), in float64 unless `loss_out` is a float32 buffer (see the module docstring for
    why fp64 is the default). Buffers given as `loss_out` / `lse_out` (1-D, contiguous) are written.
    `validate_labels=False` skips `check_labels` for callers that checked the whole batch already.
    """
    n, v = _check_logits("logits", logits)
    _check_labels_arg(labels, n, logits.device)
    if loss_out is None:
        loss_out = torch.empty(n, dtype=torch.float64, device=logits.device)
    else:
        _check_buffer("loss_out", loss_out, (n,), _LOSS_DTYPES, logits.device)
    if lse_out is None:
        lse_out = torch.empty(n, dtype=torch.float32, device=logits.device)
    else:
        _check_buffer("lse_out", lse_out, (n,), (torch.float32,), logits.device)
    for name, buf in (("loss_out", loss_out), ("lse_out", lse_out)):
        if not buf.is_contiguous():
            raise ValueError(f"cross_entropy: {name} must be contiguous")
    if validate_labels:
        check_labels(labels, v, ignore_index)
    if n == 0:
        return loss_out, lse_out

    _ce_fwd_kernel[(n,)](
        logits, labels, loss_out, lse_out,
        v, logits.stride(0), int(ignore_index),
        BLOCK_V=_block_v(v), ACC=_acc(logits.dtype),
        num_warps=_WARPS,
    )
    return loss_out, lse_out


def cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int = -100, *,
                           dlogits_out: torch.Tensor | None = None) -> torch.Tensor:
    """dlogits [N, V] in logits.dtype: (exp(logits - lse) - onehot(labels)) * dloss, 0 * (...) on ignored rows.

    dloss: [N] float64 or float32, any stride (stride 0 for an expanded scalar): the gradient of the
    caller's reduction with respect to each row's loss. lse: the forward's float32 [N] (fp32 logits
    recompute it in fp64 instead). `dlogits_out`, if given, is [N, V] of logits.dtype with unit
    column stride and is written; it may be `logits` itself (each row is read before it is
    overwritten, by the same program), which is how the fused linear cross-entropy reuses its
    logits chunk for the gradient.
    """
    n, v = _check_logits("logits", logits)
    _check_labels_arg(labels, n, logits.device)
    _check_buffer("dloss", dloss, (n,), _LOSS_DTYPES, logits.device)
    _check_buffer("lse", lse, (n,), (torch.float32,), logits.device)
    if not lse.is_contiguous():
        raise ValueError("cross_entropy: lse must be contiguous")
    if dlogits_out is None:
        dlogits_out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    else:
        _check_logits("dlogits_out", dlogits_out)
        out = dlogits_out
        if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
            raise ValueError(f"cross_entropy: dlogits_out must be {tuple(logits.shape)} {logits.dtype} on "
                             f"{logits.device}, got {tuple(dlogits_out.shape)} {dlogits_out.dtype} on "
                             f"{dlogits_out.device}")
    if n == 0:
        return dlogits_out

    _ce_bwd_kernel[(n,)](
        logits, labels, lse, dloss, dlogits_out,
        v, logits.stride(0), dlogits_out.stride(0), dloss.stride(0), int(ignore_index),
        BLOCK_V=_block_v(v), ACC=_acc(logits.dtype), RECOMPUTE=logits.dtype == torch.float32,
        SOFT_BF16=interpreted(),
        num_warps=_WARPS,
    )
    return dlogits_out
