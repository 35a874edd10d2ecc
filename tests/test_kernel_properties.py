"""Property tests (hypothesis) of fxfuse's Triton kernel entry points over random shapes, dtypes and values.

One test per entry point (or forward/backward pair) that had no property test yet; RMSNorm's is
tests/test_rms_norm_fallbacks.py::test_kernel_property_exact_on_random_shapes, whose style these copy:
hypothesis draws the sizes (only within each kernel's documented constraints, odd ones included),
the dtype and a seed; the inputs are fresh random values from a seeded `torch.Generator`; the stock
reference runs in the working precision and in float64, and every output and gradient of the kernel
must pass `fxfuse.testing.assert_exact` against them. Where a kernel is documented (and tested) as
bit-equal to the stock code or to bitsandbytes, that is asserted too. Outputs go into NaN-poisoned
buffers (`out=`-style arguments, or `torch.empty` poisoned for the host code's own allocations), so an
element a kernel skips fails. The reference functions are the kernels' own tests' (imported from them).

Two sizes are bounded from below on purpose, because the criterion compares error *statistics* and
over a handful of values the winner is luck, not accuracy:
- cross-entropy's per-row losses are held to `assert_exact` only with at least 16 rows that take a loss
  (with 1 to 5 rows, 6 of 150 random cases went over the 1.25x bar; with 16 to 40 the worst ratio seen
  was 0.58), and to a fixed tolerance (the one the kernel tests hold lse to) with any number of rows;
- the LoRA kernels' fp32 outputs have at least MIN_VALUES values (as in tests/test_lora_matmul.py).

Sizes are kept small: the kernels run in Triton's interpreter on the CPU.

Found by these tests: at rank 1, rank_r_project, rank_r_weight_grad and lora_dy_grads (interpreted) now and
then exceed the max-error bar against a host BLAS whose fp32 matrix-vector product is nearly correctly rounded
(the comment above RANK_1_MAX_FACTOR); rank 1 is held to the RMS bar against the stock path and its max error to
the host-independent fp32 summation bound (three such cases pinned).
"""
import math
import os
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxfuse.kernels import cross_entropy as ce_kernels  # noqa: E402
from fxfuse.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward  # noqa: E402
from fxfuse.kernels.flash_attention import flash_attention_backward, flash_attention_forward  # noqa: E402
from fxfuse.kernels.lora_matmul import (  # noqa: E402
    lora_dy_grads, lora_outer, rank_r_project, rank_r_weight_grad, split_columns_)
from fxfuse.kernels.rope import rope_backward, rope_forward, rope_qk_backward, rope_qk_forward  # noqa: E402
from fxfuse.kernels.swiglu import swiglu_backward, swiglu_forward  # noqa: E402
from fxfuse.patterns.rope import rotary_embedding  # noqa: E402
from fxfuse.testing import POISON, assert_exact, poisoned_empty_tensors  # noqa: E402

from test_cross_entropy import DLOSS  # noqa: E402
from test_cross_entropy import run_reference64 as ce_reference64  # noqa: E402
from test_cross_entropy import run_stock as ce_stock  # noqa: E402
from test_flash_attention import _mask as attention_mask  # noqa: E402
from test_flash_attention import _sdpa as sdpa_reference  # noqa: E402
from test_lora_matmul import poisoned_empty  # noqa: E402,F401  (fixture: torch.empty fills floats with NaN)
from test_rope import _inputs as rope_inputs  # noqa: E402
from test_swiglu import make_inputs as swiglu_inputs  # noqa: E402
from test_swiglu import run_reference64 as swiglu_reference64  # noqa: E402
from test_swiglu import run_stock as swiglu_stock  # noqa: E402

# The interpreter's runtime-bound loops trip a numpy deprecation warning thousands of times, and numpy
# warns inside the interpreter (overflowing exp of masked lanes and the like).
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered"),
              pytest.mark.filterwarnings("ignore:overflow encountered"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered")]

HALF = [torch.bfloat16, torch.float16]
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
SEEDS = st.integers(0, 2 ** 16)
# Powers of two: the LoRA kernels scale their fp32 result, where PEFT scales the 16-bit operand first
# (exact for these); any other scale is one more rounding (tests/test_lora_matmul.py).
LORA_SCALES = st.sampled_from([0.5, 1.0, 2.0, 4.0])
# The LoRA kernels' fp32 outputs: at least this many values per checked tensor (module docstring).
MIN_VALUES = 256


def _settings(n, fixture=False):
    # fixture: the test takes `poisoned_empty`, meant to stay in place for every example.
    checks = [HealthCheck.too_slow] + ([HealthCheck.function_scoped_fixture] if fixture else [])
    return settings(max_examples=n, deadline=None, suppress_health_check=checks)


def _poisoned(shape, dtype):
    return torch.full(shape, POISON, dtype=dtype)


def _rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


# ------------------------------------------------------------------------------------------------
# SwiGLU
# ------------------------------------------------------------------------------------------------


@_settings(30)
@given(lead=st.lists(st.integers(1, 6), max_size=2), n=st.integers(1, 300), dtype=st.sampled_from(FLOATS),
       halves=st.booleans(), seed=SEEDS)
def test_swiglu_property(lead, n, dtype, halves, seed):
    """h, d_gate, d_up of any row-contiguous shape (1-D to 3-D, any width), contiguous or the two column
    halves of one gate,up output (and its gradient written into the halves of one buffer)."""
    shape = (*lead, n)
    gate, up, dh = swiglu_inputs(shape, dtype, seed)
    if halves:
        y = torch.cat([gate, up], -1)
        gate, up = y[..., :n], y[..., n:]
        grad = _poisoned((*lead, 2 * n), dtype)
        d_gate_out, d_up_out = grad[..., :n], grad[..., n:]
    else:
        d_gate_out, d_up_out = _poisoned(shape, dtype), _poisoned(shape, dtype)
    out = _poisoned(shape, dtype)
    h = swiglu_forward(gate, up, out=out)
    d_gate, d_up = swiglu_backward(dh, gate, up, d_gate_out=d_gate_out, d_up_out=d_up_out)
    assert h is out and d_gate is d_gate_out and d_up is d_up_out

    stock = swiglu_stock(gate, up, dh)
    ref64 = swiglu_reference64(gate, up, dh)
    for name, ours, r, s in zip(("h", "d_gate", "d_up"), (h, d_gate, d_up), ref64, stock):
        assert_exact(name, ours, r, s)
    if dtype != torch.float32:
        # The stock roundings, not just the accuracy (assert_exact cannot see a skipped rounding of silu's
        # output): h and d_up are bit-equal; d_gate too in bf16 (fp16: rare one-ulp ties, test_swiglu.py).
        hs, dgs, dus = stock
        assert torch.equal(h, hs) and torch.equal(d_up, dus)
        if dtype == torch.bfloat16:
            assert torch.equal(d_gate, dgs)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


@_settings(8)
@given(b=st.integers(1, 3), hq=st.integers(1, 4), hk=st.integers(1, 4), t=st.integers(1, 40),
       half=st.integers(1, 64), dtype=st.sampled_from(HALF), cos_batch_one=st.booleans(), seed=SEEDS)
def test_rope_property(b, hq, hk, t, half, dtype, cos_batch_one, seed):
    """rope_forward / rope_backward and rope_qk_forward / rope_qk_backward: strided q and k (a projection
    viewed and transposed), any even head dim up to 128, cos/sin of batch 1 or B; bit-equal to HF's
    `x * cos + rotate_half(x) * sin` and its autograd backward, and exact against float64."""
    d = 2 * half
    q, cos, sin = rope_inputs(b, hq, t, d, dtype, seed, cos_batch=1 if cos_batch_one else None)
    k = rope_inputs(b, hk, t, d, dtype, seed + 1)[0]
    g = torch.Generator().manual_seed(seed + 2)
    dq, dk = _rand(g, b, hq, t, d, dtype=dtype), _rand(g, b, hk, t, d, dtype=dtype)

    def stock_and_float64(x, dy):
        xs = x.detach().clone().requires_grad_()
        y = rotary_embedding(xs, cos, sin)
        (dx,) = torch.autograd.grad(y, xs, dy)
        x64 = x.detach().double().requires_grad_()
        y64 = rotary_embedding(x64, cos.double(), sin.double())
        (dx64,) = torch.autograd.grad(y64, x64, dy.double())
        return (y.detach(), dx), (y64.detach(), dx64)

    # One tensor at a time.
    y = rope_forward(q, cos, sin, out=_poisoned(q.shape, dtype))
    dx = rope_backward(dq, cos, sin, out=_poisoned(q.shape, dtype))
    (ys, dxs), (y64, dx64) = stock_and_float64(q, dq)
    assert torch.equal(y, ys) and torch.equal(dx, dxs)
    assert_exact("y", y, y64, ys)
    assert_exact("dx", dx, dx64, dxs)
    # q and k in one launch (k of another head count).
    oq, ok = rope_qk_forward(q, k, cos, sin, out_q=_poisoned(q.shape, dtype), out_k=_poisoned(k.shape, dtype))
    gq, gk = rope_qk_backward(dq, dk, cos, sin, out_q=_poisoned(q.shape, dtype), out_k=_poisoned(k.shape, dtype))
    (yks, dks), (yk64, dk64) = stock_and_float64(k, dk)
    assert torch.equal(oq, ys) and torch.equal(gq, dxs) and torch.equal(ok, yks) and torch.equal(gk, dks)
    for name, ours, r, s in (("q", oq, y64, ys), ("dq", gq, dx64, dxs), ("k", ok, yk64, yks), ("dk", gk, dk64, dks)):
        assert_exact(name, ours, r, s)


# ------------------------------------------------------------------------------------------------
# Cross-entropy
# ------------------------------------------------------------------------------------------------

# Rows that take a loss needed before the per-row losses are held to assert_exact (module docstring).
CE_MIN_ROWS = 16


@_settings(10)
@given(n=st.integers(1, 40), v=st.integers(1, 300), dtype=st.sampled_from(FLOATS),
       block_v=st.sampled_from([16, 64, 4096]), row_pad=st.integers(0, 3), ignored=st.sampled_from([0.0, 0.3, 1.0]),
       ignore_index=st.sampled_from([-100, 0]), label_dtype=st.sampled_from([torch.int64, torch.int32]),
       reduction=st.sampled_from(["mean", "sum/num_items"]), seed=SEEDS)
def test_cross_entropy_property(n, v, dtype, block_v, row_pad, ignored, ignore_index, label_dtype, reduction, seed):
    """cross_entropy_forward / _backward: any vocabulary size (rows walked in chunks of 16, 64 or the GPU's
    4096 columns), rows of a wider tensor (row stride V + pad), ignored rows (ignore_index -100 or a
    vocabulary id, none to all), int64 or int32 labels; per-row losses, lse and dlogits."""
    g = torch.Generator().manual_seed(seed)
    logits = _rand(g, n, v + row_pad, dtype=dtype, scale=3.0)[:, :v]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = v - 1  # the last and first columns as targets: the edges of the chunk loop
    labels[-1] = 0 if n > 1 else labels[-1]
    labels[torch.rand(n, generator=g) < ignored] = ignore_index
    taken = labels != ignore_index
    count = int(taken.sum())
    num_items = None if reduction == "mean" else torch.tensor(count + int(torch.randint(0, 5, (1,), generator=g)))
    # What the backward op hands the kernel: the fp32 upstream gradient over the denominator, in fp64.
    denominator = count if num_items is None else int(num_items)
    dloss_rows = (torch.tensor(DLOSS).double() / denominator).expand(n) if denominator else \
        torch.zeros(n, dtype=torch.float64)  # 'mean' over no rows: every row ignored, its scale 0 anyway

    loss_out, lse_out, dlogits_out = _poisoned((n,), torch.float64), _poisoned((n,), torch.float32), \
        _poisoned((n, v), dtype)
    with mock.patch.object(ce_kernels, "_BLOCK_V", block_v):
        rows, lse = cross_entropy_forward(logits, labels.to(label_dtype), ignore_index, loss_out=loss_out,
                                          lse_out=lse_out)
        dlogits = cross_entropy_backward(dloss_rows, logits, labels.to(label_dtype), lse, ignore_index,
                                         dlogits_out=dlogits_out)
    assert rows is loss_out and lse is lse_out and dlogits is dlogits_out

    rows64 = F.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="none")
    rows_s = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    assert (rows[~taken] == 0).all()
    torch.testing.assert_close(rows, rows64, rtol=2.5e-7, atol=2.5e-7)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=2.5e-7, atol=2.5e-7)
    if count >= CE_MIN_ROWS:
        assert_exact("loss rows", rows, rows64, rows_s)
    _, dlogits64 = ce_reference64(logits, labels, num_items, ignore_index)
    _, dlogits_s = ce_stock(logits, labels, num_items, ignore_index)
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)
    if dtype != torch.float32:
        # The stock rounding pattern: equal to the stock dlogits but for rare rounding ties (test_cross_entropy).
        mismatched = (dlogits != dlogits_s).sum().item()
        assert mismatched <= max(2, dlogits.numel() // 1000), f"{mismatched} of {dlogits.numel()} differ from stock"


# ------------------------------------------------------------------------------------------------
# NF4 / FP4 dequantization
# ------------------------------------------------------------------------------------------------

NF4_SHAPES = st.one_of(st.tuples(st.integers(1, 600)), st.tuples(st.integers(1, 40), st.integers(1, 200)))


@_settings(15)
@given(shape=NF4_SHAPES, dtype=st.sampled_from(FLOATS), out_dtype=st.sampled_from([None, *FLOATS]),
       blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]), nested=st.booleans(),
       quant_type=st.sampled_from(["nf4", "fp4"]), misaligned=st.booleans(), seed=SEEDS)
def test_dequantize_4bit_property(shape, dtype, out_dtype, blocksize, nested, quant_type, misaligned, seed):
    """dequantize_4bit of a weight that bitsandbytes quantized (any blocksize, single or double
    quantization, NF4 or FP4, 1-D or 2-D of any size, into its own dtype or another), bit for bit as
    bitsandbytes dequantizes it; the output aligned (the fast, word-wise path when the size allows) or one
    element off (the general path)."""
    pytest.importorskip("bitsandbytes")
    from test_nf4_kernel import assert_matches_bnb, make_weight, nested_of, quantize

    from fxfuse.kernels.nf4 import dequantize_4bit
    out_dtype = out_dtype or dtype
    w = make_weight(shape, dtype, seed)
    packed, qs = quantize(w, blocksize, nested, quant_type)
    n = math.prod(shape)
    buf = _poisoned((n + 1,), out_dtype)
    out = buf[1:].view(shape) if misaligned else buf[:n].view(shape)
    got = dequantize_4bit(packed, qs.absmax, shape, out_dtype, quant_type=quant_type, blocksize=blocksize,
                          nested=nested_of(qs), out=out)
    assert got is out
    # Bitwise against bitsandbytes' arithmetic spelled out, its torch path and (where right) its CPU kernel:
    # a NaN left in `out` fails all three.
    assert_matches_bnb(out, packed, qs, f"{quant_type} {dtype}->{out_dtype} {shape} blocksize={blocksize} "
                                        f"nested={nested} misaligned={misaligned}", dtype=out_dtype)
    assert torch.isnan(buf[0] if misaligned else buf[n]), "wrote outside its output"


@_settings(8)
@given(rows=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       cols=st.one_of(st.sampled_from([256, 512]), st.integers(1, 100)), row_pad=st.sampled_from([0, 8, 16]),
       extra_rows=st.integers(0, 3), dtype=st.sampled_from(FLOATS), blocksize=st.sampled_from([32, 64, 128]),
       nested=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]), seed=SEEDS)
def test_dequantize_4bit_stacked_property(rows, cols, row_pad, extra_rows, dtype, blocksize, nested, quant_type, seed):
    """dequantize_4bit_stacked: 1 to 3 weights of one row length stacked, each row followed by row_pad
    columns and the whole by extra_rows rows that must stay unwritten; rows of whole 256-element multiples
    (the fast path, padded rows included) or any length (the general path)."""
    pytest.importorskip("bitsandbytes")
    from test_nf4_kernel import assert_matches_bnb, make_weight, nested_of, quantize

    from fxfuse.kernels.nf4 import dequantize_4bit_stacked
    quantized = [quantize(make_weight((r, cols), dtype, seed + i), blocksize, nested, quant_type)
                 for i, r in enumerate(rows)]
    specs = [(packed, qs.absmax, nested_of(qs), (r, cols)) for (packed, qs), r in zip(quantized, rows)]
    with poisoned_empty_tensors():
        out = dequantize_4bit_stacked(specs, dtype, quant_type=quant_type, blocksize=blocksize, row_pad=row_pad,
                                      extra_rows=extra_rows)
    assert out.shape == (sum(rows) + extra_rows, cols + row_pad) and out.dtype == dtype
    start = 0
    for (packed, qs), r in zip(quantized, rows):
        assert_matches_bnb(out[start:start + r, :cols].contiguous(), packed, qs, f"stacked rows {start}..")
        start += r
    assert torch.isnan(out[:, cols:]).all() and torch.isnan(out[start:]).all(), "padding written"


# ------------------------------------------------------------------------------------------------
# LoRA rank-r products
# ------------------------------------------------------------------------------------------------

RANKS = st.integers(1, 48)  # up to 32 the fused lora_dy_grads kernel, above it the two single-product kernels
# A host-dependent finding (by these tests). At rank 1 the stock product (PEFT's fp32 x @ A^T, dy @ B, dy^T @ xa)
# is a matrix-vector product, which some CPU BLAS builds compute nearly correctly rounded when the reduction runs
# along contiguous memory; interpreted, the kernels compute exactly their documented algorithm (32-wide blocks of
# the reduction, each an fp64 dot rounded to fp32, summed in fp32: several roundings once the reduction passes 32).
# On such a host the worst element of a few hundred is now and then over 1.25x the stock path's (seen up to 2.43x;
# about 1 in 200 random examples), while the RMS error stays below the stock path's (0.6x to 0.85x); on another
# host (CI's) the same cases pass the max bar. So rank 1 is held to the RMS bar against the stock path
# (RANK_1_MAX_FACTOR) and its max error to a bound that does not depend on the host's BLAS:
# test_rank_1_max_error_within_the_fp32_summation_bound.
RANK_1_MAX_FACTOR = None


def _max_factor(r):
    return RANK_1_MAX_FACTOR if r == 1 else 1.25


@st.composite
def _rank_and_sizes(draw, count):
    """(r, size, ...): a LoRA rank and `count` sizes, each at least MIN_VALUES / r (up to 64 more), so that
    every fp32 output [size, r] has at least MIN_VALUES values."""
    r = draw(RANKS)
    least = -(-MIN_VALUES // r)
    return (r, *(draw(st.integers(least, least + 64)) for _ in range(count)))


def _activation(g, m, k, dtype, transposed):
    """A [m, k] bf16/fp16 operand, contiguous or the transpose of a [k, m] one (the kernels take any strides)."""
    return _rand(g, k, m, dtype=dtype).t() if transposed else _rand(g, m, k, dtype=dtype)


def _check_rank_r_project(r, m, k, dtype, scale, p_transposed, q_transposed, copy, seed, max_factor):
    g = torch.Generator().manual_seed(seed)
    p = _activation(g, m, k, dtype, p_transposed)
    q = _rand(g, r, k).t() if q_transposed else _rand(g, k, r)
    copy_to = _poisoned((m, k + 8), dtype) if copy else None
    ours = rank_r_project(p, q, scale, copy_to=copy_to)
    assert ours.shape == (m, r) and ours.dtype == torch.float32
    ref = scale * (p.double() @ q.double())
    stock = (p.float() * scale) @ q  # PEFT: scale the fp32 copy, then the fp32 GEMM
    assert_exact("p @ q", ours, ref, stock, max_factor=max_factor)
    if copy:
        assert torch.equal(copy_to[:, :k], p) and copy_to[:, k:].isnan().all()
    return [("p @ q", ours, ref, scale * (p.double().abs() @ q.double().abs()), k)]


def _check_rank_r_weight_grad(r, n, m, dtype, scale, transpose, p_transposed, seed, max_factor):
    g = torch.Generator().manual_seed(seed)
    p, low = _activation(g, m, n, dtype, p_transposed), _rand(g, m, r)
    ours = rank_r_weight_grad(p, low, scale, transpose=transpose)
    ref = scale * p.double().t() @ low.double()
    stock = (p.float() * scale).t() @ low
    if transpose:
        ref, stock = ref.t(), stock.t()
        assert ours.is_contiguous()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert_exact("weight grad", ours, ref, stock, max_factor=max_factor)
    magnitude = scale * p.double().abs().t() @ low.double().abs()
    return [("weight grad", ours, ref, magnitude.t() if transpose else magnitude, m)]


def _check_lora_dy_grads(r, m, n, dtype, scale, dy_transposed, copy, seed, max_factor):
    g = torch.Generator().manual_seed(seed)
    dy, b, xa = _activation(g, m, n, dtype, dy_transposed), _rand(g, n, r), _rand(g, m, r)
    copy = copy and r <= 32  # documented: copy_to only with the fused kernel (rank tiles up to 32)
    copy_to = _poisoned((m, n + 8), dtype) if copy else None
    dxa, db = lora_dy_grads(dy, b, xa, scale, copy_to=copy_to)
    assert dxa.shape == (m, r) and db.shape == (n, r)
    assert_exact("dxa", dxa, scale * (dy.double() @ b.double()), (dy.float() * scale) @ b, max_factor=max_factor)
    assert_exact("dB", db, scale * (dy.double().t() @ xa.double()), (dy.float() * scale).t() @ xa,
                 max_factor=max_factor)
    if copy:
        assert torch.equal(copy_to[:, :n], dy) and copy_to[:, n:].isnan().all()
    d, bd, xd = dy.double(), b.double(), xa.double()
    return [("dxa", dxa, scale * d @ bd, scale * d.abs() @ bd.abs(), n),
            ("dB", db, scale * d.t() @ xd, scale * d.abs().t() @ xd.abs(), m)]


@_settings(12, fixture=True)
@given(rm=_rank_and_sizes(1), k=st.integers(1, 200), dtype=st.sampled_from(HALF), scale=LORA_SCALES,
       p_transposed=st.booleans(), q_transposed=st.booleans(), copy=st.booleans(), seed=SEEDS)
def test_rank_r_project_property(poisoned_empty, rm, k, dtype, scale, p_transposed, q_transposed, copy, seed):
    """rank_r_project: out[M, r] = scale * p @ q in fp32, p bf16/fp16 [M, K], q fp32 [K, r] (LoRA's A^T, a
    strided view, or contiguous), any K (split in pieces of 128 interpreted); with copy_to, p's copy."""
    r, m = rm
    _check_rank_r_project(r, m, k, dtype, scale, p_transposed, q_transposed, copy, seed, _max_factor(r))


@_settings(12, fixture=True)
@given(rn=_rank_and_sizes(1), m=st.integers(0, 150), dtype=st.sampled_from(HALF), scale=LORA_SCALES,
       transpose=st.booleans(), p_transposed=st.booleans(), seed=SEEDS)
def test_rank_r_weight_grad_property(poisoned_empty, rn, m, dtype, scale, transpose, p_transposed, seed):
    """rank_r_weight_grad: out[N, r] = scale * p^T @ low (or its transpose [r, N], dA's layout), summed over
    M tokens (none included: a sum over no tokens is 0) in per-program partials."""
    r, n = rn
    _check_rank_r_weight_grad(r, n, m, dtype, scale, transpose, p_transposed, seed, _max_factor(r))


@_settings(10, fixture=True)
@given(rmn=_rank_and_sizes(2), dtype=st.sampled_from(HALF), scale=LORA_SCALES, dy_transposed=st.booleans(),
       copy=st.booleans(), seed=SEEDS)
def test_lora_dy_grads_property(poisoned_empty, rmn, dtype, scale, dy_transposed, copy, seed):
    """lora_dy_grads: (dxa, dB) = (scale * dy @ B, scale * dy^T @ xa) from one read of dy, rows and columns
    spread over row blocks and column splits with ragged last tiles; with copy_to (ranks up to 32), dy's copy."""
    r, m, n = rmn
    _check_lora_dy_grads(r, m, n, dtype, scale, dy_transposed, copy, seed, _max_factor(r))


def _assert_within_fp32_summation_bound(name, ours, ref, magnitude, reduced):
    """|ours - ref| <= roundings * 2^-24 * magnitude elementwise, `magnitude` = scale * |p| @ |q| in fp64 and
    roundings = 2 * blocks of 32 + 4 over the `reduced` length (blocks plus per-program partials, each one fp32
    rounding): the classic forward-error bound of the documented algorithm, whatever the host."""
    bound = (2 * -(-reduced // 32) + 4) * 2.0 ** -24 * magnitude
    excess = (ours.double() - ref).abs() - bound
    assert not ours.isnan().any() and excess.max() <= 0, f"{name}: over the fp32 summation bound by {excess.max()}"


@pytest.mark.parametrize("case", [
    # K = 97, 256 rows, bf16: max error 2.43x a nearly rounded GEMV's (RMS 0.85x)
    lambda: _check_rank_r_project(1, 256, 97, torch.bfloat16, 1.0, False, False, False, 16, None),
    # N = 256, M = 150 tokens, fp16, p a transposed view: max 1.34x (RMS 0.60x)
    lambda: _check_rank_r_weight_grad(1, 256, 150, torch.float16, 0.5, False, True, 150, None),
    # dy 256 x 300, bf16: dxa's max 1.30x (RMS 0.61x)
    lambda: _check_lora_dy_grads(1, 256, 300, torch.bfloat16, 0.5, False, False, 15, None),
], ids=["rank_r_project", "rank_r_weight_grad", "lora_dy_grads"])
def test_rank_1_max_error_within_the_fp32_summation_bound(poisoned_empty, case):
    """The rank-1 cases found (the comment above RANK_1_MAX_FACTOR): the RMS error at most 1.25x the stock
    path's (in the check), and every element within the forward-error bound of the documented algorithm, a
    bar an fp16/bf16 accumulation or a lost block would fail by 2^10."""
    for name, ours, ref, magnitude, reduced in case():
        _assert_within_fp32_summation_bound(name, ours, ref, magnitude, reduced)


@_settings(15, fixture=True)
@given(m=st.integers(1, 40), groups=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 16)), min_size=1,
                                             max_size=3),
       scale=st.sampled_from([0.5, 0.75, 2.0]), dtype=st.sampled_from(HALF), bias=st.booleans(), seed=SEEDS)
def test_lora_outer_property(poisoned_empty, m, groups, scale, dtype, bias, seed):
    """lora_outer: (scale * low @ right + bias).to(dtype), low [M, r] and right [r, N] fp32, rounded once;
    with 2 or 3 groups right is block diagonal and its blocks off the diagonal (NaN here) are never read."""
    n, r = sum(w for w, _ in groups), sum(k for _, k in groups)
    g = torch.Generator().manual_seed(seed)
    low = _rand(g, m, r)
    right = torch.block_diag(*[_rand(g, k, w) for w, k in groups])  # [r, n]
    poisoned = right.clone()
    if len(groups) > 1:
        poisoned[torch.block_diag(*[torch.ones(k, w) for w, k in groups]) == 0] = float("nan")
    b = _rand(g, n, dtype=dtype) if bias else None
    ours = lora_outer(low, poisoned, scale, dtype, bias=b, groups=groups)
    ref = scale * low.double() @ right.double() + (b.double() if bias else 0)
    stock = ((low @ right) * scale + (b.float() if bias else 0)).to(dtype)
    assert ours.dtype == dtype
    assert_exact("adapter term", ours, ref, stock)


@_settings(15)
@given(n=st.integers(1, 40), r=st.integers(1, 20), start=st.integers(0, 40), spare=st.integers(0, 20),
       after=st.integers(0, 5), scale=st.sampled_from([0.5, 0.75, 1.0, 3.0]), left=st.booleans(),
       transposed=st.booleans(), src_transposed=st.booleans(), seed=SEEDS)
def test_split_columns_property(n, r, start, spare, after, scale, left, transposed, src_transposed, seed):
    """split_columns_: columns [start, start + width) of a bf16 GEMM operand (width >= 3r; its rows, when
    transposed) get the bf16 parts of v = scale * src (fp32 [n, r], any strides): hi = bf16(v) and
    lo = bf16(v - hi) in three blocks of r, (hi, hi, lo) for the left operand and (hi, lo, hi) for the right,
    then zeros; every other column is left alone."""
    width = 3 * r + spare
    cols = start + width + after
    g = torch.Generator().manual_seed(seed)
    src = _rand(g, r, n).t() if src_transposed else _rand(g, n, r)
    dst = _poisoned((cols, n) if transposed else (n, cols), torch.bfloat16)
    assert split_columns_(dst, src, start, width, scale, left, transposed=transposed) is dst
    written = dst.t() if transposed else dst  # [n, cols]
    v = src * scale
    hi = v.to(torch.bfloat16)
    lo = (v - hi.float()).to(torch.bfloat16)
    parts = (hi, hi, lo) if left else (hi, lo, hi)
    expected = torch.cat([*parts, torch.zeros(n, spare, dtype=torch.bfloat16)], 1)
    assert torch.equal(written[:, start:start + width], expected)  # NaN anywhere here fails too
    assert written[:, :start].isnan().all() and written[:, start + width:].isnan().all()
    # What the GEMM over those columns adds: hi*hi + hi*lo + lo*hi, v to 16 bits per factor.
    assert ((hi.double() + lo.double()) - v.double()).abs().max() <= 2.0 ** -16 * v.double().abs().max()


# ------------------------------------------------------------------------------------------------
# Flash attention
# ------------------------------------------------------------------------------------------------


@_settings(8)
# Every query row sees one key (left padding leaves one): the exact dk is 0, and so is the stock path's.
@example(b=1, hkv=1, group=2, s=35, d=28, dtype=torch.bfloat16, causal=False, padding="left", packed=0, dense=None,
         default_scale=False, seed=248)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), s=st.integers(1, 40),
       d=st.integers(16, 64), dtype=st.sampled_from(HALF), causal=st.booleans(),
       padding=st.sampled_from([None, "left", "right"]), packed=st.integers(0, 3),
       dense=st.sampled_from([None, "bcast-heads", "per-head", "expanded"]), default_scale=st.booleans(), seed=SEEDS)
def test_flash_attention_property(b, hkv, group, s, d, dtype, causal, padding, packed, dense, default_scale, seed):
    """flash_attention_forward / _backward: GQA (Hq = 1 to 3 x Hkv), causal or not, any length (blocks of
    16 interpreted, a ragged last one), any head dim in [16, 64] (odd ones padded to a power of two), key
    padding on the left (rows with no visible key under a causal mask) or the right, 1 to 3 packed
    sequences (segment ids), a dense boolean attn_mask ([B, 1, S, S], [B, Hq, S, S] or an expanded
    [1, 1, S, S]); out, dq, dk, dv exact against SDPA's math backend with the equivalent boolean mask, lse
    against float64."""
    hq = hkv * group
    g = torch.Generator().manual_seed(seed)
    q = _rand(g, b, hq, s, d, dtype=dtype)
    # k and v as attention sees them: a [B, S, Hkv*D] projection viewed and transposed (strided).
    k, v = (_rand(g, b, s, hkv * d, dtype=dtype).view(b, s, hkv, d).transpose(1, 2) for _ in range(2))
    do = _rand(g, b, hq, s, d, dtype=dtype)
    kpm = None
    if padding is not None:
        pads = torch.randint(0, s + 1, (b,), generator=g)  # 0 to all of the keys padding
        pos = torch.arange(s)
        kpm = torch.stack([(pos >= int(p)) if padding == "left" else (pos < s - int(p)) for p in pads])
    seg = None
    if packed:
        # Packed sequences (TRL's padding-free batches): segment ids that step up at random cut points.
        starts = torch.zeros(b, s, dtype=torch.int32)
        for i in range(b):
            starts[i, torch.randperm(max(s - 1, 0), generator=g)[:packed - 1] + 1] = 1
        seg = starts.cumsum(1, dtype=torch.int32)
    am = None
    if dense is not None:
        full = torch.rand(b, hq, s, s, generator=g) < 0.6
        am = {"bcast-heads": lambda: full[:, :1].clone(),
              "per-head": lambda: full,
              "expanded": lambda: full[:1, :1].clone().expand(b, hq, s, s)}[dense]()
    scale = 1.0 / math.sqrt(d) if default_scale else float(torch.empty(1).uniform_(0.05, 0.5, generator=g))
    masks = dict(key_padding_mask=kpm, segment_ids=seg, attn_mask=am)

    out = _poisoned((b, hq, s, d), dtype)
    lse = _poisoned((b, hq, s), torch.float32)
    flash_attention_forward(q, k, v, causal=causal, scale=scale, **masks, out=out, lse_out=lse)
    dq, dk, dv = (_poisoned(t.shape, dtype) for t in (q, k, v))
    flash_attention_backward(do, q, k, v, lse, causal=causal, scale=scale, **masks, dq_out=dq, dk_out=dk, dv_out=dv)

    mask = attention_mask(b, s, causal, kpm, seg)
    if am is not None:
        mask = mask & am
    ref64 = sdpa_reference(q, k, v, do, mask, scale, torch.float64)
    stock = sdpa_reference(q, k, v, do, mask, scale, dtype)
    for name, ours, r, st_ in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref64, stock):
        assert ours.dtype == dtype
        assert_exact(name, ours, r, st_)
    # lse: the float32 logsumexp of the masked, scaled scores; +inf where a row sees no key.
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    lse64 = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    empty = (~mask.any(-1)).expand(lse.shape)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty)
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], rtol=1e-6, atol=1e-6)
