"""The cross-entropy kernels (fxfuse/kernels/cross_entropy.py) and ops (fxfuse/ops/cross_entropy.py) against
transformers' ForCausalLMLoss.

Run on CPU tensors through the Triton interpreter. The scalar loss, dlogits, dhidden and dweight are
checked with `fxfuse.testing.assert_exact` (error against a float64 evaluation of the stock code no
larger than 1.25x the stock path's); kernel outputs are written into buffers pre-filled with POISON so
that an element a kernel skips shows up as NaN.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxfuse.kernels import cross_entropy as K  # noqa: E402
from fxfuse.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward  # noqa: E402
from fxfuse.ops.cross_entropy import (  # noqa: E402
    attach_logits_grad, causal_lm_cross_entropy, default_chunk_rows, fused_linear_cross_entropy,
    lm_head_causal_lm_loss)
from fxfuse.testing import POISON, assert_exact  # noqa: E402

# The interpreter's runtime-bound loops trip a numpy deprecation warning thousands of times, and
# numpy warns inside the interpreter on the NaN/Inf inputs that the propagation tests feed it.
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered"),
              pytest.mark.filterwarnings("ignore:overflow encountered"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered")]

IGNORE = -100
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# An upstream gradient other than 1 (HF scales the loss, e.g. for gradient accumulation), so that
# the per-row scale dloss / count is a real rounding, as it is in the stock backward.
DLOSS = 0.731


def fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100):
    """transformers' loss_utils.fixed_cross_entropy (5.x), verbatim."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(source, target, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def stock_loss(logits, labels, num_items=None, ignore_index=IGNORE, compute_dtype=torch.float32):
    """ForCausalLMLoss after its label shift: `logits.float()`, then fixed_cross_entropy.

    The float64 reference passes compute_dtype=float64 (HF hard-codes `.float()`; a "float64" run
    of fp32 logits would otherwise *be* the stock path, stock error 0, a bar nothing can meet).
    """
    return fixed_cross_entropy(logits.to(compute_dtype), labels, num_items, ignore_index)


def run_stock(logits, labels, num_items=None, ignore_index=IGNORE, compute_dtype=torch.float32):
    """(loss, dlogits) of the stock loss through autograd; dlogits in the dtype of `logits`."""
    x = logits.detach().clone().requires_grad_()
    loss = stock_loss(x, labels, num_items, ignore_index, compute_dtype)
    loss.backward(torch.tensor(DLOSS, dtype=loss.dtype))
    return loss.detach(), x.grad


def run_reference64(logits, labels, num_items=None, ignore_index=IGNORE):
    return run_stock(logits.double(), labels, num_items, ignore_index, compute_dtype=torch.float64)


def run_op(logits, labels, num_items=None, ignore_index=IGNORE):
    x = logits.detach().requires_grad_()
    loss = causal_lm_cross_entropy(x, labels, ignore_index, num_items)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward(torch.tensor(DLOSS))
    return loss.detach(), x.grad


def _seed(*key) -> int:
    # A fixed seed per case (str hashes are salted per process, crc32 is not).
    return zlib.crc32(repr(key).encode())


def make_inputs(n, v, dtype, seed, scale=3.0, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = IGNORE
    # The first and last columns are targets too (the chunk edges of the kernels' loops).
    labels[1], labels[2] = v - 1, 0
    return logits, labels


def make_num_items(labels, reduction):
    if reduction == "mean":
        return None
    # HF counts the labels of the whole (gradient-accumulated) batch: more than this micro-batch's.
    return torch.tensor(int((labels != IGNORE).sum()) + 7)


def run_kernels(logits, labels, dloss_rows, ignore_index=IGNORE):
    """Forward and backward into NaN-poisoned buffers; (loss rows, lse, dlogits)."""
    n, v = logits.shape
    loss_out = torch.full((n,), POISON, dtype=torch.float64)
    lse_out = torch.full((n,), POISON, dtype=torch.float32)
    dlogits_out = torch.full((n, v), POISON, dtype=logits.dtype)
    loss, lse = cross_entropy_forward(logits, labels, ignore_index, loss_out=loss_out, lse_out=lse_out)
    dlogits = cross_entropy_backward(dloss_rows, logits, labels, lse, ignore_index, dlogits_out=dlogits_out)
    assert loss is loss_out and lse is lse_out and dlogits is dlogits_out
    return loss, lse, dlogits


def check_exact(logits, labels, num_items=None):
    loss, dlogits = run_op(logits, labels, num_items)
    loss64, dlogits64 = run_reference64(logits, labels, num_items)
    loss_s, dlogits_s = run_stock(logits, labels, num_items)
    assert dlogits.dtype == logits.dtype and dlogits.shape == logits.shape
    assert_exact("loss", loss, loss64, loss_s)
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)

    # The kernels alone, into poisoned buffers: every element written, per-row losses exact, and
    # the op's dlogits is the kernel's with dloss / count (or / num_items) as the per-row scale.
    n = logits.shape[0]
    denominator = (labels != IGNORE).sum() if num_items is None else num_items
    # What autograd hands the backward op: the fp32 upstream gradient over the denominator, in fp64.
    dloss_rows = (torch.tensor(DLOSS).double() / denominator).expand(n)
    rows, lse, dlogits_k = run_kernels(logits, labels, dloss_rows)
    for name, t in (("loss rows", rows), ("lse", lse), ("dlogits", dlogits_k)):
        assert torch.isfinite(t).all(), f"{name}: {(~torch.isfinite(t)).sum().item()} non-finite (unwritten?)"
    assert torch.equal(dlogits_k, dlogits)
    rows64 = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE, reduction="none")
    rows_s = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    assert_exact("loss rows", rows, rows64, rows_s)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=2.5e-7, atol=2.5e-7)
    assert (rows[labels == IGNORE] == 0).all()
    return loss, dlogits


@pytest.mark.parametrize("reduction", ["mean", "sum/num_items"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v,block_v", [(37, 4096), (1000, 256), (4097, 4096)], ids=str)
def test_exact(monkeypatch, v, block_v, dtype, reduction):
    # V=37: one chunk, padded to 64; 1000 with BLOCK_V=256: 4 chunks, the last partial; 4097 with
    # the GPU's BLOCK_V: a last chunk of one column.
    monkeypatch.setattr(K, "_BLOCK_V", block_v)
    logits, labels = make_inputs(32, v, dtype, seed=_seed(v, dtype, reduction))
    loss, dlogits = check_exact(logits, labels, make_num_items(labels, reduction))
    if dtype != torch.float32:
        # assert_exact cannot see a backward that skips the stock rounding pattern (fp32 math,
        # one rounding); equality with the stock dlogits almost everywhere can. Seen: 0-6 of
        # 131k elements differ (an fp32 result within ~1e-7 relative of a rounding tie).
        _, dlogits_s = run_stock(logits, labels, make_num_items(labels, reduction))
        mismatched = (dlogits != dlogits_s).sum().item()
        assert mismatched <= max(2, dlogits.numel() // 1000), f"{mismatched} of {dlogits.numel()} differ from stock"


@pytest.mark.parametrize("view", ["wider_rows", "every_other_row", "shifted"])
def test_strided_rows(view):
    # Rows anywhere in memory, unit column stride: no copy is made (the kernel gets the view).
    v = 1000
    g = torch.Generator().manual_seed(_seed("strided", view))
    if view == "wider_rows":
        # A padded vocabulary sliced back to V (row stride V + 13).
        base = (3 * torch.randn(24, v + 13, generator=g)).bfloat16()
        logits = base[:, :v]
    elif view == "every_other_row":
        base = (3 * torch.randn(48, v, generator=g)).bfloat16()
        logits = base[::2]
    else:
        # The shifted logits of a causal LM, logits[:, :-1] with batch size 1, flattened (a view
        # starting at the storage offset 0 and stopping one row short).
        base = (3 * torch.randn(1, 25, v, generator=g)).bfloat16()
        logits = base[:, :-1].flatten(0, 1)
    labels = torch.randint(0, v, (24,), generator=g)
    labels[::5] = IGNORE
    assert logits.stride(1) == 1 and (view == "shifted" or not logits.is_contiguous())
    loss, dlogits = check_exact(logits, labels)
    assert dlogits.is_contiguous()


@pytest.mark.parametrize("v", [32000, 128256, 151936, 256000])
def test_llm_vocabularies(v):
    # The real vocabulary sizes (Llama-2, Llama-3, Qwen2, Gemma) with the GPU's BLOCK_V: 8-63
    # chunks per row, the last one partial. Two rows keep the interpreter quick.
    logits, labels = make_inputs(3, v, torch.bfloat16, seed=_seed("vocab", v))
    labels[0] = IGNORE
    dloss_rows = torch.full((3,), DLOSS / 2, dtype=torch.float64)
    rows, lse, dlogits = run_kernels(logits, labels, dloss_rows)
    assert torch.isfinite(dlogits.float()).all() and torch.isfinite(rows).all() and torch.isfinite(lse).all()
    loss64, dlogits64 = run_reference64(logits, labels, torch.tensor(2))
    loss_s, dlogits_s = run_stock(logits, labels, torch.tensor(2))
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)
    rows64 = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE, reduction="none")
    rows_s = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    assert_exact("loss rows", rows, rows64, rows_s)
    assert_exact("loss", (rows.sum() / 2).float(), loss64, loss_s)


def _nonfinite_case(dtype):
    v = 64
    logits, labels = make_inputs(9, v, dtype, seed=_seed("nonfinite", dtype), ignored=0.0)
    labels[:] = torch.arange(9) * 7
    logits[1, 5] = float("nan")              # NaN: row NaN
    logits[2, 10] = float("inf")             # +Inf: row NaN (inf - inf)
    logits[3, 3] = float("-inf")             # -Inf off target: probability 0
    logits[4, labels[4]] = float("-inf")     # -Inf at the target: loss +Inf
    logits[5] = float("-inf")                # all -Inf: NaN (-inf - -inf)
    logits[6, 20] = float("nan")             # ignored row with NaN: loss 0, dlogits NaN
    labels[6] = IGNORE
    labels[7] = IGNORE                        # ignored finite row: dlogits 0
    return logits, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_torch(dtype):
    logits, labels = _nonfinite_case(dtype)
    dloss_rows = torch.full((9,), DLOSS / 7, dtype=torch.float64)
    rows, lse, dlogits = run_kernels(logits, labels, dloss_rows)
    rows64 = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE, reduction="none")
    rows_s = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    assert_exact("loss rows", rows, rows64, rows_s)  # NaN and Inf exactly where the reference has them
    _, dlogits64 = run_reference64(logits, labels, torch.tensor(7))
    _, dlogits_s = run_stock(logits, labels, torch.tensor(7))
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)
    # Not vacuous: which rows are NaN, Inf, finite.
    assert rows.isnan().tolist() == [False, True, True, False, False, True, False, False, False]
    assert rows[4] == float("inf") and rows[6] == 0 and rows[7] == 0
    bad_rows = dlogits.isnan().any(dim=1).tolist()
    assert bad_rows == [False, True, True, False, False, True, True, False, False]
    assert (dlogits[7] == 0).all() and dlogits[4, labels[4]] < 0
    # Through the op, the scalar loss is NaN like torch's, and its gradient is the same as above.
    loss, dlogits_op = run_op(logits, labels, torch.tensor(7))
    assert loss.isnan() and stock_loss(logits, labels, torch.tensor(7)).isnan()
    assert torch.equal(dlogits_op.isnan(), dlogits.isnan())


def test_minus_inf_target_gives_inf_loss_like_torch():
    logits, labels = make_inputs(16, 100, torch.bfloat16, seed=_seed("-inf target"), ignored=0.0)
    logits[3, labels[3]] = float("-inf")
    loss, dlogits = run_op(logits, labels)
    loss_s, dlogits_s = run_stock(logits, labels)
    assert loss == loss_s == float("inf")
    _, dlogits64 = run_reference64(logits, labels)
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_all_ignored(dtype):
    logits, labels = make_inputs(6, 50, dtype, seed=_seed("all ignored"))
    labels[:] = IGNORE
    # 'mean' over no rows: 0 / 0 = NaN, as torch gives; the gradient is all zeros, as torch's.
    loss, dlogits = run_op(logits, labels)
    loss_s, dlogits_s = run_stock(logits, labels)
    assert loss.isnan() and loss_s.isnan()
    assert torch.equal(dlogits, dlogits_s) and (dlogits == 0).all()
    # 'sum' / num_items: 0.
    loss, dlogits = run_op(logits, labels, torch.tensor(5))
    assert loss == 0 and (dlogits == 0).all()


def test_empty_batch():
    logits = torch.empty(0, 50, dtype=torch.bfloat16)
    labels = torch.empty(0, dtype=torch.int64)
    loss, dlogits = run_op(logits, labels)
    assert loss.isnan() and stock_loss(logits, labels).isnan() and dlogits.shape == (0, 50)
    assert run_op(logits, labels, torch.tensor(3))[0] == 0


def test_custom_ignore_index_and_int_num_items():
    # ignore_index need not be negative (here a vocabulary id), num_items may be a Python int.
    logits, labels = make_inputs(32, 200, torch.bfloat16, seed=_seed("ignore 0"), ignored=0.0)
    labels[::3] = 0
    loss = causal_lm_cross_entropy(logits, labels, ignore_index=0, num_items_in_batch=30)
    loss64 = stock_loss(logits, labels, 30, ignore_index=0, compute_dtype=torch.float64)
    assert_exact("loss", loss, loss64, stock_loss(logits, labels, 30, ignore_index=0))
    loss, dlogits = run_op(logits, labels, ignore_index=0)
    loss64, dlogits64 = run_reference64(logits, labels, ignore_index=0)
    loss_s, dlogits_s = run_stock(logits, labels, ignore_index=0)
    assert_exact("loss", loss, loss64, loss_s)
    assert_exact("dlogits", dlogits, dlogits64, dlogits_s)


@pytest.mark.parametrize("bad_label", [50, 51, -1, -99, -101])
def test_out_of_range_label_raises(bad_label):
    logits, labels = make_inputs(8, 50, torch.bfloat16, seed=0)
    labels[5] = bad_label
    with pytest.raises(ValueError, match="out of range"):
        causal_lm_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(torch.randn(8, 16, dtype=torch.bfloat16),
                                   torch.randn(50, 16, dtype=torch.bfloat16), labels, chunk_rows=4)
    # torch refuses it too (it is not a silently ignored row).
    with pytest.raises((RuntimeError, IndexError)):
        stock_loss(logits, labels)
    # Without the check, the kernels still never produce a plausible value: NaN loss, NaN row.
    rows, lse = cross_entropy_forward(logits, labels, validate_labels=False)
    assert rows[5].isnan() and torch.isfinite(rows[torch.arange(8) != 5]).all()
    dlogits = cross_entropy_backward(torch.ones(8, dtype=torch.float64), logits, labels, lse)
    assert dlogits[5].isnan().all() and not dlogits[torch.arange(8) != 5].isnan().any()


def test_matches_transformers_ForCausalLMLoss():
    # The real thing, shift included: our op on the shifted labels is the HF loss.
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    v = 300
    g = torch.Generator().manual_seed(_seed("hf"))
    logits = (3 * torch.randn(2, 17, v, generator=g)).bfloat16()
    labels = torch.randint(0, v, (2, 17), generator=g)
    labels[0, :5] = IGNORE  # a prompt that takes no loss
    shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    for num_items in (None, torch.tensor(40)):
        x = logits.detach().requires_grad_()
        ours = causal_lm_cross_entropy(x.view(-1, v), shift_labels, num_items_in_batch=num_items)
        ours.backward()
        xs = logits.detach().requires_grad_()
        hf = loss_utils.ForCausalLMLoss(xs, labels, v, num_items_in_batch=num_items)
        hf.backward()
        x64 = logits.double().requires_grad_()
        ref = loss_utils.fixed_cross_entropy(x64.view(-1, v), shift_labels, num_items)
        ref.backward()
        assert_exact("loss", ours, ref, hf)
        assert_exact("dlogits", x.grad, x64.grad, xs.grad)


def run_stock_linear(hidden, weight, labels, num_items, compute_dtype=torch.float32):
    """(loss, dhidden, dweight) of lm_head + ForCausalLMLoss through autograd."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = stock_loss(F.linear(h, w), labels, num_items, compute_dtype=compute_dtype)
    loss.backward(torch.tensor(DLOSS, dtype=loss.dtype))
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_lm_head", "trained_lm_head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_exact(dtype, weight_grad):
    n, h_dim, v = 40, 64, 1000
    g = torch.Generator().manual_seed(_seed("linear", dtype, weight_grad))
    hidden = torch.randn(n, h_dim, generator=g).to(dtype)
    weight = (0.2 * torch.randn(v, h_dim, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = IGNORE
    num_items = torch.tensor(int((labels != IGNORE).sum()) + 3)
    for reduction in ("mean", "sum/num_items"):
        items = None if reduction == "mean" else num_items
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        # 16 rows per chunk: three chunks, the last one partial.
        loss = fused_linear_cross_entropy(h, w, labels, num_items_in_batch=items, chunk_rows=16)
        loss.backward(torch.tensor(DLOSS))
        loss64, dh64, dw64 = run_stock_linear(hidden.double(), weight.double(), labels, items, torch.float64)
        loss_s, dh_s, dw_s = run_stock_linear(hidden, weight, labels, items)
        assert_exact(f"loss ({reduction})", loss, loss64, loss_s)
        assert h.grad.dtype == dtype
        assert_exact(f"dhidden ({reduction})", h.grad, dh64, dh_s)
        if weight_grad:
            assert w.grad.dtype == dtype
            assert_exact(f"dweight ({reduction})", w.grad, dw64, dw_s)
        else:
            assert w.grad is None


def test_fused_linear_chunking_does_not_change_the_rows():
    # Each row's logits, loss and gradient depend on that row only: any chunk size gives the
    # per-row results of one unchunked cross_entropy over the stock lm_head's logits.
    n, h_dim, v = 20, 32, 300
    g = torch.Generator().manual_seed(_seed("chunks"))
    hidden = torch.randn(n, h_dim, generator=g).bfloat16()
    weight = (0.2 * torch.randn(v, h_dim, generator=g)).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = IGNORE
    rows_ref, lse_ref = torch.ops.fxfuse.cross_entropy(F.linear(hidden, weight), labels, IGNORE)
    for chunk_rows in (1, 7, 20, 64):
        rows, lse = torch.ops.fxfuse.fused_linear_cross_entropy(hidden, weight, labels, IGNORE, chunk_rows)
        torch.testing.assert_close(rows, rows_ref, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)


def run_stock_lm_head(hidden, weight, labels, num_items, tangent, compute_dtype=torch.float32):
    """(loss, logits, dhidden, dweight) of lm_head + ForCausalLMLoss with the logits returned too,
    their gradient `tangent` (None: unused) and the loss's DLOSS, through autograd."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logits = F.linear(h, w)
    loss = stock_loss(logits.view(-1, w.shape[0]), labels, num_items, compute_dtype=compute_dtype)
    outputs, grads = [loss], [torch.tensor(DLOSS, dtype=loss.dtype)]
    if tangent is not None:
        outputs.append(logits)
        grads.append(tangent.to(logits.dtype))
    torch.autograd.backward(outputs, grads)
    return loss.detach(), logits.detach(), h.grad, w.grad


@pytest.mark.parametrize("weight_grad,logits_grad", [(False, False), (False, True), (True, False)],
                         ids=["frozen_lm_head", "frozen_lm_head-logits_with_gradient", "trained_lm_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lm_head_loss_exact(dtype, weight_grad, logits_grad):
    b, t, h_dim, v = 2, 21, 64, 1000  # 42 rows: chunks of 16, 16 and 10
    g = torch.Generator().manual_seed(_seed("lm_head", dtype, weight_grad, logits_grad))
    hidden = torch.randn(b, t, h_dim, generator=g).to(dtype)
    weight = (0.2 * torch.randn(v, h_dim, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b * t,), generator=g)
    labels[torch.rand(b * t, generator=g) < 0.25] = IGNORE
    tangent = (1e-3 * torch.randn(b, t, v, generator=g)).to(dtype) if logits_grad else None
    for reduction in ("mean", "sum/num_items"):
        items = make_num_items(labels, reduction)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        loss, logits, carrier = lm_head_causal_lm_loss(h, w, labels, num_items_in_batch=items, chunk_rows=16)
        assert not logits.requires_grad  # until attached, outside any graph (the backend does it)
        if not weight_grad:
            logits = attach_logits_grad(logits, carrier, w)
            assert logits.requires_grad
        outputs, grads = [loss], [torch.tensor(DLOSS)]
        if logits_grad:
            outputs.append(logits)
            grads.append(tangent)
        torch.autograd.backward(outputs, grads)
        loss64, _, dh64, dw64 = run_stock_lm_head(hidden.double(), weight.double(), labels, items,
                                                  None if tangent is None else tangent.double(), torch.float64)
        loss_s, logits_s, dh_s, dw_s = run_stock_lm_head(hidden, weight, labels, items, tangent)
        # The logits are the stock lm_head's, bit for bit: the same product, a block of rows at a time.
        assert logits.shape == (b, t, v) and torch.equal(logits.detach(), logits_s)
        assert_exact(f"loss ({reduction})", loss, loss64, loss_s)
        assert h.grad.dtype == dtype
        assert_exact(f"dhidden ({reduction})", h.grad, dh64, dh_s)
        if weight_grad:
            assert_exact(f"dweight ({reduction})", w.grad, dw64, dw_s)
        else:
            assert w.grad is None


def test_attaching_logits_of_a_trained_lm_head_is_refused():
    hidden = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    _, logits, carrier = lm_head_causal_lm_loss(hidden, weight, torch.randint(0, 40, (4,)))
    with pytest.raises(ValueError, match="lm_head weight requires grad"):
        attach_logits_grad(logits, carrier, weight)


def test_lm_head_loss_does_not_keep_the_logits_for_its_backward():
    # A training loop drops the output right away (loss = model(...).loss): the logits must go then,
    # not live on in the autograd graph until the backward.
    from torch.multiprocessing.reductions import StorageWeakRef
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = 0.2 * torch.randn(50, 16, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (18,))
    loss, logits, carrier = lm_head_causal_lm_loss(hidden, weight, labels, chunk_rows=4)
    logits = attach_logits_grad(logits, carrier, weight)
    storage = StorageWeakRef(logits.untyped_storage())
    del logits, carrier
    assert storage.expired()
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_gradient_carrier_takes_no_memory_and_still_carries_the_logits_gradient():
    # The carrier sits beside the returned logits at the forward's peak: it must be one element, all
    # strides 0, and a gradient given to the logits must still reach hidden through it.
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = 0.2 * torch.randn(50, 16, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (18,))
    _, logits, carrier = lm_head_causal_lm_loss(hidden, weight, labels, chunk_rows=4)
    assert carrier.shape == hidden.shape and carrier.dtype == torch.float32
    assert carrier.stride() == (0, 0, 0) and carrier.untyped_storage().nbytes() == 4
    dlogits = torch.randn(logits.shape, dtype=torch.bfloat16)
    attach_logits_grad(logits, carrier, weight).backward(dlogits)
    want = (dlogits.double() @ weight.double()).to(torch.bfloat16)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLAS)")
@pytest.mark.parametrize("v", [128256, 32000, 32001])
def test_backward_forms_the_logits_the_forward_returned_on_cuda(v):
    # The backward forms each chunk's logits again, into a chunk buffer, and uses them with the forward's
    # lse: they must be the forward's bits, whether the forward wrote into the returned logits directly
    # (128256, 32000) or through a chunk buffer of its own (32001: rows not 256-byte aligned).
    n, h, chunk_rows = 1100, 4096, 256
    g = torch.Generator(device="cuda").manual_seed(_seed("recompute", v))
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (0.02 * torch.randn(v, h, device="cuda", generator=g)).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    logits = lm_head_causal_lm_loss(hidden, weight, labels, chunk_rows=chunk_rows)[1]
    buf = torch.full((chunk_rows, v), float("nan"), device="cuda", dtype=torch.bfloat16)
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        again = torch.mm(hidden[start:end], weight.t(), out=buf[:end - start])
        assert torch.equal(again, logits[start:end]), (v, start)


def test_lm_head_loss_chunking_does_not_change_dhidden():
    # Each row of dhidden depends on that row only: any chunk size gives the same bits.
    hidden = torch.randn(20, 32).bfloat16()
    weight = (0.2 * torch.randn(300, 32)).bfloat16()
    labels = torch.randint(0, 300, (20,))
    labels[::4] = IGNORE
    grads = []
    for chunk_rows in (1, 7, 20, 64):
        h = hidden.clone().requires_grad_()
        loss = lm_head_causal_lm_loss(h, weight, labels, chunk_rows=chunk_rows)[0]
        loss.backward()
        grads.append(h.grad)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_default_chunk_rows():
    # ~256 MiB of logits per chunk: Llama-3's vocabulary in bf16 gives 1024 rows.
    assert default_chunk_rows(128256, torch.bfloat16) == 1024
    assert default_chunk_rows(32000, torch.bfloat16) == 4160
    assert default_chunk_rows(256000, torch.float32) == 256
    assert default_chunk_rows(10**9, torch.float32) == 1
    for v in (32000, 128256, 151936, 256000):
        assert default_chunk_rows(v, torch.bfloat16) * v * 2 <= 256 * 1024 * 1024


def test_ops_opcheck():
    logits, labels = make_inputs(6, 40, torch.bfloat16, seed=_seed("opcheck"))
    x = logits.requires_grad_()
    torch.library.opcheck(torch.ops.fxfuse.cross_entropy.default, (x, labels, IGNORE))
    rows, lse = torch.ops.fxfuse.cross_entropy(x, labels, IGNORE)
    dloss = torch.rand(6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fxfuse.cross_entropy_backward.default,
                          (dloss, logits.detach(), labels, lse.detach(), IGNORE))
    hidden = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.fxfuse.fused_linear_cross_entropy.default, (hidden, weight, labels, IGNORE, 4))
    rows, lse = torch.ops.fxfuse.fused_linear_cross_entropy(hidden, weight, labels, IGNORE, 4)
    for need_dhidden, need_dweight in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.fxfuse.fused_linear_cross_entropy_backward.default,
                              (dloss, hidden.detach(), weight.detach(), labels, lse.detach(), IGNORE, 4,
                               need_dhidden, need_dweight))
    torch.library.opcheck(torch.ops.fxfuse.lm_head_cross_entropy.default, (hidden, weight, labels, IGNORE, 4))
    rows, lse = torch.ops.fxfuse.lm_head_cross_entropy(hidden, weight, labels, IGNORE, 4)[1:3]
    dcarrier = torch.randn(6, 16)
    for need_dhidden, need_dweight in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.fxfuse.lm_head_cross_entropy_backward.default,
                              (dloss, dcarrier, hidden.detach(), weight.detach(), labels,
                               lse.detach(), IGNORE, 4, need_dhidden, need_dweight))


@pytest.mark.parametrize("reduction", ["mean", "sum/num_items"])
def test_traces_into_one_graph(reduction):
    # The entry points are what a pattern inserts into a Dynamo graph: they must trace whole
    # (fullgraph) through AOTAutograd and give the eager results bit for bit.
    logits, labels = make_inputs(16, 100, torch.bfloat16, seed=_seed("compile", reduction))
    hidden = torch.randn(16, 32, dtype=torch.bfloat16)
    weight = 0.2 * torch.randn(100, 32, dtype=torch.bfloat16)
    items = make_num_items(labels, reduction)

    def ce(x, labels, items):
        return causal_lm_cross_entropy(x, labels, num_items_in_batch=items)

    def flce(h, weight, labels, items):
        return fused_linear_cross_entropy(h, weight, labels, num_items_in_batch=items, chunk_rows=5)

    def lm_head(h, weight, labels, items):
        return lm_head_causal_lm_loss(h, weight, labels, num_items_in_batch=items, chunk_rows=5)[0]

    for fn, inputs in ((ce, (logits,)), (flce, (hidden, weight)), (lm_head, (hidden, weight))):
        results = []
        for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
            leaf = inputs[0].clone().requires_grad_()
            loss = f(leaf, *inputs[1:], labels, items)
            loss.backward()
            results.append((loss, leaf.grad))
        (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
        assert torch.equal(compiled_loss, eager_loss) and torch.equal(compiled_grad, eager_grad)


def test_lse_takes_no_gradient():
    # The ops' lse output is for the backward only; differentiating through it must not silently
    # give a wrong (missing) gradient.
    logits, labels = make_inputs(4, 40, torch.bfloat16, seed=0)
    rows, lse = torch.ops.fxfuse.cross_entropy(logits.requires_grad_(), labels, IGNORE)
    assert rows.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("case", [
    "logits_1d", "logits_int", "logits_float64", "column_stride", "empty_vocab", "labels_length", "labels_float",
    "labels_2d", "loss_out_dtype", "lse_out_dtype",
])
def test_forward_rejects_bad_arguments(case):
    logits, labels = make_inputs(4, 40, torch.bfloat16, seed=0)
    kwargs = {}
    if case == "logits_1d":
        logits = logits[0]
        match = "2-D"
    elif case == "logits_int":
        logits = logits.to(torch.int32)
        match = "not supported"
    elif case == "logits_float64":
        logits = logits.double()
        match = "not supported"
    elif case == "column_stride":
        logits = make_inputs(4, 80, torch.bfloat16, seed=0)[0][:, ::2]
        match = "column stride"
    elif case == "empty_vocab":
        logits = logits[:, :0]
        match = "V must be > 0"
    elif case == "labels_length":
        labels = labels[:3]
        match = "length"
    elif case == "labels_float":
        labels = labels.float()
        match = "labels dtype"
    elif case == "labels_2d":
        labels = labels.view(2, 2)
        match = "1-D"
    elif case == "loss_out_dtype":
        kwargs["loss_out"] = torch.empty(4, dtype=torch.bfloat16)
        match = "loss_out"
    elif case == "lse_out_dtype":
        kwargs["lse_out"] = torch.empty(4, dtype=torch.float64)
        match = "lse_out"
    with pytest.raises(ValueError, match=match):
        cross_entropy_forward(logits, labels, **kwargs)


@pytest.mark.parametrize("case", ["dloss_shape", "dloss_dtype", "lse_dtype", "dlogits_out_dtype", "dlogits_out_shape"])
def test_backward_rejects_bad_arguments(case):
    logits, labels = make_inputs(4, 40, torch.bfloat16, seed=0)
    dloss, lse = torch.ones(4, dtype=torch.float64), torch.zeros(4)
    kwargs = {}
    if case == "dloss_shape":
        dloss = dloss[:3]
        match = "dloss"
    elif case == "dloss_dtype":
        dloss = dloss.bfloat16()
        match = "dloss"
    elif case == "lse_dtype":
        lse = lse.double()
        match = "lse"
    elif case == "dlogits_out_dtype":
        kwargs["dlogits_out"] = torch.empty(4, 40, dtype=torch.float16)
        match = "dlogits_out"
    elif case == "dlogits_out_shape":
        kwargs["dlogits_out"] = torch.empty(4, 41, dtype=torch.bfloat16)
        match = "dlogits_out"
    with pytest.raises(ValueError, match=match):
        cross_entropy_backward(dloss, logits, labels, lse, **kwargs)


@pytest.mark.parametrize("case", ["dtype", "hidden_size", "labels_length", "chunk_rows"])
def test_fused_linear_rejects_bad_arguments(case):
    hidden = torch.randn(6, 16, dtype=torch.bfloat16)
    weight = torch.randn(40, 16, dtype=torch.bfloat16)
    labels = torch.zeros(6, dtype=torch.int64)
    chunk_rows = 4
    if case == "dtype":
        weight = weight.half()
    elif case == "hidden_size":
        weight = weight[:, :15]
    elif case == "labels_length":
        labels = labels[:5]
    elif case == "chunk_rows":
        chunk_rows = 0
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
