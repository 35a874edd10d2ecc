"""Stand-ins that pattern references call for ops the canonical form folds into one node.

`linear_4bit(x, weight)` is how a reference says "a bitsandbytes 4-bit linear of x": in user graphs
that is a `gemm_4bit` call or an `autograd_function_apply` around one, which canonicalization shows
as a single `linear_4bit` node (fxfuse.canonicalize.linear_4bit_info gives its quantization state).
Markers exist to be traced: on the pattern's example inputs, where `weight` stands for the packed weight
with the logical [out_features, in_features] shape, they compute a plain linear.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_4bit"]


@torch.library.custom_op("fxfuse::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight.to(x.dtype))


@linear_4bit.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
