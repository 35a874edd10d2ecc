"""Patterns: attention as transformers calls it, replaced by fxfuse's flash attention.

- `sdpa_attention*`: `scaled_dot_product_attention` as `sdpa_attention_forward` calls it: with the
  boolean mask transformers builds in the graph (causal, padding, packed sequences) and
  `is_causal=False`, or with no mask and `is_causal=True`; each with or without `enable_gqa`.
- `eager_attention`: `eager_attention_forward`: `matmul(q, k^T) * scaling + mask`, fp32 softmax cast
  back, dropout (p = 0 reads as the identity), `matmul(p, v)`. Its mask is additive (0 or the dtype's
  minimum): the kernel adds it to the scores as the stock code does, so a row whose keys are all
  masked gets the stock answer too (a uniform average).

K and V reach attention through `repeat_kv` (`expand` + `reshape` to the query heads): the
replacement reads the un-repeated K and V (the kernel maps each query head to its KV head), and the
repeat goes dead. Dropout > 0, a float mask that needs a gradient, different query and key lengths
(a KV cache) and head dims outside 16..128 keep the stock path, with the reason in explain().

The post pass fuses RoPE in: where q and k are the two outputs of one `rope_qk` (the rope pattern's
post pass pairs a layer's q and k), the kernels rotate q and k as they load them, in the forward and
the backward, and the rotated q and k are never written.

A boolean mask that transformers built in the graph but that is proven causal has already become
`is_causal=True` on the un-repeated K and V (the canonical form: fxfuse/canonicalize.py,
`sdpa_told_causal`), so such calls reach the `sdpa_attention_causal*` patterns.

Policy on CUDA: the stock SDPA there is cuDNN or FlashAttention; the pattern replaces it only where
fxfuse's kernel was measured at least as fast (`CUDA_FASTER_FROM`, benchmarks/RESULTS.md, "Attention").
`options={"attention": "always"}` replaces every supported call; "never" none. Off CUDA nothing was
measured and the stock path is kept (on the CPU the kernel runs only under Triton's interpreter, far
slower than stock): the tests ask for "always".
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import constraints as C
from ..canonicalize import example_value, place_like, unrepeated
from ..kernels.flash_attention import MAX_HEAD_DIM, MIN_HEAD_DIM
from ..matcher import Pattern, module_path
from ..ops.attention import flash_attention
from ..ops.rope import rope_qk

# The sequence length from which fxfuse's kernel (RoPE fused in) was measured at least as fast as the
# stock path on CUDA (Inductor's RoPE + SDPA's pick), by the call's form ("masked": the boolean mask
# transformers builds, K and V repeated; "causal": is_causal=True, no mask) and head dim
# (benchmarks/attention.py, RESULTS.md "Attention"). A form and head dim not listed: never. Empty: on the
# H200 (2026-12-03, head_dim 128, 2048 and 8192 tokens) the kernel took 2.6x (masked) to 7.3x (causal)
# Inductor's time, and longer was worse.
CUDA_FASTER_FROM: dict[tuple[str, int], int] = {}

ATTENTION_POLICIES = ("measured", "always", "never")


# -- references: exactly as transformers writes them ---------------------------------------------------
def sdpa_masked(query, key, value, attn_mask, scale):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, scale=scale,
                                          is_causal=False)


def sdpa_masked_gqa(query, key, value, attn_mask, scale):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, scale=scale,
                                          is_causal=False, enable_gqa=True)


def sdpa_causal(query, key, value, scale):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=scale,
                                          is_causal=True)


def sdpa_causal_gqa(query, key, value, scale):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=scale,
                                          is_causal=True, enable_gqa=True)


def eager_attention(query, key, value, attn_mask, scale):
    # transformers' eager_attention_forward after repeat_kv (its dropout at p = 0 is looked through)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scale
    attn_weights = attn_weights + attn_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(attn_weights, value)


def fused_attention(query, key, value, attn_mask, scale, causal, cos=None, sin=None):
    """What the patterns insert: fxfuse's flash attention (k, v un-repeated; RoPE on load when cos/sin)."""
    return flash_attention(query, key, value, causal=causal, scale=scale, attn_mask=attn_mask, cos=cos, sin=sin)


# -- finding what the references bind to ------------------------------------------------------------
def _shape(node):
    v = example_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _kv(match):
    return unrepeated(match.bindings["key"]), unrepeated(match.bindings["value"])


# -- constraints -----------------------------------------------------------------------------------
def _shapes(match):
    q = match.value("query")
    k, v = (example_value(n) for n in _kv(match))
    if any(t.dim() != 4 for t in (q, k, v)):
        return "query, key and value must be 4-D [batch, heads, tokens, head_dim]"
    b, hq, s, d = q.shape
    if not (_same(k.shape[0], b) and _same(v.shape[0], b) and _same(k.shape[2], s) and _same(v.shape[2], s)):
        return (f"query {tuple(q.shape)} and key/value {tuple(k.shape)} differ in batch or length "
                "(a KV cache or cross-attention); the kernel takes self-attention of one length")
    if tuple(k.shape) != tuple(v.shape) and not all(_same(x, y) for x, y in zip(k.shape, v.shape)):
        return f"key {tuple(k.shape)} and value {tuple(v.shape)} differ in shape"
    if not isinstance(d, int) or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or not _same(k.shape[3], d):
        return f"head_dim {d} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    hk = k.shape[1]
    if not isinstance(hq, int) or not isinstance(hk, int) or hk == 0 or hq % hk:
        return f"query heads {hq} are not a multiple of key/value heads {hk}"


def _mask(match):
    if "attn_mask" not in match.bindings:
        return None
    q, m = match.value("query"), match.value("attn_mask")
    if m.dim() != 4:
        return f"the mask has {m.dim()} dims; the kernel takes [batch or 1, heads or 1, queries, keys]"
    b, h, s, _ = q.shape
    ok = (_same(m.shape[0], b) or _same(m.shape[0], 1)) and (_same(m.shape[1], h) or _same(m.shape[1], 1)) \
        and _same(m.shape[2], s) and _same(m.shape[3], s)
    if not ok:
        return f"mask {tuple(m.shape)} does not broadcast as [B or 1, H or 1, S, S] over query {tuple(q.shape)}"
    if m.dtype != torch.bool and m.dtype != q.dtype:
        return f"mask dtype {m.dtype}: the kernel takes a bool mask or an additive one in the query's dtype"
    if m.requires_grad:
        return "the additive mask requires grad (the kernel treats it as a constant)"


def _policy(match):
    from ..backend import current_options
    policy = current_options().get("attention", "measured")
    if policy == "never":
        return "options={'attention': 'never'}"
    q = match.value("query")
    if policy == "always":
        return None
    if q.device.type != "cuda":
        return (f"no measurement on {q.device.type}: the stock path is kept (the kernel runs there only under "
                "Triton's interpreter, for tests); options={'attention': 'always'} overrides")
    d, s = q.shape[-1], q.shape[-2]
    form = "masked" if "attn_mask" in match.bindings else "causal"
    start = CUDA_FASTER_FROM.get((form, d))
    if start is None or not statically_known_true(s >= start):
        where = f"from {start} tokens" if start is not None else "at no length measured"
        return (f"on CUDA the stock path was measured faster ({form} form, head_dim {d}, length {s}; fxfuse's kernel "
                f"is at least as fast {where}: benchmarks/RESULTS.md, 'Attention'); options={{'attention': 'always'}} "
                "overrides")


_COMMON = (
    C.dtype_in("query", (torch.bfloat16, torch.float16)),
    C.same_dtype("query", "key", "value"),
    C.triton_device("query", "key", "value"),
    _shapes,
    _mask,
    _policy,
)


def _args_masked(match):
    k, v = _kv(match)
    return (match.bindings["query"], k, v, match.bindings["attn_mask"], match.bindings["scale"], False)


def _args_causal(match):
    k, v = _kv(match)
    return (match.bindings["query"], k, v, None, match.bindings["scale"], True)


def _examples(masked, additive=False):
    def make():
        q = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
        k = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
        v = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
        if not masked:
            return q, k, v, 0.25
        m = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
        if additive:
            m = torch.zeros(2, 1, 8, 8, dtype=torch.bfloat16).masked_fill(~m, torch.finfo(torch.bfloat16).min)
        return q, k, v, m, 0.25
    return make


# -- post pass: RoPE into the kernel -------------------------------------------------------------------
def _rope_output(node):
    """(rope_qk node, output index) when `node` is an output of a `rope_qk` call, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target is rope_qk:
            return src, node.args[1]
    return None


def _dead_view(node) -> bool:
    """A view whose result nothing reads (the repeat_kv the replacement left behind; erased later)."""
    views = (operator.getitem, "expand", "reshape")
    return node.op in ("call_function", "call_method") and node.target in views and \
        all(_dead_view(u) for u in node.users)


def rope_on_load(gm: fx.GraphModule) -> list[str]:
    """Where q and k are the outputs of one `rope_qk` used by nothing else, pass the un-rotated q, k
    and cos/sin to the attention kernel instead (see the module docstring)."""
    lines = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not fused_attention or len(n.args) != 6:
            continue
        q_src, k_src = _rope_output(n.args[0]), _rope_output(n.args[1])
        if q_src is None or k_src is None or q_src[0] is not k_src[0] or {q_src[1], k_src[1]} != {0, 1}:
            continue
        rope_node = q_src[0]
        if any(any(u is not n and not _dead_view(u) for u in n.args[i].users) for i in (0, 1)):
            continue  # a rotated q or k is read elsewhere too: it must exist
        xq, xk, cos, sin = rope_node.args
        if q_src[1] == 1:
            xq, xk = xk, xq
        cs = [_shape(c) for c in (cos, sin)]
        if any(c is None or len(c) != 4 or c[1] != 1 for c in cs):
            continue
        with gm.graph.inserting_before(n):
            # cos/sin are [B or 1, 1, S, D]: the kernel takes [B or 1, S, D] (a view).
            cos3 = gm.graph.call_method("select", (cos, 1, 0))
            sin3 = gm.graph.call_method("select", (sin, 1, 0))
            fused = gm.graph.call_function(fused_attention, (xq, xk) + tuple(n.args[2:]), {"cos": cos3, "sin": sin3})
        fused.meta.update(n.meta)
        place_like(n, cos3, sin3)
        n.replace_all_uses_with(fused)
        gm.graph.erase_node(n)
        lines.append(f"rotates q and k inside the attention kernel at {module_path(fused)} (never written)")
    return lines


def _pattern(name, reference, masked, gqa_note, args, examples, description):
    return Pattern(
        name=name,
        description=description + gqa_note,
        reference=reference,
        replacement=fused_attention,
        example_inputs=examples,
        scalars=("scale",),
        arguments=args,
        constraints=_COMMON,
        post_pass=rope_on_load,
        # One pattern carries the anchor, so an SDPA call none of them took is reported once.
        anchor="scaled_dot_product_attention" if name == "sdpa_attention" else None,
        anchor_reason="not a form the attention patterns support (dropout > 0, a non-causal call without a mask, "
                      "or scale left to its default)",
    )


SDPA = _pattern("sdpa_attention", sdpa_masked, True, "", _args_masked, _examples(True),
                "SDPA with transformers' in-graph mask (causal, padding, packed), is_causal=False")
SDPA_GQA = _pattern("sdpa_attention_gqa", sdpa_masked_gqa, True, " (enable_gqa)", _args_masked, _examples(True),
                    "SDPA with a mask, is_causal=False")
SDPA_CAUSAL = _pattern("sdpa_attention_causal", sdpa_causal, False, "", _args_causal, _examples(False),
                       "SDPA with is_causal=True and no mask")
SDPA_CAUSAL_GQA = _pattern("sdpa_attention_causal_gqa", sdpa_causal_gqa, False, " (enable_gqa)", _args_causal,
                           _examples(False), "SDPA with is_causal=True and no mask")
EAGER = _pattern("eager_attention", eager_attention, True, "", _args_masked, _examples(True, additive=True),
                 "transformers' eager_attention_forward: matmul, scale, additive mask, fp32 softmax, matmul")

PATTERNS = [SDPA, SDPA_GQA, SDPA_CAUSAL, SDPA_CAUSAL_GQA, EAGER]
