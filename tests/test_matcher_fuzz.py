"""Matcher fuzzing: a pattern must not take code that computes something else, and no graph crashes the backend.

Mutants: every built-in pattern's reference graph (the traced plain function) with one change: an op replaced
by another (rsqrt by sqrt, mul by add, mean by sum...), one cast removed, the operands of a non-commutative op
swapped, or a constant changed (scalar parameters excepted: they bind to any constant). Each mutant that still
runs is compiled with fxfuse and that pattern alone; it must not fire, while the unmutated reference fires once
(so the test can fail). Random graphs: small functions drawn from the ops the patterns use, compiled with
every default pattern; each must run and give the stock result.
"""
import operator
import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import fxfuse
from fxfuse.canonicalize import canon
from fxfuse.matcher import _SENTINELS
from fxfuse.patterns import BUILTIN_PATTERNS

# Patterns whose reference is plain tensors in and out (the 4-bit ones take bitsandbytes' quantization state).
FUZZED = [p for p in BUILTIN_PATTERNS if not p.name.startswith("nf4_lora")]
OPTIONS = {"inner": "eager", "attention": "always"}

_OTHER_OP = {torch.rsqrt: torch.sqrt, torch.sqrt: torch.rsqrt, operator.mul: operator.add, operator.add: operator.mul,
             operator.sub: operator.add, operator.truediv: operator.mul, torch.cos: torch.sin, torch.sin: torch.cos,
             F.silu: F.gelu, F.softmax: F.log_softmax, torch.exp: torch.expm1, operator.neg: torch.abs,
             torch.matmul: torch.mul, torch.cat: torch.stack}
_OTHER_METHOD = {"mean": "sum", "sum": "mean", "rsqrt": "sqrt", "pow": "__rpow__", "float": "double",
                 "exp": "expm1", "sigmoid": "tanh", "neg": "abs"}
_COMMUTATIVE = {operator.add, operator.mul, torch.add, torch.mul, "add", "mul", "__add__", "__mul__"}


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, list[fx.Node]]:
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    return graph, [env[n] for n in gm.graph.nodes if n.op != "output"]


def _changed(value):
    return (not value) if isinstance(value, bool) else value + (1 if isinstance(value, int) else 0.5)


def mutants(pattern):
    """(description, GraphModule) for each one-change mutant of the pattern's reference graph."""
    gm = pattern.graph()
    calls = [i for i, n in enumerate(n for n in gm.graph.nodes if n.op != "output")
             if n.op in ("call_function", "call_method")]
    for i in calls:
        for kind in ("op", "cast", "swap", "constant"):
            graph, nodes = _copy(gm)
            n = nodes[i]
            if kind == "op":
                if n.op == "call_function" and n.target in _OTHER_OP:
                    n.target = _OTHER_OP[n.target]
                elif n.op == "call_method" and n.target in _OTHER_METHOD:
                    n.target = _OTHER_METHOD[n.target]
                else:
                    continue
            elif kind == "cast":
                c = canon(n)
                if c is None or c.key != "to" or not isinstance(n.args[0], fx.Node):
                    continue
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
            elif kind == "swap":
                # Two graph inputs swapped is the same function of renamed inputs, which the pattern rightly takes.
                if n.target in _COMMUTATIVE or len(n.args) < 2 or not all(isinstance(a, fx.Node) for a in n.args[:2]) \
                        or n.args[0] is n.args[1] or all(a.op == "placeholder" for a in n.args[:2]):
                    continue
                n.args = (n.args[1], n.args[0], *n.args[2:])
            else:  # the first constant that is not a scalar parameter's: a number + 0.5 (an int + 1), a bool flipped
                spots = [j for j, a in enumerate(n.args) if type(a) in (int, float) and a not in _SENTINELS]
                keys = [k for k, a in n.kwargs.items() if type(a) in (int, float, bool) and a not in _SENTINELS]
                if spots:
                    n.args = tuple(_changed(a) if k == spots[0] else a for k, a in enumerate(n.args))
                elif keys:
                    n.kwargs = {k: _changed(a) if k == keys[0] else a for k, a in n.kwargs.items()}
                else:
                    continue
            graph.eliminate_dead_code()
            yield f"{kind} at {n.name if kind != 'cast' else 'a cast'} ({n.target})", fx.GraphModule(gm, graph)


def _tensor_inputs(pattern):
    """The example tensors in the order of the reference graph's inputs (Dynamo's order of first use)."""
    values = dict(zip(pattern._params, pattern.example_inputs()))
    return [values[n.meta["fxfuse_param"]] for n in pattern.graph().graph.nodes if n.op == "placeholder"]


def _fired(module, inputs, pattern) -> int:
    torch._dynamo.reset()
    report = fxfuse.explain(module, *inputs, options={**OPTIONS, "patterns": [pattern.name]})
    return report.counts().get(pattern.name, 0)


@pytest.mark.parametrize("pattern", FUZZED, ids=lambda p: p.name)
def test_one_change_to_a_reference_is_not_matched(pattern):
    inputs = _tensor_inputs(pattern)
    original = fx.GraphModule(pattern.graph(), _copy(pattern.graph())[0])
    assert _fired(original, inputs, pattern) == 1
    tried, matched = 0, []
    for what, module in mutants(pattern):
        try:
            module(*inputs)
            fired = _fired(module, inputs, pattern)
        except (RuntimeError, torch._dynamo.exc.TorchRuntimeError):
            continue  # a mutant that cannot run (or be traced) on these shapes tests nothing
        tried += 1
        if fired:
            matched.append(what)
    assert tried >= 1, "no runnable mutant"
    assert matched == [], matched


_UNARY = [torch.rsqrt, torch.sigmoid, F.silu, torch.tanh, lambda x: x.float(), lambda x: x.to(torch.bfloat16),
          lambda x: x.pow(2).mean(-1, keepdim=True), lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
          lambda x: F.softmax(x, dim=-1, dtype=torch.float32), torch.exp]
_BINARY = [operator.add, operator.mul, operator.sub, lambda a, b: F.silu(a) * b]


def _random_function(rng: random.Random):
    steps = [(rng.random() < 0.6, rng.randrange(len(_UNARY)), rng.randrange(len(_BINARY)), rng.randrange(3))
             for _ in range(rng.randrange(2, 7))]

    def fn(x, y, w):
        values = [x, y, w]
        for unary, u, b, other in steps:
            v = values[-1]
            values.append(_UNARY[u](v) if unary else _BINARY[b](v, values[other].to(v.dtype)))
        return values[-1]
    return fn


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_never_crash_the_backend(seed):
    rng = random.Random(seed)
    fn = _random_function(rng)
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(3, 5, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(16, generator=g).to(torch.bfloat16)
    torch._dynamo.reset()
    expected = fn(x, y, w)
    got = torch.compile(fn, backend="fxfuse", options={"inner": "eager"})(x, y, w)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
