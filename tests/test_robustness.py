"""The backend in a training run's ordinary life: a graph break in user code, no-grad eval steps and
eval()/train() switches between train steps, an adapter saved and loaded back mid-run, the recompile
limit. Each runs the same steps on a compiled and on a stock copy of the tiny QLoRA Llama and holds the
losses together (fxfuse rounds less than stock: the runs drift by far less than 1e-3)."""
import pytest
import torch

import fxfuse

from qlora_llama import batch, build

RTOL = 1e-3


def _pair(**kwargs):
    """Two identical tiny QLoRA models (same seed): one to compile, one stock."""
    ours, _ = build(layers=2, twin=False, **kwargs)
    stock, _ = build(layers=2, twin=False, **kwargs)
    return ours, stock


def _opt(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)


def _train_step(model, opt, inputs) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    return loss.item()


def _close(a, b):
    assert a == pytest.approx(b, rel=RTOL), (a, b)


def test_print_in_forward_breaks_the_graph_and_patterns_still_fire(capsys):
    ours, stock = _pair()
    for m in (ours, stock):
        # User code Dynamo cannot trace: a print before the second layer splits the graph there.
        m.get_submodule("base_model.model.model.layers.1").register_forward_pre_hook(
            lambda mod, args: print("layer 1"))
    compiled = torch.compile(ours, backend="fxfuse")
    fxfuse.last_report().graphs.clear()
    o_ours, o_stock = _opt(ours), _opt(stock)
    for seed in range(2):
        _close(_train_step(compiled, o_ours, batch(seed=seed)), _train_step(stock, o_stock, batch(seed=seed)))
    report = fxfuse.last_report()
    assert len(report.graphs) >= 2, str(report)
    assert report.counts() == {"rms_norm": 5, "nf4_lora": 14, "swiglu": 2, "causal_lm_loss": 1}, str(report)
    assert "layer 1" in capsys.readouterr().out


def test_no_grad_eval_steps_and_mode_switches_between_train_steps():
    ours, stock = _pair()
    # On CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit weights for its CPU kernel in the first
    # no-grad forward (`weight.set_(...)` inside the graph), and Inductor itself then fails on the
    # repacked parameter (plain torch.compile too: an assert_size_stride error). The other inner
    # compiler keeps this test about fxfuse's rewrite on every CPU.
    compiled = torch.compile(ours, backend="fxfuse", options={"inner": "aot_eager"})
    o_ours, o_stock = _opt(ours), _opt(stock)
    for step in range(3):
        for m in (ours, stock):
            m.train()
        _close(_train_step(compiled, o_ours, batch(seed=step)), _train_step(stock, o_stock, batch(seed=step)))
        for m in (ours, stock):
            m.eval()
        with torch.no_grad():
            _close(compiled(**batch(seed=100 + step)).loss.item(), stock(**batch(seed=100 + step)).loss.item())
    # The adapters moved the same way in both runs (to rounding: fxfuse's gradients round less).
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        if p.requires_grad:
            assert (p - q).norm() <= RTOL * q.norm(), (name, float((p - q).norm() / q.norm()))


def test_adapter_saved_and_loaded_back_mid_run(tmp_path):
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    ours, stock = _pair()
    compiled = torch.compile(ours, backend="fxfuse")
    o_ours, o_stock = _opt(ours), _opt(stock)
    _close(_train_step(compiled, o_ours, batch(seed=0)), _train_step(stock, o_stock, batch(seed=0)))
    ours.save_pretrained(tmp_path / "ours")
    stock.save_pretrained(tmp_path / "stock")
    _close(_train_step(compiled, o_ours, batch(seed=1)), _train_step(stock, o_stock, batch(seed=1)))
    # Back to the saved adapter, copied into the live parameters: the compiled graph must read them.
    from safetensors.torch import load_file
    for m, d in ((ours, "ours"), (stock, "stock")):
        saved = load_file(tmp_path / d / "adapter_model.safetensors")
        set_peft_model_state_dict(m, saved)
        assert all(torch.equal(saved[k], v) for k, v in get_peft_model_state_dict(m).items() if k in saved)
    _close(_train_step(compiled, o_ours, batch(seed=2)), _train_step(stock, o_stock, batch(seed=2)))


def test_recompile_limit_falls_back_to_the_stock_path_and_stays_correct():
    ours, stock = _pair()
    compiled = torch.compile(ours, backend="fxfuse", dynamic=False)
    o_ours, o_stock = _opt(ours), _opt(stock)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        # Each new length needs another graph; past the limit Dynamo runs the frame eagerly.
        for seed, t in enumerate((24, 17, 31)):
            _close(_train_step(compiled, o_ours, batch(seed=seed, t=t)),
                   _train_step(stock, o_stock, batch(seed=seed, t=t)))


def test_varying_lengths_compile_twice_and_every_graph_keeps_the_patterns():
    """A run whose batches vary in length (as an SFT run's do) compiles twice under torch.compile's defaults,
    static then dynamic, whatever the next lengths are, and every length runs through a rewritten graph
    (no silent fallback to the stock path); the losses track stock's."""
    ours, stock = _pair()
    compiled = torch.compile(ours, backend="fxfuse", options={"inner": "aot_eager"})
    o_ours, o_stock = _opt(ours), _opt(stock)
    fxfuse.last_report().graphs.clear()
    torch._dynamo.utils.counters.clear()
    for seed, t in enumerate((24, 17, 31, 9, 40)):
        _close(_train_step(compiled, o_ours, batch(seed=seed, t=t)), _train_step(stock, o_stock, batch(seed=seed, t=t)))
    graphs = fxfuse.last_report().graphs
    assert len(graphs) == 2, [g.index for g in graphs]
    for g in graphs:  # both the static and the dynamic graph have every default pattern in them
        counts = {}
        for m in g.matches:
            counts[m.pattern] = counts.get(m.pattern, 0) + 1
        assert counts == {"rms_norm": 5, "nf4_lora": 14, "swiglu": 2, "causal_lm_loss": 1}, counts
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


class _NormWithCounter(torch.nn.Module):
    """An RMSNorm (the pattern fires) beside an in-place update whose result nothing reads."""

    def __init__(self, n=64):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n, dtype=torch.bfloat16))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls.add_(1)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_side_effects_in_the_graph_survive_the_rewrite(inner):
    # Dynamo keeps an in-place update with an unused result in the graph for its side effect; the
    # rewrite's clean-up must not take it for dead (FX's eliminate_dead_code takes every method
    # call for pure, and dropped it: bitsandbytes' `weight.set_(repacked)` in an eval forward on
    # CPUs with AVX512-BF16 went that way, and the compiled model ran the old bytes).
    m = _NormWithCounter()
    compiled = torch.compile(m, backend="fxfuse", options={"inner": inner})
    fxfuse.last_report().graphs.clear()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for _ in range(3):
        compiled(x)
    assert fxfuse.last_report().counts() == {"rms_norm": 1}
    assert m.calls.item() == 3


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_replaced_4bit_linears_leave_no_bitsandbytes_op_behind(checkpointing):
    # The other half of that clean-up: the region's producers the rewrite left without users (the
    # bitsandbytes autograd_function_apply, whose unused output 1 still pointed at it) must not run.
    from fxfuse.backend import fxfuse_backend
    from fxfuse.canonicalize import subgraphs
    model, _ = build(layers=1, twin=False, checkpointing=checkpointing)
    fxfuse.last_report().graphs.clear()
    left = []

    def backend(gm, example_inputs):
        fn = fxfuse_backend(gm, example_inputs, options={"inner": "eager"})
        left.extend(str(n.target) for _, sub in subgraphs(gm) for n in sub.graph.nodes if n.op == "call_function"
                    and ("autograd_function_apply" in str(n.target) or "bitsandbytes" in str(n.target)))
        return fn
    torch.compile(model, backend=backend)(**batch()).loss.backward()
    assert fxfuse.last_report().counts()["nf4_lora"] == 7
    assert left == [], left


@pytest.mark.parametrize("b,t", [(2, 1), (0, 8)], ids=["one-token", "empty-batch"])
def test_one_token_and_empty_batches_behave_as_stock(b, t):
    """A sequence of one token (no next-token target: the loss is 0/0) and a batch of no rows go through the
    compiled model as through the stock one: the same logits, the same loss (NaN where stock's is), the
    same LoRA gradients present, or the same error where stock raises (an empty batch: transformers' own
    reshape of 0 elements)."""
    ours, stock = _pair()
    compiled = torch.compile(ours, backend="fxfuse", options={"inner": "aot_eager"})
    fxfuse.last_report().graphs.clear()
    inputs = batch(b=max(b, 1), t=t)
    inputs = {k: v[:b] for k, v in inputs.items()}
    outs = []
    for m in (compiled, stock):
        try:
            out = m(**inputs)
        except Exception as e:  # noqa: BLE001  (compared below: stock's error must be ours)
            outs.append(type(e))
            continue
        loss = out.loss
        if torch.isfinite(loss):
            loss.backward()
        outs.append((out.logits.detach(), loss.detach()))
    if isinstance(outs[1], type):
        assert outs[0] is outs[1] or issubclass(outs[0], outs[1]), outs
        return
    (logits, loss), (logits_ref, loss_ref) = outs
    assert fxfuse.last_report().counts() == {"rms_norm": 5, "nf4_lora": 14, "swiglu": 2, "causal_lm_loss": 1}
    assert logits.shape == logits_ref.shape
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)
    assert loss.isnan() == loss_ref.isnan(), (loss, loss_ref)
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        if p.requires_grad:
            assert (p.grad is None) == (q.grad is None), name
