"""Kernels at sizes whose element count passes 2^31 (issue 8), on a CUDA GPU; skipped elsewhere.

A row offset computed in int32 wraps past 2^31 elements and reads or writes the wrong memory, which the
small shapes of the interpreted tests cannot show. Here each kernel runs once on a tensor of more than
2^31 elements: a 128256-vocabulary logits tensor of 17000 tokens (the loss, with and without the
lm_head taken in), a gate,up activation of 80000 tokens at Llama-3-8B's 14336 (SwiGLU) and 540000 rows
of 4096 (RMSNorm). Outputs are poisoned with NaN first and must be written everywhere; the first and
the last rows (those past the 2^31st element) are checked against the stock computation of the same
rows: bit-equal where the kernel is, else by `assert_exact` against float64.

    python -m pytest -q tests/test_large_shapes.py      # on a GPU with about 60 GiB free
"""
import pytest
import torch
import torch.nn.functional as F

from fxfuse.testing import POISON, assert_exact

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tensors of > 2^31 elements)")

INT32_LIMIT = 2 ** 31
ROWS_CHECKED = 48


def _edge_rows(n: int) -> torch.Tensor:
    """The first and the last ROWS_CHECKED rows: the last ones start past element 2^31."""
    return torch.cat([torch.arange(ROWS_CHECKED), torch.arange(n - ROWS_CHECKED, n)]).cuda()


def _poisoned(shape, dtype):
    return torch.full(shape, POISON, dtype=dtype, device="cuda")


def test_cross_entropy_kernels_past_2_31_elements():
    from fxfuse.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
    n, v = 17000, 128256
    assert n * v > INT32_LIMIT
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (2 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[::7] = -100
    loss_out, lse_out = _poisoned((n,), torch.float64), _poisoned((n,), torch.float32)
    loss, lse = cross_entropy_forward(logits, labels, loss_out=loss_out, lse_out=lse_out)
    assert not loss.isnan().any() and not lse.isnan().any()
    dloss = torch.rand(n, generator=g, device="cuda", dtype=torch.float64) + 0.5
    dlogits = cross_entropy_backward(dloss, logits, labels, lse, dlogits_out=_poisoned((n, v), torch.bfloat16))
    assert not dlogits.isnan().any()

    rows = _edge_rows(n)
    x, t, d = logits[rows], labels[rows], dloss[rows]
    for dtype in (torch.float32, torch.float64):  # stock (fp32 upcast, as ForCausalLMLoss) and the reference
        xr = x.to(dtype).requires_grad_()
        per_row = F.cross_entropy(xr, t, reduction="none", ignore_index=-100)
        (dx,) = torch.autograd.grad((per_row * d.to(dtype)).sum(), xr)
        if dtype == torch.float32:
            loss_stock, dx_stock = per_row.detach(), dx.to(torch.bfloat16)
        else:
            loss64, dx64 = per_row.detach(), dx
    assert_exact("loss rows", loss[rows], loss64, loss_stock)
    assert_exact("dlogits rows", dlogits[rows], dx64, dx_stock)


def test_lm_head_loss_past_2_31_logits():
    """The loss op that takes the lm_head in: logits formed whole (returned), their gradient chunked."""
    from fxfuse.ops.cross_entropy import attach_logits_grad, lm_head_causal_lm_loss
    n, h, v = 17000, 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, h, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device="cuda") / h ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[5::11] = -100
    loss, logits, carrier = lm_head_causal_lm_loss(hidden, weight, labels)
    logits = attach_logits_grad(logits, carrier, weight)
    assert logits.shape == (n, v) and not logits.isnan().any()
    (dhidden,) = torch.autograd.grad(loss, hidden)
    assert not dhidden.isnan().any()
    count = int((labels != -100).sum())

    rows = _edge_rows(n)
    hs, ts = hidden.detach()[rows], labels[rows]
    # Stock: the bf16 lm_head, the loss in fp32 over these rows, scaled as the whole batch's mean scales them.
    h_stock = hs.clone().requires_grad_()
    logits_stock = F.linear(h_stock, weight)
    rows_loss = F.cross_entropy(logits_stock.float(), ts, reduction="none", ignore_index=-100)
    (dh_stock,) = torch.autograd.grad(rows_loss.sum() / count, h_stock)
    h64 = hs.double().requires_grad_()
    logits64 = F.linear(h64, weight.double())
    rows_loss64 = F.cross_entropy(logits64, ts, reduction="none", ignore_index=-100)
    (dh64,) = torch.autograd.grad(rows_loss64.sum() / count, h64)
    assert_exact("logits rows", logits.detach()[rows], logits64.detach(), logits_stock.detach())
    assert_exact("dhidden rows", dhidden[rows], dh64, dh_stock)


def test_swiglu_past_2_31_elements():
    from fxfuse.kernels.swiglu import swiglu_backward, swiglu_forward
    n, inter = 80000, 14336
    assert n * 2 * inter > INT32_LIMIT and n * inter < INT32_LIMIT * 2
    g = torch.Generator(device="cuda").manual_seed(2)
    gate_up = torch.randn(n, 2 * inter, generator=g, device="cuda").to(torch.bfloat16)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]  # the halves of a grouped gate,up output, as the model has
    hid = swiglu_forward(gate, up, out=_poisoned((n, inter), torch.bfloat16))
    assert not hid.isnan().any()
    dh = torch.randn(n, inter, generator=g, device="cuda").to(torch.bfloat16)
    grads = torch.full_like(gate_up, POISON)
    d_gate, d_up = swiglu_backward(dh, gate, up, d_gate_out=grads[:, :inter], d_up_out=grads[:, inter:])
    assert not grads.isnan().any()
    rows = _edge_rows(n)
    gs, us = gate[rows].clone().requires_grad_(), up[rows].clone().requires_grad_()
    h_stock = F.silu(gs) * us
    dg_stock, du_stock = torch.autograd.grad(h_stock, (gs, us), dh[rows])
    # bit-equal to stock in bf16 (the kernel rounds where stock rounds)
    assert torch.equal(hid[rows], h_stock.detach())
    assert torch.equal(d_gate[rows], dg_stock) and torch.equal(d_up[rows], du_stock)


def test_rms_norm_past_2_31_elements():
    from fxfuse.kernels.rms_norm import rms_norm_backward, rms_norm_forward
    m, n = 540000, 4096
    assert m * n > INT32_LIMIT
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(m, n, generator=g, device="cuda").to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(n, generator=g, device="cuda")).to(torch.bfloat16)
    y, rstd = rms_norm_forward(x, w, 1e-5, out=_poisoned((m, n), torch.bfloat16),
                               rstd_out=_poisoned((m,), torch.float32))
    assert not y.isnan().any() and not rstd.isnan().any()
    dy = torch.randn(m, n, generator=g, device="cuda").to(torch.bfloat16)
    dx, dw = rms_norm_backward(dy, x, w, rstd, dx_out=_poisoned((m, n), torch.bfloat16))
    assert not dx.isnan().any()

    def norm(x_, w_, compute):
        hh = x_.to(compute)
        hh = hh * torch.rsqrt(hh.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w_ * hh.to(x_.dtype)

    rows = _edge_rows(m)
    xs, ws = x[rows].clone().requires_grad_(), w.clone().requires_grad_()
    ys = norm(xs, ws, torch.float32)
    (dxs,) = torch.autograd.grad(ys, xs, dy[rows])
    x64 = x[rows].double().requires_grad_()
    y64 = norm(x64, w.double(), torch.float64)
    (dx64,) = torch.autograd.grad(y64, x64, dy[rows].double())
    assert_exact("y rows", y[rows], y64.detach(), ys.detach())
    assert_exact("dx rows", dx[rows], dx64, dxs)
    # dw sums all 540000 rows: against float64 and the stock fp32 sum, accumulated a slab at a time.
    dw64 = torch.zeros(n, dtype=torch.float64, device="cuda")
    dw_stock = torch.zeros(n, dtype=torch.float32, device="cuda")
    for s in range(0, m, 65536):
        xb, dyb = x[s:s + 65536], dy[s:s + 65536]
        xb32 = xb.float()
        dw_stock += (dyb.float() * (xb32 * torch.rsqrt(xb32.pow(2).mean(-1, keepdim=True) + 1e-5))
                     .to(torch.bfloat16).float()).sum(0)
        xb64 = xb.double()
        dw64 += (dyb.double() * (xb64 * torch.rsqrt(xb64.pow(2).mean(-1, keepdim=True) + 1e-5))).sum(0)
    assert_exact("dw", dw, dw64, dw_stock.to(torch.bfloat16))
