"""Flash attention: out, dq, dk, dv are exact (fxfuse.testing.assert_exact) against SDPA evaluated in float64
with the equivalent explicit mask, the stock path being SDPA's math backend in bf16/fp16 as transformers
calls it (k and v repeated over the GQA group, boolean mask); causal, key padding (left padding makes rows
with no visible key), GQA, packed segments, dense boolean masks (broadcast, expanded, strided; rows and tiles
with nothing visible), odd lengths, head dims 16..128, fp16 and bf16. Every output is poisoned with NaN first,
so an element a kernel skips fails the test. RoPE fused on load is bit-equal to fxfuse's RoPE kernels
around the attention (forward and backward)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fxfuse.ops.attention  # noqa: F401  (registers fxfuse::flash_attention*)
from fxfuse.kernels.flash_attention import MAX_HEAD_DIM, flash_attention_backward, flash_attention_forward
from fxfuse.kernels.rope import rope_backward, rope_forward
from fxfuse.ops.attention import flash_attention, segment_ids_from_position_ids
from fxfuse.testing import POISON, assert_exact

BF16, FP16 = torch.bfloat16, torch.float16


def _inputs(b, hq, hkv, s, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    # k and v as attention sees them: a [B, S, Hkv*D] projection viewed and transposed (strided).
    k = torch.randn(b, s, hkv * d, generator=g).to(dtype).view(b, s, hkv, d).transpose(1, 2)
    v = torch.randn(b, s, hkv * d, generator=g).to(dtype).view(b, s, hkv, d).transpose(1, 2)
    do = torch.randn(b, hq, s, d, generator=g).to(dtype)
    return q, k, v, do


def _mask(b, s, causal, key_padding_mask, segment_ids):
    """The boolean [B, 1, S, S] mask (True = attend) that the kernel's three masks amount to."""
    m = torch.ones(b, 1, s, s, dtype=torch.bool)
    if causal:
        m &= torch.ones(s, s, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        m &= key_padding_mask[:, None, None, :]
    if segment_ids is not None:
        m &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return m


def _sdpa(q, k, v, do, mask, scale, dtype):
    """Stock attention in `dtype`: transformers' repeat_kv, then SDPA's math backend with a boolean mask.
    Returns (out, dq, dk, dv)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)
    out.backward(do.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _ours(q, k, v, do, causal, scale, kpm, seg, **kw):
    """The kernels on NaN-poisoned outputs: (out, dq, dk, dv, lse). kw: attn_mask, cos, sin."""
    b, hq, s, d = q.shape
    out = torch.full((b, hq, s, d), POISON, dtype=q.dtype)
    lse = torch.full((b, hq, s), POISON)
    flash_attention_forward(q, k, v, causal=causal, scale=scale, key_padding_mask=kpm, segment_ids=seg, **kw,
                            out=out, lse_out=lse)
    dq, dk, dv = (torch.full(t.shape, POISON, dtype=q.dtype) for t in (q, k, v))
    flash_attention_backward(do, q, k, v, lse, causal=causal, scale=scale, key_padding_mask=kpm, segment_ids=seg,
                             **kw, dq_out=dq, dk_out=dk, dv_out=dv)
    return out, dq, dk, dv, lse


def _padding(b, s, kind):
    if kind is None:
        return None
    kpm = torch.ones(b, s, dtype=torch.bool)
    for i in range(b):
        n = (i + 1) * s // (b + 2)
        if kind == "left":  # first tokens are padding: under a causal mask they see no key at all
            kpm[i, :n] = False
        else:
            kpm[i, s - n:] = False
    return kpm


def _segments(b, s, n_seg):
    if not n_seg:
        return None
    # TRL padding-free batches: position_ids restart at 0 at every packed sequence.
    position_ids = torch.empty(b, s, dtype=torch.int64)
    for i in range(b):
        cuts = sorted(torch.randperm(s - 1, generator=torch.Generator().manual_seed(i))[:n_seg - 1].add(1).tolist())
        starts = [0] + cuts
        for j, st in enumerate(starts):
            end = starts[j + 1] if j + 1 < len(starts) else s
            position_ids[i, st:end] = torch.arange(end - st)
    return segment_ids_from_position_ids(position_ids)


CASES = {
    # name: (b, hq, hkv, s, d, dtype, causal, padding, segments)
    "causal-bf16-d64-s45": (1, 2, 2, 45, 64, BF16, True, None, 0),
    "causal-fp16-d128-s1": (2, 2, 1, 1, 128, FP16, True, None, 0),
    "causal-fp16-d64-s32": (1, 2, 1, 32, 64, FP16, True, None, 0),  # whole blocks, no tail
    "gqa4:2-fp16-d80-s17": (2, 4, 2, 17, 80, FP16, True, None, 0),
    "gqa4:1-bf16-d96-s17-noncausal": (1, 4, 1, 17, 96, BF16, False, None, 0),
    "left-pad-causal-bf16-d80-s20": (2, 2, 1, 20, 80, BF16, True, "left", 0),
    "right-pad-noncausal-fp16-d64-s33": (2, 4, 2, 33, 64, FP16, False, "right", 0),
    "packed-causal-bf16-d128-s23": (2, 4, 2, 23, 128, BF16, True, None, 3),
    "packed-noncausal-fp16-d96-s20": (1, 2, 2, 20, 96, FP16, False, None, 4),
    "packed-right-pad-causal-bf16-d64-s19": (2, 2, 1, 19, 64, BF16, True, "right", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_against_float64_and_stock(case):
    b, hq, hkv, s, d, dtype, causal, padding, n_seg = CASES[case]
    q, k, v, do = _inputs(b, hq, hkv, s, d, dtype, seed=s * 131 + d + hq)
    kpm, seg = _padding(b, s, padding), _segments(b, s, n_seg)
    # One case with a non-default scale; the others use SDPA's default, 1/sqrt(D).
    scale = 0.3 if case.startswith("gqa4:1") else 1.0 / math.sqrt(d)
    mask = _mask(b, s, causal, kpm, seg)

    ours = _ours(q, k, v, do, causal, scale, kpm, seg)
    ref64 = _sdpa(q, k, v, do, mask, scale, torch.float64)
    stock = _sdpa(q, k, v, do, mask, scale, dtype)
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
        assert a.dtype == dtype and not torch.isnan(a).any(), name  # fully written, no NaN even on empty rows
        assert_exact(name, a, r, st)

    # lse: float32 logsumexp of the masked, scaled scores; +inf where a row sees no key.
    lse = ours[4]
    scores = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scale
    lse64 = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    empty = (~mask.any(-1)).expand(lse.shape)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty)
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], rtol=1e-6, atol=1e-6)
    if padding == "left" and causal:
        assert empty.any()  # the case is there to cover rows with no visible key


# ------------------------------------------------------------------------------------------------
# Dense boolean attn_mask
# ------------------------------------------------------------------------------------------------


def _dense_mask(b, hq, s, layout, seed):
    """A random bool attn_mask (True = attend) in `layout`, with query row 5 of batch 0 seeing no key and
    the (query block 1, key block 0) tile of the interpreted 16 x 16 tiling blank, so its dots are skipped."""
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(b, hq, s, s, generator=g) < 0.6
    full[0, :, 5, :] = False
    full[:, :, 16:32, :16] = False
    if layout == "bcast-heads":  # [B, 1, S, S], as transformers builds it
        return full[:, :1].clone()
    if layout == "expanded":  # [1, 1, S, S].expand: stride 0 on batch and heads
        return full[:1, :1].clone().expand(b, hq, s, s)
    if layout == "per-head-strided":  # [B, Hq, S, S], keys on the slow axis
        return full.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


DENSE_CASES = {
    # name: (b, hq, hkv, s, d, dtype, causal, layout, padding, segments)
    "bf16-d32-s37-bcast-heads": (2, 4, 2, 37, 32, BF16, False, "bcast-heads", None, 0),
    "causal-bf16-d16-s37-bcast-heads": (2, 4, 2, 37, 16, BF16, True, "bcast-heads", None, 0),
    "causal-fp16-d32-s37-expanded": (2, 4, 2, 37, 32, FP16, True, "expanded", None, 0),
    "fp16-d16-s37-per-head-strided": (2, 4, 2, 37, 16, FP16, False, "per-head-strided", None, 0),
    "causal-right-pad-packed-bf16-d32-s37": (2, 4, 2, 37, 32, BF16, True, "bcast-heads", "right", 3),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_mask_exact_against_float64_and_stock(case):
    b, hq, hkv, s, d, dtype, causal, layout, padding, n_seg = DENSE_CASES[case]
    q, k, v, do = _inputs(b, hq, hkv, s, d, dtype, seed=s * 7 + d + len(case))
    am = _dense_mask(b, hq, s, layout, seed=len(case))
    kpm, seg = _padding(b, s, padding), _segments(b, s, n_seg)
    scale = 1.0 / math.sqrt(d)
    mask = _mask(b, s, causal, kpm, seg) & am

    ours = _ours(q, k, v, do, causal, scale, kpm, seg, attn_mask=am)
    ref64 = _sdpa(q, k, v, do, mask, scale, torch.float64)
    stock = _sdpa(q, k, v, do, mask, scale, dtype)
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        assert_exact(name, a, r, st)

    # Rows with no visible key: out 0, lse +inf, dq 0 -- what stock SDPA's math backend gives (torch 2.13).
    empty = ~mask.any(-1).expand(b, hq, s)
    assert empty[0, :, 5].all()
    out, dq, lse = ours[0], ours[1], ours[4]
    assert (out[empty] == 0).all() and (dq[empty] == 0).all() and torch.isinf(lse[empty]).all()
    assert (stock[0][empty] == 0).all() and (stock[1][empty] == 0).all()
    scores = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scale
    lse64 = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], rtol=1e-6, atol=1e-6)
    # The blank tile is there to exercise the skip: no query of block 1 sees a key of block 0.
    assert not mask[:, :, 16:32, :16].any()



# ------------------------------------------------------------------------------------------------
# Additive attn_mask (transformers' eager attention)
# ------------------------------------------------------------------------------------------------


def _eager(q, k, v, do, bias, scale, dtype):
    """Stock eager attention in `dtype` (transformers' eager_attention_forward: repeat_kv, matmul * scale,
    + the additive mask, fp32 softmax cast back, matmul). Returns (out, dq, dk, dv)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    w = torch.matmul(q, kr.transpose(2, 3)) * scale + bias.to(dtype)
    out = torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(dtype), vr)
    out.backward(do.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


ADDITIVE_CASES = {
    # name: (b, hq, hkv, s, d, dtype, causal, kind): "eager" = 0 / the dtype's minimum, as transformers builds
    # it (row 5 of batch 0 all minimum), "bias" = arbitrary values (ALiBi-like) with some minimum entries.
    "eager-bf16-d32-s37": (2, 4, 2, 37, 32, BF16, False, "eager"),
    "eager-causal-fp16-d16-s21": (1, 2, 1, 21, 16, FP16, True, "eager"),
    "bias-bf16-d16-s19": (1, 4, 4, 19, 16, BF16, False, "bias"),
}


@pytest.mark.parametrize("case", list(ADDITIVE_CASES))
def test_additive_mask_exact_against_float64_and_stock_eager(case):
    b, hq, hkv, s, d, dtype, causal, kind = ADDITIVE_CASES[case]
    q, k, v, do = _inputs(b, hq, hkv, s, d, dtype, seed=s * 3 + d)
    g = torch.Generator().manual_seed(s)
    low = torch.finfo(dtype).min
    keep = _dense_mask(b, 1, s, "bcast-heads", seed=s)  # row 5 of batch 0 sees no key
    if kind == "eager":
        bias = torch.zeros(b, 1, s, s, dtype=dtype).masked_fill(~keep, low)
    else:
        bias = (torch.rand(b, 1, s, s, generator=g) * 6 - 4).to(dtype).masked_fill(~keep & (torch.rand(
            b, 1, s, s, generator=g) < 0.3), low)
    scale = 1.0 / math.sqrt(d)
    full = bias.double()
    if causal:  # the kernel's causal mask, as the reference's -inf
        full = full.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))

    ours = _ours(q, k, v, do, causal, scale, None, None, attn_mask=bias)
    ref64 = _eager(q, k, v, do, full, scale, torch.float64)
    stock = _eager(q, k, v, do, full, scale, dtype)
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        assert_exact(name, a, r, st)
    if kind == "eager" and dtype == BF16:
        # A row whose keys all carry bf16's minimum (-3.4e38: s + min rounds to min, in float64 too): the stock
        # answer, a uniform average of the visible values. (fp16's minimum, -65504, keeps s in fp32 and float64.)
        n = 6 if causal else s
        mean = v[0, :, :n].double().mean(1).repeat_interleave(hq // hkv, 0)
        torch.testing.assert_close(ours[0][0, :, 5].double(), mean, rtol=0, atol=1e-2)
        assert ours[1][0, :, 5].abs().sum() > 0  # and a real gradient, as stock's


def test_dense_mask_skips_blank_tiles():
    """A tile with no visible pair skips its dots. The one effect to observe: NaN values of keys that a
    query block cannot see stay out of its rows (a dot of p = 0 with a NaN v would be NaN; stock SDPA,
    whose P @ V sees them too, has NaN there)."""
    q, k, v, do = _inputs(1, 2, 1, 37, 16, BF16, seed=17)
    v = v.clone()
    v[:, :, :16] = float("nan")
    am = torch.ones(1, 1, 37, 37, dtype=torch.bool)
    am[:, :, 16:32, :16] = False  # query block 1 sees no key of key block 0
    out, dq, _, _, _ = _ours(q, k, v, do, False, 0.25, None, None, attn_mask=am)
    assert torch.isfinite(out[:, :, 16:32]).all() and torch.isfinite(dq[:, :, 16:32]).all()
    assert torch.isnan(out[:, :, :16]).all() and torch.isnan(out[:, :, 32:]).all()

def test_entry_point_autograd_matches_kernels():
    q, k, v, do = _inputs(2, 4, 2, 17, 64, BF16, seed=5)
    kpm, seg = _padding(2, 17, "right"), _segments(2, 17, 2)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(qs, ks, vs, key_padding_mask=kpm.long(), segment_ids=seg)  # HF 0/1 int mask is accepted
    out.backward(do)
    expect = _ours(q, k, v, do, True, 1.0 / math.sqrt(64), kpm, seg)
    for got, want in zip((out, qs.grad, ks.grad, vs.grad), expect):
        assert torch.equal(got, want)


# The interpreter's row max (numpy) warns on the all-NaN row; the GPU max does not.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_propagates_like_stock():
    q, k, v, do = _inputs(1, 2, 1, 20, 64, BF16, seed=9)
    q = q.clone()
    q[0, 1, 6, 3] = float("nan")
    scale = 1.0 / math.sqrt(64)
    # Causal: the NaN query row's output is NaN, every other row as exact as ever.
    out, _ = flash_attention_forward(q, k, v, causal=True, scale=scale)
    mask = _mask(1, 20, True, None, None)
    stock = _sdpa(q, k, v, do, mask, scale, BF16)
    assert torch.isnan(out[0, 1, 6]).all() and torch.equal(torch.isnan(out), torch.isnan(stock[0]))
    assert_exact("out", out, _sdpa(q, k, v, do, mask, scale, torch.float64)[0], stock[0])
    # Without a causal mask every key sees the NaN row, so dk and dv are NaN throughout, as stock;
    # the NaN pattern of all four is the stock one and the finite entries are exact.
    mask = _mask(1, 20, False, None, None)
    ours = _ours(q, k, v, do, False, scale, None, None)
    ref64, stock = _sdpa(q, k, v, do, mask, scale, torch.float64), _sdpa(q, k, v, do, mask, scale, BF16)
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
        assert torch.equal(torch.isnan(a), torch.isnan(st)), name
        assert_exact(name, a, r, st)


# The interpreter's row max (numpy) warns on the all-NaN row; the GPU max does not.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_under_dense_mask_like_stock():
    b, hq, hkv, s, d = 2, 4, 2, 37, 16
    q, k, v, do = _inputs(b, hq, hkv, s, d, BF16, seed=13)
    q = q.clone()
    q[0, 1, 20, 3] = float("nan")
    am = _dense_mask(b, hq, s, "bcast-heads", seed=13)
    assert am[0, 0, 20].any()  # the NaN query sees keys (a query that sees none gives 0, stock NaN)
    scale = 1.0 / math.sqrt(d)
    mask = _mask(b, s, False, None, None) & am
    ours = _ours(q, k, v, do, False, scale, None, None, attn_mask=am)
    ref64, stock = _sdpa(q, k, v, do, mask, scale, torch.float64), _sdpa(q, k, v, do, mask, scale, BF16)
    # The output: NaN exactly where stock has it (the NaN query's row), the rest exact.
    assert torch.isnan(ours[0][0, 1, 20]).all()
    assert torch.equal(torch.isnan(ours[0]), torch.isnan(stock[0]))
    assert_exact("out", ours[0], ref64[0], stock[0])
    # The gradients: a NaN only where stock has one (blank tiles are skipped, so dk and dv have fewer:
    # the math backend's NaN + -inf makes every key of the kv head NaN), and the NaN query's dq row is NaN.
    assert torch.isnan(ours[1][0, 1, 20]).all()
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
        assert not (torch.isnan(a) & ~torch.isnan(st)).any(), name
        finite = ~torch.isnan(st)
        assert_exact(name, a[finite], r[finite], st[finite])


# ------------------------------------------------------------------------------------------------
# RoPE on load
# ------------------------------------------------------------------------------------------------


def _cos_sin(position_ids, d, dtype, base=10000.0):
    """Hugging Face's rotary embedding output for `position_ids` [B', S]: cos, sin [B', S, D] in `dtype`."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


ROPE_CASES = {
    # name: (b, hq, hkv, s, d, dtype, cos/sin batch, packed segments, dense mask)
    # (RoPE multiplies the interpreted kernels' work: two blocks of tokens are enough here.)
    "causal-gqa-bf16-d32-cos-batch1": (2, 4, 2, 23, 32, BF16, 1, 0, False),
    "causal-gqa-fp16-d16-cos-batchB": (2, 4, 2, 23, 16, FP16, 2, 0, False),
    "causal-gqa-bf16-d32-packed-positions": (2, 4, 2, 23, 32, BF16, 2, 3, False),
    "causal-gqa-bf16-d16-cos-batchB-dense-mask": (2, 4, 2, 23, 16, BF16, 2, 0, True),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_fused_is_bit_equal_to_rope_kernels_around_attention(case):
    b, hq, hkv, s, d, dtype, cos_b, n_seg, dense = ROPE_CASES[case]
    q, k, v, do = _inputs(b, hq, hkv, s, d, dtype, seed=s + d + cos_b + n_seg)
    seg = None
    if n_seg:
        # Packed sequences: the positions restart at 0 at each one, and cos/sin follow them per token.
        seg = _segments(b, s, n_seg)
        starts = torch.cat([torch.ones(b, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)
        idx = torch.arange(s).expand(b, s)
        position_ids = idx - torch.cummax(torch.where(starts, idx, 0), 1).values
        assert (position_ids == 0).sum() == b * n_seg and torch.equal(segment_ids_from_position_ids(position_ids), seg)
    else:
        # Positions offset per batch row when cos/sin have one, so the two rows' rotations differ.
        position_ids = torch.arange(s)[None] + 5 * torch.arange(cos_b)[:, None]
    cos, sin = _cos_sin(position_ids, d, dtype)
    assert cos.shape == (cos_b, s, d)
    am = _dense_mask(b, hq, s, "bcast-heads", seed=3) if dense else None
    scale = 1.0 / math.sqrt(d)

    fused = _ours(q, k, v, do, True, scale, None, seg, attn_mask=am, cos=cos, sin=sin)
    # Unfused: fxfuse's RoPE kernels (bit-equal to HF's apply_rotary_pos_emb) around the attention.
    c4, s4 = cos.unsqueeze(1), sin.unsqueeze(1)
    qr, kr = rope_forward(q, c4, s4), rope_forward(k, c4, s4)
    out, lse = flash_attention_forward(qr, kr, v, causal=True, scale=scale, segment_ids=seg, attn_mask=am)
    dqr, dkr, dv = flash_attention_backward(do, qr, kr, v, lse, causal=True, scale=scale, segment_ids=seg,
                                            attn_mask=am)
    unfused = (out, rope_backward(dqr, c4, s4), rope_backward(dkr, c4, s4), dv, lse)
    for name, a, u in zip(("out", "dq", "dk", "dv", "lse"), fused, unfused):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, u), name

    # The same with HF's RoPE in torch ops (autograd for its backward): bit for bit too.
    qq, kk = (t.detach().requires_grad_() for t in (q, k))
    q_hf, k_hf = qq * c4 + _rotate_half(qq) * s4, kk * c4 + _rotate_half(kk) * s4
    assert torch.equal(qr, q_hf) and torch.equal(kr, k_hf)
    torch.autograd.backward([q_hf, k_hf], [dqr, dkr])
    assert torch.equal(fused[1], qq.grad) and torch.equal(fused[2], kk.grad)

    # And the whole is exact against HF's RoPE + SDPA in float64, the stock path being both in `dtype`.
    mask = _mask(b, s, True, None, seg)
    if dense:
        mask = mask & am
    runs = {}
    for dt in (torch.float64, dtype):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        cc, ss = c4.to(dt), s4.to(dt)
        group = hq // hkv
        kk_rot = (kk * cc + _rotate_half(kk) * ss).repeat_interleave(group, dim=1)
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qq * cc + _rotate_half(qq) * ss, kk_rot,
                                               vv.repeat_interleave(group, dim=1), attn_mask=mask, scale=scale)
        o.backward(do.to(dt))
        runs[dt] = (o.detach(), qq.grad, kk.grad, vv.grad)
    # dk's worst element is left to chance here: the stock RoPE's rounding of k, shared by both paths and
    # carried through the attention, then RoPE's backward roundings decide it, and the stock dk's own GQA
    # rounding order differs. Even an ideal attention (exact on the rounded rotated q, k; one rounding)
    # gave a max error of 0.44-1.53x stock's over seeds at this size, with the RMS error at 0.86-0.95x
    # (torch emulation); this kernel measured 0.56-1.39x and 0.88-0.97x. So dk is held to the RMS bar.
    for name, a, r, st in zip(("out", "dq", "dk", "dv"), fused, runs[torch.float64], runs[dtype]):
        assert_exact(name, a, r, st, max_factor=None if name == "dk" else 1.25)


def test_entry_point_mask_and_rope_autograd_matches_kernels():
    b, hq, hkv, s, d = 1, 4, 2, 21, 16
    q, k, v, do = _inputs(b, hq, hkv, s, d, BF16, seed=21)
    am = _dense_mask(b, hq, 32, "expanded", seed=21)[..., :s, :s]
    cos, sin = _cos_sin(torch.arange(s)[None], d, BF16)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(qs, ks, vs, attn_mask=am, cos=cos, sin=sin)
    out.backward(do)
    expect = _ours(q, k, v, do, True, 1.0 / math.sqrt(d), None, None, attn_mask=am, cos=cos, sin=sin)
    for got, want in zip((out, qs.grad, ks.grad, vs.grad), expect):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_gpu_split_dot_numerics_are_exact(dtype):
    """On the GPU each dot with an fp32 operand (P @ V, P^T @ dO, dS @ K, dS^T @ Q) runs as two 16-bit
    dots on its hi + lo split; interpreted, the kernels use fp32 dots instead, so this emulates the
    GPU numerics in torch (untiled) to show the split is needed and enough: with one cast to 16 bits
    the errors reach 1.35-2.2x the stock path's, with the split they are the stock path's."""
    def split_dot(a, b):
        hi = a.to(b.dtype)
        lo = (a - hi.float()).to(b.dtype)
        return hi.float() @ b.float() + lo.float() @ b.float()

    def single_dot(a, b):
        return a.to(b.dtype).float() @ b.float()

    s, d = 128, 128
    q4, k4, v4, do4 = _inputs(1, 1, 1, s, d, dtype, seed=11)
    scale, mask = 1.0 / math.sqrt(d), _mask(1, s, True, None, None)
    ref64, stock = (tuple(x[0, 0] for x in _sdpa(q4, k4, v4, do4, mask, scale, dt)) for dt in (torch.float64, dtype))
    q, k, v, do = (x[0, 0] for x in (q4, k4, v4, do4))
    sc = (q.float() @ k.float().T * scale).masked_fill(~mask[0, 0], float("-inf"))
    p = torch.exp(sc - sc.logsumexp(-1, keepdim=True))
    dp = do.float() @ v.float().T
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    for dot, ok in ((split_dot, True), (single_dot, False)):
        ours = (dot(p, v).to(dtype), (dot(ds, k) * scale).to(dtype), (dot(ds.T, q) * scale).to(dtype),
                dot(p.T, do).to(dtype))
        passed = []
        for name, a, r, st in zip(("out", "dq", "dk", "dv"), ours, ref64, stock):
            try:
                assert_exact(name, a, r, st)
                passed.append(True)
            except AssertionError:
                passed.append(False)
        assert all(passed) if ok else not all(passed), (dot.__name__, passed)


def test_segment_ids_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert segment_ids_from_position_ids(pos).dtype == torch.int32


BAD = ["dtype", "mixed_dtype", "head_dim", "groups", "kv_len", "mask_dtype", "seg_shape",
       "attn_mask_dtype", "attn_mask_grad", "attn_mask_heads", "attn_mask_3d", "attn_mask_len", "attn_mask_device",
       "cos_dtype", "cos_len", "cos_4d", "cos_without_sin", "cos_strided", "cos_device", "rope_odd_head_dim"]


@pytest.mark.parametrize("bad", BAD)
def test_bad_arguments_raise(bad):
    q, k, v, _ = _inputs(1, 4, 2, 5, 64, BF16, seed=0)
    cos = sin = torch.ones(1, 5, 64, dtype=BF16)
    kw = dict(causal=True, scale=0.125)
    if bad == "dtype":
        q, k, v = q.float(), k.float(), v.float()
    elif bad == "mixed_dtype":
        v = v.half()
    elif bad == "head_dim":
        q, k, v = (torch.zeros(*t.shape[:3], MAX_HEAD_DIM + 16, dtype=BF16) for t in (q, k, v))
    elif bad == "groups":
        q = q[:, :3]
    elif bad == "kv_len":
        k, v = k[:, :, :4], v[:, :, :4]
    elif bad == "mask_dtype":
        kw["key_padding_mask"] = torch.ones(1, 5, dtype=torch.int64)
    elif bad == "seg_shape":
        kw["segment_ids"] = torch.zeros(1, 4, dtype=torch.int32)
    elif bad == "attn_mask_dtype":  # an additive mask in another dtype than q's
        kw["attn_mask"] = torch.zeros(1, 1, 5, 5)
    elif bad == "attn_mask_grad":  # the kernels treat the mask as a constant
        kw["attn_mask"] = torch.zeros(1, 1, 5, 5, dtype=BF16, requires_grad=True)
    elif bad == "attn_mask_heads":  # neither 1 nor Hq = 4
        kw["attn_mask"] = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    elif bad == "attn_mask_3d":
        kw["attn_mask"] = torch.ones(1, 5, 5, dtype=torch.bool)
    elif bad == "attn_mask_len":
        kw["attn_mask"] = torch.ones(1, 1, 5, 4, dtype=torch.bool)
    elif bad == "attn_mask_device":
        kw["attn_mask"] = torch.ones(1, 1, 5, 5, dtype=torch.bool, device="meta")
    elif bad == "cos_dtype":
        kw.update(cos=cos.float(), sin=sin.float())
    elif bad == "cos_len":
        kw.update(cos=cos[:, :4], sin=sin[:, :4])
    elif bad == "cos_4d":  # HF's cos after apply_rotary_pos_emb's unsqueeze(1)
        kw.update(cos=cos[:, None], sin=sin[:, None])
    elif bad == "cos_without_sin":
        kw.update(cos=cos)
    elif bad == "cos_strided":
        wide = torch.ones(1, 5, 128, dtype=BF16)
        kw.update(cos=wide[..., ::2], sin=wide[..., ::2])
    elif bad == "cos_device":
        kw.update(cos=cos.to("meta"), sin=sin.to("meta"))
    elif bad == "rope_odd_head_dim":
        q, k, v = (torch.zeros(*t.shape[:3], 17, dtype=BF16) for t in (q, k, v))
        kw.update(cos=torch.ones(1, 5, 17, dtype=BF16), sin=torch.ones(1, 5, 17, dtype=BF16))
    with pytest.raises(ValueError):
        flash_attention_forward(q, k, v, **kw)


def test_op_opcheck():
    q, k, v, do = _inputs(1, 2, 1, 5, 16, BF16, seed=1)
    kpm, seg = _padding(1, 5, "right"), torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32)
    am = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    cos, sin = _cos_sin(torch.arange(5)[None], 16, BF16)
    args = (q.requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(), True, 0.25)
    # Every optional tensor absent, then all present (the dense mask expanded: stride 0 on the heads).
    for extra in ((kpm, seg, None, None, None), (None, None, None, None, None),
                  (kpm, seg, am.expand(1, 2, 5, 5), cos, sin)):
        torch.library.opcheck(torch.ops.fxfuse.flash_attention.default, args + extra)
        _, lse = torch.ops.fxfuse.flash_attention(q, k, v, True, 0.25, *extra)
        torch.library.opcheck(torch.ops.fxfuse.flash_attention_backward.default,
                              (do, q.detach(), k.detach(), v.detach(), lse.detach(), True, 0.25) + extra)
