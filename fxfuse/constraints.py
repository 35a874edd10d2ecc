"""Declarative constraints for patterns: small functions `(match) -> reason | None`.

Each builder returns a constraint that declines with a sentence a user can act on. Shape facts are
checked with `statically_known_true` (sympy, through the ShapeEnv), so a symbolic size is never
specialised: if a fact cannot be proven for every value the size may take, the pattern declines.
"""
from __future__ import annotations

import os

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["dtype_in", "same_dtype", "triton_device", "last_dim_at_most", "shape_equals_last_dim",
           "triton_interpreted"]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tensor(match, name):
    v = match.value(name)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"`{name}` is not a tensor")
    return v


def dtype_in(name: str, dtypes):
    allowed = tuple(dtypes)

    def check(match):
        d = _tensor(match, name).dtype
        if d not in allowed:
            return f"`{name}` is {d}; the kernel supports {', '.join(str(a) for a in allowed)}"
    check.__name__ = f"dtype_in({name})"
    return check


def same_dtype(*names: str):
    def check(match):
        ds = {n: _tensor(match, n).dtype for n in names}
        if len(set(ds.values())) > 1:
            return "dtypes differ: " + ", ".join(f"`{n}` {d}" for n, d in ds.items())
    check.__name__ = f"same_dtype{names}"
    return check


def triton_device(*names: str):
    """Tensors must live where the Triton kernels run: CUDA, or CPU under TRITON_INTERPRET=1."""
    def check(match):
        for n in names:
            dev = _tensor(match, n).device
            if dev.type == "cuda":
                continue
            if dev.type == "cpu" and triton_interpreted():
                continue
            if dev.type == "cpu":
                return f"`{n}` is on the CPU and the Triton interpreter is off (TRITON_INTERPRET=1 enables it)"
            return f"`{n}` is on {dev}; the kernels run on CUDA"
    check.__name__ = f"triton_device{names}"
    return check


def last_dim_at_most(name: str, limit: int):
    def check(match):
        t = _tensor(match, name)
        if t.dim() == 0:
            return f"`{name}` is a scalar"
        n = t.shape[-1]
        if not statically_known_true(n <= limit):
            return f"last dim of `{name}` ({n}) is not provably <= {limit}"
    check.__name__ = f"last_dim_at_most({name}, {limit})"
    return check


def shape_equals_last_dim(vec: str, of: str):
    """`vec` is 1-D with the size of the last dim of `of` (e.g. a norm weight)."""
    def check(match):
        v, t = _tensor(match, vec), _tensor(match, of)
        if v.dim() != 1 or t.dim() == 0 or not statically_known_true(v.shape[0] == t.shape[-1]):
            return f"`{vec}` has shape {tuple(v.shape)}, expected ({t.shape[-1] if t.dim() else '?'},)"
    check.__name__ = f"shape_equals_last_dim({vec}, {of})"
    return check
