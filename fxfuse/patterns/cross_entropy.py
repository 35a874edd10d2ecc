"""Patterns: the causal-LM loss of transformers' `ForCausalLMLoss`, on the low-precision logits.

In the graph the loss reads `logits.float().view(-1, V)` (canonicalized to `logits.view(-1, V).float()`,
see canonicalize._casts_after_views) and the shifted labels. Two reductions:
  causal_lm_loss       cross_entropy(..., ignore_index=-100, reduction='mean')
  causal_lm_loss_sum   cross_entropy(..., reduction='sum') / num_items_in_batch   (gradient accumulation:
                       the Trainer passes the batch's token count as a tensor)
Both become `fxfuse::cross_entropy`, which reads the bf16/fp16 logits in place, computes in fp32 and
writes the logits' gradient once in their dtype: none of the stock path's three fp32 [N, V] tensors
(the copy, the log-softmax kept for backward, the fp32 gradient) exists.

The bf16 logits themselves stay: the graph returns them (`CausalLMOutput.logits`, which TRL reads for
its token-accuracy and entropy metrics), so the lm_head is not fused into the loss here.
"""
from __future__ import annotations

import torch

from .. import constraints as C
from ..matcher import Pattern
from ..ops.cross_entropy import causal_lm_cross_entropy


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
    enabled_by_default=False,  # until measured on the GPU
)

SUM = Pattern(
    name="causal_lm_loss_sum",
    description="transformers ForCausalLMLoss with num_items_in_batch ('sum' / num_items_in_batch)",
    reference=causal_lm_loss_sum,
    replacement=_sum_replacement,
    example_inputs=lambda: (*_examples(), torch.tensor(5)),
    constraints=_COMMON + (_num_items,),
    enabled_by_default=False,
)
