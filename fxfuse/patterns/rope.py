"""Pattern: HF `apply_rotary_pos_emb`'s `q * cos + rotate_half(q) * sin`, for q and for k.

cos and sin are whatever the graph computes them from (`inv_freq` and the position ids, Llama-3 rope
scaling included: the pattern starts at the products). Its post pass pairs a layer's q and k, which
share cos and sin, into one `rope_qk` call (one launch each way); the attention patterns' post pass
then moves that rotation into the attention kernel where it can.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .. import constraints as C
from ..canonicalize import example_value
from ..kernels.rope import MAX_HEAD_DIM
from ..matcher import Pattern, module_path
from ..ops.rope import rope, rope_qk


def rotate_half(x):
    # transformers.models.llama.modeling_llama.rotate_half, verbatim
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(x, cos, sin):
    # apply_rotary_pos_emb for one of q, k; cos/sin already unsqueezed on the head dim
    return (x * cos) + (rotate_half(x) * sin)


def _examples():
    return (torch.randn(2, 3, 5, 16, dtype=torch.bfloat16), torch.randn(2, 1, 5, 16, dtype=torch.bfloat16),
            torch.randn(2, 1, 5, 16, dtype=torch.bfloat16))


def _shapes(match):
    x, cos, sin = (match.value(n) for n in ("x", "cos", "sin"))
    if x.dim() != 4:
        return f"x has {x.dim()} dims, the kernel takes [batch, heads, tokens, head_dim]"
    d = x.shape[-1]
    if not isinstance(d, int) or d % 2 or d > MAX_HEAD_DIM:
        return f"head_dim {d} is not an even number <= {MAX_HEAD_DIM}"
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 4 or c.shape[1] != 1 or c.shape[-1] != d or c.shape[2] != x.shape[2] \
                or c.shape[0] not in (1, x.shape[0]):
            return f"{name} of shape {tuple(c.shape)} does not broadcast over the heads of x {tuple(x.shape)}"
        if c.requires_grad:
            return f"{name} requires grad (the kernel treats cos/sin as constants)"


def rotate_q_and_k_together(gm: fx.GraphModule) -> list[str]:
    """Two `rope` calls of one module on the same cos and sin, both inputs available at the first of
    them, become one `rope_qk` call."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is rope and len(n.args) == 3 and not n.kwargs:
            groups.setdefault((n.args[1], n.args[2], module_path(n)), []).append(n)
    lines = []
    for (cos, sin, where), nodes in groups.items():
        if len(nodes) != 2:
            continue
        first, second = nodes
        xk = second.args[0]
        if isinstance(xk, fx.Node) and order[xk] > order[first]:
            continue
        q, k = example_value(first.args[0]), example_value(xk)
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dtype == k.dtype
                and q.shape[0] == k.shape[0] and tuple(q.shape[2:]) == tuple(k.shape[2:])):
            continue  # rope_qk takes q and k of one batch, length, head_dim and dtype; else two launches
        with gm.graph.inserting_before(first):
            both = gm.graph.call_function(rope_qk, (first.args[0], xk, cos, sin))
            outs = [gm.graph.call_function(operator.getitem, (both, i)) for i in (0, 1)]
        both.meta.update(first.meta)
        for old, new in zip(nodes, outs):
            new.meta.update(old.meta)
            old.replace_all_uses_with(new)
            gm.graph.erase_node(old)
        lines.append(f"rotates q and k in one launch at {where}")
    return lines


PATTERN = Pattern(
    name="rope",
    description="HF rotary embedding, x * cos + rotate_half(x) * sin (q and k each)",
    reference=rotary_embedding,
    replacement=rope,
    example_inputs=_examples,
    post_pass=rotate_q_and_k_together,
    # Bit-equal to the stock code, not yet measured against Inductor's fused elementwise code.
    enabled_by_default=False,
    constraints=(
        C.dtype_in("x", (torch.bfloat16, torch.float16)),
        C.same_dtype("x", "cos", "sin"),
        C.triton_device("x", "cos", "sin"),
        _shapes,
    ),
)
