"""The 4-bit dequantization kernel (fxfuse/kernels/nf4.py) against bitsandbytes, bit for bit.

Run on CPU tensors through the Triton interpreter. Weights are quantized by bitsandbytes itself
(`quantize_4bit`, single and double quantization) and every output is compared bitwise (as int16
or int32, so that -0.0 vs +0.0 or NaN payloads count) with bitsandbytes' own dequantization, and
with bitsandbytes' arithmetic spelled out in torch (`_torch_reference`). Outputs are written into
buffers pre-filled with POISON, so that an element the kernel skips shows up.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

from fxfuse.kernels.nf4 import (  # noqa: E402
    FP4_CODE, NF4_CODE, dequantize_4bit, dequantize_4bit_stacked, dequantize_nf4, dequantize_params4bit,
)
from fxfuse.testing import POISON, poisoned_empty_tensors  # noqa: E402

from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

# bitsandbytes wraps its torch path in torch.compile (falling back to eager); the eager function
# is the same arithmetic without minutes of compiling across tests.
_bnb_dequantize_4bit_compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _seed(*key) -> int:
    # A fixed seed per case (str hashes are salted per process, crc32 is not).
    return zlib.crc32(repr(key).encode())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                   ignore_zero_sign: bool = False) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.numel() == expected.numel(), f"{what}: {actual.numel()} != {expected.numel()} elements"
    if ignore_zero_sign:
        # x + 0.0 is x for every x but -0.0, which becomes +0.0.
        actual, expected = actual + 0.0, expected + 0.0
    a, e = _bits(actual).reshape(-1), _bits(expected).reshape(-1)
    diff = (a != e).nonzero().reshape(-1)
    if diff.numel():
        i = diff[0].item()
        raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} elements differ; first at flat "
                             f"index {i}: got {actual.reshape(-1)[i].item()!r}, expected "
                             f"{expected.reshape(-1)[i].item()!r}")


def make_weight(shape, dtype, seed, outliers=True):
    """A weight-like tensor: N(0, 0.02), a few large outliers, an exact-zero row, a tiny row.

    The outliers set their blocks' absmax far above the rest (most codes of such a block decode
    to 0); the zero row makes blocks of absmax 0 (where shapes allow a whole block); the tiny row,
    blocks whose absmax is small. With double quantization all of these stretch the 8-bit absmax
    code table and its offset.
    """
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(shape, generator=g)
    flat = w.view(-1)
    if outliers and flat.numel() >= 8:
        idx = torch.randint(0, flat.numel(), (4,), generator=g)
        flat[idx] = torch.tensor([30.0, -45.0, 8.0, -1000.0])[: idx.numel()]
    if w.dim() == 2 and w.shape[0] >= 3:
        w[1] = 0.0
        w[2] *= 1e-3
    return w.to(dtype)


def quantize(w, blocksize=64, nested=False, quant_type="nf4"):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=nested, quant_storage=torch.uint8)


def nested_of(qs):
    return (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize) if qs.nested else None


def decode(quant_type, nibbles, absmax):
    """fp32 values of 4-bit codes `nibbles` with per-element scales `absmax`, as bitsandbytes' kernels.

    code[nibble] * absmax, from bitsandbytes' own table; for FP4 the sign is applied after the
    multiply (sign * magnitude * absmax), so code 8 is -0.0 as in its CUDA kernel.
    """
    code = bnbF.get_4bit_type(quant_type, device="cpu")
    if quant_type == "fp4":
        values = code[nibbles & 7] * absmax
        return torch.where(nibbles >= 8, values * -1.0, values)
    return code[nibbles] * absmax


def _torch_reference(packed, qs, dtype=None):
    """bitsandbytes' arithmetic in plain torch (the CUDA semantics).

    absmax (double quantization): code2[q] * absmax2[b // blocksize2], then + offset, in fp32;
    w[i] = decode(nibble(i), absmax[i // blocksize]) in fp32, rounded once to dtype; the high
    nibble of each byte is the first element.
    """
    if qs.nested:
        blocks = torch.arange(qs.absmax.numel()) // qs.state2.blocksize
        absmax = qs.state2.code[qs.absmax.long()] * qs.state2.absmax[blocks]
        absmax = absmax + qs.offset
    else:
        absmax = qs.absmax
    n = qs.shape.numel()
    b = packed.view(torch.uint8).reshape(-1).long()
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]
    values = decode(qs.quant_type, nibbles, absmax[torch.arange(n) // qs.blocksize])
    return values.to(dtype or qs.dtype).reshape(qs.shape)


def bnb_torch_path(packed, qs, dtype=None):
    """bitsandbytes' own pure-torch dequantization (its "default" backend), run eagerly.

    The same arithmetic as its CUDA kernel, but for FP4 code 8, which it decodes to +0.0. Its C++
    CPU kernel, which `bnb.functional` uses on CPU, agrees except where noted (that zero's sign,
    bf16 subnormals, and `bnb_cpu_kernel_is_wrong`).
    """
    absmax = qs.absmax
    if qs.nested:
        # As bnb.functional.dequantize_4bit: blockwise dequantization, then `absmax += offset`.
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = bnbF.get_4bit_type(qs.quant_type, device="cpu")
    return _bnb_dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, qs.blocksize,
                                        tuple(qs.shape), dtype or qs.dtype)


def bnb_cpu_kernel_is_wrong(shape, blocksize) -> bool:
    # bitsandbytes 0.50.2's C++ CPU kernel (used for an even last dim) reads the wrong absmax for
    # rows whose length is a multiple of 16 but not of the blocksize (e.g. rows of 96 or 160 with
    # blocksize 64, of 64 with blocksize 128): its 16-wide path assumes blocks do not straddle
    # rows. There its output differs from its own torch path and from its CUDA kernel, which this
    # kernel matches. (Found by sweeping row lengths 2..598; Llama rows are whole blocks.)
    n = shape[-1]
    return n % 16 == 0 and n % blocksize != 0


def assert_matches_bnb(got, packed, qs, what, dtype=None):
    """`got` against bitsandbytes three ways: the torch reference (CUDA semantics, always bitwise),
    bitsandbytes' torch path, and bnb.functional.dequantize_4bit (its C++ kernel on CPU, where that
    kernel is right). For FP4 the sign of zero is compared only against the torch reference."""
    fp4 = qs.quant_type == "fp4"
    assert_bitwise(got, _torch_reference(packed, qs, dtype), what + " vs torch reference")
    assert_bitwise(got, bnb_torch_path(packed, qs, dtype), what + " vs bitsandbytes' torch path",
                   ignore_zero_sign=fp4)
    if (dtype or qs.dtype) == qs.dtype and not bnb_cpu_kernel_is_wrong(qs.shape, qs.blocksize):
        assert_bitwise(got, bnbF.dequantize_4bit(packed, qs), what + " vs bnb.functional.dequantize_4bit",
                       ignore_zero_sign=fp4)


def run_kernel(packed, qs, dtype=None, quant_type="nf4"):
    dtype = dtype or qs.dtype
    out = torch.full(tuple(qs.shape), POISON, dtype=dtype)
    got = dequantize_4bit(packed, qs.absmax, qs.shape, dtype, quant_type=quant_type,
                          blocksize=qs.blocksize, nested=nested_of(qs), out=out)
    assert got is out
    return got


# ------------------------------------------------------------------------------------------------
# The code tables and the bit layout
# ------------------------------------------------------------------------------------------------

def test_code_tables_match_bitsandbytes():
    assert_bitwise(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"), "NF4_CODE")
    assert_bitwise(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"), "FP4_CODE")
    # The torch fallback and the C++ CPU backend read these tables too.
    from bitsandbytes.backends.utils import CODE
    assert_bitwise(NF4_CODE, CODE["nf4"], "bitsandbytes.backends.utils NF4 table")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_byte_decodes_as_bitsandbytes_kernel(quant_type):
    # All 256 bytes, i.e. every (high, low) nibble pair, with absmax 1 and then 3.
    packed = torch.arange(256, dtype=torch.uint8).repeat(2)
    absmax = torch.tensor([1.0, 3.0])
    got = dequantize_4bit(packed, absmax, (2, 512), torch.float32, quant_type=quant_type, blocksize=512)
    byte = torch.arange(512) % 256
    nibbles = torch.stack([byte >> 4, byte & 0xF], 1).reshape(-1)  # high nibble first
    expected = decode(quant_type, nibbles, torch.tensor([1.0, 3.0]).repeat_interleave(512)).reshape(2, 512)
    if quant_type == "nf4":
        assert_bitwise(got[0], NF4_CODE[nibbles[:512]], "nf4 codes")
    else:
        assert_bitwise(got[0][nibbles[:512] != 8], FP4_CODE[nibbles[:512]][nibbles[:512] != 8], "fp4 codes")
        assert (_bits(got[0][nibbles[:512] == 8]) == _bits(torch.tensor(-0.0))).all(), "fp4 code 8 is -0.0"
    assert_bitwise(got, expected, f"{quant_type} decode of every byte")
    # bitsandbytes' CPU kernel on the same bytes (FP4: but for the sign of code 8, see test_fp4).
    ref = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 512, quant_type, [2, 512], torch.float32)
    assert_bitwise(got, ref, f"{quant_type} decode vs bitsandbytes", ignore_zero_sign=quant_type == "fp4")


# ------------------------------------------------------------------------------------------------
# Against bitsandbytes, single and double quantization
# ------------------------------------------------------------------------------------------------

# (72, 200): blocks straddle rows; (200, 72), (64, 64): other row lengths; (256, 136): more than
# 256 blocks, so double quantization uses several nested scales; (33, 70): 2310 elements, not a
# multiple of 64 or 128 (a ragged last block); (7, 9): 63 elements, odd (the last byte holds one
# element), and odd last dim (bitsandbytes' CPU backend then takes its torch path).
SHAPES = [(72, 200), (200, 72), (64, 64), (256, 136), (33, 70), (7, 9)]


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_bitsandbytes(dtype, shape, blocksize, nested):
    w = make_weight(shape, dtype, _seed(dtype, shape, blocksize, nested))
    packed, qs = quantize(w, blocksize, nested)
    assert qs.blocksize == blocksize and qs.nested == nested
    got = run_kernel(packed, qs)
    assert got.shape == shape and got.dtype == dtype
    case = f"{dtype} {shape} blocksize={blocksize} nested={nested}"
    assert_matches_bnb(got, packed, qs, case)
    if not nested and not bnb_cpu_kernel_is_wrong(shape, blocksize):
        ref = torch.ops.bitsandbytes.dequantize_4bit(packed, qs.absmax, blocksize, "nf4", list(shape), dtype)
        assert_bitwise(got, ref, case + " vs torch.ops.bitsandbytes.dequantize_4bit")


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_matches_bitsandbytes_llama_row(blocksize, nested):
    # A Llama-like row length; many programs and, with double quantization, 24 (12) blocks of
    # the nested 256-block absmax scale.
    shape = (96, 4096)
    w = make_weight(shape, torch.bfloat16, _seed("big", blocksize, nested))
    packed, qs = quantize(w, blocksize, nested)
    assert_matches_bnb(run_kernel(packed, qs), packed, qs, f"{shape} {blocksize} {nested}")


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
def test_other_blocksizes(blocksize, nested):
    w = make_weight((40, 520), torch.bfloat16, _seed("bs", blocksize, nested))
    packed, qs = quantize(w, blocksize, nested)
    assert_matches_bnb(run_kernel(packed, qs), packed, qs, f"blocksize {blocksize} nested={nested}")


@pytest.mark.parametrize("shape", [(130,), (4, 6, 10), (3, 5, 7), (1,)], ids=str)
def test_other_ranks(shape):
    w = make_weight(shape, torch.float16, _seed("rank", shape))
    packed, qs = quantize(w, 64, True)
    got = run_kernel(packed, qs)
    assert got.shape == shape
    # bitsandbytes' CPU kernel returns [1, n] for a 1-D shape; compare the elements.
    assert_matches_bnb(got, packed, qs, f"shape {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_output_dtype_differs_from_quant_dtype(dtype):
    # bf16 weights dequantized to each dtype: the fp32 product is rounded once, to `dtype`.
    # (bnb.functional always returns quant_state.dtype; its op takes any dtype.)
    w = make_weight((48, 200), torch.bfloat16, _seed("cast", dtype))
    packed, qs = quantize(w, 64, True)
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    ref = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", [48, 200], dtype)
    got = run_kernel(packed, qs, dtype)
    assert_bitwise(got, ref, f"bf16 weights -> {dtype}")
    assert_bitwise(got, bnb_torch_path(packed, qs, dtype), f"bf16 weights -> {dtype}, torch path")
    assert_bitwise(got, _torch_reference(packed, qs, dtype), f"bf16 weights -> {dtype}, torch reference")


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_degenerate_blocks(dtype, nested):
    # All-zero weight: absmax 0 everywhere (and a zero offset / nested absmax). Huge outliers near
    # the top of fp16's range. Then a weight small enough for subnormal outputs.
    zeros = torch.zeros(16, 64, dtype=dtype)
    packed, qs = quantize(zeros, 64, nested)
    got = run_kernel(packed, qs)
    assert_matches_bnb(got, packed, qs, "zeros")
    assert_bitwise(got, torch.zeros_like(got), "zeros decode to +0.0")

    w = make_weight((16, 64), torch.float32, _seed("huge", dtype, nested), outliers=False)
    w[3, 5], w[9, 60], w[12, :] = 6.0e4, -5.0e4, 3.0e4
    w = w.to(dtype)
    packed, qs = quantize(w, 64, nested)
    assert_matches_bnb(run_kernel(packed, qs), packed, qs, "huge outliers")

    scale = {torch.float16: 1e-6, torch.bfloat16: 1e-39, torch.float32: 1e-39}[dtype]
    tiny = (scale * torch.randn(8, 64, generator=torch.Generator().manual_seed(3))).to(dtype)
    packed, qs = quantize(tiny, 64, nested)
    got = run_kernel(packed, qs)
    assert (got != 0).any(), "subnormal outputs expected"
    assert_bitwise(got, _torch_reference(packed, qs), "subnormal outputs vs torch reference")
    assert_bitwise(got, bnb_torch_path(packed, qs), "subnormal outputs vs bitsandbytes' torch path")
    if dtype != torch.bfloat16:
        assert_bitwise(got, bnbF.dequantize_4bit(packed, qs), "subnormal outputs vs bnb")
    # (bitsandbytes' C++ CPU kernel converts to bf16 with AVX512-BF16's VCVTNEPS2BF16, which
    # flushes subnormals to zero; its CUDA kernel and its torch path keep them, as does this one.)


def test_out_is_written_everywhere():
    # A ragged last block, an odd element count, double quantization: every element overwritten.
    for shape, dtype in [((33, 70), torch.bfloat16), ((7, 9), torch.float16), ((5, 13), torch.float32)]:
        w = make_weight(shape, dtype, _seed("poison", shape))
        packed, qs = quantize(w, 64, True)
        out = torch.full(shape, POISON, dtype=dtype)
        got = dequantize_nf4(packed, qs.absmax, shape, dtype, nested=nested_of(qs), out=out)
        assert got is out
        assert not torch.isnan(out).any(), f"{shape}: {torch.isnan(out).sum().item()} elements not written"
        assert_matches_bnb(out, packed, qs, f"out= {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_both_paths_agree(dtype):
    # A shape of whole 32-bit words takes the fast path (words in, pairs of outputs out); the same
    # weight written into an output one element off alignment takes the general (interleaving)
    # path. Both must be bit-equal to bitsandbytes, and every element written.
    w = make_weight((40, 256), dtype, _seed("paths", dtype))
    packed, qs = quantize(w, 64, True)
    fast = torch.full((40, 256), POISON, dtype=dtype)
    dequantize_nf4(packed, qs.absmax, (40, 256), dtype, nested=nested_of(qs), out=fast)
    buf = torch.full((40 * 256 + 1,), POISON, dtype=dtype)
    general = buf[1:].view(40, 256)
    assert general.data_ptr() % (2 * general.element_size()) != 0  # not aligned for the paired store
    dequantize_nf4(packed, qs.absmax, (40, 256), dtype, nested=nested_of(qs), out=general)
    assert not torch.isnan(fast).any() and not torch.isnan(general).any()
    assert_matches_bnb(fast, packed, qs, f"fast path {dtype}")
    assert_matches_bnb(general, packed, qs, f"general path {dtype}")
    assert torch.isnan(buf[0]), "the general path wrote outside its output"


@pytest.mark.parametrize("cols", [256, 70], ids=["words", "general"])
def test_stacked_with_padded_rows_and_extra_rows(cols):
    # How the LoRA op builds a K-extended GEMM operand: two weights stacked, each row followed by
    # row_pad columns and the whole followed by extra_rows rows, all left for the caller. Rows of
    # whole words take the fast path; 70 columns, the general one. Every buffer starts as all-ones
    # bytes (NaN as bf16), so that the padding must still be NaN and each weight bit-equal.
    with poisoned_empty_tensors():
        shapes = [(40, cols), (24, cols)]
        quantized = []
        for i, shape in enumerate(shapes):
            w = make_weight(shape, torch.bfloat16, _seed("stacked", cols, i))
            quantized.append(quantize(w, 64, True))
        specs = [(packed, qs.absmax, nested_of(qs), shape) for (packed, qs), shape in zip(quantized, shapes)]
        out = dequantize_4bit_stacked(specs, torch.bfloat16, row_pad=16, extra_rows=8)
        assert out.shape == (40 + 24 + 8, cols + 16)
        row = 0
        for (packed, qs), (n, _) in zip(quantized, shapes):
            assert_matches_bnb(out[row:row + n, :cols].contiguous(), packed, qs, f"stacked rows {row}..")
            row += n
        assert torch.isnan(out[:, cols:]).all() and torch.isnan(out[row:]).all(), "padding written"
        with pytest.raises(ValueError, match="multiple of 8"):
            dequantize_4bit_stacked(specs, torch.bfloat16, row_pad=4)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fast_path_select_tree_decode(monkeypatch, quant_type):
    # The fast path decodes through a table (tl.gather); its select-tree variant, kept for the
    # launch sweep's comparison (benchmarks/lora_kernels_sweep.py), must give the same bits.
    import fxfuse.kernels.nf4 as nf4
    monkeypatch.setattr(nf4, "_LOOKUP", False)
    w = make_weight((40, 256), torch.bfloat16, _seed("tree", quant_type))
    packed, qs = quantize(w, 64, True, quant_type)
    assert_matches_bnb(run_kernel(packed, qs, quant_type=quant_type), packed, qs, f"select tree {quant_type}")


def test_offset_forms():
    w = make_weight((24, 128), torch.bfloat16, _seed("offset"))
    packed, qs = quantize(w, 64, True)
    assert isinstance(qs.offset, torch.Tensor) and qs.offset.dim() == 0
    ref = bnbF.dequantize_4bit(packed, qs)
    a2, c2, off, bs2 = nested_of(qs)
    for offset in (off, off.item(), off.reshape(1), off.double()):
        got = dequantize_nf4(packed, qs.absmax, (24, 128), torch.bfloat16, nested=(a2, c2, offset, bs2))
        assert_bitwise(got, ref, f"offset given as {type(offset).__name__}")


def test_fp4():
    # FP4, bit for bit as bitsandbytes' CUDA kernel computes it (the torch reference: code 8, a
    # zero with the sign bit set, is -0.0). bitsandbytes' CPU backend does not agree with itself
    # on that zero's sign (its torch path gives +0.0; its C++ kernel -0.0 or +0.0 depending on
    # whether rows are whole blocks), so against it the sign of zero is not compared.
    for dtype, nested, shape in [(torch.bfloat16, True, (40, 200)), (torch.float16, False, (32, 128)),
                                 (torch.float32, True, (7, 9))]:
        w = make_weight(shape, dtype, _seed("fp4", dtype, nested))
        packed, qs = quantize(w, 64, nested, "fp4")
        got = run_kernel(packed, qs, quant_type="fp4")
        assert_matches_bnb(got, packed, qs, f"fp4 {dtype} {shape} nested={nested}")


# ------------------------------------------------------------------------------------------------
# Params4bit / Linear4bit
# ------------------------------------------------------------------------------------------------

def _params4bit(w, nested, quant_type="nf4", quant_storage=torch.uint8, blocksize=64):
    p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                          quant_type=quant_type, quant_storage=quant_storage)
    p = p.to("cpu")  # quantizes
    assert p.bnb_quantized
    return p


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16"])
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
def test_params4bit(nested, quant_storage):
    w = make_weight((72, 200), torch.bfloat16, _seed("params", nested, quant_storage))
    p = _params4bit(w, nested, quant_storage=quant_storage)
    got = dequantize_params4bit(p)
    assert got.shape == (72, 200) and got.dtype == torch.bfloat16
    assert_matches_bnb(got, p.data, p.quant_state, "Params4bit")
    out = torch.full((72, 200), POISON, dtype=torch.float32)
    assert dequantize_params4bit(p, dtype=torch.float32, out=out) is out
    assert_bitwise(out, _torch_reference(p.data, p.quant_state, torch.float32), "Params4bit -> fp32")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_forward_uses_the_same_weight(quant_type):
    # Linear4bit's training-mode forward dequantizes with bitsandbytes and calls F.linear; with
    # our dequantized weight the product is the same, bit for bit.
    lin = bnb.nn.Linear4bit(200, 72, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type=quant_type, quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(make_weight((72, 200), torch.bfloat16, _seed("lin", quant_type)),
                                   requires_grad=False, compress_statistics=True, quant_type=quant_type)
    lin = lin.to("cpu").train()
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
    y = lin(x)
    w = dequantize_params4bit(lin.weight)
    assert_bitwise(w, bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state), "Linear4bit weight")
    assert_bitwise(y.detach(), torch.nn.functional.linear(x.detach(), w), "Linear4bit forward")


def test_params4bit_errors():
    w = make_weight((8, 64), torch.bfloat16, 0)
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_params4bit(bnb.nn.Params4bit(w, requires_grad=False))  # not quantized yet
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_params4bit(w)
    p = _params4bit(w, False)
    p.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_params4bit(p)
    p = _params4bit(w, False)
    p.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        dequantize_params4bit(p)


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def test_bad_arguments():
    w = make_weight((8, 64), torch.float32, 1)
    packed, qs = quantize(w, 64, False)
    packed2, qs2 = quantize(w, 64, True)
    nested = nested_of(qs2)
    a2, c2, off, bs2 = nested
    bf = torch.bfloat16
    cases = [
        (dict(packed=packed.view(torch.int8)), "packed must be torch.uint8"),
        (dict(packed=packed[:-1]), "packed must have 256 elements"),
        (dict(packed=packed.numpy()), "packed must be a torch.Tensor"),
        (dict(packed=torch.stack([packed, packed], 1)[:, 0]), "packed must be contiguous"),
        (dict(absmax=qs.absmax.half()), "absmax must be torch.float32"),
        (dict(absmax=torch.cat([qs.absmax, qs.absmax])), "absmax must have 8 elements"),
        (dict(shape=(8, 66)), "packed must have 264 elements"),
        (dict(shape=(8, -64)), "negative"),
        (dict(shape=None), "shape must be a sequence"),
        (dict(shape=(8.0, 64)), "shape must be a sequence of ints"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(blocksize=48), "blocksize 48 not supported"),
        (dict(blocksize=16), "blocksize 16 not supported"),
        (dict(blocksize=64.0), "blocksize must be an int"),
        (dict(quant_type="int4"), "quant_type"),
        (dict(out=torch.empty(8, 64, dtype=torch.float32)), "out must be"),
        (dict(out=torch.empty(64, 8, dtype=bf).t()), "out must be contiguous"),
        (dict(out=torch.empty(8, 63, dtype=bf)), "out must be"),
        # double quantization
        (dict(nested=nested), "absmax \\(double quantization\\) must be torch.uint8"),
        (dict(absmax=qs2.absmax, nested=(a2, c2, off)), "nested must be"),
        (dict(absmax=qs2.absmax, nested=(a2.half(), c2, off, bs2)), "absmax2 must be torch.float32"),
        (dict(absmax=qs2.absmax, nested=(torch.cat([a2, a2]), c2, off, bs2)), "absmax2 must have 1"),
        (dict(absmax=qs2.absmax, nested=(a2, c2[:16], off, bs2)), "code2 must have 256"),
        (dict(absmax=qs2.absmax, nested=(a2, c2, off, 100)), "power of two"),
        (dict(absmax=qs2.absmax, nested=(a2, c2, torch.zeros(2), bs2)), "offset"),
        (dict(absmax=qs2.absmax, nested=(a2, c2, "0.1", bs2)), "offset"),
        (dict(absmax=qs2.absmax, nested=(a2, c2, torch.tensor(1), bs2)), "offset"),
        (dict(absmax=qs2.absmax.float(), nested=nested), "must be torch.uint8"),
    ]
    base = dict(packed=packed, absmax=qs.absmax, shape=(8, 64), dtype=bf)
    for change, message in cases:
        args = {**base, **change}
        kwargs = {k: args.pop(k) for k in ("blocksize", "nested", "out", "quant_type") if k in args}
        with pytest.raises(ValueError, match=message):
            dequantize_4bit(args["packed"], args["absmax"], args["shape"], args["dtype"], **kwargs)
    # And the good call works; an empty shape returns an empty tensor without a launch.
    good = dequantize_4bit(packed, qs.absmax, (8, 64), torch.float32)
    assert_bitwise(good, bnbF.dequantize_4bit(packed, qs), "the good call")
    empty = dequantize_nf4(torch.empty(0, dtype=torch.uint8), torch.empty(0), (0, 64), bf)
    assert empty.shape == (0, 64)
