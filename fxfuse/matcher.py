"""The pattern engine: a pattern is the plain PyTorch function it replaces, plus its replacement.

A `Pattern` is traced with Dynamo (the tracer that produces user graphs) on small example inputs, then
put in canonical form (`fxfuse.canonicalize`). Matching walks the pattern graph from its output towards
its inputs and the user graph alongside, comparing canonical views; placeholders bind to whatever user
node sits there, scalar parameters (like `eps`) bind to the constant found in the user graph.
Commutative ops try both operand orders. A match is then checked:

1. structurally: no intermediate node of the match is used outside it (else it cannot be removed);
2. against the pattern's constraints on the bound values (dtype, device, shapes: symbolic sizes are
   checked with sympy through ShapeEnv's `statically_known_true`, never by specialising them);
3. against the replacement: it is run on the fake values and must give the root's shape and dtype.

Any failure is a *decline*, recorded with its reason; a near miss (at least half of the pattern's ops
matched) is recorded too, so `fxfuse.explain` can say why a look-alike was left alone.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import Canon, canon, canonicalize, example_value, is_commutative, module_path, place_like  # noqa: F401

__all__ = ["Pattern", "Match", "Decline", "PatternError", "find_matches", "apply_match", "module_path",
           "TOP_LEVEL_META", "OUTPUT_FIXUPS_META"]

# gm.meta keys of post passes (see Pattern.post_pass).
TOP_LEVEL_META = "fxfuse_top_level"
OUTPUT_FIXUPS_META = "fxfuse_output_fixups"


class PatternError(ValueError):
    """A pattern definition is malformed (raised when the pattern is built, never at match time)."""


@dataclass
class Match:
    pattern: "Pattern"
    graph_module: fx.GraphModule
    root: fx.Node
    nodes: list  # user nodes the match covers (replaced), root included
    bindings: dict  # placeholder / scalar name -> user node or constant
    node_map: dict = field(default_factory=dict)  # pattern node -> user node
    ops: set = field(default_factory=set)  # fxfuse ops the replacement called on the fake values

    def user_node(self, key: str) -> fx.Node:
        """The user node matched to the (single) pattern node of canonical op `key`."""
        found = [u for p, u in self.node_map.items() if p.meta["fxfuse_canon"].key == key]
        if len(found) != 1:
            raise KeyError(f"pattern {self.pattern.name!r} has {len(found)} `{key}` nodes")
        return found[0]

    def value(self, name: str):
        """The fake value (FakeTensor or constant) bound to a pattern parameter."""
        b = self.bindings[name]
        return example_value(b) if isinstance(b, fx.Node) else b


@dataclass
class Decline:
    pattern: str
    where: str  # module path of the declined region
    node: str  # user node name where the pattern was anchored
    reason: str


@dataclass
class Pattern:
    """A rewrite rule.

    name:        unique id, used in options and reports.
    reference:   the PyTorch function being replaced, exactly as the model code writes it. It is also
                 the test oracle: evaluated in float64 and in the stock precision, it is what
                 `fxfuse.testing.assert_exact` holds the replacement to (docs/patterns.md).
    replacement: function with the same parameters, calling fxfuse custom ops.
    example_inputs: zero-arg function returning the inputs used to trace `reference` (tensors for
                 tensor parameters, any value for scalar parameters listed in `scalars`).
    scalars:     names of non-tensor parameters; each is traced with a sentinel value so it can be
                 found in the graph and bound to the user's constant (e.g. `eps`).
    constraints: functions `(match) -> str | None`; a string is the reason to decline.
    arguments:   optional `(match) -> tuple` building the replacement's arguments (user nodes and
                 constants); by default the values bound to the reference's parameters, in order. A
                 pattern whose replacement needs more than its reference sees (e.g. the quantization
                 state of a 4-bit linear) builds them here; the replacement then has its own signature.
    post_pass:   optional `(graph_module) -> list[str]`, run on each graph where the pattern fired,
                 after every pattern was applied: rewrites between its replacements (e.g. merging
                 the projections that share an input into one call). Returns one line per change,
                 shown by explain(). On the graph whose outputs reach the caller (not a subgraph),
                 `gm.meta[TOP_LEVEL_META]` is True, and a post pass may change what it returns: it
                 appends to `gm.meta[OUTPUT_FIXUPS_META]` a function `(outputs: list) -> None` that
                 the backend applies to the compiled graph's outputs at run time (latest first), in
                 place, giving the caller back the outputs the graph had (e.g. dropping ones it added).
                 Nodes it makes take the place of what they replace (`canonicalize.place_like`):
                 explain() and regional compilation's cuts between layers read where a node is from it.
    anchor:      optional canonical op key, or tuple of keys (e.g. "linear_4bit"), that every region
                 this pattern targets contains. An anchor op left in the graph after rewriting, which no decline
                 already explains, is reported as declined with `anchor_reason`: forms the pattern
                 does not know (DoRA, several adapters) do not match at all, and must still be said.
    anchor_reason: a string, or `(anchor_node) -> str` to say what is particular to that op (its dtype).
    """
    name: str
    reference: Callable
    replacement: Callable
    example_inputs: Callable[[], Sequence[Any]]
    scalars: Sequence[str] = ()
    constraints: Sequence[Callable[[Match], str | None]] = ()
    description: str = ""
    arguments: Callable[[Match], tuple] | None = None
    enabled_by_default: bool = True
    post_pass: Callable[[fx.GraphModule], list[str]] | None = None
    anchor: str | tuple[str, ...] | None = None
    anchor_reason: str | Callable[[fx.Node], str] = "not in a form this pattern supports"
    _graph: fx.GraphModule | None = field(default=None, repr=False)
    _params: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise PatternError("a pattern needs a non-empty string name")
        for attr in ("reference", "replacement", "example_inputs"):
            if not callable(getattr(self, attr)):
                raise PatternError(f"pattern {self.name!r}: {attr} must be callable")
        import inspect
        self._params = list(inspect.signature(self.reference).parameters)
        rep_params = list(inspect.signature(self.replacement).parameters)
        if self.arguments is None and len(rep_params) != len(self._params):  # passed positionally
            raise PatternError(f"pattern {self.name!r}: replacement takes {len(rep_params)} parameters, "
                               f"the reference {len(self._params)}")
        if not (isinstance(self.anchor_reason, str) or callable(self.anchor_reason)):
            raise PatternError(f"pattern {self.name!r}: anchor_reason must be a string or a callable "
                               f"(anchor node) -> str, not {type(self.anchor_reason).__name__}")
        unknown = set(self.scalars) - set(self._params)
        if unknown:
            raise PatternError(f"pattern {self.name!r}: scalars {sorted(unknown)} are not parameters")

    # -- tracing -----------------------------------------------------------------------------------
    def graph(self) -> fx.GraphModule:
        if self._graph is None:
            self._graph = trace_reference(self)
        return self._graph

    def op_count(self) -> int:
        return sum(1 for n in self.graph().graph.nodes if n.op in ("call_function", "call_method"))


# Sentinels for scalar parameters: values no model uses, so the traced constant is unambiguous.
_SENTINELS = [1.2345678e-3 + i * 1.1e-9 for i in range(16)]


class _Sentinel:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<scalar {self.name}>"


class _DtypeVar:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<dtype like {self.name}>"


def trace_reference(pattern: Pattern) -> fx.GraphModule:
    """Trace the reference with Dynamo (as user code is traced) and canonicalize the result."""
    inputs = list(pattern.example_inputs())
    if len(inputs) != len(pattern._params):
        raise PatternError(f"pattern {pattern.name!r}: example_inputs gave {len(inputs)} values for "
                           f"{len(pattern._params)} parameters")
    sentinel_of = {}
    for i, p in enumerate(pattern._params):
        if p in pattern.scalars:
            inputs[i] = _SENTINELS[len(sentinel_of)]
            sentinel_of[inputs[i]] = _Sentinel(p)
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    # A private Dynamo cache: tracing a pattern must not disturb the user's compiled functions.
    fn = _fresh_function(pattern.reference)
    with torch._dynamo.config.patch(specialize_float=True, capture_scalar_outputs=False):
        torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)(*inputs)
    if len(captured) != 1:
        raise PatternError(f"pattern {pattern.name!r}: reference traced into {len(captured)} graphs")
    gm = captured[0]
    canonicalize(gm)
    # Name placeholders after the reference's tensor parameters (Dynamo names them L_x_ etc.).
    tensor_params = [p for p in pattern._params if p not in pattern.scalars]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(tensor_params):
        raise PatternError(f"pattern {pattern.name!r}: {len(placeholders)} graph inputs for tensor "
                           f"parameters {tensor_params} (is a parameter unused?)")
    # Dynamo creates inputs in the order the body first reads them, not the parameters' order: name
    # each after its source (`L['x']`, placeholder `l_x_`) when it can be read, else by position.
    by_name = {f"l_{p.lower()}_": p for p in tensor_params}
    names = [by_name.get(node.target.lower() if isinstance(node.target, str) else "") for node in placeholders]
    if sorted(n for n in names if n) != sorted(tensor_params):
        names = tensor_params
    for node, p in zip(placeholders, names):
        node.meta["fxfuse_param"] = p
    # Replace sentinel constants by markers in the canonical views. A dtype constant equal to the
    # dtype of an example tensor is generic: `x.to(bfloat16)` traced on bf16 examples matches
    # `x.to(float16)` in an fp16 model (the same dtype must appear wherever the pattern has it).
    for t in inputs:
        if isinstance(t, torch.Tensor):
            sentinel_of.setdefault(t.dtype, _DtypeVar(str(t.dtype).replace("torch.", "")))
    for node in gm.graph.nodes:
        c = canon(node) if node.op in ("call_function", "call_method") else None
        if c is not None:
            node.meta["fxfuse_canon"] = Canon(c.key, _mark_sentinels(c.args, sentinel_of))
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 1 or not isinstance(outputs[0], fx.Node):
        raise PatternError(f"pattern {pattern.name!r}: reference must return exactly one tensor")
    gm.meta["fxfuse_root"] = outputs[0]
    return gm


def _fresh_function(fn):
    import types
    code = fn.__code__.replace()  # a new code object gets its own Dynamo cache entry
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _mark_sentinels(x, sentinel_of):
    if isinstance(x, torch.dtype) and x in sentinel_of:
        return sentinel_of[x]
    if isinstance(x, float) and x in sentinel_of:
        return sentinel_of[x]
    if isinstance(x, (tuple, list)):
        return type(x)(_mark_sentinels(v, sentinel_of) for v in x)
    return x


# -- matching --------------------------------------------------------------------------------------
class _Attempt:
    def __init__(self):
        self.bind: dict = {}  # pattern param name -> user node / constant
        self.node_map: dict = {}  # pattern node -> user node
        self.matched = 0
        self.fail: str | None = None
        self.skipped: list = []  # user nodes looked through (plain clones)

    def copy(self):
        a = _Attempt()
        a.bind, a.node_map, a.matched, a.fail = dict(self.bind), dict(self.node_map), self.matched, self.fail
        a.skipped = list(self.skipped)
        return a


def _describe(node) -> str:
    if isinstance(node, fx.Node):
        c = (node.meta.get("fxfuse_canon") or canon(node)) if node.op in ("call_function", "call_method") else None
        return f"`{node.name}` ({c.key if c else node.op})"
    return repr(node)


def _match_node(p: fx.Node, u: Any, st: _Attempt) -> bool:
    if p.op == "placeholder":
        name = p.meta["fxfuse_param"]
        if name in st.bind:
            if st.bind[name] is not u:
                st.fail = f"input `{name}` would be bound to two different values"
                return False
            return True
        if not isinstance(u, fx.Node):
            st.fail = f"input `{name}` is a constant ({u!r}) here, not a tensor"
            return False
        st.bind[name] = u
        return True
    if p in st.node_map:
        if st.node_map[p] is not u:
            st.fail = f"{_describe(u)} should be the same value as {_describe(st.node_map[p])}"
            return False
        return True
    if not isinstance(u, fx.Node) or u.op not in ("call_function", "call_method"):
        st.fail = f"expected `{p.meta['fxfuse_canon'].key}`, found {_describe(u)}"
        return False
    pc: Canon = p.meta["fxfuse_canon"]
    uc = canon(u)
    if uc is not None and uc.key == "clone" and pc.key != "clone" and uc.args[1] is None:
        # A plain clone is value-identical to its input (PEFT's "defensive" clone of the base
        # output): look through it, and take it into the matched region.
        st.skipped.append(u)
        return _match_node(p, uc.args[0], st)
    if uc is None or uc.key != pc.key:
        st.fail = f"expected `{pc.key}` at {_describe(u)}"
        return False
    if len(uc.args) != len(pc.args):
        st.fail = f"`{pc.key}` at {_describe(u)} has a different number of arguments"
        return False
    st.node_map[p] = u
    st.matched += 1
    orders = [list(range(len(pc.args)))]
    if is_commutative(pc.key) and len(pc.args) >= 2:
        orders.append([1, 0] + list(range(2, len(pc.args))))
    best = None
    for order in orders:
        trial = st.copy()
        if all(_match_arg(pc.args[i], uc.args[j], trial) for i, j in zip(range(len(pc.args)), order)):
            st.__dict__.update(trial.__dict__)
            return True
        if best is None or trial.matched > best.matched:
            best = trial
    st.__dict__.update(best.__dict__)
    return False


def _match_arg(pa, ua, st: _Attempt) -> bool:
    if isinstance(pa, fx.Node):
        return _match_node(pa, ua, st)
    if isinstance(pa, _Sentinel):
        if isinstance(ua, fx.Node):
            # Under dynamic=True Dynamo keeps float attributes (like eps) as graph inputs; a symbolic
            # scalar is fine, a tensor is not.
            if not isinstance(example_value(ua), (torch.SymFloat, torch.SymInt)):
                st.fail = f"scalar `{pa.name}` is a computed tensor here ({_describe(ua)}), not a number"
                return False
            if pa.name in st.bind and st.bind[pa.name] is not ua:
                st.fail = f"scalar `{pa.name}` takes two different values"
                return False
            st.bind[pa.name] = ua
            return True
        if not isinstance(ua, (int, float)) or isinstance(ua, bool):
            st.fail = f"scalar `{pa.name}` is {ua!r} here"
            return False
        if pa.name in st.bind and st.bind[pa.name] != ua:
            st.fail = f"scalar `{pa.name}` takes two different values ({st.bind[pa.name]!r}, {ua!r})"
            return False
        st.bind[pa.name] = ua
        return True
    if isinstance(pa, _DtypeVar):
        key = f"dtype:{pa.name}"
        if not isinstance(ua, torch.dtype):
            st.fail = f"expected a dtype, found {ua!r}"
            return False
        if st.bind.setdefault(key, ua) != ua:
            st.fail = f"dtype {ua} differs from {st.bind[key]} used elsewhere in the pattern"
            return False
        return True
    if isinstance(pa, (tuple, list)):
        if not isinstance(ua, (tuple, list)) or len(pa) != len(ua):
            st.fail = f"expected {pa!r}, found {ua!r}"
            return False
        return all(_match_arg(a, b, st) for a, b in zip(pa, ua))
    if isinstance(ua, fx.Node):
        st.fail = f"expected the constant {pa!r}, found {_describe(ua)}"
        return False
    same = type(pa) is type(ua) and pa == ua
    if isinstance(pa, float) and isinstance(ua, float) and math.isnan(pa) and math.isnan(ua):
        same = True
    if isinstance(pa, (int, float)) and isinstance(ua, (int, float)) and not isinstance(pa, bool) \
            and not isinstance(ua, bool):
        same = pa == ua  # 2 and 2.0 are the same exponent
    if not same:
        st.fail = f"expected {pa!r}, found {ua!r}"
        return False
    return True


def find_matches(pattern: Pattern, gm: fx.GraphModule, fake_mode=None) -> tuple[list[Match], list[Decline]]:
    """All non-overlapping matches of `pattern` in `gm` (not its subgraphs), and the near misses."""
    pg = pattern.graph()
    proot: fx.Node = pg.meta["fxfuse_root"]
    root_key = proot.meta["fxfuse_canon"].key
    threshold = max(2, math.ceil(pattern.op_count() / 2))
    matches, declines, taken = [], [], set()
    for u in list(gm.graph.nodes):
        if u.op not in ("call_function", "call_method"):
            continue
        uc = canon(u)
        if uc is None or uc.key != root_key:
            continue
        st = _Attempt()
        ok = _match_node(proot, u, st)

        def decline(reason):
            declines.append(Decline(pattern.name, module_path(u), u.name, reason))

        if not ok:
            if st.matched >= threshold:
                decline(f"not this pattern: {st.fail}")
            continue
        nodes = list(dict.fromkeys(list(st.node_map.values()) + st.skipped))
        inner = set(nodes)
        outside = [n for n in nodes if n is not u and any(user not in inner for user in n.users)]
        if outside:
            decline(f"intermediate {_describe(outside[0])} is also used outside the pattern")
            continue
        if inner & taken:
            decline("overlaps a region already rewritten")
            continue
        m = Match(pattern, gm, u, nodes, dict(st.bind), dict(st.node_map))
        reason = _check_constraints(m)
        if reason is None:
            reason = _check_replacement(m, fake_mode)
        if reason is not None:
            decline(reason)
            continue
        taken |= inner
        matches.append(m)
    return matches, declines


def _check_constraints(m: Match) -> str | None:
    for c in m.pattern.constraints:
        try:
            reason = c(m)
        except Exception as e:  # a constraint that cannot decide declines; it never breaks compilation
            reason = f"constraint {getattr(c, '__name__', c)} failed: {type(e).__name__}: {e}"
        if reason:
            return reason
    return None


def _call_args(m: Match) -> list:
    if m.pattern.arguments is not None:
        return list(m.pattern.arguments(m))
    return [m.bindings[p] for p in m.pattern._params]


class _FxfuseOpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the fxfuse ops a replacement calls, so that a kernel failure can name its pattern."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fxfuse":
            self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _check_replacement(m: Match, fake_mode) -> str | None:
    """Run the replacement on the fake inputs: it must produce the root's shape, dtype and device."""
    want = example_value(m.root)
    if not isinstance(want, torch.Tensor):
        return "the matched value has no recorded tensor metadata"
    try:
        args = [example_value(a) if isinstance(a, fx.Node) else a for a in _call_args(m)]
    except Exception as e:
        return f"could not build the replacement's arguments: {type(e).__name__}: {e}"
    # The values carry their own fake mode (Dynamo's tracing mode); the backend's context has another.
    modes = [a.fake_mode for a in args if isinstance(a, torch._subclasses.FakeTensor)]
    fake_mode = modes[0] if modes else fake_mode
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    seen = _FxfuseOpsSeen()
    try:
        with ctx, torch.no_grad(), seen:
            got = m.pattern.replacement(*args)
    except Exception as e:
        return f"replacement failed on these shapes: {type(e).__name__}: {e}"
    m.ops = seen.ops
    if not isinstance(got, torch.Tensor):
        return "replacement did not return a tensor"
    if got.dtype != want.dtype or got.device != want.device or got.dim() != want.dim() or not all(
            statically_known_true(a == b) for a, b in zip(got.shape, want.shape)):
        return (f"replacement gives {got.dtype} {tuple(got.shape)} on {got.device}, the graph has "
                f"{want.dtype} {tuple(want.shape)} on {want.device}")
    m.bindings["__fake_out__"] = got
    return None


def apply_match(m: Match) -> None:
    """Replace the matched region by one call of the pattern's replacement."""
    graph = m.graph_module.graph
    with graph.inserting_before(m.root):
        new = graph.call_function(m.pattern.replacement, tuple(_call_args(m)))
    place_like(m.root, new)
    new.meta["example_value"] = m.bindings.pop("__fake_out__")
    new.meta["fxfuse_pattern"] = m.pattern.name
    m.root.replace_all_uses_with(new)
    # Erase users before their inputs.
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.nodes, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)
