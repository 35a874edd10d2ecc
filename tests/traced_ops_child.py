"""Child process of tests/test_traced_ops.py: trace fxfuse's GPU ops as torch.compile would, without a GPU.

Runs without TRITON_INTERPRET (so the ops are triton_ops and their kernels JIT functions), on meta
tensors, with a stand-in Triton driver that names an sm_90 target (Triton then generates the TTIR
that torch's kernel-mutation analysis reads, with no device). AOTAutograd decomposes each op into
its kernel launches; for every launch this prints which arguments the analysis found written,
whether those are graph inputs, and whether the token count stayed symbolic. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")


triton.runtime.driver.set_active(_Sm90Driver())

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from functorch.compile import make_boxed_func  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402

import fxfuse.ops  # noqa: E402,F401
from fxfuse.ops.nf4_lora import lora_linear_group  # noqa: E402

# Token count, features: sizes no parameter shares (duck sizing would tie their symbols together).
M, K, R = 200, 512, 16


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _nf4(n):
    return (_meta(n * K // 2, 1, dtype=torch.uint8), _meta(n * K // 64, dtype=torch.uint8),
            _meta(-(-n * K // 64 // 256), dtype=torch.float32), _meta(256), _meta(()))


def case_lora(sizes, quant, activation="none"):
    x = _meta(M, 2 * K if activation == "swiglu_halves" else K, dtype=torch.bfloat16, grad=True)
    a = [_meta(R, K, grad=True) for _ in sizes]
    b = [_meta(n, R, grad=True) for n in sizes]
    if quant == "none":
        w = [_meta(n, K, dtype=torch.bfloat16) for n in sizes]
        state = [[None] * len(sizes)] * 4
    else:
        packed = [_nf4(n) for n in sizes]
        w = [p[0] for p in packed]
        state = [[p[i] for p in packed] for i in range(1, 5)]
    flat = [x, *w, *[t for s in state for t in s if t is not None], *a, *b]

    def fn(*args):
        it = iter(args)
        x_ = next(it)
        w_ = [next(it) for _ in sizes]
        st = [[None if t is None else next(it) for t in s] for s in state]
        a_ = [next(it) for _ in sizes]
        b_ = [next(it) for _ in sizes]
        return lora_linear_group(x_, w_, *st, a_, b_, None, 2.0, quant, list(sizes), K, 64, 256, activation)
    return fn, flat


# Ops that read a tensor's metadata, not its data (the launches' stride arguments).
_METADATA = (torch.ops.aten.sym_stride.int, torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
             torch.ops.aten.sym_storage_offset.default)


def _forward_backward_graphs(fn, inputs, partition_fn=None) -> list:
    """The forward and backward graphs AOTAutograd makes of `fn` (dynamic shapes), after one backward."""
    graphs = []

    def compiler(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    extra = {} if partition_fn is None else {"partition_fn": partition_fn}
    out = aot_function(fn, fw_compiler=compiler, bw_compiler=compiler, dynamic=True, **extra)(*inputs)
    out.sum().backward()
    return graphs


def trace(fn, inputs) -> dict:
    graphs = _forward_backward_graphs(fn, inputs)
    launches, opaque, in_place = [], [], []
    for gm in graphs:
        placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if "fxfuse" in str(n.target):
                opaque.append(str(n.target))
            if n.target is torch.ops.higher_order.auto_functionalized_v2:
                # An op that updates a tensor in place (fxfuse::frozen_addmm_): Inductor re-inplaces
                # it when nothing else reads the tensor it updates, and copies that tensor otherwise.
                bases = n.kwargs["_all_bases"]
                in_place.append({"op": str(n.args[0]),
                                 "shared": any(u is not n and u.target not in _METADATA for b in bases
                                               for u in b.users)})
            if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
                kwargs = n.kwargs["kwargs"]
                written = list(n.kwargs["tensors_to_clone"])
                m = kwargs.get("M", kwargs.get("n_words"))
                launches.append({
                    "kernel": kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__,
                    "written": written,
                    "written_inputs": [k for k in written if kwargs[k] in placeholders],
                    # A written buffer passed under a second name too: Inductor copies it first.
                    "written_aliased": [k for k in written if any(kwargs[o] is kwargs[k] for o in kwargs if o != k)],
                    # A written intermediate (updated in place) that something else reads too: it
                    # cannot be updated in place, and Inductor copies it first.
                    "written_shared": [k for k in written if kwargs[k] not in placeholders
                                       and any(u is not n and u.target not in _METADATA for u in kwargs[k].users)],
                    "m_symbolic": None if "M" not in kwargs else not isinstance(m, int),
                })
    return {"launches": launches, "opaque": opaque, "in_place": in_place}


def saved_for_backward(fn, inputs) -> list[dict]:
    """What the forward saves for the backward under the partitioner Inductor uses (min-cut
    rematerialization): each tensor beyond the op's output, whether it is a graph input, its dtype, and
    whether its leading dimension is the (symbolic) token count."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    graphs = _forward_backward_graphs(fn, inputs, min_cut_rematerialization_partition)
    (outputs,) = [n.args[0] for n in graphs[0].graph.nodes if n.op == "output"]
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
    saved = []
    for n in outputs[1:]:
        val = n.meta.get("val")
        base = n
        while base.op == "call_function" and base.target in views:
            base = base.args[0]
        if isinstance(val, torch.Tensor):
            saved.append({"name": n.name, "input": base.op == "placeholder", "dtype": str(val.dtype),
                          "token_sized": val.dim() > 0 and not isinstance(val.shape[0], int)})
    return saved


def main():
    cases = {
        "lora nf4": case_lora([1000], "nf4"),
        "lora nf4 narrowing": case_lora([300], "nf4"),
        "lora nf4 group": case_lora([1000, 520], "nf4"),
        "lora nf4 wide group": case_lora([1100, 1100], "nf4"),
        "lora plain base": case_lora([1000], "none"),
        "lora nf4 down of swiglu": case_lora([300], "nf4", "swiglu_halves"),
    }
    result = {name: trace(*c) for name, c in cases.items()}
    for name in ("lora nf4 narrowing", "lora nf4 down of swiglu"):
        result[name]["saved"] = saved_for_backward(*cases[name])
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
