"""Pattern: SwiGLU, `silu(gate) * up`, as Hugging Face LlamaMLP writes it (also Mistral, Qwen2/3: the same code).

Its post pass joins it to a grouped gate,up projection (the `nf4_lora` pattern's post pass, which runs
first, makes gate and up the two halves of one output y, split back): `swiglu(split(y)[0], split(y)[1])`
becomes `swiglu_halves(y)`, which reads the halves in place and returns the gradient of y in one
buffer. Without it autograd's backward of the split concatenates d_gate and d_up into a new [.., 2N]
tensor: an extra round trip of the MLP's widest tensor.

Then, outside activation checkpoints, the down projection reads that y too: `nf4_lora_linear(swiglu_halves(y),
...)` becomes `nf4_lora_linear(y, ..., activation="swiglu_halves")`, which forms h = silu(gate) * up itself
and keeps y (which the SwiGLU's backward needs anyway) instead of h for its backward, forming h again
there (fxfuse/ops/nf4_lora.py, ACTIVATIONS): one [tokens, intermediate] tensor less saved per layer (on the
Llama-3-8B shape at 2 x 2048 tokens, 112 MiB a layer, 3.5 GiB over 32 layers). Under a checkpoint the
region's saved tensors live only while it is recomputed and run backward, one layer at a time, so there the
second SwiGLU forward would cost time for next to no memory: not done."""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import constraints as C
from ..canonicalize import under_checkpoint
from ..matcher import Pattern, module_path
from ..ops.nf4_lora import nf4_lora_linear
from ..ops.swiglu import swiglu, swiglu_halves


def swiglu_reference(gate, up):
    # transformers' LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn = nn.SiLU
    # (nn.SiLU.forward is F.silu(input, inplace=False); either operand order matches).
    return torch.nn.functional.silu(gate) * up


def _examples():
    return torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)


def _same_shape(match):
    # The kernel is elementwise over two equal shapes; a broadcast `up` (or `gate`) is another op.
    g, u = match.value("gate"), match.value("up")
    if g.dim() != u.dim() or not all(statically_known_true(a == b) for a, b in zip(g.shape, u.shape)):
        return f"`gate` {tuple(g.shape)} and `up` {tuple(u.shape)} are not provably the same shape (broadcast)"


def _halves_of(gate: fx.Node, up: fx.Node):
    """y when gate and up are items 0 and 1 of `torch.split(y, [n, n], dim=-1)`, else None."""
    if not all(isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
               for n in (gate, up)):
        return None
    split = gate.args[0]
    if up.args[0] is not split or (gate.args[1], up.args[1]) != (0, 1) or split.op != "call_function" \
            or split.target is not torch.split or len(split.args) != 2:
        return None
    y, sizes = split.args
    dim = split.kwargs.get("dim", 0)
    y_val = y.meta.get("example_value") if isinstance(y, fx.Node) else None
    last = dim == -1 or (y_val is not None and dim == y_val.dim() - 1)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or sizes[0] != sizes[1] or not last:
        return None
    return y


def read_gate_up_whole(gm: fx.GraphModule) -> list[str]:
    """Hand a grouped gate,up output to the SwiGLU whole (see the module docstring)."""
    lines = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not swiglu:
            continue
        y = _halves_of(*n.args)
        if y is None:
            continue
        with gm.graph.inserting_before(n):
            fused = gm.graph.call_function(swiglu_halves, (y,))
        fused.meta.update(n.meta)
        n.replace_all_uses_with(fused)
        gm.graph.erase_node(n)
        lines.append(f"reads the grouped gate,up output at {module_path(n)} in place (its gradient in one buffer)")
    if not under_checkpoint(gm):
        lines += _down_projection_reads_gate_up(gm)
    return lines


def _down_projection_reads_gate_up(gm: fx.GraphModule) -> list[str]:
    """`nf4_lora_linear(swiglu_halves(y), ...)`, h used nowhere else -> `nf4_lora_linear(y, ...,
    activation="swiglu_halves")` (see the module docstring)."""
    lines = []
    for h in list(gm.graph.nodes):
        if h.op != "call_function" or h.target is not swiglu_halves or len(h.users) != 1:
            continue
        (down,) = h.users
        if down.op != "call_function" or down.target is not nf4_lora_linear or down.args[0] is not h \
                or h in down.args[1:] or down.kwargs.get("activation", "none") != "none":
            continue
        down.args = (h.args[0],) + down.args[1:]
        down.kwargs = {**down.kwargs, "activation": "swiglu_halves"}
        gm.graph.erase_node(h)
        lines.append(f"the down projection at {module_path(down)} reads the gate,up output and forms "
                     f"silu(gate) * up again in its backward (not saved)")
    return lines


PATTERN = Pattern(
    name="swiglu",
    description="SwiGLU of HF LlamaMLP, silu(gate) * up (stock roundings; saves gate and up only)",
    reference=swiglu_reference,
    replacement=swiglu,
    example_inputs=_examples,
    post_pass=read_gate_up_whole,
    constraints=(
        # fp32 runs in fp64 inside the kernel: not the stock bits, but never less exact (tested).
        C.dtype_in("gate", (torch.bfloat16, torch.float16, torch.float32)),
        C.same_dtype("gate", "up"),
        _same_shape,
        C.triton_device("gate", "up"),
    ),
)
