"""Regional compilation (fxfuse/regional.py): the graph is cut at layer boundaries, each distinct piece is
compiled once, and the result is the result of compiling the graph whole, bit for bit."""
import functools

import pytest
import torch
import torch.fx as fx

import fxfuse
from fxfuse import regional
from fxfuse.regional import plan, signature
from torch._dynamo.utils import counters

from qlora_llama import batch, build


@pytest.fixture(autouse=True)
def _cut_small_models(monkeypatch):
    # Two- and three-layer models, cut as a 32-layer one is (by default a model is cut only where two
    # layers or more reuse code: test_small_models_are_compiled_whole).
    monkeypatch.setattr(regional, "MIN_REUSES", 1)


def _run(model, inputs, options):
    """Loss, logits and every LoRA gradient of one step through fxfuse, and the report."""
    report = fxfuse.Report()
    backend = functools.partial(fxfuse.fxfuse_backend, options=options, report=report)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=backend)(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads, report


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


def _regional(report):
    cut = [g.regional for g in report.graphs if g.regional is not None and not g.regional.reason]
    assert len(cut) == 1, str(report)
    return cut[0]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_layers_compiled_once_and_results_bit_equal(checkpointing):
    model, _ = build(layers=2, checkpointing=checkpointing, twin=False)
    model.enable_input_require_grads()  # every layer's input then requires grad: the layers are alike
    inputs = batch(seed=1, t=19)
    whole = _run(model, inputs, {"inner": "aot_eager", "regional": False})
    assert all(g.regional is None for g in whole[3].graphs)

    before = counters["aot_autograd"]["total"]
    cut = _run(model, inputs, {"inner": "aot_eager"})
    summary = _regional(cut[3])
    assert (summary.layers, summary.compiled) == (2, summary.pieces - 1)  # before, one layer, after
    assert [where for where, _ in summary.compile_s] == ["before layers.0", "layers.0", "after layers.1"]
    assert all(s > 0 for _, s in summary.compile_s)
    assert "forward compiles: before layers.0 " in str(summary)
    whole_graphs = sum(1 for g in cut[3].graphs if g.regional.reason)
    assert counters["aot_autograd"]["total"] - before == summary.compiled + whole_graphs
    assert cut[3].counts() == whole[3].counts()  # the rewrite is the same: only the compile is cut
    _assert_same(whole, cut)
    assert "2 layers in" in str(cut[3])


def test_a_layer_whose_input_needs_no_grad_is_compiled_apart():
    # Without enable_input_require_grads the first layer's input (the frozen embedding's output) needs no
    # gradient: compiled code for the other layers would compute one, so it gets its own.
    model, _ = build(layers=3, twin=False)
    inputs = batch(seed=2, t=13)
    whole = _run(model, inputs, {"inner": "aot_eager", "regional": False})
    cut = _run(model, inputs, {"inner": "aot_eager"})
    summary = _regional(cut[3])
    assert summary.layers == 3 and summary.compiled == summary.pieces - 1
    _assert_same(whole, cut)


def test_small_models_are_compiled_whole(monkeypatch):
    monkeypatch.setattr(regional, "MIN_REUSES", 2)
    model, _ = build(layers=2, twin=False)
    model.enable_input_require_grads()
    report = _run(model, batch(seed=6, t=9), {"inner": "aot_eager"})[3]
    reasons = [g.regional.reason for g in report.graphs]
    assert any("1 layer(s) would reuse another's compiled code" in r for r in reasons), reasons
    assert all(r for r in reasons)


def test_inductor_regional_equals_inductor_whole():
    """The default inner compiler: each distinct piece compiled in a tracing context of its own, the
    backward compiled lazily per piece and shared by the layers that reuse it."""
    model, _ = build(layers=2, checkpointing=True, twin=False)
    model.enable_input_require_grads()
    inputs = batch(seed=3, t=21)
    whole = _run(model, inputs, {"regional": False})
    cut = _run(model, inputs, {})
    assert _regional(cut[3]).layers == 2
    _assert_same(whole, cut)


def test_varying_lengths_compile_twice_regionally_and_match_the_whole_graph():
    """Batches of varying length compile twice under torch.compile's defaults (static, then dynamic), and
    the dynamic graph is cut too: the pieces' fake run must not specialize the symbolic length (it did,
    through the loss's F.pad, until the run took the Python dispatcher as Dynamo's does; every length was
    then a recompile). Losses and gradients equal the whole-graph compile's at every length."""
    model, _ = build(layers=3, twin=False)
    model.enable_input_require_grads()
    runs = {}
    for regional_on in (False, True):
        torch._dynamo.reset()
        report = fxfuse.Report()
        backend = functools.partial(fxfuse.fxfuse_backend, options={"inner": "aot_eager", "regional": regional_on},
                                    report=report)
        compiled = torch.compile(model, backend=backend)
        steps = []
        for seed, t in enumerate((12, 17, 9, 23)):
            model.zero_grad(set_to_none=True)
            out = compiled(**batch(seed=seed, t=t))
            out.loss.backward()
            steps.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        runs[regional_on] = steps, report
    (whole, _), (cut, report) = runs[False], runs[True]
    layer_graphs = [g for g in report.graphs if g.regional is not None and "layers in" in str(g.regional)]
    assert len(layer_graphs) == 2, str(report)  # static, then dynamic: no recompile per length
    assert all(g.regional.layers == 3 for g in layer_graphs)
    for (loss_w, grads_w), (loss_c, grads_c) in zip(whole, cut):
        assert torch.equal(loss_w, loss_c)
        assert grads_w.keys() == grads_c.keys() and len(grads_w) > 0
        assert all(torch.equal(grads_w[n], grads_c[n]) for n in grads_w)


# The plan, on small hand-made graphs: module paths as Dynamo records them.
def _graph(layer_paths, extra=None):
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    for i, path in enumerate(layer_paths):
        x = g.call_function(torch.mul, (x, w))
        x.meta["nn_module_stack"] = {"m": (f"L['self'].{path}", torch.nn.Module)} if path else {}
        if extra is not None and i == extra[0]:
            for arg in extra[2:] or (False,):
                s = g.call_function(extra[1], (arg,))
                s.meta["nn_module_stack"] = x.meta["nn_module_stack"]
    g.output((x,))
    return fx.GraphModule(torch.nn.Module(), g)


def test_a_repeated_layer_runs_on_fake_values_once(monkeypatch):
    """A piece whose signature ran on fake values already is not run again: the first run's output
    metadata stands in. The results stay bit-equal to the whole graph's."""
    stood_in = []
    same_outputs = regional._same_outputs
    monkeypatch.setattr(regional, "_same_outputs", lambda *a: stood_in.append(same_outputs(*a)) or stood_in[-1])
    model, _ = build(layers=3, checkpointing=True, twin=False)
    model.enable_input_require_grads()
    inputs = batch(seed=4, t=11)
    whole = _run(model, inputs, {"inner": "aot_eager", "regional": False})
    stood_in.clear()
    cut = _run(model, inputs, {"inner": "aot_eager"})
    summary = _regional(cut[3])
    assert summary.layers == 3 and summary.compiled == 3
    assert sum(s is not None for s in stood_in) == 2  # layers 1 and 2, after layer 0
    _assert_same(whole, cut)


def test_stand_in_outputs_keep_the_metadata_and_refuse_aliases():
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    with mode:
        a = torch.empty(4, 6, requires_grad=True)
        out = (a * 2).t()  # strides (1, 6), requires grad
        view, tail = a.view(24), torch.empty(10)[2:]
    got = regional._same_outputs(([a], [out, 3]), mode)
    assert got[1] == 3 and got[0] is not out and isinstance(got[0], torch._subclasses.FakeTensor)
    assert (got[0].shape, got[0].stride(), got[0].dtype, got[0].requires_grad) == ((6, 4), (1, 6), out.dtype, True)
    assert regional._same_outputs(None, mode) is None  # nothing ran yet
    assert regional._same_outputs(([a], [view]), mode) is None  # an output aliasing an input
    assert regional._same_outputs(([a], [out, out]), mode) is None  # two outputs aliasing each other
    assert regional._same_outputs(([a], [tail]), mode) is None  # past its storage's start


def test_plan_cuts_before_between_and_after_layers():
    gm = _graph(["embed", "layers.0.mlp", "layers.0", "layers.1.mlp", "layers.1", "norm"])
    pieces = plan(gm)
    assert [p.layer for p in pieces] == [None, "layers.0", "layers.1", None]
    assert [len(p.nodes) for p in pieces] == [1, 2, 2, 1]
    assert [[a.name for a in p.inputs] for p in pieces] == [["x", "w"], ["mul", "w"], ["mul_2", "w"], ["mul_4", "w"]]
    assert [[o.name for o in p.outputs] for p in pieces] == [["mul"], ["mul_2"], ["mul_4"], ["mul_5"]]


@pytest.mark.parametrize("paths, extra, reason", [
    (["layers.0", "norm"], None, "fewer than two layers"),
    (["layers.0", "layers.1", "layers.0"], None, "interleave"),
    (["layers.0", "layers.1"], (0, torch._C._set_grad_enabled), "changed across the cut after node"),
    (["layers.0", "layers.1"], (0, torch._C._set_fwd_grad_enabled), "changes global state"),
])
def test_plan_says_why_a_graph_stays_whole(paths, extra, reason):
    assert reason in plan(_graph(paths, extra))


def test_a_grad_mode_region_within_a_piece_is_cut_around():
    # torch.no_grad() set and restored inside the first layer, as the rotary embedding does before them
    pieces = plan(_graph(["layers.0", "layers.1"], (0, torch._C._set_grad_enabled, False, True)))
    assert [p.layer for p in pieces] == ["layers.0", "layers.1"]


def test_a_mutation_across_a_cut_keeps_the_graph_whole():
    gm = _graph(["layers.0", "layers.1"])
    x = next(n for n in gm.graph.nodes if n.name == "mul")  # layer 0's output
    w = next(n for n in gm.graph.nodes if n.name == "w")
    later = next(n for n in gm.graph.nodes if n.name == "mul_1")
    with gm.graph.inserting_before(later):
        view = gm.graph.call_method("view", (x, -1))
        add_ = gm.graph.call_method("add_", (view, 1.0))
    for made in (view, add_):
        made.meta["nn_module_stack"] = later.meta["nn_module_stack"]
    assert "mutates in place mul, computed in another piece" in plan(gm)
    gm.graph.erase_node(add_)
    with gm.graph.inserting_before(later):  # a graph input: AOTAutograd applies it after the piece, as whole
        gm.graph.call_method("add_", (w, 1.0)).meta["nn_module_stack"] = later.meta["nn_module_stack"]
    assert not isinstance(plan(gm), str)


def test_ddp_optimizer_pieces_are_not_cut_again():
    # DDPOptimizer calls the backend once per bucket and expects one AOTAutograd compile per call.
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake_mode = FakeTensorMode()
    ctx = TracingContext(fake_mode)
    ctx.ddp_optimizer_ctx = object()
    summary = regional.RegionalSummary()
    with tracing(ctx):
        got = regional.compile_regions(_graph(["layers.0", "layers.1", "layers.2"]), [torch.randn(2), torch.randn(2)],
                                       lambda *a: pytest.fail("compiled a piece"), fake_mode, summary)
    assert got is None and "DDPOptimizer" in summary.reason


def test_signature_tells_inputs_apart():
    gm = _graph(["layers.0", "layers.0"])
    x = torch.randn(4, 6)
    same = signature(gm, [torch.randn(4, 6), x])
    assert signature(gm, [torch.randn(4, 6), torch.randn(4, 6)]) == same
    for other in ([torch.randn(6, 4).t(), x],  # strides
                  [torch.randn(4, 6, requires_grad=True), x],
                  [torch.randn(4, 6, dtype=torch.float64), x],
                  [torch.randn(4, 7)[:, :6], x],  # strides again, a view
                  [x, x]):  # the two inputs alias
        assert signature(gm, other) != same
    other_graph = _graph(["layers.0", "layers.0", "layers.0"])
    assert signature(other_graph, [torch.randn(4, 6), x]) != same


def test_regional_option_is_checked():
    with pytest.raises(TypeError, match="regional"):
        fxfuse.backend.validate_options({"regional": "yes"})
    with pytest.raises(TypeError, match="offload_layer_inputs"):
        fxfuse.backend.validate_options({"offload_layer_inputs": 1})


def test_nothing_is_offloaded_off_cuda():
    model, _ = build(layers=2, checkpointing=True, twin=False)
    model.enable_input_require_grads()
    summary = _regional(_run(model, batch(seed=7, t=9), {"inner": "aot_eager"})[3])
    assert summary.offload is None and "host memory" not in str(summary)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory, streams)")
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_layer_inputs_offloaded_to_host_and_back_bit_for_bit(monkeypatch, checkpointing):
    """Each layer's saved input goes to pinned host memory in the forward and comes back for the backward
    (ahead of time, on a side stream): the results are those without offloading, bit for bit, and the
    device holds none of the layers' inputs between the forward and the backward, as soon as the forward
    returns."""
    layers, t, hidden = 4, 256, 512
    model, _ = build(layers=layers, checkpointing=checkpointing, twin=False, device="cuda", hidden_size=hidden,
                     intermediate_size=1024)
    model.enable_input_require_grads()
    inputs = batch(seed=8, t=t, device="cuda")
    input_bytes = 2 * t * hidden * 2  # one layer's input, bf16
    monkeypatch.setattr(regional, "OFFLOAD_MIN_BYTES", input_bytes)
    kept = _run(model, inputs, {"inner": "aot_eager", "offload_layer_inputs": False})
    assert _regional(kept[3]).offload is None
    moved = _run(model, inputs, {"inner": "aot_eager"})
    _assert_same(kept, moved)
    offload = _regional(moved[3]).offload
    # Every layer's input but the first's: enable_input_require_grads' hook breaks the graph after the
    # embedding, so the first layer's input comes from outside the graph, and its caller holds it.
    moved_inputs = layers - 1
    assert offload.tensors == moved_inputs and offload.bytes == moved_inputs * input_bytes, str(offload)

    def allocated_after_forward(options):
        report = fxfuse.Report()
        compiled = torch.compile(model, backend=functools.partial(fxfuse.fxfuse_backend, options=options,
                                                                  report=report))
        for _ in range(2):  # the second call: compiled, nothing left of the first
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            loss = compiled(**inputs).loss
            # No synchronization: the inputs are let go in the compute stream's order, whether or
            # not the GPU has caught up with the CPU (freed after their copies' events, they were not).
            held = torch.cuda.memory_allocated() - start
            loss.backward()
            del loss
        return held

    held_kept = allocated_after_forward({"inner": "aot_eager", "offload_layer_inputs": False})
    held_moved = allocated_after_forward({"inner": "aot_eager"})
    assert held_kept - held_moved >= moved_inputs * input_bytes, (held_kept, held_moved)
