"""Canonical form of Dynamo FX graphs, so that a pattern is written once.

Dynamo keeps the user's spelling: `x.pow(2)`, `torch.pow(x, 2)` and `x ** 2` are three different
nodes, `.float()` and `.to(torch.float32)` are two, and a bitsandbytes 4-bit linear is either a bare
`gemm_4bit` call or an `autograd_function_apply` higher-order op whose body calls it. This module
gives every call node a *canonical view* `Canon(key, args)`: an op name and its arguments bound to
one signature with defaults filled in and dims made negative. The matcher compares views only, so
the graph itself keeps running exactly the code the user wrote.

Two physical rewrites change nothing that is computed. Dropping no-op casts (`.to(dtype)` of a tensor
that already has that dtype and device): `Tensor.to` returns `self` then. And telling SDPA it is causal
(`sdpa_told_causal`): compiling, transformers (for torch < 2.14) builds the causal mask as a tensor in the
graph even for a batch with no padding and no packing, and passes it with K and V repeated to the query
heads; uncompiled, it calls SDPA with `is_causal=True` on the un-repeated K and V. Where the mask is
proven causal (computed at compile time: `constant_causal_mask`), the call becomes the uncompiled one:
the same attention, and the kernel behind SDPA (cuDNN on the H200) skips the masked half instead of
reading a mask, 3x faster at 2048 tokens (benchmarks/RESULTS.md, "Whole step, second pass").

`subgraphs(gm)` lists the graphs a pattern may be found in: the top graph and the bodies of
activation-checkpoint regions (`tag_activation_checkpoint`, `wrap`), recursively. The bodies of
`autograd_function_apply` are not entered: they are library internals (bitsandbytes' MatMul4Bit),
seen from outside as one canonical `linear_4bit` node.
"""
from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["Canon", "canon", "canonicalize", "subgraphs", "outer_source", "example_value", "linear_4bit_info",
           "Linear4bitSpec", "constant_causal_mask", "sdpa_told_causal", "unrepeated", "module_path",
           "recompile_alone"]


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
    "cross_entropy": "(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
                     "reduction='mean', label_smoothing=0.0)",
    "scaled_dot_product_attention": "(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, "
                                    "scale=None, *, enable_gqa=False)",
    "dropout": "(input, p=0.5, training=True, inplace=False)",
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
    if t is operator.getitem and _is_linear_4bit_output(node):
        return "linear_4bit"
    if t in _OPERATOR_KEYS:
        return _OPERATOR_KEYS[t]
    if isinstance(t, torch._ops.HigherOrderOperator):
        return "hop." + t.name()
    if isinstance(t, torch._ops.OpOverload):
        if t.namespace == "bitsandbytes" and t._opname == "gemm_4bit" or \
                t.namespace == "fxfuse" and t._opname == "linear_4bit":
            return "linear_4bit"
        return f"{t.namespace}.{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    if t is torch.Tensor.to:
        return "to"
    name = getattr(t, "__name__", None)
    if name is None:
        return None
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


# node.meta keys of memoized views, each stored with the stamp it was computed for.
_CANON_MEMO = "fxfuse_canon_memo"
_LINEAR_4BIT_MEMO = "fxfuse_linear_4bit_memo"


def _stamp(node: fx.Node) -> tuple:
    """What a node's canonical view is computed from: FX gives a node new args/kwargs containers
    whenever an input is replaced, so identical containers mean unchanged inputs. A `getitem` of a
    higher-order op is read through that op's own inputs (bitsandbytes' 4-bit linear), so they count
    too; the node itself counts because FX passes copy `meta` from node to node."""
    src = node.args[0] if node.target is operator.getitem and node.args else None
    return (node, node.target, node.args, node.kwargs, src.args if isinstance(src, fx.Node) else None)


def _memoized(node: fx.Node, meta_key: str, compute):
    stamp = _stamp(node)
    hit = node.meta.get(meta_key)
    if hit is not None and all(a is b for a, b in zip(hit[0], stamp)):
        return hit[1]
    value = compute(node)
    node.meta[meta_key] = (stamp, value)
    return value


def canon(node: fx.Node) -> Canon | None:
    """The canonical view of a call node, or None for nodes patterns cannot match (memoized per node
    until its inputs change: the matcher asks for every node's view once per pattern)."""
    return _memoized(node, _CANON_MEMO, _canon)


def _canon(node: fx.Node) -> Canon | None:
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
        if isinstance(node.target, torch._ops.OpOverload):  # fxfuse::linear_4bit, in pattern references
            return Canon(key, tuple(node.args[:2]))
        info = linear_4bit_info(node)
        return Canon(key, (info.x, info.weight)) if info else None
    if key == "getitem":
        half = _half_of_last_dim(node)
        if half is not None:
            return Canon(key, (node.args[0], half))
    sig = _BOUND.get(key)
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if key == "dropout":
        # Dropout with p = 0 is the identity in training and in eval (transformers' attention calls
        # it with the module's rate): it reads as a plain clone, which the matcher looks through.
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return Canon("dropout.other", args)
        bound.apply_defaults()
        x, prob, _, inplace = bound.arguments.values()
        if prob == 0 and not isinstance(prob, bool) and inplace is False:
            return Canon("clone", (x, None))
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


def _half_of_last_dim(node: fx.Node):
    """`x[..., :D/2]` -> "first half", `x[..., D/2:]` -> "second half" of the last dim (size D, static).

    HF's `rotate_half` slices at `x.shape[-1] // 2`, which Dynamo bakes in as a number: naming the
    halves lets one RoPE pattern match every head dim."""
    x, idx = node.args
    v = example_value(x)
    if not isinstance(v, torch.Tensor) or not isinstance(idx, tuple) or len(idx) != 2 or idx[0] is not Ellipsis:
        return None
    d, sl = v.shape[-1], idx[1]
    if not isinstance(d, int) or d % 2 or not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    if sl.start in (None, 0) and sl.stop == d // 2:
        return "first half of last dim"
    if sl.start == d // 2 and sl.stop in (None, d):
        return "second half of last dim"
    return None


def _negative_dim(dim, ndim: int):
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
        return dim - ndim
    if isinstance(dim, (list, tuple)):
        return type(dim)(_negative_dim(d, ndim) for d in dim)
    return dim


def is_commutative(key: str) -> bool:
    return key in _COMMUTATIVE


@dataclass(frozen=True)
class Linear4bitSpec:
    """What a bitsandbytes 4-bit linear needs, as user-graph nodes and constants."""
    x: Any  # input node
    weight: Any  # packed uint8 weight node (the Params4bit placeholder)
    shape: tuple  # (out_features, in_features)
    blocksize: int
    quant_type: str
    absmax: Any  # fp32 absmax node; the uint8 absmax under double quantization
    bias: Any = None
    nested: tuple | None = None  # (state2_absmax node, state2_code node, offset node, blocksize2)


_NESTED_BLOCKSIZE = 256  # bitsandbytes' gemm_4bit dequantizes a nested absmax with blocks of 256


def _is_linear_4bit_output(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return (isinstance(src, fx.Node) and src.op == "call_function" and node.args[1] == 0
            and isinstance(src.target, torch._ops.HigherOrderOperator)
            and src.target.name() == "autograd_function_apply" and linear_4bit_info(node) is not None)


def linear_4bit_info(node: fx.Node) -> Linear4bitSpec | None:
    """Recognise a bitsandbytes 4-bit linear: `gemm_4bit(x, B, ...)`, or output 0 of the
    `autograd_function_apply` whose forward body calls it (bitsandbytes' MatMul4Bit when the input
    needs grad): `autograd_function_apply(...)[0]` is the linear's value."""
    if node.op != "call_function":
        return None
    return _memoized(node, _LINEAR_4BIT_MEMO, _linear_4bit_info)


def _linear_4bit_info(node: fx.Node) -> Linear4bitSpec | None:
    if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    t = node.target
    outer = {}
    if isinstance(t, torch._ops.HigherOrderOperator) and t.name() == "autograd_function_apply":
        owner = node.graph.owning_module
        fwd = node.args[0]
        body = getattr(owner, fwd.target, None) if isinstance(fwd, fx.Node) and fwd.op == "get_attr" else None
        if not isinstance(body, fx.GraphModule):
            return None
        gemms = [n for n in body.graph.nodes if n.op == "call_function" and _is_gemm_4bit(n.target)]
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        operands = node.args[2:]
        if len(gemms) != 1 or len(placeholders) != len(operands):
            return None
        outer = dict(zip(placeholders, operands))
        gemm = gemms[0]
    elif _is_gemm_4bit(t):
        gemm = node
    else:
        return None
    try:
        bound = _GEMM_4BIT_SIGNATURE.bind(*gemm.args, **gemm.kwargs)
    except (AttributeError, TypeError):
        return None
    bound.apply_defaults()
    g = bound.arguments

    def out(v):
        """The user-graph node for a value of the gemm call (through the body's placeholders and views)."""
        while isinstance(v, fx.Node) and v.op == "call_method" and v.target == "view":
            v = v.args[0]
        if outer:
            if isinstance(v, fx.Node) and v.op != "placeholder":
                return _UNKNOWN
            v = outer.get(v, v) if isinstance(v, fx.Node) else v
        while isinstance(v, fx.Node) and v.op == "call_method" and v.target == "view":
            v = v.args[0]
        return v

    vals = {k: out(v) for k, v in g.items()}
    if any(v is _UNKNOWN for v in vals.values()) or not isinstance(g["shapeB"], (list, tuple)):
        return None
    nested = None
    if vals["absmax_8bit"] is not None:
        nested = (vals["absmax"], vals["absmax_code"], vals["absmax_offset"], _NESTED_BLOCKSIZE)
        absmax = vals["absmax_8bit"]
    else:
        absmax = vals["absmax"]
    return Linear4bitSpec(x=vals["A"], weight=vals["B"], shape=tuple(g["shapeB"]), blocksize=g["blocksize"],
                          quant_type=g["quant_type"], absmax=absmax, bias=vals["bias"], nested=nested)


_UNKNOWN = object()


def _gemm_4bit_signature(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                         absmax_code=None, absmax_offset=None):
    """bitsandbytes::gemm_4bit's schema, as a Python signature to bind graph arguments to."""


_GEMM_4BIT_SIGNATURE = inspect.signature(_gemm_4bit_signature)


def _is_gemm_4bit(t) -> bool:
    return isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
        str(t).startswith("bitsandbytes.gemm_4bit")


# Higher-order ops whose body runs as ordinary code of the surrounding graph (patterns may span it).
_TRANSPARENT_HOPS = {"tag_activation_checkpoint", "wrap", "wrap_with_autocast", "wrap_with_set_grad_enabled"}


# GraphModule.meta key: a transparent HOP body's placeholders -> the operands the HOP call passes them.
OPERANDS_META = "fxfuse_operands"
# GraphModule.meta key: the names of the HOPs around a body, outermost first.
ENCLOSING_HOPS_META = "fxfuse_enclosing_hops"


def subgraphs(gm: fx.GraphModule, _prefix: str = ""):
    """Yield (path, GraphModule) for the graph and every transparent HOP body under it (each body's
    placeholders mapped to the outer nodes they stand for: `outer_source`)."""
    yield _prefix, gm
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        if node.target.name() not in _TRANSPARENT_HOPS:
            continue
        at = 0 if node.target.name() != "wrap_with_set_grad_enabled" else 1
        body_ref = node.args[at]
        if isinstance(body_ref, fx.Node) and body_ref.op == "get_attr":
            body = getattr(gm, body_ref.target, None)
            if isinstance(body, fx.GraphModule):
                placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
                operands = node.args[at + 1:]
                if len(placeholders) == len(operands):
                    body.meta[OPERANDS_META] = dict(zip(placeholders, operands))
                body.meta[ENCLOSING_HOPS_META] = gm.meta.get(ENCLOSING_HOPS_META, ()) + (node.target.name(),)
                yield from subgraphs(body, f"{_prefix}{body_ref.target}.")


def under_checkpoint(gm: fx.GraphModule) -> bool:
    """Whether `gm` is (within) the body of an activation checkpoint, as `subgraphs` last walked it: what
    its nodes save for the backward then lives only while its own region is recomputed and run backward."""
    return "tag_activation_checkpoint" in gm.meta.get(ENCLOSING_HOPS_META, ())


def outer_source(node: Any) -> Any:
    """The node a HOP body's placeholder stands for in the graph around it (through nested bodies),
    else `node` itself."""
    while isinstance(node, fx.Node) and node.op == "placeholder":
        outer = node.graph.owning_module.meta.get(OPERANDS_META, {}).get(node)
        if outer is None:
            break
        node = outer
    return node


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


def _casts_after_views(graph: fx.Graph) -> int:
    """`x.float().view(s)` -> `x.view(s).float()` where the cast feeds only the view.

    A view and a dtype cast commute exactly. With the cast last, a pattern anchored on the consumer
    (e.g. the loss's `cross_entropy(logits.float().view(-1, V))`) finds the low-precision tensor
    right under the cast and can read it directly. Widening casts only: a narrowing cast is how a
    region hands its result back in the model's dtype (PEFT's `result.to(torch_result_dtype)`
    before attention's `.view(hidden_shape)`), and patterns end on it where the model wrote it."""
    moved = 0
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function") or op_key(node) not in ("view", "reshape"):
            continue
        cast = node.args[0] if node.args else None
        if not isinstance(cast, fx.Node) or len(cast.users) != 1 or cast.op not in ("call_method", "call_function"):
            continue
        c = canon(cast)
        if c is None or c.key != "to" or c.args[1] is None or c.args[2] is not None:
            continue
        src, vin, vout = c.args[0], example_value(c.args[0]), example_value(node)
        if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor) or not vin.is_contiguous():
            continue  # a view of a non-contiguous source could fail where the cast's fresh copy did not
        if not (vin.dtype.is_floating_point and vout.dtype.is_floating_point
                and vout.dtype.itemsize > vin.dtype.itemsize):
            continue
        with graph.inserting_before(node):
            if node.op == "call_method":
                view = graph.call_method(node.target, (src, *node.args[1:]), dict(node.kwargs))
            else:
                view = graph.call_function(node.target, (src, *node.args[1:]), dict(node.kwargs))
            view.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
            view.meta["example_value"] = vin.reshape(vout.shape)
            new_cast = graph.call_method("to", (view, c.args[1])) if cast.op == "call_method" else \
                graph.call_function(cast.target, (view, *cast.args[1:]), dict(cast.kwargs))
            new_cast.meta.update(node.meta)
        node.replace_all_uses_with(new_cast)
        graph.erase_node(node)
        graph.erase_node(cast)
        moved += 1
    return moved


# Masks with more elements than this are not computed at compile time (2 x 8192 x 8192 booleans: 128 MiB).
MAX_PROVEN_MASK = 2 ** 28
_CAUSAL_META = "fxfuse_constant_causal"


def _constant_value(node: fx.Node) -> torch.Tensor | None:
    """`node`'s value where it is a function of constants alone: no graph input among the nodes it is
    computed from, no symbolic size, only plain calls. It is then the same tensor at every call of the
    graph, and computing those nodes once (on their device, now) gives it. Else None."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op not in ("call_function", "call_method"):
            return None  # a graph input (user data such as attention_mask or position_ids), a module, ...
        v = example_value(n)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) or \
                (isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape)):
            return None  # a symbolic size: the value may differ between calls
        needed.add(n)
        stack.extend(n.all_input_nodes)
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or value.numel() > MAX_PROVEN_MASK:
        return None
    sub, env = fx.Graph(), {}
    for n in node.graph.nodes:  # in the graph's (topological) order
        if n in needed:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[node])
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    try:
        with unset_fake_temporarily(), torch.no_grad():
            return fx.GraphModule(torch.nn.Module(), sub)()
    except Exception:  # noqa: BLE001  (what cannot be computed is not proven)
        return None


def constant_causal_mask(mask: Any) -> bool:
    """Whether `mask` (a node, or a HOP body's placeholder standing for one) is a boolean
    [B or 1, H or 1, S, S] tensor equal to the causal mask at every call: computed once per mask."""
    mask = outer_source(mask)
    if not isinstance(mask, fx.Node):
        return False
    if _CAUSAL_META not in mask.meta:
        v = example_value(mask)
        value = _constant_value(mask) if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 4 \
            and v.shape[-1] == v.shape[-2] else None
        causal = False
        if value is not None:
            s = value.shape[-1]
            causal = bool((value == torch.ones(s, s, dtype=torch.bool, device=value.device).tril()).all())
        mask.meta[_CAUSAL_META] = causal
    return mask.meta[_CAUSAL_META]


def unrepeated(node: Any) -> Any:
    """The KV tensor [B, Hkv, S, D] before transformers' repeat_kv, else `node` itself.

    repeat_kv(x, n) = x[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D): checked on
    the recorded shapes, so it is the repeat of heads and nothing else."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return node
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and exp.op == "call_method" and exp.target == "expand"):
        return node
    idx = exp.args[0]
    full = slice(None, None, None)
    if not (isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is operator.getitem
            and idx.args[1] == (full, full, None, full, full)):
        return node
    x = idx.args[0]
    xs, es, rs = (example_value(n) for n in (x, exp, node))
    if not all(isinstance(v, torch.Tensor) for v in (xs, es, rs)) or (xs.dim(), es.dim(), rs.dim()) != (4, 5, 4):
        return node
    b, h, s, d = xs.shape
    same = lambda p, q: statically_known_true(p == q)  # noqa: E731
    if not all(same(p, q) for p, q in zip((b, h, s, d), (es.shape[0], es.shape[1], es.shape[3], es.shape[4]))) or \
            not all(same(p, q) for p, q in zip((b, h * es.shape[2], s, d), rs.shape)):
        return node
    return x


def module_path(node: fx.Node) -> str:
    """The user's module a node comes from (`layers.0.self_attn`), from Dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "<top>"
    path = re.sub(r"^L\['[^']+'\]\.?", "", list(stack.values())[-1][0])
    path = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"^(base_model\.model\.)?(model\.)?", "", path)  # PEFT and *ForCausalLM wrappers
    return path or "<model>"


def place_like(node: fx.Node, *made) -> None:
    """Give the nodes a rewrite `made` the place `node` has in the user's modules (its module path and stack
    trace): explain() and regional compilation's cuts between layers read where a node is from them."""
    where = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    for m in made:
        if m is not None:
            m.meta.update(where)


_IN_PLACE_OPERATORS = {operator.iadd, operator.iand, operator.ior, operator.ixor, operator.isub, operator.imul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.ilshift,
                       operator.irshift, operator.imatmul}


def _in_place(n: fx.Node) -> bool:
    t = n.target
    if n.op == "call_method":
        return t.endswith("_")
    if t in _IN_PLACE_OPERATORS:
        return True
    schema = getattr(t, "_schema", None)
    return bool(schema is not None and schema.is_mutable) or getattr(t, "__name__", "").endswith("_")


def _erase_if_dead(nodes) -> None:
    """Erase the nodes no one uses any more, and then their producers that become unused, stopping at
    in-place calls (their effect is on a tensor others may read) and at anything not a plain call."""
    stack, erased = list(nodes), set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in erased or n.users or n.op not in ("call_function", "call_method") \
                or _in_place(n):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def sdpa_told_causal(gm: fx.GraphModule) -> list[str]:
    """SDPA calls of `gm` whose boolean mask is proven causal, made the call transformers makes uncompiled:
    no mask, is_causal=True, K and V un-repeated (enable_gqa where the head counts differ). Returns one
    line per graph with where, for explain()."""
    where = []
    for node in list(gm.graph.nodes):
        c = canon(node) if node.op == "call_function" else None
        if c is None or c.key != "scaled_dot_product_attention":
            continue
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = c.args
        if not isinstance(attn_mask, fx.Node) or dropout_p != 0.0 or is_causal or not constant_causal_mask(attn_mask):
            continue
        key, value = unrepeated(key), unrepeated(value)
        q, k = example_value(query), example_value(key)
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            continue
        old = (c.args[1], c.args[2], attn_mask)
        node.args = (query, key, value)
        node.kwargs = {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": scale,
                       "enable_gqa": bool(enable_gqa) or not statically_known_true(q.shape[1] == k.shape[1])}
        _erase_if_dead(old)  # the repeat of K and V, the mask where it is built in this graph
        where.append(module_path(node))
    if not where:
        return []
    shown = ", ".join(where[:3]) + (f", ... ({len(where) - 3} more)" if len(where) > 3 else "")
    return [f"{len(where)} SDPA call(s) with a mask proven causal told is_causal=True, K and V un-repeated ({shown})"]


def recompile_alone(gm: fx.GraphModule) -> None:
    """`gm.recompile()` without regenerating the code of its child graph modules, whose code is current.

    GraphModule.recompile regenerates every child GraphModule too, recursively: at 32 checkpointed
    layers one recompile of the top graph regenerated ~500 graphs (each layer's body and the
    bitsandbytes forward and backward bodies inside it)."""
    gm._recompile_submodules = _no_submodules
    try:
        gm.recompile()
    finally:
        del gm._recompile_submodules


def _no_submodules():
    return []


def canonicalize(gm: fx.GraphModule, notes: list | None = None, sdpa_causal: bool = True,
                 changed: set | None = None) -> int:
    """Make `gm` (and its transparent HOP bodies) canonical in place. Returns the nodes dropped; lines
    saying where SDPA was told it is causal go to `notes` (sdpa_causal=False: left as it is). The graph
    modules changed are recompiled, or, where a set `changed` is given, added to it for the caller to
    recompile after its own edits."""
    dropped = 0
    for _, sub in subgraphs(gm):
        n = _drop_noop_casts(sub.graph)
        moved = _casts_after_views(sub.graph)
        told = sdpa_told_causal(sub) if sdpa_causal else []
        if notes is not None:
            notes.extend(told)
        if n or moved or told:
            if changed is None:
                recompile_alone(sub)
            else:
                changed.add(sub)
        dropped += n
    return dropped
