"""The rank-r LoRA kernels (fxfuse/kernels/lora_matmul.py) against float64 and the stock fp32 products
PEFT computes, on odd shapes and ranks, with every output pre-filled with NaN.

Each case has at least a few hundred output values: the criterion compares error statistics, and over
a handful of values the worst one is luck (CPU BLAS landed one 72-term dot 4e-8 from the truth; over 33
such dots its worst error was 0.7x a plain sequential fp32 sum's), which no statistic can be held to."""
import pytest
import torch

from fxfuse.kernels.lora_matmul import (MAX_RANK, lora_dy_grads, lora_outer, rank_r_project, rank_r_weight_grad,
                                       split_columns_)
from fxfuse.testing import assert_exact


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float tensor the kernels' host code allocates starts as NaN: an element a kernel does not
    write stays NaN and fails the exactness check."""
    original = torch.empty

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t
    monkeypatch.setattr(torch, "empty", empty)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k,r", [(3000, 72, 1), (37, 200, 8), (70, 33, 16), (19, 64, 40)])
def test_rank_r_project(poisoned_empty, dtype, m, k, r):
    p, q = _rand(m, k, dtype=dtype, seed=1), _rand(r, k, seed=2)
    ours = rank_r_project(p, q.t(), 2.0)  # q as A^T: a strided operand
    ref = 2.0 * (p.double() @ q.double().t())
    stock = (p.float() * 2.0) @ q.t()  # PEFT: scale the fp32 copy, then the fp32 GEMM
    assert_exact("dxa", ours, ref, stock)


def test_rank_r_project_scale_not_a_power_of_two():
    # The kernel scales its fp32 result (one more rounding, half an ulp) where PEFT scales dy before
    # the GEMM (exact for bf16 dy and s = 0.75): the RMS error stays within the bound; the worst
    # element of a few hundred can sit that half ulp above stock's.
    p, q = _rand(64, 200, dtype=torch.bfloat16, seed=1), _rand(8, 200, seed=2)
    ours = rank_r_project(p, q.t(), 0.75)
    assert_exact("dxa", ours, 0.75 * (p.double() @ q.double().t()), (p.float() * 0.75) @ q.t(), max_factor=None)


@pytest.mark.parametrize("transpose", [False, True], ids=["dB", "dA"])
@pytest.mark.parametrize("m,n,r", [(40, 1500, 1), (111, 200, 8), (300, 40, 16), (29, 64, 40)])
def test_rank_r_weight_grad(poisoned_empty, transpose, m, n, r):
    p, low = _rand(m, n, dtype=torch.bfloat16, seed=3), _rand(m, r, seed=4)
    ours = rank_r_weight_grad(p, low, 2.0, transpose=transpose)
    ref = 2.0 * p.double().t() @ low.double()
    stock = (p.float() * 2.0).t() @ low
    if transpose:
        ref, stock = ref.t(), stock.t()
        assert ours.is_contiguous()
    assert_exact("weight grad", ours, ref, stock)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,r", [(111, 200, 8), (300, 72, 16), (37, 1500, 1), (70, 130, 40)])
def test_lora_dy_grads(poisoned_empty, dtype, m, n, r):
    # Rows not a multiple of the row block (two halves of 16 when interpreted), columns spread over
    # several splits with a ragged last tile: both partial sums and every mask are exercised.
    dy, b, xa = _rand(m, n, dtype=dtype, seed=8), _rand(n, r, seed=9), _rand(m, r, seed=10)
    dxa, db = lora_dy_grads(dy, b, xa, 2.0)
    assert dxa.shape == (m, r) and db.shape == (n, r)
    assert_exact("dxa", dxa, 2.0 * (dy.double() @ b.double()), (dy.float() * 2.0) @ b)
    assert_exact("dB", db, 2.0 * (dy.double().t() @ xa.double()), (dy.float() * 2.0).t() @ xa)


def test_lora_dy_grads_block_diagonal():
    # A group's B is block diagonal (q/k/v): the off-diagonal zeros give zero columns of dxa's
    # blocks, and dB's diagonal blocks are each projection's gradient.
    g = torch.Generator().manual_seed(11)
    bs = [torch.randn(n, r, generator=g) for n, r in ((64, 8), (32, 8), (32, 16))]
    b = torch.block_diag(*bs)
    dy = torch.randn(50, 128, generator=g).to(torch.bfloat16)
    xa = torch.randn(50, 32, generator=g)
    dxa, db = lora_dy_grads(dy, b, xa, 0.5)
    rows, cols = 0, 0
    for blk in bs:
        n, r = blk.shape
        ref = 0.5 * dy[:, rows:rows + n].double() @ blk.double()
        assert_exact("dxa block", dxa[:, cols:cols + r], ref, (dy[:, rows:rows + n].float() * 0.5) @ blk)
        rows, cols = rows + n, cols + r


def test_lora_dy_grads_strided_column_slice():
    # How the op calls it for a group: one projection's columns of dy, and its columns of xa.
    dy = _rand(90, 300, dtype=torch.bfloat16, seed=12)
    b, xa = _rand(110, 8, seed=13), _rand(90, 24, seed=14)
    dxa, db = lora_dy_grads(dy[:, 150:260], b, xa[:, 8:16], 2.0)
    dy_g, xa_g = dy[:, 150:260], xa[:, 8:16]
    assert_exact("dxa", dxa, 2.0 * (dy_g.double() @ b.double()), (dy_g.float() * 2.0) @ b)
    assert_exact("dB", db, 2.0 * (dy_g.double().t() @ xa_g.double()), (dy_g.float() * 2.0).t() @ xa_g)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("m,groups", [(1, [(72, 1)]), (37, [(200, 8)]), (45, [(33, 40)]),
                                      # side by side, boundaries inside a column tile (32 wide interpreted)
                                      (40, [(50, 8), (30, 16)]), (23, [(70, 4), (45, 16), (19, 8)])],
                         ids=["r1", "r8", "r40", "group2", "group3"])
def test_lora_outer(poisoned_empty, bias, m, groups):
    n, r = sum(g[0] for g in groups), sum(g[1] for g in groups)
    low = _rand(m, r, seed=5)
    right = torch.block_diag(*[_rand(k, w, seed=6 + i) for i, (w, k) in enumerate(groups)])  # [r, n]
    b = _rand(n, dtype=torch.bfloat16, seed=7) if bias else None
    # Off the diagonal blocks a group's right is never read: poison proves it.
    poisoned = right.clone()
    poisoned[right == 0] = float("nan")
    ours = lora_outer(low, poisoned if len(groups) > 1 else right, 0.5, torch.bfloat16, bias=b, groups=groups)
    ref = 0.5 * low.double() @ right.double() + (b.double() if bias else 0)
    stock = ((low @ right) * 0.5 + (b.float() if bias else 0)).to(torch.bfloat16)
    assert_exact("adapter term", ours, ref, stock)


def test_lora_outer_bad_arguments():
    low, right = torch.randn(4, 8), torch.randn(8, 30)
    with pytest.raises(ValueError, match="fp32"):
        lora_outer(low.bfloat16(), right, 1.0, torch.bfloat16)
    with pytest.raises(ValueError, match="partition"):
        lora_outer(low, right, 1.0, torch.bfloat16, groups=[(10, 4), (10, 4)])


def test_reads_copied_for_a_k_extended_gemm():
    # rank_r_project and lora_dy_grads store the tile of p / dy they read into copy_to's first
    # columns: every element exactly (bitwise), the columns after them untouched, results unchanged.
    p, q = _rand(70, 200, dtype=torch.bfloat16, seed=15), _rand(200, 8, seed=16)
    ext = torch.full((70, 248), float("nan"), dtype=torch.bfloat16)
    xa = rank_r_project(p, q, copy_to=ext)
    assert torch.equal(ext[:, :200].view(torch.int16), p.view(torch.int16)) and ext[:, 200:].isnan().all()
    assert torch.equal(xa, rank_r_project(p, q))
    dy, b, xa = _rand(90, 130, dtype=torch.bfloat16, seed=17), _rand(130, 8, seed=18), _rand(90, 8, seed=19)
    ext = torch.full((90, 160), float("nan"), dtype=torch.bfloat16)
    dxa, db = lora_dy_grads(dy, b, xa, 2.0, copy_to=ext)
    assert torch.equal(ext[:, :130].view(torch.int16), dy.view(torch.int16)) and ext[:, 130:].isnan().all()
    ref_dxa, ref_db = lora_dy_grads(dy, b, xa, 2.0)
    assert torch.equal(dxa, ref_dxa) and torch.equal(db, ref_db)
    with pytest.raises(ValueError, match="copy_to"):
        rank_r_project(p, q, copy_to=torch.empty(70, 100, dtype=torch.bfloat16))


@pytest.mark.parametrize("transposed", [False, True], ids=["columns", "rows"])
def test_split_columns_fold_the_product_into_a_gemm(transposed):
    # [p | left parts] @ [q ; right parts] = p @ q + scale * low @ right to 16 bits per factor:
    # far closer than the bf16 rounding of the result.
    m, k, n, r, width = 37, 40, 50, 8, 32
    p, q = _rand(m, k, dtype=torch.bfloat16, seed=20), _rand(k, n, dtype=torch.bfloat16, seed=21)
    low, right = _rand(m, r, seed=22), _rand(n, r, seed=23)
    left_ext = torch.full((m, k + width), float("nan"), dtype=torch.bfloat16)
    left_ext[:, :k] = p
    split_columns_(left_ext, low, k, width, 1.0, left=True)
    if transposed:  # the right operand [k + width, n] row-major: its extra rows are written
        right_ext = torch.full((k + width, n), float("nan"), dtype=torch.bfloat16)
        right_ext[:k] = q
        split_columns_(right_ext, right, k, width, 0.5, left=False, transposed=True)
        rhs = right_ext
    else:  # stored as [n, k + width] (W), used transposed
        right_ext = torch.full((n, k + width), float("nan"), dtype=torch.bfloat16)
        right_ext[:, :k] = q.t()
        split_columns_(right_ext, right, k, width, 0.5, left=False)
        rhs = right_ext.t()
    assert not left_ext.isnan().any() and not right_ext.isnan().any()
    assert (left_ext[:, k + 3 * r:] == 0).all()
    got = left_ext.double() @ rhs.double()
    ref = p.double() @ q.double() + 0.5 * low.double() @ right.double().t()
    assert (got - ref).abs().max() <= 2 ** -14 * (0.5 * low.double().abs() @ right.double().abs().t()).max()
    with pytest.raises(ValueError, match="does not fit"):
        split_columns_(left_ext, low, k, 3 * r - 1, 1.0, left=True)


def test_empty_and_bad_arguments():
    assert rank_r_project(torch.empty(0, 8, dtype=torch.bfloat16), torch.randn(8, 4)).shape == (0, 4)
    zero = rank_r_weight_grad(torch.empty(0, 8, dtype=torch.bfloat16), torch.randn(0, 4))
    assert zero.shape == (8, 4) and (zero == 0).all()  # a sum over no tokens is 0
    with pytest.raises(ValueError, match="bf16 or fp16"):
        rank_r_project(torch.randn(3, 8), torch.randn(8, 4))
    with pytest.raises(ValueError, match="fp32"):
        rank_r_project(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not chain"):
        rank_r_project(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(9, 4))
    with pytest.raises(ValueError, match="rank"):
        rank_r_project(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, MAX_RANK + 1))
    dxa, db = lora_dy_grads(torch.empty(0, 8, dtype=torch.bfloat16), torch.randn(8, 4), torch.randn(0, 4), 1.0)
    assert dxa.shape == (0, 4) and db.shape == (8, 4) and (db == 0).all()
    with pytest.raises(ValueError, match="do not chain"):
        lora_dy_grads(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, 4), torch.randn(3, 5), 1.0)
