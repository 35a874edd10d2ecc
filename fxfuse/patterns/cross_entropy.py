"""Patterns: the causal-LM loss of transformers' `ForCausalLMLoss`, on the low-precision logits.

In the graph the loss reads `logits.float().view(-1, V)` (canonicalized to `logits.view(-1, V).float()`,
see canonicalize._casts_after_views) and the shifted labels. Two reductions:
  causal_lm_loss       cross_entropy(..., ignore_index=-100, reduction='mean')
  causal_lm_loss_sum   cross_entropy(..., reduction='sum') / num_items_in_batch   (gradient accumulation:
                       the Trainer passes the batch's token count as a tensor)
Both become `fxfuse::cross_entropy`, which reads the bf16/fp16 logits in place, computes in fp32 and
writes the logits' gradient once in their dtype: none of the stock path's three fp32 [N, V] tensors
(the copy, the log-softmax kept for backward, the fp32 gradient) exists.

Their post pass takes the lm_head (`F.linear(hidden, weight)`, no bias) into the loss:
- The graph returns the logits (`CausalLMOutput.logits`: training loops read them for accuracy or
  entropy metrics; a caller may use them any way, a gradient of their own included). They are
  formed whole, by `fxfuse::lm_head_cross_entropy`, which does not keep them for its backward: that
  forms them again a chunk of rows at a time, each chunk's gradient multiplied out to dhidden at once,
  so neither logits the caller dropped nor the full [N, V] gradient stay on the device. The op's logits take no gradient: as a differentiable output of the compiled graph
  they would be handed a zero [N, V] gradient by autograd on every step where the caller does not
  use one (AOTAutograd materialises it; Inductor's own graph pays it). The post pass makes the graph
  return the op's gradient carrier (fp32, hidden's shape, no memory: all strides 0) and the weight
  too, and the backend's output fixup gives the logits the stock lm_head's gradient outside the graph
  (`attach_logits_grad`), routed through the carrier into the op's backward, where it is added before
  dhidden's one rounding.
- The graph does not return the logits: `fused_linear_cross_entropy`, the logits never formed whole.
A trained lm_head whose logits are returned stays apart (its weight's gradient from the logits would
need an fp32 carrier the size of the weight); the loss pattern still applies to it.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .. import constraints as C
from ..canonicalize import example_value, op_key, place_like
from ..matcher import OUTPUT_FIXUPS_META, TOP_LEVEL_META, Pattern, module_path
from ..ops.cross_entropy import (attach_logits_grad, causal_lm_cross_entropy, fused_linear_cross_entropy,
                                 gradient_carrier, lm_head_causal_lm_loss)


def causal_lm_loss(logits, labels):
    # transformers.loss.loss_utils.ForCausalLMLoss -> fixed_cross_entropy, num_items_in_batch None
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="mean")


def causal_lm_loss_sum(logits, labels, num_items_in_batch):
    # the same with num_items_in_batch (a tensor): reduction 'sum', then the division
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


def _mean_replacement(logits, labels):
    return causal_lm_cross_entropy(logits, labels, -100)


def _sum_replacement(logits, labels, num_items_in_batch):
    return causal_lm_cross_entropy(logits, labels, -100, num_items_in_batch)


def _lm_head_of(logits_2d: fx.Node):
    """(linear node, hidden, weight) when `logits_2d` is `F.linear(hidden, weight).view(-1, V)`, else a reason."""
    if not isinstance(logits_2d, fx.Node) or op_key(logits_2d) not in ("view", "reshape"):
        return "the logits are not a view of the lm_head's output"
    linear = logits_2d.args[0]
    if not isinstance(linear, fx.Node) or linear.op != "call_function" or op_key(linear) != "linear":
        return "the logits do not come from F.linear (an lm_head)"
    args = list(linear.args) + [None] * (3 - len(linear.args))
    hidden, weight = linear.kwargs.get("input", args[0]), linear.kwargs.get("weight", args[1])
    if linear.kwargs.get("bias", args[2]) is not None:
        return "the lm_head has a bias"
    h, w, y = example_value(hidden), example_value(weight), example_value(linear)
    if not all(isinstance(t, torch.Tensor) for t in (h, w, y)) or w.dim() != 2 or h.dim() < 2:
        return "the lm_head's operands are not a [.., H] input and a [V, H] weight"
    if h.dtype != w.dtype or h.dtype not in (torch.bfloat16, torch.float16):
        return f"the lm_head runs in {h.dtype} with a {w.dtype} weight, not bf16 or fp16 throughout"
    if h.device != w.device:
        return "the lm_head's input and weight are on different devices"
    v = example_value(logits_2d)
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[-1] != w.shape[0]:
        return "the 2-D logits are not the lm_head's output viewed as [N, V]"
    return linear, hidden, weight


def _returned_once(linear: fx.Node, view: fx.Node):
    """(output node, position) when the lm_head's output is used by the loss's view and returned once, as
    one item of the graph's output tuple; None when the loss is its only user; else a reason."""
    others = [u for u in linear.users if u is not view]
    if not others:
        return None
    out = others[0]
    if len(others) > 1 or out.op != "output" or not isinstance(out.args[0], (tuple, list)):
        return "the logits have users other than the loss and the graph's output"
    positions = [i for i, a in enumerate(out.args[0]) if a is linear]
    if len(positions) != 1:
        return "the logits are returned more than once, or inside a nested output"
    return out, positions[0]


def _fusable_lm_head(gm: fx.GraphModule, view: fx.Node):
    """(linear, hidden, weight, where the logits are returned or None) for the loss's 2-D logits `view`,
    or the reason the lm_head stays apart."""
    found = _lm_head_of(view)
    if isinstance(found, str):
        return found
    linear, hidden, weight = found
    if len(view.users) != 1:
        return "the 2-D logits have other users"
    returned = _returned_once(linear, view)
    if isinstance(returned, str):
        return returned
    if returned is not None and not gm.meta.get(TOP_LEVEL_META):
        return "the logits are returned from a subgraph (a checkpointed region), not to the caller"
    if returned is not None and example_value(weight).requires_grad:
        return "the lm_head's weight is trained and the logits are returned"
    return linear, hidden, weight, returned


def lm_head_loss_without_logits(hidden, weight, labels, ignore_index, num_items_in_batch=None):
    # For a graph that does not return the logits: they are never formed whole.
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels, ignore_index,
                                      num_items_in_batch)


def _logits_grad_fixup(position: int):
    def attach(outputs: list) -> None:
        weight, carrier = outputs.pop(), outputs.pop()
        outputs[position] = attach_logits_grad(outputs[position], carrier, weight)
    return attach


def fuse_lm_head(gm: fx.GraphModule) -> list[str]:
    """Take the lm_head into the loss (see the module docstring)."""
    lines = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (_mean_replacement, _sum_replacement):
            continue
        where = module_path(n)
        found = _fusable_lm_head(gm, n.args[0])
        if isinstance(found, str):
            lines.append(f"the lm_head stays apart from the loss at {where}: {found}")
            continue
        linear, hidden, weight, returned = found
        view = n.args[0]
        args = (hidden, weight, *n.args[1:2], -100, *n.args[2:])
        if returned is None:
            with gm.graph.inserting_before(n):
                loss = gm.graph.call_function(lm_head_loss_without_logits, args)
            loss.meta.update(n.meta)
        else:
            with gm.graph.inserting_before(n):
                fused = gm.graph.call_function(lm_head_causal_lm_loss, args)
                loss = gm.graph.call_function(operator.getitem, (fused, 0))
                logits = gm.graph.call_function(operator.getitem, (fused, 1))
                carrier = gm.graph.call_function(operator.getitem, (fused, 2))
            place_like(n, fused)
            fused.meta["example_value"] = (example_value(n), example_value(linear),
                                           gradient_carrier(example_value(hidden)))
            loss.meta.update(n.meta)
            logits.meta.update(linear.meta)
            carrier.meta["example_value"] = fused.meta["example_value"][2]
            linear.replace_all_uses_with(logits)
            # The op's logits take no gradient; the backend gives the returned ones theirs, outside the
            # compiled graph, through the gradient carrier and the weight, returned for that.
            out, position = returned
            out.args = (type(out.args[0])([*out.args[0], carrier, weight]),)
            gm.meta.setdefault(OUTPUT_FIXUPS_META, []).append(_logits_grad_fixup(position))
        n.replace_all_uses_with(loss)
        gm.graph.erase_node(n)
        gm.graph.erase_node(view)
        gm.graph.erase_node(linear)
        lines.append(f"takes the lm_head into the loss at {where}: " + (
            "the logits are not returned, and never formed whole" if returned is None else
            "the logits' gradient is formed a chunk of rows at a time; the returned logits get their gradient "
            "outside the graph"))
    return lines


def _examples():
    return torch.randn(6, 16, dtype=torch.bfloat16), torch.randint(0, 16, (6,))


def _shapes(match):
    logits, labels = match.value("logits"), match.value("labels")
    if logits.dim() != 2 or labels.dim() != 1:
        return f"logits {tuple(logits.shape)} / labels {tuple(labels.shape)} are not [N, V] / [N]"
    if labels.dtype not in (torch.int64, torch.int32):
        return f"labels are {labels.dtype}, not an integer class index"
    if logits.stride(-1) != 1:
        return "the logits' last dimension is not contiguous"


def _num_items(match):
    n = match.value("num_items_in_batch")
    if n.numel() != 1:
        return f"num_items_in_batch has {n.numel()} elements, not 1"


_COMMON = (
    C.dtype_in("logits", (torch.bfloat16, torch.float16)),
    C.triton_device("logits", "labels"),
    _shapes,
)

MEAN = Pattern(
    name="causal_lm_loss",
    description="transformers ForCausalLMLoss, 'mean' (fp32 logits copy, cross_entropy ignore_index=-100)",
    reference=causal_lm_loss,
    replacement=_mean_replacement,
    example_inputs=_examples,
    constraints=_COMMON,
    post_pass=fuse_lm_head,
)

SUM = Pattern(
    name="causal_lm_loss_sum",
    description="transformers ForCausalLMLoss with num_items_in_batch ('sum' / num_items_in_batch)",
    reference=causal_lm_loss_sum,
    replacement=_sum_replacement,
    example_inputs=lambda: (*_examples(), torch.tensor(5)),
    constraints=_COMMON + (_num_items,),
    post_pass=fuse_lm_head,
)
