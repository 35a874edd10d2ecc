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

Two details keep it exact. On the GPU, ptxas contracts a multiply followed by an add into one
fused multiply-add (one rounding instead of two); the absmax restore above is such a pair, so its
add is an explicit `add.rn.f32` (inline PTX), which is never contracted. (The kernel has no other
add.) And Triton's interpreter truncates fp32 -> bf16, so when interpreted the bf16 rounding is
done by hand (`common.round_to`).

Two kernels. The fast one, for weights of whole 32-bit words of codes (8 elements: every Llama
shape), reads the packed codes as words and writes the two values of each byte side by side as one
integer twice the element width: each thread stores what it loaded, so no value changes threads
and the stores are full-width and coalesced. The general one (any size and alignment) decodes a
[ROWS, blocksize / 2] tile of bytes and interleaves the two nibbles' values into the output tile,
which costs a shuffle through shared memory. Both scale a whole quantization block by one absmax.
This module knows nothing of graphs or autograd; callers own those.
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from .common import interpreted, launch, round_to

__all__ = [
    "NF4_CODE", "FP4_CODE", "NF4_VALUES", "FP4_VALUES", "BLOCKSIZES",
    "dequantize_nf4", "dequantize_4bit", "dequantize_4bit_stacked", "dequantize_params4bit",
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

# Work per program. The fast path: 1024 words of packed codes (4 KiB in, 8192 outputs, 16 KiB of
# bf16 out). The general path: ROWS = _TILE_ELEMS // blocksize quantization blocks (at least one).
_WORDS_PER_PROGRAM = 1024
_TILE_ELEMS = 4096
# The fast path's decode: a table lookup (True) or the select tree (False). See the kernel.
_LOOKUP = True
_NUM_WARPS = 4
_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# Two outputs side by side: the integer of twice the element width.
_PAIR_DTYPE = {2: torch.int32, 4: torch.int64}


# The tables as compile-time constants: the general path selects among them (_decode); the fast path
# builds a 16-entry table from them in shared memory and gathers from it (_code_table).
_NF4 = tl.constexpr(NF4_VALUES)
_FP4 = tl.constexpr(FP4_VALUES)


@triton.jit
def _lookup8(nibble, BASE: tl.constexpr, IS_FP4: tl.constexpr):
    """TABLE[BASE + (nibble & 7)] (TABLE the NF4 or the FP4 values) as fp32."""
    # A binary tree of selects on the low three bits, as bitsandbytes' own CUDA and Triton kernels
    # do: the table lives in the instructions.
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    if IS_FP4:
        v0 = tl.where(b0, _FP4[BASE + 1], _FP4[BASE + 0])
        v1 = tl.where(b0, _FP4[BASE + 3], _FP4[BASE + 2])
        v2 = tl.where(b0, _FP4[BASE + 5], _FP4[BASE + 4])
        v3 = tl.where(b0, _FP4[BASE + 7], _FP4[BASE + 6])
    else:
        v0 = tl.where(b0, _NF4[BASE + 1], _NF4[BASE + 0])
        v1 = tl.where(b0, _NF4[BASE + 3], _NF4[BASE + 2])
        v2 = tl.where(b0, _NF4[BASE + 5], _NF4[BASE + 4])
        v3 = tl.where(b0, _NF4[BASE + 7], _NF4[BASE + 6])
    w0 = tl.where(b1, v1, v0)
    w1 = tl.where(b1, v3, v2)
    return tl.where(b2, w1, w0)


@triton.jit
def _decode(nibble, absmax, IS_FP4: tl.constexpr):
    """The fp32 value of 4-bit codes `nibble` scaled by `absmax`: one multiply (and a sign)."""
    negative = (nibble & 8) != 0
    if IS_FP4:
        # FP4 is sign-magnitude: bitsandbytes' CUDA kernel multiplies the magnitude by the sign
        # and absmax, which makes code 8 (sign set, magnitude 0) -0.0. Multiplying by -1 flips
        # the sign exactly and keeps -0.0 (Triton's unary minus is 0 - x, which turns -0.0 into
        # +0.0, and the interpreter drops the sign of a -0.0 constant, so neither is used).
        return _lookup8(nibble, 0, True) * absmax * tl.where(negative, -1.0, 1.0)
    else:
        return tl.where(negative, _lookup8(nibble, 8, False), _lookup8(nibble, 0, False)) * absmax


@triton.jit
def _code_table(IS_FP4: tl.constexpr):
    """[16] fp32: the signed code values (FP4's code 8 is -0.0, as bitsandbytes' CUDA kernel gives it)."""
    code = tl.arange(0, 16)
    table = tl.zeros([16], tl.float32)
    for j in tl.static_range(16):
        if IS_FP4:
            if j == 8:
                # Built as -1 * 0.0: the interpreter drops the sign of a -0.0 constant.
                table = tl.where(code == j, -1.0 * tl.zeros([16], tl.float32), table)
            else:
                table = tl.where(code == j, _FP4[j], table)
        else:
            table = tl.where(code == j, _NF4[j], table)
    return table


@triton.jit
def _gather_codes(table, nibbles, BLOCK: tl.constexpr):
    """table[nibbles] for a [BLOCK, 4] tile (tl.gather wants a 1-D index here)."""
    return tl.reshape(tl.gather(table, tl.reshape(nibbles, (BLOCK * 4,)), 0), (BLOCK, 4))


@triton.jit
def _add_rn(a, b, INTERPRETED: tl.constexpr):
    """a + b in fp32, one IEEE rounding, never contracted with a preceding multiply into an FMA."""
    if INTERPRETED:
        return a + b  # numpy: plain IEEE fp32 add
    else:
        # An add with an explicit rounding mode is never fused by ptxas (PTX ISA, "add"); this keeps
        # the absmax restore two roundings, as in bitsandbytes, without disabling FMA for the kernel.
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _bits_of(values, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """`values` (fp32) rounded to `dtype` as torch rounds, as unsigned bits of the same width."""
    rounded = round_to(values, dtype, INTERPRETED)
    if dtype == tl.float32:
        return rounded.to(tl.uint32, bitcast=True)
    else:
        return rounded.to(tl.uint16, bitcast=True)


@triton.jit
def _block_absmax(ABSMAX, ABSMAX2, CODE2, OFFSET, blocks, mask, NESTED: tl.constexpr, QBLOCK2: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    """The fp32 absmax of quantization blocks `blocks`."""
    if NESTED:
        # Restored from its 8-bit code as bitsandbytes does: first the blockwise dequantization
        # (one fp32 multiply), then `absmax += offset` (one fp32 add, kept apart from the
        # multiply: see _add_rn).
        q = tl.load(ABSMAX + blocks, mask=mask, other=0)
        scale2 = tl.load(ABSMAX2 + blocks // QBLOCK2, mask=mask, other=0.0)
        absmax = tl.load(CODE2 + q) * scale2  # q < 256 always (0 on masked rows): no mask
        return _add_rn(absmax, tl.load(OFFSET) + tl.zeros_like(absmax), INTERPRETED)
    else:
        return tl.load(ABSMAX + blocks, mask=mask, other=0.0)


@triton.jit
def _dequant_4bit_words_kernel(
    WORDS, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT_PAIRS, pair_offset, n_words, row_words, pad_pairs,
    OUT_KIND: tl.constexpr, IS_FP4: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_WORDS: tl.constexpr,
    NESTED: tl.constexpr, QBLOCK2: tl.constexpr, LOOKUP: tl.constexpr, INTERPRETED: tl.constexpr,
    PADDED: tl.constexpr,
):
    """The fast path: whole 32-bit words of packed codes (8 elements each) in, pairs of outputs out.

    A program reads BLOCK_WORDS words and writes, for each, its 4 bytes' output pairs (the two
    values of a byte side by side in one integer twice the element width, element 2j in the low
    half: little-endian) as one [BLOCK_WORDS, 4] tile. Each thread decodes the words it loaded and
    stores their pairs contiguously: no value changes threads, so no shuffle through shared memory,
    and the stores are full-width and coalesced. With pad_pairs > 0 each row (row_words words) is
    followed in OUT by pad_pairs pairs the kernel leaves alone (a row-padded output)."""
    pid = tl.program_id(0)
    words = pid.to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    mask = words < n_words
    w = tl.load(WORDS + words, mask=mask, other=0)
    # Eight elements per word, so a quantization block is QBLOCK // 8 whole words.
    absmax = _block_absmax(ABSMAX, ABSMAX2, CODE2, OFFSET, words // (QBLOCK // 8), mask, NESTED, QBLOCK2,
                           INTERPRETED)
    t = tl.arange(0, 4)
    byte = (w[:, None] >> (8 * t[None, :])) & 0xFF  # byte t of each word (the mask undoes the sign)
    if LOOKUP:
        # The 16 signed code values as a table in shared memory (tl.gather), one conflict-free
        # load per value instead of a tree of 15 selects: the select tree makes this kernel
        # ALU-bound (measured: benchmarks/lora_kernels_sweep.py). Same fp32 value, same multiply.
        table = _code_table(IS_FP4)
        hi = _gather_codes(table, byte >> 4, BLOCK_WORDS) * absmax[:, None]
        lo = _gather_codes(table, byte & 0xF, BLOCK_WORDS) * absmax[:, None]
    else:
        hi = _decode(byte >> 4, absmax[:, None], IS_FP4)
        lo = _decode(byte & 0xF, absmax[:, None], IS_FP4)
    # OUT_KIND: 0 bf16, 1 fp16 (pairs in int32), 2 fp32 (pairs in int64).
    if OUT_KIND == 2:
        pair = _bits_of(hi, tl.float32, INTERPRETED).to(tl.uint64) | (
            _bits_of(lo, tl.float32, INTERPRETED).to(tl.uint64) << 32)
    elif OUT_KIND == 1:
        pair = _bits_of(hi, tl.float16, INTERPRETED).to(tl.uint32) | (
            _bits_of(lo, tl.float16, INTERPRETED).to(tl.uint32) << 16)
    else:
        pair = _bits_of(hi, tl.bfloat16, INTERPRETED).to(tl.uint32) | (
            _bits_of(lo, tl.bfloat16, INTERPRETED).to(tl.uint32) << 16)
    dest = words * 4
    if PADDED:
        # BLOCK_WORDS divides row_words (the host sees to it), so the program's words lie in one
        # row: one scalar division per program (a division per word, emulated in PTX, made this
        # ALU-short kernel 3.8x slower: H200, 2026-12-02).
        dest += ((pid * BLOCK_WORDS) // row_words).to(tl.int64) * pad_pairs
    tl.store(OUT_PAIRS + pair_offset + dest[:, None] + t[None, :],
             pair.to(OUT_PAIRS.dtype.element_ty, bitcast=True), mask=mask[:, None])


@triton.jit
def _dequant_4bit_kernel(
    PACKED, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, out_offset,
    n_elements, n_bytes, n_blocks, row_len, row_pad,
    IS_FP4: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
    NESTED: tl.constexpr, QBLOCK2: tl.constexpr, INTERPRETED: tl.constexpr, PADDED: tl.constexpr,
):
    """The general path: any element count and alignment.

    A program handles ROWS whole quantization blocks: a [ROWS, QBLOCK // 2] tile of packed bytes,
    whose two nibbles are decoded, scaled by the row's absmax (loaded, or restored, once per row)
    and interleaved back into a [ROWS, QBLOCK] tile of outputs. With row_pad > 0 each row of
    row_len outputs is followed in OUT by row_pad elements the kernel leaves alone."""
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
    absmax = _block_absmax(ABSMAX, ABSMAX2, CODE2, OFFSET, blocks, block_mask, NESTED, QBLOCK2, INTERPRETED)
    # High nibble first: byte j holds elements 2j (bits 7..4) and 2j+1 (bits 3..0). Each value is
    # one fp32 product, rounded once below.
    hi = _decode(packed >> 4, absmax[:, None], IS_FP4)
    lo = _decode(packed & 0xF, absmax[:, None], IS_FP4)
    values = tl.interleave(hi, lo)  # [ROWS, QBLOCK]: hi, lo, hi, lo, ...
    out_offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    dest = out_offs
    if PADDED:
        dest += (out_offs // row_len) * row_pad
    tl.store(OUT + out_offset + dest, round_to(values, OUT.dtype.element_ty, INTERPRETED),
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


def _prepare(packed, absmax, shape, dtype, quant_type, blocksize, nested):
    """Validate one weight's arguments; returns (shape, kernel inputs, constexprs, n)."""
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
    n_blocks = _cdiv(n, blocksize)
    _check_tensor("packed", packed, torch.uint8, _cdiv(n, 2), device)
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
    consts = dict(IS_FP4=quant_type == "fp4", QBLOCK=blocksize, NESTED=nested is not None, QBLOCK2=blocksize2,
                  INTERPRETED=interpreted(), num_warps=_NUM_WARPS)
    return shape, (packed, absmax, absmax2, code2, offset), consts, n


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    # From the storage offset, not data_ptr(): also answers for fake tensors while torch.compile
    # traces (the allocator aligns every storage's start far more than this).
    return t.storage_offset() * t.element_size() % nbytes == 0


def _launch_words(inputs, consts, n, out_pairs, pair_offset, dtype, row_len=1, row_pad=0):
    """Fast path: n (a multiple of 8) outputs as pairs into out_pairs[pair_offset:] (rows of row_len,
    a multiple of 8, each followed by row_pad, even, elements left alone)."""
    packed, absmax, absmax2, code2, offset = inputs
    n_words = n // 8
    row_words = max(row_len // 8, 1)
    # Padded rows: programs of a power of two of words that divides the row (at least 32: the caller
    # takes the general path for other row lengths).
    block = _WORDS_PER_PROGRAM if not row_pad else min(_WORDS_PER_PROGRAM, row_words & -row_words)
    if row_pad and (block < 32 or row_pad % 8):
        raise ValueError(f"dequantize_4bit: padded rows need a row length that is a multiple of 256 and a padding "
                         f"that is a multiple of 8, got {row_len} and {row_pad}")
    launch(_dequant_4bit_words_kernel, packed)[(_cdiv(n_words, block),)](
        packed.view(-1).view(torch.int32), absmax, absmax2, code2, offset, out_pairs, pair_offset, n_words,
        row_words, row_pad // 2, OUT_KIND=_OUT_KIND[dtype], BLOCK_WORDS=block, LOOKUP=_LOOKUP, PADDED=row_pad > 0,
        **consts)


def _launch_general(inputs, consts, n, out_flat, out_offset, row_len=1, row_pad=0):
    """General path: n outputs into out_flat[out_offset:] (any n, any alignment; rows of row_len
    each followed by row_pad elements left alone)."""
    packed, absmax, absmax2, code2, offset = inputs
    n_blocks = _cdiv(n, consts["QBLOCK"])
    rows = max(1, _TILE_ELEMS // consts["QBLOCK"])
    launch(_dequant_4bit_kernel, packed)[(_cdiv(n_blocks, rows),)](
        packed, absmax, absmax2, code2, offset, out_flat, out_offset, n, _cdiv(n, 2), n_blocks, max(row_len, 1),
        row_pad, ROWS=rows, PADDED=row_pad > 0, **consts)


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
    shape, inputs, consts, n = _prepare(packed, absmax, shape, dtype, quant_type, blocksize, nested)
    device = packed.device
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
    size = out.element_size()
    if n % 8 == 0 and _aligned(packed, 4) and _aligned(out, 2 * size):
        _launch_words(inputs, consts, n, out.view(-1).view(_PAIR_DTYPE[size]), 0, dtype)
    else:
        _launch_general(inputs, consts, n, out.view(-1), 0)
    return out


def dequantize_4bit_stacked(weights, dtype: torch.dtype, *, quant_type: str = "nf4",
                            blocksize: int = 64, row_pad: int = 0, extra_rows: int = 0) -> torch.Tensor:
    """Several 4-bit weights of one row length, dequantized into one [sum of rows, cols] tensor.

    weights: a sequence of (packed, absmax, nested, (rows, cols)) as for `dequantize_4bit`. The
    stacked buffer is allocated here and each kernel writes its rows at an offset into it (no views
    of it are written through: the launches stay plain mutations of one tensor when torch.compile
    traces them). row_pad (a multiple of 8) and extra_rows make the buffer
    [sum of rows + extra_rows, cols + row_pad], the weights in its top-left corner and the rest
    left unwritten for the caller (a GEMM operand extended by more columns or rows)."""
    cols = {tuple(w[3])[1] for w in weights}
    if len(weights) == 0 or len(cols) != 1:
        raise ValueError("dequantize_4bit_stacked: give one or more weights of the same row length")
    if row_pad < 0 or row_pad % 8 or extra_rows < 0:
        raise ValueError(f"dequantize_4bit_stacked: row_pad must be a multiple of 8 and extra_rows >= 0, got "
                         f"{row_pad} and {extra_rows}")
    prepared = [_prepare(p, a, shape, dtype, quant_type, blocksize, nested) for p, a, nested, shape in weights]
    rows = sum(shape[0] for shape, *_ in prepared)
    cols = cols.pop()
    width = cols + row_pad
    device = weights[0][0].device
    size = torch.empty((), dtype=dtype).element_size()
    total = (rows + extra_rows) * width
    # Padded rows: the fast path's programs each take words of one row (see _launch_words), at least 32
    # of them (rows of a multiple of 256); shorter rows take the general path, whose programs span rows
    # (the fast path's programs of 8 words made the interpreted tests' tiny models 100x slower there).
    if all(n % 8 == 0 and _aligned(inputs[0], 4) for _, inputs, _, n in prepared) and (cols % 256 == 0 or not row_pad):
        pairs = torch.empty(total // 2, dtype=_PAIR_DTYPE[size], device=device)
        start = 0
        for shape, inputs, consts, n in prepared:
            if n:
                _launch_words(inputs, consts, n, pairs, start // 2, dtype, cols, row_pad)
            start += shape[0] * width
        return pairs.view(dtype).view(rows + extra_rows, width)
    out = torch.empty(total, dtype=dtype, device=device)
    start = 0
    for shape, inputs, consts, n in prepared:
        if n:
            _launch_general(inputs, consts, n, out, start, cols, row_pad)
        start += shape[0] * width
    return out.view(rows + extra_rows, width)


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
