"""Attention patterns: SDPA and eager attention as transformers calls them are replaced by fxfuse's flash
attention (RoPE fused in where the rope pattern runs); whole-model gradients meet the exactness criterion
for plain, padded and packed batches; what the kernel does not take is declined with the reason."""
import types

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from fxfuse.kernels import flash_attention as fa
from fxfuse.patterns import attention as A

from qlora_llama import batch, build, check_compiled_gradients

ALWAYS = {"attention": "always"}  # off CUDA the measured policy keeps the stock path
WITH_ROPE = {"enable": ["rope"], **ALWAYS}
ROPE_ON_LOAD = "rotates q and k inside the attention kernel"
CAUSAL = "sdpa_attention_causal_gqa"


@pytest.fixture
def one_tile(monkeypatch):
    """Whole-model tests: 64 x 64 interpreted tiles, so a 40-token batch is one tile and the interpreter runs
    a few programs rather than dozens (4x faster). The kernels' loops over many tiles, their causal bounds
    and tails are tested on 16 x 16 tiles in tests/test_flash_attention.py."""
    monkeypatch.setattr(fa, "_INTERPRETED_BLOCK", 64)


@pytest.mark.parametrize("attn,layout,layers", [("sdpa", "plain", 2), ("sdpa", "padded", 1), ("sdpa", "packed", 1),
                                                ("eager", "plain", 1), ("eager", "padded", 1)])
def test_whole_model_gradients_are_exact(one_tile, attn, layout, layers):
    report = check_compiled_gradients(False, WITH_ROPE, attn=attn, layout=layout, t=40, seeds=(1, 2), layers=layers)
    # A plain batch's SDPA mask is proven causal: the call reaches the patterns as is_causal=True (GQA).
    name = "eager_attention" if attn == "eager" else CAUSAL if layout == "plain" else "sdpa_attention"
    assert report.counts().get(name) == layers, str(report)
    assert sum(ROPE_ON_LOAD in line for line in report.post_passes) == layers, str(report)


def test_gradient_checkpointing(one_tile):
    report = check_compiled_gradients(True, WITH_ROPE, t=40, seeds=(1,), layers=1)
    assert report.counts().get(CAUSAL) == 1, str(report)


TOLD_CAUSAL = "proven causal told is_causal=True"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_constant_causal_mask_becomes_is_causal(checkpointing):
    """Compiling, transformers (torch < 2.14) builds the causal mask in the graph even for a batch with no
    padding and no packing, and SDPA then runs its masked kernel on K and V repeated (3x slower on the
    H200). The mask reads no input there: computed at compile time it is the causal mask, and the call
    becomes transformers' uncompiled one, SDPA with is_causal=True on the un-repeated K and V (on the CPU
    the measured policy keeps the stock kernel). With checkpointing the mask reaches each layer through
    the checkpoint's body. Every LoRA gradient stays exact."""
    report = check_compiled_gradients(checkpointing, None, t=24, seeds=(1,), layers=1)
    assert sum(TOLD_CAUSAL in line for line in report.post_passes) == 1, str(report)
    assert "sdpa_attention" not in report.counts(), str(report)
    assert [d.pattern for d in report.declines if "attention" in d.pattern] == ["sdpa_attention_causal_gqa"], \
        str(report)


def test_a_mask_that_reads_inputs_keeps_it():
    """A padded batch's mask reads attention_mask: not a constant, so the call keeps its mask."""
    model, _ = build(layers=1)
    report = fxfuse.explain(model, **batch(t=16, layout="padded"))
    assert not any(TOLD_CAUSAL in line for line in report.post_passes), str(report)
    assert "sdpa_attention_gqa" in {d.pattern for d in report.declines} or \
        "sdpa_attention" in {d.pattern for d in report.declines}, str(report)


def test_attention_never_leaves_the_mask():
    model, _ = build(layers=1)
    report = fxfuse.explain(model, **batch(t=16), options={"attention": "never"})
    assert not any(TOLD_CAUSAL in line for line in report.post_passes), str(report)


def test_causal_proof_computes_the_mask():
    """The proof computes the mask's subgraph: a constant mask that is not causal (a sliding window) is not
    taken for one, nor is a mask of a symbolic length; a causal one is, and the call is rewritten."""
    from fxfuse.canonicalize import constant_causal_mask, sdpa_told_causal

    def graph_of(fn, *args, dynamic=False):
        graphs = []

        def keep(gm, _):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        torch.compile(fn, backend=keep, dynamic=dynamic)(*args)
        return graphs[0]

    def attention(window):
        def fn(q):
            i = torch.arange(q.shape[-2])
            m = i[None, :] <= i[:, None]
            if window:
                m = m & (i[None, :] > i[:, None] - window)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=m[None, None].expand(2, 1, -1, -1))
        return fn

    q = torch.randn(2, 2, 12, 16)

    def proven(fn, dynamic=False):
        gm = graph_of(fn, q, dynamic=dynamic)
        sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
        return constant_causal_mask(sdpa.kwargs["attn_mask"]), gm
    assert not proven(attention(4))[0]
    assert not proven(attention(None), dynamic=True)[0]
    causal, gm = proven(attention(None))
    assert causal
    assert len(sdpa_told_causal(gm)) == 1
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["is_causal"] and sdpa.kwargs["attn_mask"] is None
    assert not any(n.target is torch.arange for n in gm.graph.nodes)  # the mask's subgraph is gone
    gm.recompile()
    torch.testing.assert_close(gm(q)[0], F.scaled_dot_product_attention(q, q, q, is_causal=True), rtol=0, atol=0)


def test_without_rope_the_kernel_reads_rotated_q_and_k(one_tile):
    report = check_compiled_gradients(False, ALWAYS, t=40, seeds=(1,), layers=1)
    assert report.counts().get(CAUSAL) == 1 and "rope" not in report.counts(), str(report)
    assert not any(ROPE_ON_LOAD in line for line in report.post_passes)


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _qkv(b=2, hq=4, hkv=2, s=21, d=32, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _repeat_kv(x, n):
    # transformers' repeat_kv, verbatim
    b, h, s, d = x.shape
    x = x[:, :, None, :, :].expand(b, h, n, s, d)
    return x.reshape(b, h * n, s, d)


@pytest.mark.parametrize("form", ["causal", "causal_gqa", "masked_gqa"])
def test_sdpa_forms_fire_and_match_stock(form):
    q, k, v = _qkv()
    mask = torch.ones(21, 21, dtype=torch.bool).tril()[None, None].expand(2, 1, 21, 21)

    def fn(q, k, v):
        if form == "causal":
            return F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), dropout_p=0.0,
                                                  scale=0.2, is_causal=True)
        if form == "causal_gqa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=0.2,
                                                  is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.2, is_causal=False,
                                              enable_gqa=True)

    name = {"causal": "sdpa_attention_causal", "causal_gqa": "sdpa_attention_causal_gqa",
            "masked_gqa": "sdpa_attention_gqa"}[form]
    rep = fxfuse.explain(_Call(fn), q, k, v, options={"inner": "eager", **ALWAYS})
    assert rep.counts() == {name: 1}, str(rep)
    compiled = torch.compile(_Call(fn), backend="fxfuse", options={"inner": "eager", **ALWAYS})
    out = compiled(q, k, v)
    ref = fn(q, k, v)
    assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=0)


def _explain(fn, *args, **options):
    return fxfuse.explain(_Call(fn), *args, options={"inner": "eager", **ALWAYS, **options})


def test_dropout_is_declined():
    q, k, v = _qkv(hkv=4)
    rep = _explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, scale=0.2, is_causal=True),
                   q, k, v)
    assert rep.counts() == {} and any("dropout" in d.reason or "0.1" in d.reason for d in rep.declines), str(rep)


def test_head_dim_outside_the_kernel_is_declined():
    q, k, v = _qkv(hkv=4, d=8)
    rep = _explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.2, is_causal=True), q, k, v)
    assert rep.counts() == {} and "head_dim 8" in str(rep), str(rep)


def test_fp32_is_declined():
    q, k, v = _qkv(hkv=4, dtype=torch.float32)
    rep = _explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.2, is_causal=True), q, k, v)
    assert rep.counts() == {} and "torch.float32" in str(rep), str(rep)


def test_kv_cache_lengths_are_declined():
    q, _, _ = _qkv(hkv=4, s=5)
    _, k, v = _qkv(hkv=4, s=9)
    rep = _explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.2, is_causal=True), q, k, v)
    assert rep.counts() == {} and "KV cache" in str(rep), str(rep)


def test_attention_never_option_and_bad_value():
    q, k, v = _qkv(hkv=4)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.2, is_causal=True)  # noqa: E731
    assert _explain(fn, q, k, v).counts() == {"sdpa_attention_causal": 1}
    rep = _explain(fn, q, k, v, attention="measured")  # the default: nothing measured on the CPU
    assert rep.counts() == {} and "no measurement on cpu" in str(rep), str(rep)
    rep = _explain(fn, q, k, v, attention="never")
    assert rep.counts() == {} and "'attention': 'never'" in str(rep)
    with pytest.raises(ValueError, match="attention"):
        _explain(fn, q, k, v, attention="sometimes")


def test_cuda_policy_follows_the_measured_table(monkeypatch):
    """On CUDA the pattern replaces SDPA only from the measured length on (fake CUDA values: no GPU here)."""
    def match(s, d=128, masked=True, device="cuda"):
        q = types.SimpleNamespace(device=torch.device(device), shape=(2, 32, s, d))
        return types.SimpleNamespace(value=lambda name: q, bindings={"attn_mask": None} if masked else {})
    monkeypatch.setattr(A, "CUDA_FASTER_FROM", {("masked", 128): 4096})
    assert A._policy(match(8192)) is None
    assert "measured faster (masked form" in A._policy(match(2048))
    assert "at no length measured" in A._policy(match(8192, d=64))
    assert "at no length measured" in A._policy(match(8192, masked=False))
    assert "no measurement on cpu" in A._policy(match(16, device="cpu"))
