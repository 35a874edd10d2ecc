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
    name = "sdpa_attention" if attn == "sdpa" else "eager_attention"
    assert report.counts().get(name) == layers, str(report)
    assert sum(ROPE_ON_LOAD in line for line in report.post_passes) == layers, str(report)


def test_gradient_checkpointing(one_tile):
    report = check_compiled_gradients(True, WITH_ROPE, t=40, seeds=(1,), layers=1)
    assert report.counts().get("sdpa_attention") == 1, str(report)


def test_without_rope_the_kernel_reads_rotated_q_and_k(one_tile):
    report = check_compiled_gradients(False, ALWAYS, t=40, seeds=(1,), layers=1)
    assert report.counts().get("sdpa_attention") == 1 and "rope" not in report.counts(), str(report)
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
