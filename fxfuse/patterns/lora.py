"""Patterns: PEFT LoRA (one adapter, dropout 0) on a frozen base, as `fxfuse::lora_linear`.

- `nf4_lora`: `lora.Linear4bit.forward` on a bitsandbytes NF4/FP4 base, and its post pass, which
  merges the projections that read the same input (q/k/v, gate/up) into one call: one read of x for
  the adapters' down-projections, one dequantization pass and one GEMM over the stacked weights.
- `nf4_lora_autocast`: the same forward without PEFT's casts: under CUDA autocast (the Trainer's
  `bf16=True`), where autocast rounds fp32 A and B to bf16 for the adapter's products, or with bf16
  adapters (TRL's bf16=True casts a 4-bit model's LoRA weights to bf16), where the products are bf16
  GEMMs. The replacement computes them in fp32 from A's and B's values (fewer roundings than either
  stock path: the exactness criterion holds); bf16 adapters get dA and dB rounded once to bf16.
- `lora`, `lora_bias`: `lora.Linear.forward` on a plain bf16/fp16 `nn.Linear` (without and with a
  frozen bias). Not grouped: stacking plain weights would copy them on every call, where 4-bit
  weights are dequantized into the stacked buffer anyway."""
from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict

import torch
from torch import fx

from .. import constraints as C
from ..canonicalize import canon, example_value, linear_4bit_info, place_like
from ..matcher import Pattern, module_path
from ..ops.nf4_lora import MAX_GROUP_RANK, lora_linear_group, nf4_lora_linear
from .markers import linear_4bit


def peft_lora_linear_4bit(x, weight, lora_A, lora_B, scaling):
    # peft.tuners.lora.bnb.Linear4bit.forward, vanilla LoRA, one active adapter, no autocast
    result = linear_4bit(x, weight)
    result = result.clone()
    expected_dtype = result.dtype
    x = x.to(lora_A.dtype)
    output = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    output = output.to(expected_dtype)
    return result + output


def peft_lora_linear_4bit_autocast(x, weight, lora_A, lora_B, scaling):
    # the same under CUDA autocast (the Trainer's and TRL's bf16=True): PEFT skips both casts when
    # torch.is_autocast_enabled(), and autocast runs the adapter's linears in bf16 (A and B rounded)
    result = linear_4bit(x, weight)
    result = result.clone()
    output = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    return result + output


def peft_lora_linear(x, weight, lora_A, lora_B, scaling):
    # peft.tuners.lora.layer.Linear.forward, vanilla LoRA, one active adapter, no bias: the sum is
    # formed in the adapter's dtype (type promotion), then cast back to the base's output dtype
    result = torch.nn.functional.linear(x, weight)
    torch_result_dtype = result.dtype
    x = x.to(lora_A.dtype)
    result = result + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    return result.to(torch_result_dtype)


def peft_lora_linear_bias(x, weight, bias, lora_A, lora_B, scaling):
    # the same with the base layer's bias
    result = torch.nn.functional.linear(x, weight, bias)
    torch_result_dtype = result.dtype
    x = x.to(lora_A.dtype)
    result = result + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    return result.to(torch_result_dtype)


def _examples():
    return (torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16),
            torch.randn(4, 16), torch.randn(24, 4), 2.0)


def _examples_autocast():
    # Traced without autocast: every operand in the compute dtype (the user graph's fp32 adapters are
    # checked by the constraints, and autocast by the adapter product's dtype).
    x, w, a, b, s = _examples()
    return x, w, a.to(torch.bfloat16), b.to(torch.bfloat16), s


def _examples_bias():
    x, w, a, b, s = _examples()
    return x, w, torch.randn(24, dtype=torch.bfloat16), a, b, s


def _spec(match):
    return linear_4bit_info(match.user_node("linear_4bit"))


def _4bit_state(match):
    spec = _spec(match)
    if spec is None:
        return "the 4-bit linear's quantization state could not be read"
    if spec.quant_type not in ("nf4", "fp4"):
        return f"quant_type {spec.quant_type!r}: NF4 and FP4 are supported"
    if len(spec.shape) != 2:
        return f"weight shape {spec.shape} is not 2-D"
    # The kernel reads bitsandbytes' standard layout: packed bytes [ceil(N*K/2), 1] and an fp32 (or,
    # double-quantized, uint8) absmax. bitsandbytes' CPU gemm path repacks weights in place (its
    # `packing_format_for_cpu`, with a bf16 absmax) on AVX512-BF16 CPUs: another layout, declined.
    w, a = _value(spec.weight), _value(spec.absmax)
    if not isinstance(w, torch.Tensor) or not isinstance(a, torch.Tensor):
        return "the packed weight or its absmax has no recorded value"
    n = spec.shape[0] * spec.shape[1]
    if w.numel() * w.element_size() != (n + 1) // 2 or (w.dim() == 2 and w.shape[1] != 1):
        return f"packed weight {tuple(w.shape)} {w.dtype} is not bitsandbytes' standard 4-bit layout"
    if a.dtype != (torch.uint8 if spec.nested else torch.float32):
        return f"absmax is {a.dtype}: not bitsandbytes' standard layout (repacked for its CPU kernel?)"
    if spec.bias is not None:
        bias = spec.bias.meta.get("example_value")
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (spec.shape[0],):
            return "the base layer's bias is not a vector of out_features"
        if bias.requires_grad:
            return "the base layer's bias is trainable (PEFT bias='all'/'lora_only'): not supported"


def _adapter_fits(match, out_f, in_f):
    """The adapter (A [r, K], B [N, r]) and the input fit a base of out_f x in_f, within the kernels' rank."""
    a, b, x = match.value("lora_A"), match.value("lora_B"), match.value("x")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        return f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base {out_f}x{in_f}"
    if x.shape[-1] != in_f:
        return f"input features {x.shape[-1]} != {in_f}"
    if a.shape[0] > MAX_GROUP_RANK:
        return f"LoRA rank {a.shape[0]} > {MAX_GROUP_RANK}: not supported by the rank-r kernels"


def _adapter_shapes(match):
    return _adapter_fits(match, *_spec(match).shape)


def _arguments(match):
    spec = _spec(match)
    s2_absmax, s2_code, offset, blocksize2 = spec.nested or (None, None, None, 0)
    return (match.bindings["x"], spec.weight, spec.absmax, s2_absmax, s2_code, offset, match.bindings["lora_A"],
            match.bindings["lora_B"], match.bindings["scaling"], spec.quant_type, spec.shape[0], spec.shape[1],
            spec.blocksize, blocksize2, spec.bias)


def _value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def group_shared_input(gm: fx.GraphModule) -> list[str]:
    """Merge the `nf4_lora_linear` calls that read the same x (and agree on scaling, quantization
    and bias presence) into one `lora_linear_group` call whose output is split back."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    families = defaultdict(list)
    for n in graph.nodes:
        if n.op == "call_function" and n.target is nf4_lora_linear:
            (x, _, _, s2, _, _, a, _, scaling, qt, _, in_f, bs, bs2, bias) = n.args
            a_val = _value(a)
            if a_val is None:
                continue
            if qt == "none":
                continue  # plain bases: see the module docstring
            families[(x, scaling, qt, in_f, bs, bs2, s2 is None, bias is None, a_val.dtype)].append(n)
    lines = []
    for members in families.values():
        # Greedy chunks within the rank-r kernels' limit on the summed rank.
        chunks, chunk, rank = [], [], 0
        for n in members:
            r = _value(n.args[6]).shape[0]
            if chunk and rank + r > MAX_GROUP_RANK:
                chunks.append(chunk)
                chunk, rank = [], 0
            chunk.append(n)
            rank += r
        chunks.append(chunk)
        for chunk in chunks:
            if len(chunk) < 2:
                continue
            first = min(chunk, key=order.__getitem__)
            inputs = [a for n in chunk for a in n.all_input_nodes]
            if any(order[a] > order[first] for a in inputs):
                continue  # an input is computed after the first member: leave them apart
            args = [n.args for n in chunk]
            col = lambda i: [a[i] for a in args]  # noqa: E731
            with graph.inserting_before(first):
                bias = None
                if args[0][14] is not None:
                    bias = graph.call_function(torch.cat, (col(14),))
                sizes = col(10)
                grouped = graph.call_function(lora_linear_group, (
                    args[0][0], col(1), col(2), col(3), col(4), col(5), col(6), col(7), bias, args[0][8],
                    args[0][9], sizes, args[0][11], args[0][12], args[0][13]))
                pieces = graph.call_function(torch.split, (grouped, sizes), {"dim": -1})
                place_like(first, bias, grouped, pieces)
                for i, n in enumerate(chunk):
                    piece = graph.call_function(operator.getitem, (pieces, i))
                    piece.meta.update(n.meta)
                    n.replace_all_uses_with(piece)
            for n in chunk:
                graph.erase_node(n)
            names = "+".join(module_path(n).rsplit(".", 1)[-1] for n in chunk)
            lines.append(f"grouped {names} at {module_path(first).rsplit('.', 1)[0]} (one read of x, one GEMM)")
    return lines


def _unmatched_4bit_linear(node: fx.Node) -> str:
    """explain()'s reason for a 4-bit linear no form matched: its compute dtype when that is not bf16
    (BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float16) on a bf16 model puts casts around the linear,
    so the pattern does not even come near), else the forms it does not know."""
    c = canon(node)
    x = example_value(c.args[0]) if c is not None and c.args and isinstance(c.args[0], fx.Node) else None
    if isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16:
        return (f"a bitsandbytes 4-bit linear computing in {x.dtype} (bnb_4bit_compute_dtype): nf4_lora takes "
                f"bfloat16 compute only (bitsandbytes dequantizes to the stored dtype, then casts; the graph "
                f"does not carry the stored dtype): stock path")
    return ("a bitsandbytes 4-bit linear outside PEFT's plain LoRA form (DoRA, several active adapters, no "
            "adapter, a graph break inside the layer, or bitsandbytes' inference kernel gemv_4bit): stock path")


NF4_LORA = Pattern(
    name="nf4_lora",
    description="PEFT LoRA on a bitsandbytes NF4 Linear4bit (base GEMM, clone, fp32 adapter path, add)",
    reference=peft_lora_linear_4bit,
    replacement=nf4_lora_linear,
    example_inputs=_examples,
    scalars=("scaling",),
    arguments=_arguments,
    post_pass=group_shared_input,
    # bitsandbytes' gemv_4bit: its inference kernel (no grad; on CPU it also repacks the weight).
    anchor=("linear_4bit", "bitsandbytes.gemv_4bit"),
    anchor_reason=_unmatched_4bit_linear,
    constraints=(
        _4bit_state,
        # bf16 only: bitsandbytes dequantizes to the weight's stored dtype and then casts to the
        # compute dtype; the graph does not carry the stored dtype, and with fp16 compute over a bf16
        # checkpoint that double rounding differs from dequantizing straight to fp16. (The op itself
        # is exact in fp16 when the two agree: tests/test_nf4_lora.py.)
        C.dtype_in("x", (torch.bfloat16,)),
        # bf16 adapters (TRL's bf16=True casts them) enter the op as their exact fp32 values.
        C.dtype_in("lora_A", (torch.float32, torch.bfloat16)),
        C.same_dtype("lora_A", "lora_B"),
        C.triton_device("x", "lora_A", "lora_B"),
        _adapter_shapes,
    ),
)


def _under_autocast(match):
    """An adapter product in x's dtype: autocast ran it (fp32 adapters), or the adapters are in x's
    dtype (bf16: the same graph with or without autocast)."""
    product = example_value(match.user_node("mul"))
    x = match.value("x")
    if not isinstance(product, torch.Tensor) or product.dtype != x.dtype:
        return (f"the adapter product is {getattr(product, 'dtype', None)}, the input {x.dtype}: not the "
                f"autocast form (autocast to another dtype than the input's?)")


NF4_LORA_AUTOCAST = dataclasses.replace(
    NF4_LORA,
    name="nf4_lora_autocast",
    description="PEFT LoRA on a bitsandbytes NF4 Linear4bit without PEFT's casts (CUDA autocast, or bf16 adapters)",
    reference=peft_lora_linear_4bit_autocast,
    example_inputs=_examples_autocast,
    # nf4_lora's anchor already reports every 4-bit linear neither form matched.
    anchor=None,
    constraints=NF4_LORA.constraints + (_under_autocast,),
    _graph=None,  # traced afresh from its own reference
)


def _plain_base(match):
    w, x = match.value("weight"), match.value("x")
    if w.dim() != 2:
        return f"base weight of shape {tuple(w.shape)} is not 2-D"
    if w.requires_grad:
        return "the base weight is trainable (not a frozen LoRA base): its gradient is not computed here"
    if w.dtype != x.dtype:
        return f"base weight is {w.dtype}, input {x.dtype}: the kernels read both in one dtype"
    if "bias" in match.bindings:
        bias = match.value("bias")
        if bias.requires_grad:
            return "the base layer's bias is trainable (PEFT bias='all'/'lora_only'): not supported"
        if bias.dtype != x.dtype or tuple(bias.shape) != (w.shape[0],):
            return f"base bias {bias.dtype} {tuple(bias.shape)} does not fit the base {tuple(w.shape)}"


def _plain_adapter_shapes(match):
    return _adapter_fits(match, *match.value("weight").shape)


def _plain_arguments(match):
    w = match.value("weight")
    bias = match.bindings.get("bias")
    return (match.bindings["x"], match.bindings["weight"], None, None, None, None, match.bindings["lora_A"],
            match.bindings["lora_B"], match.bindings["scaling"], "none", w.shape[0], w.shape[1], 0, 0, bias)


_PLAIN_CONSTRAINTS = (
    C.dtype_in("x", (torch.bfloat16, torch.float16)),
    C.dtype_in("lora_A", (torch.float32,)),
    C.same_dtype("lora_A", "lora_B"),
    C.triton_device("x", "weight", "lora_A", "lora_B"),
    _plain_base,
    _plain_adapter_shapes,
)

PLAIN_LORA = Pattern(
    name="lora",
    description="PEFT LoRA on a plain bf16/fp16 nn.Linear (base GEMM, fp32 adapter path, sum, cast)",
    reference=peft_lora_linear,
    replacement=nf4_lora_linear,
    example_inputs=_examples,
    scalars=("scaling",),
    arguments=_plain_arguments,
    constraints=_PLAIN_CONSTRAINTS,
)

PLAIN_LORA_BIAS = dataclasses.replace(
    PLAIN_LORA,
    name="lora_bias",
    description="PEFT LoRA on a plain bf16/fp16 nn.Linear with a frozen bias",
    reference=peft_lora_linear_bias,
    example_inputs=_examples_bias,
    _graph=None,  # traced afresh from its own reference
)
