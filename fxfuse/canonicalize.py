"""Canonical form of Dynamo FX graphs, so that a pattern is written once.

Dynamo keeps the user's spelling: `x.pow(2)`, `torch.pow(x, 2)` and `x ** 2` are three different
nodes, `.float()` and `.to(torch.float32)` are two, and a bitsandbytes 4-bit linear is either a bare
`gemm_4bit` call or an `autograd_function_apply` higher-order op whose body calls it. This module
gives every call node a *canonical view* `Canon(key, args)`: an op name and its arguments bound to
one signature with defaults filled in and dims made negative. The matcher compares views only, so
the graph itself keeps running exactly the code the user wrote.

The one physical rewrite is dropping no-op casts (`.to(dtype)` of a tensor that already has that
dtype and device): `Tensor.to` returns `self` then, so removing the node changes nothing at run time.

`subgraphs(gm)` lists the graphs a pattern may be found in: the top graph and the bodies of
activation-checkpoint regions (`tag_activation_checkpoint`, `wrap`), recursively. The bodies of
`autograd_function_apply` are not entered: they are library internals (bitsandbytes' MatMul4Bit),
seen from outside as one canonical `linear_4bit` node.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Canon", "canon", "canonicalize", "subgraphs", "example_value", "linear_4bit_info"]


@dataclass(frozen=True)
class Canon:
    key: str
    args: tuple  # positional, bound to the op's canonical signature, defaults filled in


# Operators and torch functions with more than one spelling, by canonical key.
_OPERATOR_KEYS = {
    operator.add: "add", operator.iadd: "add_", operator.mul: "mul", operator.imul: "mul_",
    operator.sub: "sub", operator.truediv: "div", operator.neg: "neg", operator.pow: "pow",
    operator.matmul: "matmul", operator.getitem: "getitem", operator.eq: "eq", operator.ne: "ne",
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.and_: "bitwise_and",
    operator.or_: "bitwise_or", operator.invert: "bitwise_not",
}
_METHOD_ALIASES = {"__eq__": "eq", "__ne__": "ne", "__and__": "bitwise_and", "__or__": "bitwise_or",
                   "__mul__": "mul", "__add__": "add", "__sub__": "sub", "__neg__": "neg",
                   "__truediv__": "div", "__getitem__": "getitem", "__matmul__": "matmul", "__pow__": "pow",
                   "divide": "div", "multiply": "mul", "subtract": "sub", "negative": "neg"}
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}

# Canonical signatures of the ops patterns use. An op not listed keeps its arguments as spelled.
_SIGNATURES = {
    "pow": "(self, exponent)", "mean": "(self, dim=None, keepdim=False, *, dtype=None)",
    "sum": "(self, dim=None, keepdim=False, *, dtype=None)", "rsqrt": "(self)", "sqrt": "(self)",
    "add": "(self, other, *, alpha=1)", "mul": "(self, other)", "sub": "(self, other, *, alpha=1)",
    "div": "(self, other, *, rounding_mode=None)", "neg": "(self)", "exp": "(self)", "tanh": "(self)",
    "silu": "(input, inplace=False)", "sigmoid": "(self)", "gelu": "(input, approximate='none')",
    "reciprocal": "(self)", "cat": "(tensors, dim=0)", "matmul": "(self, other)",
    "linear": "(input, weight, bias=None)", "clone": "(self, *, memory_format=None)",
    "contiguous": "(self, memory_format=torch.contiguous_format)", "cos": "(self)", "sin": "(self)",
    "transpose": "(self, dim0, dim1)", "unsqueeze": "(self, dim)", "softmax": "(input, dim=None, _stacklevel=3, dtype=None)",
}
_BOUND = {k: inspect.Signature.from_callable(eval(f"lambda {v[1:-1]}: None", {"torch": torch}))  # noqa: S307
          for k, v in _SIGNATURES.items()}
_DIM_ARGS = {"mean": (1,), "sum": (1,), "cat": (1,), "softmax": (1,), "transpose": (1, 2), "unsqueeze": ()}
_COMMUTATIVE = {"add", "mul"}


def example_value(node: Any):
    """The fake value Dynamo recorded for a node (a FakeTensor, SymInt, tuple...), or None."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def _ndim(node: Any) -> int | None:
    v = example_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def op_key(node: fx.Node) -> str | None:
    if node.op == "call_method":
        name = node.target
        if name in _CAST_METHODS or name in ("to", "type"):
            return "to"
        return _METHOD_ALIASES.get(name, name)
    if node.op != "call_function":
        return None
    t = node.target
    if t in _OPERATOR_KEYS:
        return _OPERATOR_KEYS[t]
    if isinstance(t, torch._ops.HigherOrderOperator):
        if t.name() == "autograd_function_apply" and linear_4bit_info(node) is not None:
            return "linear_4bit"
        return "hop." + t.name()
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    if t is torch.Tensor.to:
        return "to"
    name = getattr(t, "__name__", None)
    if name is None:
        return None
    if name == "gemm_4bit":  # bitsandbytes.functional wrapper, should Dynamo ever keep it
        return "linear_4bit"
    return _METHOD_ALIASES.get(name, name)


def _to_args(node: fx.Node) -> tuple | None:
    """Canonical `to`: (self, dtype, device); None when the cast is not a plain dtype/device cast."""
    if node.op == "call_method" and node.target in _CAST_METHODS:
        if len(node.args) != 1 or node.kwargs.get("memory_format") is not None:
            return None
        return (node.args[0], _CAST_METHODS[node.target], None)
    args, kwargs = list(node.args), dict(node.kwargs)
    self = args.pop(0)
    if kwargs.pop("copy", False) or kwargs.pop("memory_format", None) is not None:
        return None
    kwargs.pop("non_blocking", None)
    dtype, device = kwargs.pop("dtype", None), kwargs.pop("device", None)
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (torch.device, str)):
            device = torch.device(a)
        elif isinstance(a, bool):  # non_blocking / copy given positionally
            if a:
                return None
        else:
            return None  # .to(other_tensor) and friends
    if kwargs:
        return None
    return (self, dtype, device)


def canon(node: fx.Node) -> Canon | None:
    """The canonical view of a call node, or None for nodes patterns cannot match."""
    key = op_key(node)
    if key is None:
        return None
    if key == "to":
        if node.op == "call_method" and node.target == "type":
            a = node.args[1:] if len(node.args) > 1 else tuple(node.kwargs.values())
            if len(a) != 1 or not isinstance(a[0], torch.dtype):
                return Canon("to.other", tuple(node.args))
            return Canon("to", (node.args[0], a[0], None))
        args = _to_args(node)
        return Canon("to", args) if args is not None else Canon("to.other", tuple(node.args))
    if key == "linear_4bit":
        info = linear_4bit_info(node)
        return Canon(key, (info["x"], info["weight"])) if info else None
    sig = _BOUND.get(key)
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if sig is None:
        return Canon(key, args + tuple(sorted(kwargs.items())))
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return Canon(key + ".other", args)
    bound.apply_defaults()
    vals = list(bound.arguments.values())
    ndim = _ndim(vals[0][0] if key == "cat" and vals[0] else vals[0])
    for i in _DIM_ARGS.get(key, ()):
        if ndim is not None:
            vals[i] = _negative_dim(vals[i], ndim + (1 if key == "unsqueeze" else 0))
    return Canon(key, tuple(vals))


def _negative_dim(dim, ndim: int):
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
        return dim - ndim
    if isinstance(dim, (list, tuple)):
        return type(dim)(_negative_dim(d, ndim) for d in dim)
    return dim


def is_commutative(key: str) -> bool:
    return key in _COMMUTATIVE


def linear_4bit_info(node: fx.Node) -> dict | None:
    """Recognise a bitsandbytes 4-bit linear: `gemm_4bit(x, B, ...)` or the `autograd_function_apply`
    whose forward body calls it. Returns x, the packed weight node and the quant-state arguments."""
    t = node.target
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.HigherOrderOperator) and t.name() == "autograd_function_apply":
        owner = node.graph.owning_module
        fwd = node.args[0]
        body = getattr(owner, fwd.target, None) if isinstance(fwd, fx.Node) and fwd.op == "get_attr" else None
        if not isinstance(body, fx.GraphModule):
            return None
        gemms = [n for n in body.graph.nodes if n.op == "call_function" and _is_gemm_4bit(n.target)]
        if len(gemms) != 1:
            return None
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        operands = node.args[2:]
        if len(placeholders) != len(operands):
            return None
        outer = dict(zip(placeholders, operands))
        g = gemms[0]
        x_inner, b_inner = g.args[0], g.args[1]
        # B inside the body is `placeholder.view(-1, 1)`; walk back to the placeholder.
        while isinstance(b_inner, fx.Node) and b_inner.op != "placeholder":
            b_inner = b_inner.args[0] if b_inner.args else None
        if x_inner not in outer or b_inner not in outer:
            return None
        w = outer[b_inner]
        while isinstance(w, fx.Node) and w.op == "call_method" and w.target == "view":
            w = w.args[0]
        return {"x": outer[x_inner], "weight": w, "gemm": g, "outer": outer}
    if _is_gemm_4bit(t):
        w = node.args[1]
        while isinstance(w, fx.Node) and w.op == "call_method" and w.target == "view":
            w = w.args[0]
        return {"x": node.args[0], "weight": w, "gemm": node, "outer": {}}
    return None


def _is_gemm_4bit(t) -> bool:
    return isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
        str(t).startswith("bitsandbytes.gemm_4bit")


# Higher-order ops whose body runs as ordinary code of the surrounding graph (patterns may span it).
_TRANSPARENT_HOPS = {"tag_activation_checkpoint", "wrap", "wrap_with_autocast", "wrap_with_set_grad_enabled"}


def subgraphs(gm: fx.GraphModule, _prefix: str = ""):
    """Yield (path, GraphModule) for the graph and every transparent HOP body under it."""
    yield _prefix, gm
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        if node.target.name() not in _TRANSPARENT_HOPS:
            continue
        body_ref = node.args[0] if node.target.name() != "wrap_with_set_grad_enabled" else node.args[1]
        if isinstance(body_ref, fx.Node) and body_ref.op == "get_attr":
            body = getattr(gm, body_ref.target, None)
            if isinstance(body, fx.GraphModule):
                yield from subgraphs(body, f"{_prefix}{body_ref.target}.")


def _drop_noop_casts(graph: fx.Graph) -> int:
    dropped = 0
    for node in list(graph.nodes):
        c = canon(node) if node.op in ("call_method", "call_function") else None
        if c is None or c.key != "to":
            continue
        src, dtype, device = c.args
        vin, vout = example_value(src), example_value(node)
        if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor):
            continue
        if (dtype is None or vin.dtype == dtype) and (device is None or vin.device == vout.device) \
                and vin.dtype == vout.dtype and vin.device == vout.device:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            dropped += 1
    return dropped


def canonicalize(gm: fx.GraphModule) -> int:
    """Make `gm` (and its transparent HOP bodies) canonical in place. Returns the nodes dropped."""
    dropped = 0
    for _, sub in subgraphs(gm):
        n = _drop_noop_casts(sub.graph)
        if n:
            sub.recompile()
        dropped += n
    return dropped
