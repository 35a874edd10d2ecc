"""How every fxfuse op is registered with torch.library: one decorator, `triton_op_or_custom_op`.

On the GPU an op is a `torch.library.triton_op`: torch.compile traces into its body (torch ops and
Triton launches through `kernels.common.launch`), so Inductor compiles and launches the kernels
itself. A plain custom op would stay an opaque Python call at run time, and its Python (argument
handling, several Triton launches through Triton's own launcher) cost more host time than the GPU
time of the kernels it starts (measured on the H200: benchmarks/RESULTS.md).

Under Triton's interpreter (CPU tests) the kernels cannot be traced (they run on real data only),
so the op is an opaque `custom_op` with the given fake implementation. Both register the same
Python body, so what the tests check is what runs eagerly on the GPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels.common import interpreted, memoize_access_analysis

__all__ = ["triton_op_or_custom_op"]


def triton_op_or_custom_op(name: str, fake: Callable, traced: bool = True):
    """Decorator registering `fn` as the op `name` ("fxfuse::..."), which mutates none of its inputs.

    `fake` computes the outputs' metadata from fake inputs (used when interpreted, or with
    traced=False; a triton_op is its own fake implementation, so `fake` must agree with `fn`'s
    outputs in shape, dtype and strides). traced=False keeps an op opaque on the GPU too: for ops
    whose kernels Inductor has not yet been seen to compile (its copy of a kernel's source is
    compiled with its own argument handling)."""
    def register(fn):
        if interpreted() or not traced:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
        else:
            memoize_access_analysis()  # compile time: see its docstring
            op = torch.library.triton_op(name, mutates_args=())(fn)
        return op
    return register
