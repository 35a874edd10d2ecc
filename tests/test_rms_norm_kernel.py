"""The RMSNorm Triton kernels (fxfuse/kernels/rms_norm.py) against Hugging Face LlamaRMSNorm.

Run on CPU tensors through the Triton interpreter. Every kernel output is checked with
`fxfuse.testing.assert_exact` (error against a float64 evaluation no larger than 1.25x the stock
path's), into buffers pre-filled with POISON so that an element a kernel skips shows up as NaN.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fxfuse.kernels import rms_norm as K  # noqa: E402
from fxfuse.kernels.common import round_to  # noqa: E402
from fxfuse.kernels.rms_norm import MAX_HIDDEN, rms_norm_backward, rms_norm_forward  # noqa: E402
from fxfuse.testing import POISON, assert_exact  # noqa: E402

# The interpreter's runtime-bound loops trip a numpy deprecation warning thousands of times.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# N not powers of two, M not multiples of anything; (2, 4096) is one row per program.
SHAPES = [(1, 64), (3, 72), (17, 200), (33, 96), (5, 1000), (2, 4096)]


def hf_rms_norm(x, w, eps, compute_dtype=torch.float32):
    """transformers' LlamaRMSNorm.forward, verbatim but for `compute_dtype` (HF: torch.float32).

    The float64 reference passes compute_dtype=float64. With HF's hard-coded float32, a "float64"
    run would still normalise in fp32; for fp32 inputs it would then *be* the stock path bit for
    bit (stock error 0), and no other implementation could meet the bar.
    """
    input_dtype = x.dtype
    hidden_states = x.to(compute_dtype)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return w * hidden_states.to(input_dtype)


def _seed(*key) -> int:
    # A fixed seed per case (str hashes are salted per process, crc32 is not).
    return zlib.crc32(repr(key).encode())


def make_inputs(m, n, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(m, n, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, dy


def run_stock(x, w, dy, eps, compute_dtype=torch.float32):
    """(y, dx, dw) of hf_rms_norm through autograd, in the dtype of the inputs."""
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    y = hf_rms_norm(xs, ws, eps, compute_dtype)
    y.backward(dy)
    return y.detach(), xs.grad, ws.grad


def run_reference64(x, w, dy, eps):
    return run_stock(x.double(), w.double(), dy.double(), eps, compute_dtype=torch.float64)


def run_kernels(x, w, dy, eps):
    """Forward and backward into NaN-poisoned buffers; checks each buffer was fully written."""
    m, n = x.shape
    out = torch.full_like(x, POISON)
    rstd_out = torch.full((m,), POISON, dtype=torch.float32)
    dx_out = torch.full_like(x, POISON)
    y, rstd = rms_norm_forward(x, w, eps, out=out, rstd_out=rstd_out)
    assert y is out and rstd is rstd_out
    # eps is used by the fp32 backward only (it recomputes rstd in fp64).
    dx, dw = rms_norm_backward(dy, x, w, rstd, dx_out=dx_out, eps=eps)
    assert dx is dx_out
    assert y.dtype == dx.dtype == dw.dtype == x.dtype and rstd.dtype == torch.float32
    assert dw.shape == (n,)
    return y, rstd, dx, dw


def check_exact(x, w, dy, eps):
    y, rstd, dx, dw = run_kernels(x, w, dy, eps)
    for name, t in (("y", y), ("rstd", rstd), ("dx", dx), ("dw", dw)):
        assert torch.isfinite(t).all(), f"{name}: {(~torch.isfinite(t)).sum().item()} non-finite (unwritten?)"
    y64, dx64, dw64 = run_reference64(x, w, dy, eps)
    ys, dxs, dws = run_stock(x, w, dy, eps)
    assert_exact("y", y, y64, ys)
    assert_exact("dx", dx, dx64, dxs)
    assert_exact("dw", dw, dw64, dws)
    rstd64 = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    torch.testing.assert_close(rstd.double(), rstd64, rtol=2.5e-7, atol=0)
    return y, rstd, dx, dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact(shape, dtype):
    x, w, dy = make_inputs(*shape, dtype, seed=_seed(shape, dtype))
    check_exact(x, w, dy, EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_when_eps_matters(dtype):
    # With unit-scale inputs eps=1e-6 barely moves rstd; here mean(x^2) ~ eps, so a kernel that
    # dropped or misplaced eps would be off by tens of percent.
    x, w, dy = make_inputs(5, 1000, dtype, seed=_seed("eps", dtype), scale=1e-3)
    check_exact(x, w, dy, EPS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_rounds_like_hf(dtype):
    # assert_exact cannot see a kernel that skips HF's rounding of the normalised value (skipping
    # it is *more* accurate against float64), but that is HF's semantics: y must be the stock y.
    # Only the order of the row sum differs, which may move rstd by an ulp and, rarely, flip a
    # rounding; so demand equality almost everywhere and at most 1 ulp anywhere.
    x, w, dy = make_inputs(64, 1000, dtype, seed=_seed("rounding", dtype))
    y, _ = rms_norm_forward(x, w, EPS)
    ys, _, _ = run_stock(x, w, dy, EPS)
    mismatched = (y != ys).sum().item()
    assert mismatched <= y.numel() // 1000, f"{mismatched} of {y.numel()} elements differ from stock"
    ulp = torch.finfo(dtype).eps * ys.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y.double() - ys.double()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_rounds_dy_times_weight_like_stock(dtype):
    # The stock backward rounds g = dy * w to x.dtype before the fp32 math; the kernel does the
    # same, so that dx equals the stock dx almost everywhere (seen: 0-7 of 64000 differ; skipping
    # the rounding, equally exact against float64, changes about a quarter of them).
    x, w, dy = make_inputs(64, 1000, dtype, seed=_seed("dx-rounding", dtype))
    _, rstd = rms_norm_forward(x, w, EPS)
    dx, _ = rms_norm_backward(dy, x, w, rstd)
    _, dxs, _ = run_stock(x, w, dy, EPS)
    mismatched = (dx != dxs).sum().item()
    assert mismatched <= dx.numel() // 1000, f"{mismatched} of {dx.numel()} dx elements differ from stock"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_grad_is_the_float64_sum_rounded_once(dtype):
    # The design choice that makes dw robustly exact (see the kernel's docstring): dw sums dy times
    # the *unrounded* xhat in fp32 and rounds once, so it is the float64 dw correctly rounded
    # except where fp32 accumulation lands next to a rounding tie. Summing dy times the rounded
    # xhat, as the stock graph does, misses it on a good share of the columns.
    x, w, dy = make_inputs(64, 1000, dtype, seed=_seed("dw-rounding", dtype))
    _, rstd = rms_norm_forward(x, w, EPS)
    _, dw = rms_norm_backward(dy, x, w, rstd)
    _, _, dw64 = run_reference64(x, w, dy, EPS)
    mismatched = (dw != dw64.to(dtype)).sum().item()  # seen: 0-4 of 1000; rounded xhat: ~400
    assert mismatched <= dw.numel() // 100, f"{mismatched} of {dw.numel()} dw entries are not the correctly rounded sum"


def test_exact_at_max_hidden(monkeypatch):
    monkeypatch.setattr(K, "_DW_BLOCK_C", 4096)  # fewer dw-reduction programs: faster interpreted
    x, w, dy = make_inputs(2, MAX_HIDDEN, torch.bfloat16, seed=_seed("max"))
    check_exact(x, w, dy, EPS)


@pytest.mark.parametrize("programs,block_r,block_c,dtype", [
    (1, 64, 32, torch.bfloat16), (2, 2, 16, torch.bfloat16), (7, 2, 32, torch.bfloat16), (19, 4, 64, torch.bfloat16),
    (25, 4, 64, torch.bfloat16),  # more programs than row blocks: those without rows add zero partials
    (5, 2, 16, torch.float16), (5, 2, 16, torch.float32),
], ids=str)
def test_backward_program_count_does_not_matter(monkeypatch, programs, block_r, block_c, dtype):
    # With the default (GPU-tuned) backward tile the small shapes above are one row block, so one
    # program. Here 37 rows of N=1500 are 19 row blocks of 2 rows: with fewer programs each walks
    # several blocks (the strided loop), and a small BLOCK_R makes the dw reduction loop and mask.
    monkeypatch.setattr(K, "_BWD_TILE_ELEMS", 4096)
    monkeypatch.setattr(K, "_BWD_PROGRAMS_INTERPRETED", programs)
    monkeypatch.setattr(K, "_DW_BLOCK_R", block_r)
    monkeypatch.setattr(K, "_DW_BLOCK_C", block_c)
    x, w, dy = make_inputs(37, 1500, dtype, seed=_seed("programs", dtype))
    assert K._blocks(1500, K._BWD_TILE_ELEMS) == (2, 2048)
    assert K._num_backward_programs(x.device) == programs
    _, rstd, dx, dw = check_exact(x, w, dy, EPS)
    # dx does not depend on the grid at all; compare with a one-program run bit for bit.
    monkeypatch.setattr(K, "_BWD_PROGRAMS_INTERPRETED", 1)
    dx1, dw1 = rms_norm_backward(dy, x, w, rstd, eps=EPS)
    assert torch.equal(dx, dx1)
    torch.testing.assert_close(dw.double(), dw1.double(), rtol=torch.finfo(dtype).eps, atol=0)


def test_backward_without_weight_grad():
    x, w, dy = make_inputs(17, 200, torch.bfloat16, seed=_seed("nodw"))
    _, rstd = rms_norm_forward(x, w, EPS)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    dx2, none = rms_norm_backward(dy, x, w, rstd, need_weight_grad=False)
    assert none is None
    assert torch.equal(dx, dx2)


def test_fp32_backward_without_eps_uses_saved_rstd():
    # Without eps the fp32 backward reads the fp32-rounded rstd: still close, a bit less exact.
    x, w, dy = make_inputs(17, 200, torch.float32, seed=_seed("fp32-noeps"))
    _, rstd = rms_norm_forward(x, w, EPS)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    _, dx64, dw64 = run_reference64(x, w, dy, EPS)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-6, atol=1e-6)


def test_empty_batch():
    x = torch.empty(0, 72, dtype=torch.bfloat16)
    w = torch.ones(72, dtype=torch.bfloat16)
    y, rstd = rms_norm_forward(x, w, EPS)
    assert y.shape == (0, 72) and rstd.shape == (0,)
    dx, dw = rms_norm_backward(x, x, w, rstd)
    assert dx.shape == (0, 72) and torch.equal(dw, torch.zeros(72, dtype=torch.bfloat16))


def _nonfinite_case(dtype, with_nan):
    x, w, dy = make_inputs(4, 72, dtype, seed=_seed("nonfinite", dtype))
    if with_nan:
        x[1, 5] = float("nan")
    x[2, 10] = float("inf")
    x[3, 7] = float("-inf")
    return x, w, dy


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the interpreter
@pytest.mark.parametrize("with_nan", [True, False], ids=["nan+inf", "inf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nan_and_inf_propagate_like_stock(dtype, with_nan):
    x, w, dy = _nonfinite_case(dtype, with_nan)
    y, rstd, dx, dw = run_kernels(x, w, dy, EPS)
    ys, dxs, dws = run_stock(x, w, dy, EPS)
    for name, ours, stock in (("y", y, ys), ("dx", dx, dxs), ("dw", dw, dws)):
        assert torch.equal(ours.isnan(), stock.isnan()), f"{name}: NaN pattern differs from stock"
        assert torch.equal(ours.isinf(), stock.isinf()), f"{name}: Inf pattern differs from stock"
    # Not vacuous: the bad rows really are NaN (row 0 stays finite), and without the NaN row dw is
    # NaN exactly in the Inf columns (Inf * rstd=0).
    assert y[2].isnan().any() and y[0].isfinite().all() and dx[2].isnan().all()
    assert not with_nan or y[1].isnan().all()
    if not with_nan:
        assert dw.isnan().nonzero().flatten().tolist() == [7, 10]
    # And the finite entries are as exact as everywhere else.
    y64, dx64, dw64 = run_reference64(x, w, dy, EPS)
    assert_exact("y", y, y64, ys)
    assert_exact("dx", dx, dx64, dxs)
    assert_exact("dw", dw, dw64, dws)


def test_interpreter_bf16_rounding_is_round_to_nearest_even():
    # The kernels round to bf16 by hand when interpreted (the interpreter truncates). Check the
    # helper bit for bit against torch on random bit patterns and on the edge cases.
    @triton.jit
    def round_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, round_to(tl.load(X + offs), Y.dtype.element_ty, True))

    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.3895e38, -3.3895e38,
                            3.4e38, 1e-40, -1e-40, 1.17e-38], dtype=torch.float32)
    # NaNs whose payload would carry out of the mantissa when rounded (into -0.0 or Inf).
    nan_payloads = torch.tensor([0x7FFFFFFF, -1, 0x7F80FFFF, 0x7FBFFFFF], dtype=torch.int32).view(torch.float32)
    ones = torch.tensor([1.0] * 4, dtype=torch.float32).view(torch.int32)
    ties = torch.cat([ones + 0x8000, ones + 0x18000, ones + 0x7FFF, ones + 0x8001]).view(torch.float32)
    x = torch.cat([bits.view(torch.float32), special, nan_payloads, ties])
    x = torch.cat([x, torch.zeros(8192 - x.numel())])
    y = torch.empty(8192, dtype=torch.bfloat16)
    round_kernel[(1,)](x, y, N=8192)
    expected = x.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def _args(m=3, n=72, dtype=torch.bfloat16):
    x, w, dy = make_inputs(m, n, dtype, seed=0)
    return x, w, dy


@pytest.mark.parametrize("case", [
    "n_too_large", "non_contiguous_x", "weight_dtype", "x_3d", "weight_2d", "weight_length", "int_dtype",
    "float64", "out_shape", "out_dtype", "rstd_out_dtype", "non_contiguous_weight",
])
def test_forward_rejects_bad_arguments(case):
    x, w, _ = _args()
    kwargs = {}
    if case == "n_too_large":
        x, w, _ = _args(1, MAX_HIDDEN + 1)
        match = "MAX_HIDDEN"
    elif case == "non_contiguous_x":
        x = _args(3, 144)[0][:, ::2]
        match = "contiguous"
    elif case == "weight_dtype":
        w = w.float()
        match = "dtype"
    elif case == "x_3d":
        x = x.view(1, 3, 72)
        match = "2-D"
    elif case == "weight_2d":
        w = w.view(1, 72)
        match = "1-D"
    elif case == "weight_length":
        w = w[:71]
        match = "length"
    elif case == "int_dtype":
        x, w = x.to(torch.int32), w.to(torch.int32)
        match = "not supported"
    elif case == "float64":
        x, w = x.double(), w.double()
        match = "not supported"
    elif case == "out_shape":
        kwargs["out"] = torch.empty(3, 71, dtype=x.dtype)
        match = "out"
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(3, 72, dtype=torch.float32)
        match = "out"
    elif case == "rstd_out_dtype":
        kwargs["rstd_out"] = torch.empty(3, dtype=torch.bfloat16)
        match = "rstd_out"
    elif case == "non_contiguous_weight":
        w = torch.ones(144, dtype=x.dtype)[::2]
        match = "contiguous"
    with pytest.raises(ValueError, match=match):
        rms_norm_forward(x, w, EPS, **kwargs)


@pytest.mark.parametrize("case", [
    "n_too_large", "dy_dtype", "dy_shape", "dy_non_contiguous", "x_non_contiguous", "rstd_dtype", "rstd_shape",
    "weight_dtype", "dx_out_dtype",
])
def test_backward_rejects_bad_arguments(case):
    x, w, dy = _args()
    rstd = torch.ones(3, dtype=torch.float32)
    kwargs = {}
    if case == "n_too_large":
        x, w, dy = _args(1, MAX_HIDDEN + 1)
        rstd = torch.ones(1, dtype=torch.float32)
        match = "MAX_HIDDEN"
    elif case == "dy_dtype":
        dy = dy.half()
        match = "dy"
    elif case == "dy_shape":
        dy = dy[:2]
        match = "dy"
    elif case == "dy_non_contiguous":
        dy = _args(3, 144)[2][:, ::2]
        match = "contiguous"
    elif case == "x_non_contiguous":
        x = _args(3, 144)[0][:, 1::2]
        match = "contiguous"
    elif case == "rstd_dtype":
        rstd = rstd.bfloat16()
        match = "rstd"
    elif case == "rstd_shape":
        rstd = torch.ones(4, dtype=torch.float32)
        match = "rstd"
    elif case == "weight_dtype":
        w = w.half()
        match = "dtype"
    elif case == "dx_out_dtype":
        kwargs["dx_out"] = torch.empty(3, 72, dtype=torch.float16)
        match = "dx_out"
    with pytest.raises(ValueError, match=match):
        rms_norm_backward(dy, x, w, rstd, **kwargs)
