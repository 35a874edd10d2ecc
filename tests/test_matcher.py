"""The pattern engine on small hand-written graphs: what matches, what must not, and why."""
import subprocess
import sys

import pytest
import torch

import fxfuse
from fxfuse.canonicalize import canon
from fxfuse.matcher import Pattern, PatternError

H = 40  # not a power of two


class HFNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm, verbatim."""

    def __init__(self, n=H, dtype=torch.bfloat16, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class OtherSpelling(HFNorm):
    """The same math, spelled differently: functions for methods, `**`, `.float()`, swapped operands."""

    def forward(self, x):
        h = x.float()
        variance = torch.mean(h ** 2, dim=2, keepdim=True)
        h = torch.mul(torch.rsqrt(torch.add(variance, self.variance_epsilon)), h)
        return h.to(x.dtype) * self.weight


class EpsOutside(HFNorm):
    """A different eps placement: rsqrt(var) + eps. Not RMSNorm as the kernel computes it."""

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * (torch.rsqrt(variance) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class NoUpcast(HFNorm):
    """One cast removed: the variance is computed in bf16."""

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class SumNotMean(HFNorm):
    """One op changed: sum instead of mean."""

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).sum(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class LeakyIntermediate(HFNorm):
    """The normalised fp32 value is also returned: the region cannot be removed."""

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(x.dtype), variance


def _x(dtype=torch.bfloat16, shape=(3, 5, H)):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def test_backend_registered_through_entry_point_without_import():
    code = ("import torch; from torch._dynamo.backends.registry import lookup_backend; "
            "print(lookup_backend('fxfuse').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fxfuse.backend"


@pytest.mark.parametrize("module", [HFNorm, OtherSpelling])
def test_rms_norm_spellings_match_and_are_exact(module):
    torch.manual_seed(0)
    m = module()
    rep = fxfuse.explain(m, _x())
    assert rep.counts() == {"rms_norm": 1}, str(rep)
    assert rep.declines == []
    # Where the compile's time went: fxfuse's rewrite, then the inner compiler, each timed.
    g = rep.graphs[0]
    assert g.rewrite_s > 0 and g.inner_compile_s > 0 and "compile time: fxfuse's rewrite" in str(rep), str(rep)
    x = _x()
    torch._dynamo.reset()
    y = torch.compile(m, backend="fxfuse")(x)
    y_ref = m(x)
    # Same rounding sequence as the stock module: at most one bf16 ulp apart.
    assert torch.allclose(y.float(), y_ref.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("module,expect", [
    (EpsOutside, "expected `rsqrt`"),
    (SumNotMean, "expected `mean`"),
    (LeakyIntermediate, "also used outside the pattern"),
])
def test_near_misses_are_declined_with_a_reason(module, expect):
    torch.manual_seed(0)
    m = module()
    rep = fxfuse.explain(m, _x())
    assert rep.counts() == {}, str(rep)
    assert len(rep.declines) == 1, str(rep)
    assert rep.declines[0].pattern == "rms_norm"
    assert expect in rep.declines[0].reason, rep.declines[0].reason
    assert expect in str(rep)


def test_missing_cast_does_not_match():
    rep = fxfuse.explain(NoUpcast(), _x())
    assert rep.counts() == {}


def test_unsupported_inputs_keep_the_stock_path(monkeypatch):
    # fp32 weight under a bf16 input: the output is fp32, the kernel's contract is same-dtype.
    m = HFNorm()
    m.weight.data = m.weight.data.float()
    rep = fxfuse.explain(m, _x())
    assert rep.counts() == {} and "dtypes differ" in rep.declines[0].reason
    # CPU tensors without the interpreter: no kernel can run there.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    rep = fxfuse.explain(HFNorm(), _x())
    assert rep.counts() == {} and "interpreter is off" in rep.declines[0].reason
    # ...and the compiled module still computes the stock result.
    torch._dynamo.reset()
    m = HFNorm()
    x = _x()
    assert torch.equal(torch.compile(m, backend="fxfuse")(x), m(x))


def test_fp16_matches_through_the_generic_dtype():
    rep = fxfuse.explain(HFNorm(dtype=torch.float16), _x(torch.float16))
    assert rep.counts() == {"rms_norm": 1}


def test_fp32_model_is_left_alone():
    rep = fxfuse.explain(HFNorm(dtype=torch.float32), _x(torch.float32))
    assert rep.counts() == {}


def test_options_reach_the_backend():
    m, x = HFNorm(), _x()
    assert fxfuse.explain(m, x, options={"disable": ["rms_norm"]}).counts() == {}
    torch._dynamo.reset()
    rep = fxfuse.explain(m, x, options={"patterns": [], "inner": "aot_eager"})
    assert rep.counts() == {} and rep.graphs[0].inner == "aot_eager"
    assert "disabled by options: " in str(rep) and "rms_norm" in rep.graphs[0].disabled
    torch._dynamo.reset()
    # options given to torch.compile itself
    fxfuse.last_report().graphs.clear()
    torch.compile(m, backend="fxfuse", options={"inner": "aot_eager"})(x)
    g = fxfuse.last_report().graphs[-1]
    assert g.inner == "aot_eager" and [r.pattern for r in g.matches] == ["rms_norm"]


@pytest.mark.parametrize("options,error", [
    ({"bogus": 1}, ValueError), ({"disable": ["nope"]}, ValueError), ({"disable": "rms_norm"}, TypeError),
    ({"inner": "tvm"}, ValueError), ("rms_norm", TypeError), ({"extra_patterns": [1]}, TypeError),
])
def test_bad_options_raise_clear_errors(options, error):
    with pytest.raises(error):
        fxfuse.explain(HFNorm(), _x(), options=options)


def test_dynamic_shapes_are_not_specialised():
    m = HFNorm()
    fxfuse.last_report().graphs.clear()
    cm = torch.compile(m, backend="fxfuse", dynamic=True)
    for rows in (3, 7, 12):
        x = _x(shape=(rows, 5, H))
        y = cm(x)
        assert torch.allclose(y.float(), m(x).float(), rtol=2 ** -7, atol=0)
    graphs = fxfuse.last_report().graphs
    assert len(graphs) == 1, "a new row count must not recompile"
    assert [r.pattern for r in graphs[0].matches] == ["rms_norm"]


def test_pattern_definitions_are_validated():
    with pytest.raises(PatternError):
        Pattern("p", lambda x: x, lambda x, y: x, lambda: (torch.ones(2),))
    with pytest.raises(PatternError):
        Pattern("p", lambda x: x, lambda x: x, lambda: (torch.ones(2),), scalars=("eps",))
    with pytest.raises(PatternError):
        Pattern("", lambda x: x, lambda x: x, lambda: ())
    with pytest.raises(PatternError, match="anchor_reason"):
        Pattern("p", lambda x: x, lambda x: x, lambda: (torch.ones(2),), anchor="sigmoid", anchor_reason=3)


def _silu_with_anchor(reason):
    return Pattern("my_silu", lambda x: x * torch.sigmoid(x), lambda x: torch.nn.functional.silu(x),
                   lambda: (torch.randn(4, 8, dtype=torch.bfloat16),), anchor="sigmoid", anchor_reason=reason)


class _SigmoidTwice(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * 2  # not x * sigmoid(x): the anchor is left unmatched


def test_a_callable_anchor_reason_says_what_is_particular_to_the_op_left_over():
    from fxfuse.canonicalize import example_value

    def reason(node):
        return f"a sigmoid of {tuple(example_value(node.args[0]).shape)}"

    x = torch.randn(3, 7, dtype=torch.bfloat16)
    rep = fxfuse.explain(_SigmoidTwice(), x, options={"extra_patterns": [_silu_with_anchor(reason)]})
    assert [(d.pattern, d.reason) for d in rep.declines if d.pattern == "my_silu"] == \
        [("my_silu", "a sigmoid of (3, 7)")], str(rep)
    # Dynamo wraps what a backend raises, message kept.
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="PatternError.*not a non-empty string"):
        fxfuse.explain(_SigmoidTwice(), x, options={"extra_patterns": [_silu_with_anchor(lambda node: None)]})


def test_extra_pattern_through_public_api():
    """A user-defined pattern (here: x * sigmoid(x) -> silu) fires and is reported."""
    def ref(x):
        return x * torch.sigmoid(x)

    def rep_fn(x):
        return torch.nn.functional.silu(x)

    pat = Pattern("my_silu", ref, rep_fn, lambda: (torch.randn(4, 8),))

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * x + 1

    x = torch.randn(3, 8)
    rep = fxfuse.explain(M(), x, options={"extra_patterns": [pat]})
    assert rep.counts() == {"my_silu": 1}


def test_canonical_views_agree_across_spellings():
    def f(x):
        a = x.pow(2)
        b = torch.pow(x, 2)
        c = x ** 2
        d = x.float()
        e = x.to(torch.float32)
        f_ = x.to(dtype=torch.float32)
        g = x.mean(-1, keepdim=True)
        h = torch.mean(x, dim=1, keepdim=True)
        return a, b, c, d, e, f_, g, h

    gms = []
    torch.compile(f, backend=lambda gm, ex: gms.append(gm) or gm.forward)(torch.randn(2, 3, dtype=torch.bfloat16))
    views = [canon(n) for n in gms[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert len({(v.key, v.args[1:]) for v in views[:3]}) == 1
    assert len({(v.key, v.args[1:]) for v in views[3:6]}) == 1
    assert views[6].args[1:] == views[7].args[1:] == (-1, True, None)


def test_recompile_alone_leaves_child_graph_modules_as_they_are():
    import torch.fx as fx
    from fxfuse.canonicalize import recompile_alone
    child = fx.symbolic_trace(lambda x: x + 1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("child", (x,)))
    parent = fx.GraphModule({"child": child}, graph)
    next(n for n in child.graph.nodes if n.op == "call_function").args = (next(iter(child.graph.nodes)), 2)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        tripled = graph.call_function(torch.mul, (out.args[0], 3))
    out.args = (tripled,)
    recompile_alone(parent)
    x = torch.arange(4.0)
    assert torch.equal(parent(x), (x + 1) * 3)  # the parent's new code, the child's old code
    parent.recompile()  # torch's recompile regenerates the child as well
    assert torch.equal(parent(x), (x + 2) * 3)


def test_canonical_views_follow_replaced_inputs():
    def f(x, y):
        return (x * 2).pow(2) + y

    gms = []
    torch.compile(f, backend=lambda gm, ex: gms.append(gm) or gm.forward)(torch.randn(3), torch.randn(3))
    graph = gms[0].graph
    pow_ = next(n for n in graph.nodes if n.op in ("call_function", "call_method") and canon(n).key == "pow")
    mul = pow_.args[0]
    assert canon(pow_).args[0] is mul and canon(pow_) is canon(pow_)  # memoized
    y = [n for n in graph.nodes if n.op == "placeholder"][1]
    mul.replace_all_uses_with(y)
    assert canon(pow_).args[0] is y
