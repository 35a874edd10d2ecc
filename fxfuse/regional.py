"""Regional compilation: a repeated layer is compiled once, and its twins run that compiled code.

A decoder's graph is one layer N times over (a 32-layer Llama: 32 copies of the same ops on other
weights). Compiled whole, AOTAutograd's tracing and partitioning and Inductor's code generation grow
with N, although the code generated for layer 7 is the code for layer 3. Here the rewritten graph is
cut at layer boundaries (the module paths Dynamo records: `layers.3.self_attn...`), each piece is
reduced to a signature, and a piece whose signature was compiled already reuses that compiled code,
forward and backward. The graph that calls the pieces runs as FX-generated Python, which frees each
value after its last use.

Why reuse is exact: Dynamo lifts parameters to graph inputs, so a piece is a function of its inputs
alone, and the signature covers every operation, constant and wire of it, and each input's dtype,
shape, strides, storage offset, device, requires_grad and aliasing. Two pieces with one signature are
the same function of the same kind of inputs.

The graph is compiled whole instead (and the report says why) where the cut would not pay (fewer than
MIN_REUSES layers reusing another's code) or could change what runs: layers whose nodes interleave, grad mode or autocast changed across a cut,
other global state set in the graph, a piece mutating in place a value another piece computed, a value
crossing a cut that is not a tensor or a number, or Dynamo's DDPOptimizer, which has cut the graph
already and expects one compiled function per piece of its own.
"""
from __future__ import annotations

import functools
import operator
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch.multiprocessing.reductions import StorageWeakRef

from .canonicalize import _in_place, module_path

__all__ = ["layer_of", "plan", "compile_regions", "RegionalSummary", "LayerInputOffload"]

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")
# Layers that must reuse another's compiled code for the cut to be made: each piece is a compile of its
# own (AOTAutograd, Inductor, and on CPU a C++ build), so a 2-layer model compiles faster whole.
MIN_REUSES = 2
# Calls that change global state the next piece would see. Grad mode and autocast are followed through
# the graph (a `torch.no_grad()` region, e.g. the rotary embedding's, is set and restored within one
# piece): a cut is only made where both are as at the graph's entry. The others keep a graph whole.
_GRAD_MODE = "_set_grad_enabled"
_AUTOCAST = {"_enter_autocast": 1, "_exit_autocast": -1}
_OTHER_GLOBAL_STATE = {"set_autocast_enabled", "_set_autocast_enabled", "set_grad_enabled",
                       "_set_fwd_grad_enabled", "_enter_dual_level", "_exit_dual_level",
                       "_set_deterministic_algorithms"}


def layer_of(node: fx.Node) -> str | None:
    """The repeated module a node belongs to (`layers.3`: the first indexed component of its module
    path), or None outside any."""
    m = _LAYER.match(module_path(node))
    return m.group(1) if m else None


@dataclass
class Piece:
    layer: str | None  # None: the nodes before, between or after the layers
    nodes: list
    inputs: list = field(default_factory=list)  # nodes computed elsewhere, in order of first use
    outputs: list = field(default_factory=list)  # its nodes used elsewhere, in graph order


@dataclass
class RegionalSummary:
    """What regional compilation did with one graph (GraphReport.regional)."""
    pieces: int = 0
    layers: int = 0
    compiled: int = 0  # distinct pieces compiled: the rest reused one of them
    reason: str = ""  # why the graph was compiled whole ("" when it was cut)
    offload: "LayerInputOffload | None" = None  # None: the layers' saved inputs stay on the device
    # (piece, seconds) per compile, forward only (the backward compiles at the first backward): the piece
    # is the layer it holds, or where it sits ("before layers.0", "after layers.31")
    compile_s: list = field(default_factory=list)

    def __str__(self) -> str:
        if self.reason:
            return f"compiled whole: {self.reason}"
        text = f"{self.layers} layers in {self.pieces} pieces, {self.compiled} compiled (each repeated layer once)"
        if self.compile_s:
            text += "; forward compiles: " + ", ".join(f"{where} {s:.1f} s" for where, s in self.compile_s)
        return text + (f"; {self.offload}" if self.offload is not None else "")


def _is_module_attr(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "get_attr" and isinstance(_fetch(gm, node.target), torch.nn.Module)


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def plan(gm: fx.GraphModule) -> list[Piece] | str:
    """Cut `gm`'s graph into pieces, one per layer plus the stretches between; or say why not."""
    # Tensor attributes stay with the calling graph and reach the pieces as inputs (a constant baked
    # into compiled code would be layer 3's in layer 7); HOP bodies go into the piece that calls them.
    nodes = [n for n in gm.graph.nodes
             if n.op not in ("placeholder", "output") and (n.op != "get_attr" or _is_module_attr(gm, n))]
    # Whether grad mode and autocast are as at entry after each node (where a cut may follow it).
    entry = torch.is_grad_enabled()  # Dynamo guards the graph on the grad mode it was traced in
    grad, depth, at_entry_state = entry, 0, []
    for n in nodes:
        if n.op == "call_module":
            return f"the graph calls module {n.target} (not a lifted Dynamo graph)"
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name in _OTHER_GLOBAL_STATE:
            return f"node {n.name} changes global state ({name})"
        if name == _GRAD_MODE:
            if not isinstance(n.args[0], bool):
                return f"node {n.name} sets a grad mode not known before it runs"
            grad = n.args[0]
        depth += _AUTOCAST.get(name, 0)
        at_entry_state.append(grad == entry and depth == 0)
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        key = layer_of(n)
        if key is not None:
            spans.setdefault(key, [i, i])[1] = i
    if len(spans) < 2:
        return "fewer than two layers"
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (a, (_, last)), (b, (first, _)) in zip(ordered, ordered[1:]):
        if first <= last:
            return f"the nodes of {a} and {b} interleave"
    pieces, cursor = [], 0
    for key, (first, last) in ordered:
        if first > cursor:
            pieces.append(Piece(None, nodes[cursor:first]))
        pieces.append(Piece(key, nodes[first:last + 1]))
        cursor = last + 1
    if cursor < len(nodes):
        pieces.append(Piece(None, nodes[cursor:]))
    for p in pieces[:-1]:
        if not at_entry_state[nodes.index(p.nodes[-1])]:
            return (f"grad mode or autocast is changed across the cut after node {p.nodes[-1].name} "
                    f"({p.layer or 'between layers'})")
    owner = {n: i for i, p in enumerate(pieces) for n in p.nodes}
    for i, p in enumerate(pieces):
        seen = {}
        for n in p.nodes:
            for a in n.all_input_nodes:
                if owner.get(a) != i:
                    seen.setdefault(a, None)
        p.inputs = list(seen)
        p.outputs = [n for n in p.nodes if any(owner.get(u) != i for u in n.users)]
        # Compiled whole, AOTAutograd functionalizes such a mutation; across a cut it would change a tensor
        # the piece that made it may have saved for its backward.
        for n in p.nodes:
            base = _view_base(n.args[0], owner, i) if _in_place(n) and n.args else None
            if base is not None and owner.get(base) is not None:
                return f"node {n.name} mutates in place {base.name}, computed in another piece"
    return pieces


# Ops whose output may share the first argument's memory (a mutation through them reaches it).
_VIEWS = {"view", "reshape", "transpose", "permute", "select", "narrow", "expand", "unsqueeze", "squeeze", "t",
          "as_strided", "split", "chunk", "unbind", "flatten", "unflatten", "view_as", "expand_as", "getitem",
          "__getitem__", "diagonal", "movedim", "swapaxes", "contiguous", "detach", "alias"}


def _view_base(arg, owner: dict, piece: int):
    """The node outside piece `piece` that `arg` is (a view of), else None."""
    while isinstance(arg, fx.Node):
        if owner.get(arg) != piece:
            return arg
        name = arg.target if arg.op == "call_method" else getattr(arg.target, "__name__", "")
        if arg.op not in ("call_method", "call_function") or name not in _VIEWS or not arg.args:
            return None
        arg = arg.args[0]
    return None


class _PieceModule(fx.GraphModule):
    """A piece's graph. Its child graph modules are the whole graph's HOP bodies, whose code is current:
    a plain GraphModule would regenerate all of them (recursively) for every piece, as its constructor
    recompiles (after that, `canonicalize.recompile_alone` does the same for any graph module)."""

    def _recompile_submodules(self):
        return []


def _piece_module(gm: fx.GraphModule, piece: Piece) -> fx.GraphModule:
    graph = fx.Graph()
    env, attrs = {}, {}
    for k, a in enumerate(piece.inputs):
        env[a] = graph.placeholder(f"arg{k}")
    for n in piece.nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
        if n.op == "get_attr":
            attrs[n.target] = _fetch(gm, n.target)
    graph.output(tuple(env[o] for o in piece.outputs))
    return _PieceModule(attrs, graph)


def _sym(x):
    return str(x.node.expr) if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) else x


def _value_key(v, storages: dict) -> tuple:
    """What compiled code may assume about one input."""
    if isinstance(v, torch.Tensor):
        alias = storages.setdefault(StorageWeakRef(v.untyped_storage()), len(storages))
        return ("tensor", type(v), v.dtype, v.layout, v.device, v.requires_grad, tuple(map(_sym, v.shape)),
                tuple(map(_sym, v.stride())), _sym(v.storage_offset()), alias)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(v), _sym(v))
    return ("const", type(v), repr(v))


def _arg_key(a, index: dict):
    if isinstance(a, fx.Node):
        return ("node", index[a])
    if isinstance(a, (tuple, list)):
        return (type(a).__name__,) + tuple(_arg_key(x, index) for x in a)
    if isinstance(a, dict):
        return ("dict",) + tuple((k, _arg_key(v, index)) for k, v in a.items())
    if isinstance(a, slice):
        return ("slice", _arg_key(a.start, index), _arg_key(a.stop, index), _arg_key(a.step, index))
    if a is None or isinstance(a, (bool, int, str)):
        return (type(a).__name__, a)
    if isinstance(a, float):
        return ("float", repr(a))  # tells 0.0 from -0.0, and nan equals nan
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(a).__name__, str(a))
    return ("object", id(a))  # anything else: equal only to itself


def _graph_key(gm: fx.GraphModule) -> tuple:
    index, items = {}, []
    for n in gm.graph.nodes:
        index[n] = len(index)
        if n.op == "get_attr":
            attr = _fetch(gm, n.target)
            items.append(("get_attr", _graph_key(attr) if isinstance(attr, fx.GraphModule) else id(attr)))
        elif n.op == "call_module":
            items.append(("call_module", id(_fetch(gm, n.target))))
        else:
            target = n.target if n.op in ("call_function", "call_method") else None
            items.append((n.op, target, _arg_key(n.args, index), _arg_key(n.kwargs, index)))
    return tuple(items)


def signature(module: fx.GraphModule, args: list) -> tuple:
    """Equal for two pieces exactly when one's compiled code is correct for the other."""
    storages: dict = {}
    return (_graph_key(module), tuple(_value_key(a, storages) for a in args))


class _Compiled(torch.nn.Module):
    """A compiled piece as the calling graph's submodule (it returns a tuple, as compile_fx wants)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        # Called as Dynamo calls a backend's function (AOTAutograd's forward copies its inner
        # function's `_boxed_call` mark, but takes its arguments unboxed).
        return self.fn(*args)


def _fake(v, fake_mode):
    """`v` as the fake value AOTAutograd would trace with (Dynamo hands the backend real tensors and
    keeps how it fakified each, symbolic sizes included, on the tracing context)."""
    if not isinstance(v, torch.Tensor):
        return v
    if isinstance(v, torch._subclasses.FakeTensor):
        return v if v.fake_mode is fake_mode else fake_mode.from_tensor(v)
    ctx = torch._guards.TracingContext.try_get()
    symbolic = ctx.tensor_to_context.get(v) if ctx is not None else None
    return fake_mode.from_tensor(v, symbolic_context=symbolic, source=getattr(symbolic, "tensor_source", None))


def _same_outputs(first_run, fake_mode):
    """A piece's outputs without running it, where a piece of the same signature ran before: fresh fake
    tensors with the metadata of that run's outputs (a layer's twin; the fake run of 32 layers was a
    second of the first step). None where they could differ in what the next pieces' signatures see: an
    output that aliases an input or another output, or starts past its storage's offset 0."""
    if first_run is None:
        return None
    first_args, first_outs = first_run
    seen = {StorageWeakRef(a.untyped_storage()) for a in first_args if isinstance(a, torch.Tensor)}
    outs = []
    for o in first_outs:
        if not isinstance(o, torch.Tensor):
            outs.append(o)  # a number or a symbol: a function of the inputs' sizes, which are the same
            continue
        storage = StorageWeakRef(o.untyped_storage())
        if storage in seen or o.storage_offset() != 0 or type(o) is not torch._subclasses.FakeTensor:
            return None
        seen.add(storage)
        with fake_mode:
            fresh = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, layout=o.layout, device=o.device)
        outs.append(fresh.requires_grad_(o.requires_grad))
    return outs


def _crossing_ok(v) -> bool:
    return isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def compile_regions(gm: fx.GraphModule, example_inputs: list, compile_piece: Callable, fake_mode,
                    summary: RegionalSummary, offload: bool = True):
    """`gm` cut into pieces, each distinct piece compiled once with `compile_piece(module, args)`, and
    the callable running them; None (with `summary.reason`) where the graph should be compiled whole.
    `offload`: the layer pieces keep the inputs they save for the backward in host memory (CUDA only)."""
    ctx = torch._guards.TracingContext.try_get()
    if fake_mode is None:
        summary.reason = "no fake inputs to compile pieces with"
        return None
    if ctx is not None and (getattr(ctx, "ddp_optimizer_ctx", None) is not None or ctx.fakify_first_call):
        summary.reason = "DDPOptimizer cut the graph already"
        return None
    pieces = plan(gm)
    if isinstance(pieces, str):
        summary.reason = pieces
        return None
    n_layers = sum(1 for p in pieces if p.layer is not None)
    if n_layers - 1 < MIN_REUSES:  # cannot pay even if all layers were alike: spare the fake run
        summary.reason = (f"{n_layers - 1} layer(s) would reuse another's compiled code at most; the cut pays for "
                          f"its extra compiles (before and after the layers) from {MIN_REUSES}")
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        summary.reason = "the example inputs do not match the graph's placeholders"
        return None
    env: dict = {p: _fake(x, fake_mode) for p, x in zip(placeholders, example_inputs)}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not _is_module_attr(gm, n):
            value = _fetch(gm, n.target)
            env[n] = _fake(value, fake_mode)
    # Run the pieces on fake values first: each one's inputs (strides, requires_grad) come from the
    # pieces before it, and no compile starts unless reuse pays.
    modules, keys = [], []
    outputs_of: dict = {}  # signature -> the outputs of its first fake run
    for p in pieces:
        module = _piece_module(gm, p)
        args = [env[a] for a in p.inputs]
        if not all(_crossing_ok(a) for a in args):
            summary.reason = "a value that is not a tensor or a number crosses a layer boundary"
            return None
        key = signature(module, args)
        keys.append(key)
        outs = _same_outputs(outputs_of.get(key), fake_mode)
        if outs is None:
            try:
                # As Dynamo and AOTAutograd run ops on fake values: with the Python dispatcher, composite
                # ops (e.g. the loss's F.pad) decompose symbolically; without it they read sizes as ints
                # and specialize a symbolic length (a guard, and a recompile for every other length).
                with fake_mode, enable_python_dispatcher():
                    outs = module(*args)
            except Exception as exc:  # Dynamo ran these nodes on fake values; if a piece cannot, keep it whole
                summary.reason = f"piece {len(modules)} did not run on fake values ({type(exc).__name__}: {exc})"
                return None
            outputs_of.setdefault(key, (args, outs))
        env.update(zip(p.outputs, outs))
        modules.append((module, args))
    layer_keys = [k for k, p in zip(keys, pieces) if p.layer is not None]
    reuses = len(layer_keys) - len(set(layer_keys))
    if reuses < MIN_REUSES:
        summary.reason = (f"{reuses} layer(s) would reuse another's compiled code; the cut pays for its extra "
                          f"compiles (before and after the layers) from {MIN_REUSES}")
        return None
    compiled: dict = {}
    for i, (key, (module, args)) in enumerate(zip(keys, modules)):
        if key not in compiled:
            start = time.perf_counter()
            # Each compile in a tracing context of its own, as if Dynamo had handed over the piece as
            # a graph: AOTAutograd keeps a piece's metadata there for compiling its backward later.
            with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
                compiled[key] = _Compiled(compile_piece(module, args))
            summary.compile_s.append((_where(pieces, i), time.perf_counter() - start))
    summary.pieces, summary.layers, summary.compiled = len(pieces), len(layer_keys), len(compiled)
    if offload and any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        summary.offload = LayerInputOffload()
    return _calling_graph(gm, pieces, [compiled[k] for k in keys], summary.offload)


def _where(pieces: list[Piece], i: int) -> str:
    if pieces[i].layer is not None:
        return pieces[i].layer
    before = next((p.layer for p in pieces[i + 1:] if p.layer is not None), None)
    after = next((p.layer for p in reversed(pieces[:i]) if p.layer is not None), None)
    return " and ".join(([f"after {after}"] if after else []) + ([f"before {before}"] if before else [])) or "no layer"


def _calling_graph(gm: fx.GraphModule, pieces: list[Piece], compiled: list[_Compiled],
                   offload: "LayerInputOffload | None") -> fx.GraphModule:
    graph = fx.Graph()
    env, root, made_by, last_use, offloading = {}, {}, {}, {}, False
    for i, p in enumerate(pieces):
        for a in p.inputs:
            last_use[a] = i
    out = next(n for n in gm.graph.nodes if n.op == "output")
    fx.map_arg(out.args[0], lambda x: last_use.__setitem__(x, len(pieces)))
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n.op == "get_attr" and not _is_module_attr(gm, n)):
            env[n] = graph.node_copy(n, lambda x: env[x])
            if n.op == "get_attr":
                root[n.target] = _fetch(gm, n.target)
    for i, (p, fn) in enumerate(zip(pieces, compiled)):
        name = f"piece{i}"
        # What may go to host memory: a value an earlier piece made that no later piece reads (the layer's
        # input). Graph inputs (the weights; a first layer's input made by another graph, which its caller
        # still holds) and values shared by the layers (RoPE's cos and sin) stay on the device.
        activations = [j for j, a in enumerate(p.inputs) if a in made_by and last_use[a] == i]
        if offload is not None and p.layer and activations:
            root[name] = _Offloaded(fn, offload, activations)
            offloading = True
        else:  # a piece after the layers (the loss) lets go of the last layer's input
            root[name] = _Offloaded(fn, offload, []) if offload is not None and offloading else fn
        for o in p.outputs:
            made_by[o] = i
        call = graph.call_module(name, tuple(env[a] for a in p.inputs))
        for j, o in enumerate(p.outputs):
            env[o] = graph.call_function(operator.getitem, (call, j))
    graph.output(fx.map_arg(out.args[0], lambda x: env[x]))
    return fx.GraphModule(root, graph)


# ------------------------------------------------------------------------------------------------
# The layers' saved inputs in host memory
# ------------------------------------------------------------------------------------------------

# Saved tensors smaller than this stay on the device: the copy's fixed cost outweighs the memory.
OFFLOAD_MIN_BYTES = 1 << 20


class LayerInputOffload:
    """Moves to pinned host memory what a layer piece saves for its backward of the values an earlier
    piece made and no later piece reads (its input), and brings them back one layer ahead of the backward.

    Under gradient checkpointing a layer saves its input and nothing else of size (the weights are
    graph inputs and stay): 32 MiB per layer of the Llama-3-8B workload, 1 GiB over its 32 layers.
    The copy out starts on a side stream as the layer starts, beside its forward. The device memory
    is let go when the next piece starts, after the compute stream has waited for the copy: freed in
    the compute stream's order, so the allocator reuses it at once. (Freed with `record_stream`, it
    would wait for the allocator to see the copy's event complete, which, with the CPU several layers
    ahead of the GPU, kept about 7 layers' inputs allocated at the forward's end.) In the backward,
    unpacking layer i's input starts the copy back of layer i-1's on the side stream, beside layer i's
    backward. Copies are bit for bit; where pinned host memory runs out, the tensor stays on the device
    (and the report says so)."""

    def __init__(self):
        self.tensors = 0  # offloaded so far (a running count, for the report)
        self.bytes = 0
        self.failure = ""
        self._last_group = None  # weakref to the group of the last layer call
        self._streams: dict = {}
        self._held: list = []  # copies whose device tensor the next piece lets go

    def __str__(self) -> str:
        text = (f"the layers' saved inputs kept in host memory ({self.tensors} tensors, "
                f"{self.bytes / 2 ** 20:.0f} MiB moved so far)")
        return text + (f"; not moved once: {self.failure}" if self.failure else "")

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def new_group(self) -> "_OffloadGroup":
        previous = self._last_group() if self._last_group is not None else None
        group = _OffloadGroup(previous)
        self._last_group = weakref.ref(group)
        return group

    def release(self) -> None:
        """Lets go of the device tensors whose copies the pieces before this one started: the compute
        stream waits for each copy, then the tensor is freed in its order."""
        held, self._held = self._held, []
        for copy in held:
            if copy.held is not None:
                torch.cuda.current_stream(copy.device).wait_event(copy.copied)
                copy.held = None

    def stage(self, group: "_OffloadGroup", t: torch.Tensor) -> None:
        """Starts the copy of a piece's input `t` to host memory, to be matched by `pack` if the piece
        saves it."""
        key = (t.data_ptr(), t.dtype, t.numel())
        if not (t.is_cuda and t.nbytes >= OFFLOAD_MIN_BYTES and t.is_contiguous()) or key in group.staged:
            return
        copy = self._copy_out(group, t)
        if copy is not None:
            copy.held = t
            group.staged[key] = copy

    def _copy_out(self, group: "_OffloadGroup", t: torch.Tensor) -> "_HostCopy | None":
        try:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError as exc:  # out of pinned host memory: this one stays on the device
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return None
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        return _HostCopy(host, stream.record_event(), t.device, group)

    def unstage(self, group: "_OffloadGroup") -> None:
        """After the piece's forward: copies it did not save are dropped; those it saved wait for the
        next piece to let their device tensors go."""
        for copy in group.staged.values():
            if copy.saved:
                self._held.append(copy)
            else:  # its device tensor is freed now: the copy still reading it must finish first
                copy.held.record_stream(self._stream(copy.device))
                copy.held = None
        group.staged = {}

    def pack(self, group: "_OffloadGroup", storages: set, t: torch.Tensor):
        if not (t.is_cuda and t.nbytes >= OFFLOAD_MIN_BYTES and t.is_contiguous()
                and t.untyped_storage().data_ptr() in storages):
            return t
        staged = group.staged.get((t.data_ptr(), t.dtype, t.numel()))
        if staged is not None:  # the piece's input itself, or a view of all of it
            if not staged.saved:
                staged.saved = True
                group.by_key[("input", t.data_ptr())] = staged
                self.tensors += 1
                self.bytes += t.nbytes
            return _SavedOnHost(staged, t.shape)
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in group.by_key:  # the same tensor saved twice
            return _SavedOnHost(group.by_key[key], t.shape)
        # A part of an input: copied now, its device memory freed once the copy has read it.
        copy = self._copy_out(group, t)
        if copy is None:
            return t
        t.record_stream(self._stream(t.device))
        copy.saved = True
        group.by_key[key] = copy
        self.tensors += 1
        self.bytes += t.nbytes
        return _SavedOnHost(copy, t.shape)

    def unpack(self, saved):
        if not isinstance(saved, _SavedOnHost):
            return saved
        copy = saved.copy
        if copy.held is not None:  # not let go yet (no piece ran after this one's forward)
            return copy.held.view(saved.shape)
        current = torch.cuda.current_stream(copy.device)
        previous = copy.group.previous() if copy.group.previous is not None else None
        if previous is not None and not previous.prefetched:
            previous.prefetched = True
            stream = self._stream(copy.device)
            for other in previous.copies():
                if other.held is not None:
                    continue
                stream.wait_event(other.copied)
                with torch.cuda.stream(stream):
                    other.back = other.host.to(other.device, non_blocking=True)
                other.back_ready = stream.record_event()
        if copy.back is not None:
            current.wait_event(copy.back_ready)
            t, copy.back = copy.back, None
            t.record_stream(current)  # made on the side stream, used and freed on this one
            return t.view(saved.shape)
        current.wait_event(copy.copied)
        return copy.host.to(copy.device, non_blocking=True).view(saved.shape)


class _OffloadGroup:
    """What one call of one layer piece moved to host memory. Held by its copies (through the saved
    tensors); the next layer's group holds it weakly, to fetch it back ahead of its backward."""
    __slots__ = ("previous", "staged", "by_key", "prefetched", "__weakref__")

    def __init__(self, previous: "_OffloadGroup | None"):
        self.previous = weakref.ref(previous) if previous is not None else None
        self.staged: dict = {}  # during the piece's forward: the copies of its inputs started ahead
        # Weak: the copies hold the group, and a cycle would keep the pinned memory until the next
        # garbage collection (fresh pinned allocations, which synchronize, every other step).
        self.by_key = weakref.WeakValueDictionary()
        self.prefetched = False

    def copies(self) -> list:
        return list(self.by_key.values())


class _HostCopy:
    __slots__ = ("host", "copied", "device", "group", "held", "saved", "back", "back_ready", "__weakref__")

    def __init__(self, host, copied, device, group):
        self.host, self.copied, self.device, self.group = host, copied, device, group
        self.held = None  # the device tensor, until the next piece lets it go
        self.saved = False
        self.back = self.back_ready = None


class _SavedOnHost:
    """What autograd keeps for a saved tensor that went to host memory: its copy, and the shape it
    was saved with (a view of a piece's input has the input's copy)."""
    __slots__ = ("copy", "shape")

    def __init__(self, copy: _HostCopy, shape: torch.Size):
        self.copy, self.shape = copy, shape


class _Offloaded(torch.nn.Module):
    """A piece run with the layer-input offload: its saved inputs among `activations` (arguments an
    earlier piece computed and no later piece reads) go to host memory until its backward; and, first,
    the inputs the pieces before it saved are let go on the device."""

    def __init__(self, compiled: _Compiled, offload: LayerInputOffload, activations: list[int]):
        super().__init__()
        self.compiled, self.offload, self.activations = compiled, offload, activations

    def forward(self, *args):
        self.offload.release()
        inputs = [args[i] for i in self.activations if isinstance(args[i], torch.Tensor) and args[i].is_cuda]
        if not inputs or not torch.is_grad_enabled():
            return self.compiled(*args)
        group = self.offload.new_group()
        for t in inputs:
            self.offload.stage(group, t)
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        try:
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self.offload.pack, group, storages),
                                                          self.offload.unpack):
                return self.compiled(*args)
        finally:
            self.offload.unstage(group)
