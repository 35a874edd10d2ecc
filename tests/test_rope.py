"""RoPE: the kernels are bit-equal to HF's `x * cos + rotate_half(x) * sin` (forward and backward), the
pattern fires for q and k in QLoRA models (head dims 64..128, Llama-3 rope scaling), and declines what
the kernel does not take."""
import pytest
import torch

import fxfuse
from fxfuse.kernels import rope as rope_kernels
from fxfuse.kernels.rope import MAX_HEAD_DIM, rope_backward, rope_forward, rope_qk_backward, rope_qk_forward
from fxfuse.ops.rope import rope, rope_qk
from fxfuse.patterns.rope import rotary_embedding
from fxfuse.testing import assert_exact

from qlora_llama import batch, build, check_compiled_gradients

ENABLE = {"enable": ["rope"], "inner": "eager"}


def _inputs(b, h, t, d, dtype, seed, cos_batch=None):
    g = torch.Generator().manual_seed(seed)
    # q as attention sees it: a [B, T, H*D] projection viewed and transposed (strided).
    x = torch.randn(b, t, h * d, generator=g).to(dtype).view(b, t, h, d).transpose(1, 2)
    ang = torch.randn(cos_batch or b, t, d, generator=g) * 10
    return x, ang.cos().to(dtype).unsqueeze(1), ang.sin().to(dtype).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,h,t,d,cos_batch", [(2, 3, 7, 64, None), (1, 4, 33, 80, None), (2, 2, 5, 96, 1),
                                               (3, 1, 17, 128, None), (1, 2, 1, 16, None)])
def test_kernels_bit_equal_to_stock_and_exact(b, h, t, d, cos_batch, dtype):
    x, cos, sin = _inputs(b, h, t, d, dtype, seed=b * 1000 + t + d, cos_batch=cos_batch)
    xs = x.detach().requires_grad_()
    stock = rotary_embedding(xs, cos, sin)
    dy = torch.randn(stock.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    (dx_stock,) = torch.autograd.grad(stock, xs, dy)

    out = torch.full((b, h, t, d), float("nan"), dtype=dtype)  # poisoned: every element must be written
    ours = rope_forward(x, cos, sin, out=out)
    dx = rope_backward(dy, cos, sin, out=torch.full_like(out, float("nan")))
    assert torch.equal(ours, stock) and torch.equal(dx, dx_stock)

    x64 = x.detach().double().requires_grad_()
    y64 = rotary_embedding(x64, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_exact("y", ours, y64, stock)
    assert_exact("dx", dx, dx64, dx_stock)


def test_nan_and_inf_propagate_like_stock():
    x, cos, sin = _inputs(1, 2, 6, 64, torch.bfloat16, seed=3)
    x = x.contiguous()
    x[0, 0, 1, 5] = float("nan")
    x[0, 1, 2, 40] = float("inf")
    stock, ours = rotary_embedding(x, cos, sin), rope_forward(x, cos, sin)
    assert torch.equal(torch.isnan(ours), torch.isnan(stock)) and torch.equal(torch.isinf(ours), torch.isinf(stock))
    assert torch.equal(ours.nan_to_num(), stock.nan_to_num())


@pytest.mark.parametrize("bad", ["odd_dim", "too_big", "dtype", "cos_heads", "rank3"])
def test_bad_arguments_raise(bad):
    x, cos, sin = _inputs(1, 2, 4, 16, torch.bfloat16, seed=0)
    if bad == "odd_dim":
        x, cos, sin = x[..., :15], cos[..., :15], sin[..., :15]
    elif bad == "too_big":
        x, cos, sin = (torch.zeros(1, 1, 2, MAX_HEAD_DIM + 2, dtype=torch.bfloat16) for _ in range(3))
    elif bad == "dtype":
        cos = cos.float()
    elif bad == "cos_heads":
        cos = cos.expand(1, 2, 4, 16)
    elif bad == "rank3":
        x = x[0]
    with pytest.raises(ValueError):
        rope_forward(x, cos, sin)


def test_op_opcheck():
    x, cos, sin = _inputs(2, 3, 5, 32, torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.fxfuse.rope.default, (x.detach().requires_grad_(), cos, sin))
    torch.library.opcheck(torch.ops.fxfuse.rope_backward.default, (torch.randn_like(x), cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,hq,hk,t,d,cos_batch", [(2, 4, 2, 7, 64, 1), (1, 3, 1, 33, 80, None),
                                                   (2, 2, 2, 5, 16, None), (1, 8, 2, 19, 128, 1)])
def test_q_and_k_in_one_launch_bit_equal_to_stock(b, hq, hk, t, d, cos_batch, dtype):
    q, cos, sin = _inputs(b, hq, t, d, dtype, seed=t + d, cos_batch=cos_batch)
    k = _inputs(b, hk, t, d, dtype, seed=t + d + 1)[0]
    poison = dict(out_q=torch.full((b, hq, t, d), float("nan"), dtype=dtype),
                  out_k=torch.full((b, hk, t, d), float("nan"), dtype=dtype))
    oq, ok = rope_qk_forward(q, k, cos, sin, **poison)
    assert torch.equal(oq, rotary_embedding(q, cos, sin)) and torch.equal(ok, rotary_embedding(k, cos, sin))
    dq, dk = torch.randn(b, hq, t, d).to(dtype), torch.randn(b, hk, t, d).to(dtype)
    gq, gk = rope_qk_backward(dq, dk, cos, sin, out_q=torch.full_like(dq, float("nan")),
                              out_k=torch.full_like(dk, float("nan")))
    qs, ks = q.detach().requires_grad_(), k.detach().requires_grad_()
    torch.autograd.backward((rotary_embedding(qs, cos, sin), rotary_embedding(ks, cos, sin)), (dq, dk))
    assert torch.equal(gq, qs.grad) and torch.equal(gk, ks.grad)


def test_rope_qk_op_opcheck():
    q, cos, sin = _inputs(2, 4, 5, 32, torch.bfloat16, seed=1)
    k = _inputs(2, 2, 5, 32, torch.bfloat16, seed=2)[0]
    torch.library.opcheck(torch.ops.fxfuse.rope_qk.default, (q.detach().requires_grad_(), k.detach().requires_grad_(),
                                                             cos, sin))
    torch.library.opcheck(torch.ops.fxfuse.rope_qk_backward.default,
                          (torch.randn_like(q), torch.randn_like(k), cos, sin))


def test_no_recompilation_when_batch_or_length_changes():
    """Sizes and strides are runtime arguments: one compiled kernel serves every batch and length
    (Triton would otherwise specialise on sizes that are 1 or multiples of 16)."""
    kernel = rope_kernels._rope_qk_kernel
    before = None
    for b, t in ((1, 16), (2, 7), (3, 1), (2, 32), (1, 33)):
        q, cos, sin = _inputs(b, 4, t, 32, torch.bfloat16, seed=t)
        k = _inputs(b, 2, t, 32, torch.bfloat16, seed=t + 1)[0]
        rope_qk(q, k, cos, sin)
        if hasattr(kernel, "device_caches"):  # compiled (GPU): count the kernels Triton built
            n = sum(len(c[0]) for c in kernel.device_caches.values())
            before = n if before is None else before
            assert n == before
    # What the GPU build is told (the interpreter's wrapper keeps the jit arguments in .kwargs).
    unspecialised = set(kernel.kwargs["do_not_specialize"]) if hasattr(kernel, "kwargs") else \
        {p.name for p in kernel.params if p.do_not_specialize}
    assert {"RQ", "HQ", "RK", "HK", "T", "PQ", "sqb", "sqh", "sqt", "skb", "skh", "skt", "scb", "sct"} <= unspecialised


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_fires_for_q_and_k_and_gradients_are_exact(checkpointing):
    # RoPE's kernels are bit-equal to stock: two short batches hold the other patterns' gradients to the bound.
    report = check_compiled_gradients(checkpointing, {"enable": ["rope"]}, t=48, seeds=(1, 2))
    assert report.counts() == {"rms_norm": 5, "nf4_lora": 14, "rope": 4, "swiglu": 2, "causal_lm_loss": 1}, str(report)


@pytest.mark.parametrize("k_batch", [2, 1], ids=["paired", "other-batch"])
def test_q_and_k_are_paired_into_one_launch_only_when_they_can_be(k_batch):
    """q and k on one cos/sin go into one rope_qk call; a k the kernel cannot take with q (here another
    batch size, broadcast against cos) keeps its own launch, and both stay bit-equal to stock."""
    class QK(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)

    q, cos, sin = _inputs(2, 4, 9, 32, torch.bfloat16, seed=3, cos_batch=1)
    k = _inputs(k_batch, 2, 9, 32, torch.bfloat16, seed=4)[0]
    rep = fxfuse.explain(QK(), q, k, cos, sin, options=ENABLE)
    assert rep.counts() == {"rope": 2}, str(rep)
    paired = any("in one launch" in line for line in rep.post_passes)
    assert paired == (k_batch == 2), str(rep)
    out = torch.compile(QK(), backend="fxfuse", options=ENABLE)(q, k, cos, sin)
    assert torch.equal(out[0], rotary_embedding(q, cos, sin)) and torch.equal(out[1], rotary_embedding(k, cos, sin))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims_and_llama3_rope_scaling(head_dim):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, _ = build(layers=1, twin=False, hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=head_dim, rope_scaling=scaling)
    rep = fxfuse.explain(model, **batch(), options=ENABLE)
    assert rep.counts().get("rope") == 2, str(rep)


def test_off_by_default():
    model, _ = build(layers=1, twin=False)
    rep = fxfuse.explain(model, **batch(), options={"inner": "eager"})
    assert "rope" not in rep.counts() and "rope" in str(rep)


def test_head_dim_above_the_kernel_limit_is_declined():
    class M(torch.nn.Module):
        def forward(self, x, cos, sin):
            return rotary_embedding(x, cos, sin)

    d = MAX_HEAD_DIM + 2
    x = torch.randn(1, 2, 3, d, dtype=torch.bfloat16)
    cos = torch.randn(1, 1, 3, d, dtype=torch.bfloat16)
    rep = fxfuse.explain(M(), x, cos, cos.clone(), options=ENABLE)
    assert rep.counts() == {} and "head_dim" in rep.declines[0].reason
    assert torch.equal(rope(x[..., :16].contiguous(), cos[..., :16].contiguous(), cos[..., :16].contiguous()),
                       rotary_embedding(x[..., :16], cos[..., :16], cos[..., :16]))
