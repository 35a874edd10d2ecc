"""Dequantization of bitsandbytes 4-bit weights (NF4, FP4) in one Triton kernel, bit-identical to it.

QLoRA keeps each frozen base weight as a bitsandbytes `Params4bit`: two 4-bit codes per byte (the
*high* nibble is the first element), and one fp32 scale, `absmax`, per block of `blocksize`
consecutive elements of the flattened weight (64 by default). bitsandbytes dequantizes as

    w[i] = (CODE[nibble(i)] * absmax[i // blocksize]).to(dtype)

one fp32 multiply, rounded once (to nearest even) to the output dtype. With double quantization
(`bnb_4bit_use_double_quant`) `absmax` is itself 8-bit: uint8 codes into a 256-entry fp32 table
`code2`, with one fp32 scale per `blocksize2` (= 256) blocks, around a mean `offset` that was
subtracted before quantizing. It is restored first, by a separate blockwise dequantization and
then an fp32 add:

    absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2]     # fp32 multiply, rounded
    absmax[b] = absmax[b] + offset                                 # fp32 add, rounded

This module does both steps in one kernel (the fp32 absmax never goes to memory) with exactly
those roundings, so its output equals bitsandbytes' bit for bit:

    dequantize_nf4(packed, absmax, shape, dtype, *, blocksize=64, nested=None, out=None)
    dequantize_4bit(..., quant_type="nf4" | "fp4")          the same, either 4-bit code
    dequantize_params4bit(weight, *, dtype=None, out=None)  from a bitsandbytes Params4bit

"bitsandbytes" here is its CUDA kernel. Its pure-torch fallback agrees with it everywhere but
in the sign of FP4's code 8, a zero (see FP4_VALUES). Its C++ CPU kernel (0.50.2) departs from it
in three places, which this kernel does not follow: that same zero's sign; bf16 subnormals
(|w| < 1.2e-38), flushed to zero on CPUs with AVX512-BF16 by the conversion instruction; and, a
bug, rows whose length is a multiple of 16 but not of the blocksize (e.g. 96 with blocksize 64),
for which its 16-wide path takes the wrong absmax. QLoRA weights (NF4, rows of whole blocks,
|w| >> 1e-38) meet none of these.

Two details keep it exact. On the GPU, Triton contracts a multiply followed by an add into one
fused multiply-add (one rounding instead of two) unless told not to; the absmax restore above is
such a pair, so the kernel is launched with `enable_fp_fusion=False`. (It has no other add.) And
Triton's interpreter truncates fp32 -> bf16, so when interpreted the bf16 rounding is done by hand
(`common.round_to`).

Each program handles ROWS whole quantization blocks: a [ROWS, blocksize // 2] tile of packed
bytes, whose two nibbles are decoded, scaled by the row's absmax (loaded, or restored, once per
row, not once per element) and interleaved back into a [ROWS, blocksize] tile of outputs.
This module knows nothing of graphs or autograd; callers own those.
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from .common import interpreted, round_to

__all__ = [
    "NF4_CODE", "FP4_CODE", "NF4_VALUES", "FP4_VALUES", "BLOCKSIZES",
    "dequantize_nf4", "dequantize_4bit", "dequantize_params4bit",
]

# The 16 NF4 values of bitsandbytes (`bitsandbytes.functional.get_4bit_type("nf4")`), in code
# order. Each literal is exactly an fp32 value (printed as the double it widens to), so it becomes
# that fp32 value again in torch and as a Triton constant.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) as bitsandbytes tabulates it: the values
# [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] divided by 12 in fp32. The kernel reads only the eight
# magnitudes and applies the sign bit after the multiply, as bitsandbytes' CUDA kernel does
# (`lut[code & 7] * sign`, then `* absmax`), so code 8 (sign set, magnitude 0) decodes to -0.0 as
# there. bitsandbytes' CPU paths disagree on that one zero: its torch path indexes this table,
# whose entry 8 is +0.0 (spelt `-0`, an integer), and its C++ kernel gives +0.0 on its 16-wide
# path (rows a multiple of 16 long) and -0.0 on its scalar one. All other values agree everywhere.
FP4_VALUES = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
NF4_CODE = torch.tensor(NF4_VALUES, dtype=torch.float32)
FP4_CODE = torch.tensor(FP4_VALUES, dtype=torch.float32)
_CODES = {"nf4": NF4_VALUES, "fp4": FP4_VALUES}

# The block sizes bitsandbytes accepts for 4-bit quantization (`quantize_4bit`).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Output elements per program: ROWS = _TILE_ELEMS // blocksize quantization blocks (at least one).
# 4096 outputs are 2 KiB of packed input and 8 KiB of bf16 output per program.
_TILE_ELEMS = 4096
_NUM_WARPS = 4


@triton.jit
def _lookup8(nibble, CODE: tl.constexpr, BASE: tl.constexpr):
    """CODE[BASE + (nibble & 7)], CODE a constexpr tuple of floats (each becomes an fp32 constant)."""
    # A binary tree of selects on the low three bits, as bitsandbytes' own CUDA and Triton kernels
    # do: the table lives in the instructions, so there is no gather from memory per element.
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    v0 = tl.where(b0, CODE[BASE + 1], CODE[BASE + 0])
    v1 = tl.where(b0, CODE[BASE + 3], CODE[BASE + 2])
    v2 = tl.where(b0, CODE[BASE + 5], CODE[BASE + 4])
    v3 = tl.where(b0, CODE[BASE + 7], CODE[BASE + 6])
    w0 = tl.where(b1, v1, v0)
    w1 = tl.where(b1, v3, v2)
    return tl.where(b2, w1, w0)


@triton.jit
def _decode(nibble, absmax, CODE: tl.constexpr, SIGN_BIT: tl.constexpr):
    """The fp32 value of 4-bit codes `nibble` scaled by `absmax`: one multiply (and a sign)."""
    negative = (nibble & 8) != 0
    if SIGN_BIT:
        # FP4 is sign-magnitude: bitsandbytes' CUDA kernel multiplies the magnitude by the sign
        # and absmax, which makes code 8 (sign set, magnitude 0) -0.0. Multiplying by -1 flips
        # the sign exactly and keeps -0.0 (Triton's unary minus is 0 - x, which turns -0.0 into
        # +0.0, and the interpreter drops the sign of a -0.0 constant, so neither is used).
        return _lookup8(nibble, CODE, 0) * absmax * tl.where(negative, -1.0, 1.0)
    else:
        return tl.where(negative, _lookup8(nibble, CODE, 8), _lookup8(nibble, CODE, 0)) * absmax


@triton.jit
def _dequant_4bit_kernel(
    PACKED, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT,
    n_elements, n_bytes, n_blocks,
    CODE: tl.constexpr, SIGN_BIT: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
    NESTED: tl.constexpr, QBLOCK2: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    HALF: tl.constexpr = QBLOCK // 2  # packed bytes per quantization block
    pid = tl.program_id(0)
    # Quantization-block indices of this tile's rows; int64 so that block * QBLOCK (an element
    # offset) cannot overflow for weights of more than 2^31 elements.
    blocks = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    block_mask = blocks < n_blocks

    byte_offs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    # Past the last byte (a ragged last block, or rows past the end) load 0; those outputs are
    # masked at the store.
    packed = tl.load(PACKED + byte_offs, mask=byte_offs < n_bytes, other=0)

    if NESTED:
        # Restore the fp32 absmax of each row from its 8-bit code, as bitsandbytes does: first the
        # blockwise dequantization (one fp32 multiply), then `absmax += offset` (one fp32 add).
        # The launch disables FMA contraction, so these stay two roundings on the GPU too.
        q = tl.load(ABSMAX + blocks, mask=block_mask, other=0)
        scale2 = tl.load(ABSMAX2 + blocks // QBLOCK2, mask=block_mask, other=0.0)
        absmax = tl.load(CODE2 + q) * scale2  # q < 256 always (0 on masked rows): no mask
        absmax = absmax + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + blocks, mask=block_mask, other=0.0)

    # High nibble first: byte j holds elements 2j (bits 7..4) and 2j+1 (bits 3..0). Each value is
    # one fp32 product, rounded once below.
    hi = _decode(packed >> 4, absmax[:, None], CODE, SIGN_BIT)
    lo = _decode(packed & 0xF, absmax[:, None], CODE, SIGN_BIT)
    values = tl.interleave(hi, lo)  # [ROWS, QBLOCK]: hi, lo, hi, lo, ...

    out_offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(OUT + out_offs, round_to(values, OUT.dtype.element_ty, SOFT_BF16),
             mask=out_offs < n_elements)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_tensor(name: str, t, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"dequantize_4bit: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"dequantize_4bit: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"dequantize_4bit: {name} must have {numel} elements, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"dequantize_4bit: {name} is on {t.device}, packed on {device}")
    if not t.is_contiguous():
        raise ValueError(f"dequantize_4bit: {name} must be contiguous")


def _check_blocksize(name: str, blocksize) -> int:
    if isinstance(blocksize, bool):
        raise ValueError(f"dequantize_4bit: {name} must be an int, got {blocksize!r}")
    try:
        return operator.index(blocksize)
    except TypeError:
        raise ValueError(f"dequantize_4bit: {name} must be an int, got {blocksize!r}") from None


def _offset_tensor(offset, device: torch.device) -> torch.Tensor:
    """The double-quantization offset as a 1-element fp32 tensor on `device`."""
    # bitsandbytes does `absmax += offset` on an fp32 tensor; a Python float or a 0-dim tensor of
    # another float dtype enters that add converted to fp32, and so it does here.
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1 or not offset.dtype.is_floating_point:
            raise ValueError(f"dequantize_4bit: nested offset must be a float or a 1-element floating "
                             f"tensor, got {offset.dtype} of shape {tuple(offset.shape)}")
        if offset.device != device:
            raise ValueError(f"dequantize_4bit: nested offset is on {offset.device}, packed on {device}")
        return offset.reshape(1).to(torch.float32)
    if isinstance(offset, (int, float)) and not isinstance(offset, bool):
        # Passed through memory rather than as a scalar argument: the interpreter would type a
        # Python float outside fp32's normal range as fp64.
        return torch.tensor([float(offset)], dtype=torch.float32, device=device)
    raise ValueError(f"dequantize_4bit: nested offset must be a float or a tensor, "
                     f"got {type(offset).__name__}")


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, *,
                    quant_type: str = "nf4", blocksize: int = 64, nested=None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight, bit for bit as bitsandbytes does (module docstring).

    packed: the packed codes, uint8, contiguous, any shape, ceil(prod(shape) / 2) elements (the
        `Params4bit` data; view other `quant_storage` dtypes as uint8 first).
    absmax: fp32 [ceil(prod(shape) / blocksize)] for single quantization; for double quantization
        the uint8 codes of the same length, with
    nested: (absmax2 fp32 [ceil(nblocks / blocksize2)], code2 fp32 [256], offset, blocksize2), i.e.
        (quant_state.state2.absmax, quant_state.state2.code, quant_state.offset,
        quant_state.state2.blocksize); offset a float or a 1-element tensor.
    shape: the weight's shape (e.g. [out_features, in_features]); dtype: bf16, fp16 or fp32.
    quant_type: "nf4" or "fp4"; blocksize: a power of two in BLOCKSIZES.
    Returns a contiguous tensor of `shape` and `dtype` (`out`, written in full, if given).
    """
    if quant_type not in _CODES:
        raise ValueError(f"dequantize_4bit: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dequantize_4bit: dtype {dtype} not supported (bf16, fp16 or fp32)")
    blocksize = _check_blocksize("blocksize", blocksize)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"dequantize_4bit: blocksize {blocksize} not supported (one of {BLOCKSIZES})")
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"dequantize_4bit: shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"dequantize_4bit: shape {shape} has a negative size")
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"dequantize_4bit: packed must be a torch.Tensor, got {type(packed).__name__}")
    device = packed.device

    n = math.prod(shape)
    n_bytes = _cdiv(n, 2)
    n_blocks = _cdiv(n, blocksize)
    _check_tensor("packed", packed, torch.uint8, n_bytes, device)
    if nested is None:
        _check_tensor("absmax", absmax, torch.float32, n_blocks, device)
        absmax2 = code2 = offset = absmax  # not read by the kernel
        blocksize2 = 1
    else:
        if not isinstance(nested, (tuple, list)) or len(nested) != 4:
            raise ValueError("dequantize_4bit: nested must be (absmax2, code2, offset, blocksize2)")
        absmax2, code2, offset, blocksize2 = nested
        blocksize2 = _check_blocksize("nested blocksize2", blocksize2)
        if blocksize2 <= 0 or blocksize2 & (blocksize2 - 1):
            raise ValueError(f"dequantize_4bit: nested blocksize2 must be a power of two, got {blocksize2}")
        _check_tensor("absmax (double quantization)", absmax, torch.uint8, n_blocks, device)
        _check_tensor("nested absmax2", absmax2, torch.float32, _cdiv(n_blocks, blocksize2), device)
        _check_tensor("nested code2", code2, torch.float32, 256, device)
        offset = _offset_tensor(offset, device)

    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"dequantize_4bit: out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
            raise ValueError(f"dequantize_4bit: out must be {shape} {dtype} on {device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("dequantize_4bit: out must be contiguous")
    if n == 0:
        return out

    rows = max(1, _TILE_ELEMS // blocksize)
    _dequant_4bit_kernel[(_cdiv(n_blocks, rows),)](
        packed, absmax, absmax2, code2, offset, out,
        n, n_bytes, n_blocks,
        CODE=_CODES[quant_type], SIGN_BIT=quant_type == "fp4", QBLOCK=blocksize, ROWS=rows,
        NESTED=nested is not None, QBLOCK2=blocksize2, SOFT_BF16=interpreted(),
        num_warps=_NUM_WARPS,
        # Keep `code2 * absmax2 + offset` two roundings, as in bitsandbytes (see the docstring).
        enable_fp_fusion=False,
    )
    return out


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, *,
                   blocksize: int = 64, nested=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_4bit` for NF4 codes (QLoRA's `bnb_4bit_quant_type="nf4"`)."""
    return dequantize_4bit(packed, absmax, shape, dtype, quant_type="nf4", blocksize=blocksize,
                           nested=nested, out=out)


def dequantize_params4bit(weight, *, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes `Params4bit` (e.g. `Linear4bit.weight`) to `dtype`.

    dtype defaults to `weight.quant_state.dtype` (the dtype the weight had before quantization),
    as in bitsandbytes. Raises ValueError for a weight that is not quantized, or in a layout
    this kernel does not read (bitsandbytes' CPU-only `packing_format_for_cpu`).
    """
    qs = getattr(weight, "quant_state", None)
    if qs is None or not isinstance(weight, torch.Tensor):
        raise ValueError("dequantize_params4bit: expected a quantized bitsandbytes Params4bit "
                         "(with a quant_state)")
    if qs.quant_type not in _CODES:
        raise ValueError(f"dequantize_params4bit: quant_type {qs.quant_type!r} not supported "
                         f"('nf4' or 'fp4')")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("dequantize_params4bit: the weight is in bitsandbytes' CPU gemm packing "
                         "(packing_format_for_cpu); convert it back with "
                         "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first")
    packed = weight.data
    if packed.dtype != torch.uint8:
        # Params4bit's quant_storage (e.g. bf16, for FSDP) only relabels the packed bytes.
        packed = packed.contiguous().view(torch.uint8)
    absmax = qs.absmax
    nested = None
    if qs.nested:
        nested = (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize)
    elif absmax.dtype in (torch.float16, torch.bfloat16):
        # bitsandbytes widens a half-precision absmax to fp32 before use; exact.
        absmax = absmax.float()
    return dequantize_4bit(packed, absmax, qs.shape, qs.dtype if dtype is None else dtype,
                           quant_type=qs.quant_type, blocksize=qs.blocksize, nested=nested, out=out)
