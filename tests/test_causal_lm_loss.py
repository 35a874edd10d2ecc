"""The causal-LM loss patterns (transformers' ForCausalLMLoss, 'mean' and 'sum' / num_items_in_batch)
on the tiny QLoRA Llama: where they fire, the loss and every LoRA gradient against float64, declines.
The kernel itself is tested in tests/test_cross_entropy.py."""
import pytest
import torch

import fxfuse
from fxfuse.testing import assert_exact

from qlora_llama import batch, build, check_compiled_gradients, lora_grads

ENABLE = {}  # on by default


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_loss_pattern_fires_and_gradients_are_exact(checkpointing):
    report = check_compiled_gradients(checkpointing, ENABLE)
    assert report.counts() == {"rms_norm": 5, "nf4_lora": 14, "swiglu": 2, "causal_lm_loss": 1}, str(report)
    # The lm_head is taken into the loss (fxfuse::lm_head_cross_entropy), and the graph still returns the logits.
    assert sum("takes the lm_head into the loss" in line for line in report.post_passes) == 1, str(report)


def lm_head_and_loss(hidden, labels, weight, bias=None, float64=False):
    """LlamaForCausalLM.forward's tail: the lm_head, then ForCausalLMLoss ('mean'); both returned.
    float64: the reference evaluation (HF's `.float()` would round float64 logits to fp32)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    upcast = logits.double() if float64 else logits.float()
    loss = torch.nn.functional.cross_entropy(upcast.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    return loss, logits


def test_returned_logits_keep_their_gradient():
    # A caller may differentiate the returned logits too (a second loss on them): the fused op adds
    # that gradient in. Loss, logits and dhidden against float64, both gradients flowing.
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 11, 32, generator=g).bfloat16()
    weight = (0.2 * torch.randn(300, 32, generator=g)).bfloat16()
    labels = torch.randint(0, 300, (2, 11), generator=g)
    labels[0, :3] = -100
    tangent = (1e-3 * torch.randn(2, 11, 300, generator=g)).bfloat16()
    fxfuse.last_report().graphs.clear()
    compiled = torch.compile(lm_head_and_loss, backend="fxfuse", options={**ENABLE, "inner": "eager"})

    def run(f, h, w, t, **kwargs):
        h = h.clone().requires_grad_()
        loss, logits = f(h, labels, w, **kwargs)
        torch.autograd.backward([loss, logits], [torch.tensor(0.7, dtype=loss.dtype), t])
        return loss.detach(), logits.detach(), h.grad

    ours = run(compiled, hidden, weight, tangent)
    report = fxfuse.last_report()
    assert report.counts() == {"causal_lm_loss": 1}, str(report)
    assert any("takes the lm_head into the loss" in line for line in report.post_passes), str(report)
    stock = run(lm_head_and_loss, hidden, weight, tangent)
    ref = run(lm_head_and_loss, hidden.double(), weight.double(), tangent.double(), float64=True)
    assert torch.equal(ours[1], stock[1])  # the same lm_head GEMM
    for name, o, r, s in zip(("loss", "logits", "dhidden"), ours, ref, stock):
        assert_exact(name, o.reshape(-1), r.reshape(-1), s.reshape(-1))


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_lm_head", "trained_lm_head"])
def test_loss_alone_never_forms_the_logits(weight_grad):
    # A graph that returns only the loss: the fused linear cross-entropy, exact for dhidden (and dweight).
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 13, 32, generator=g).bfloat16()
    weight = (0.2 * torch.randn(300, 32, generator=g)).bfloat16()
    labels = torch.randint(0, 300, (2, 13), generator=g)
    labels[1, 4:9] = -100

    def loss_only(h, labels, w, float64=False):
        return lm_head_and_loss(h, labels, w, float64=float64)[0]

    fxfuse.last_report().graphs.clear()
    compiled = torch.compile(loss_only, backend="fxfuse", options={**ENABLE, "inner": "eager"})

    def run(f, h, w, **kwargs):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
        loss = f(h, labels, w, **kwargs)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ours = run(compiled, hidden, weight)
    report = fxfuse.last_report()
    assert any("the logits are not returned, and never formed whole" in line for line in report.post_passes), \
        str(report)
    stock = run(loss_only, hidden, weight)
    ref = run(loss_only, hidden.double(), weight.double(), float64=True)
    for name, o, r, s in zip(("loss", "dhidden", "dweight"), ours, ref, stock):
        if name == "dweight" and not weight_grad:
            assert o is None
            continue
        assert_exact(name, o.reshape(-1), r.reshape(-1), s.reshape(-1))


def test_trained_lm_head_with_returned_logits_stays_apart_with_the_reason():
    # Its returned logits' gradient would reach the weight too; that path is not fused (the loss is).
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 5))
    rep = fxfuse.explain(lm_head_and_loss, hidden, labels, weight, options={**ENABLE, "inner": "eager"})
    assert rep.counts() == {"causal_lm_loss": 1}, str(rep)
    assert any("weight is trained and the logits are returned" in line for line in rep.post_passes), str(rep)


def test_lm_head_with_bias_stays_apart_with_the_reason():
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    weight, bias = torch.randn(300, 32, dtype=torch.bfloat16), torch.randn(300, dtype=torch.bfloat16)
    labels = torch.randint(0, 300, (2, 5))
    rep = fxfuse.explain(lm_head_and_loss, hidden, labels, weight, bias, options={**ENABLE, "inner": "eager"})
    assert rep.counts() == {"causal_lm_loss": 1}, str(rep)
    assert any("the lm_head stays apart from the loss" in line and "bias" in line for line in rep.post_passes), str(rep)


@pytest.mark.parametrize("num_items", [None, "tensor"], ids=["mean", "sum-over-num-items"])
@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
def test_loss_value_is_exact(num_items, shifted):
    model, twin = build(layers=1)
    inputs = batch(seed=4, t=64)
    inputs["labels"][0, :9] = -100  # some ignored positions, as a padded or prompt-masked batch has
    if shifted:  # labels passed pre-shifted (TRL's padding-free and context-parallel batches)
        inputs["shift_labels"] = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    if num_items:
        inputs["num_items_in_batch"] = torch.tensor(101)
    fxfuse.last_report().graphs.clear()
    compiled = torch.compile(model, backend="fxfuse", options={**ENABLE, "inner": "eager"})
    with torch.no_grad():
        ours, stock, ref = (m(**inputs).loss for m in (compiled, model, twin))
    want = "causal_lm_loss_sum" if num_items else "causal_lm_loss"
    assert fxfuse.last_report().counts().get(want) == 1, str(fxfuse.last_report())
    assert ours.dtype == stock.dtype == torch.float32
    assert_exact("loss", ours.reshape(1), ref.reshape(1), stock.reshape(1))


def test_all_ignored_mean_is_nan_like_stock():
    model, _ = build(layers=1, twin=False)
    inputs = batch(seed=4, t=16)
    inputs["labels"][:] = -100
    compiled = torch.compile(model, backend="fxfuse", options={**ENABLE, "inner": "eager"})
    loss = compiled(**inputs).loss
    assert torch.isnan(loss) and torch.isnan(model(**inputs).loss)
    grads = lora_grads(compiled, inputs)  # backward through 0/0: no gradient is produced from the loss
    assert all(torch.isnan(g).all() or (g == 0).all() for g in grads.values())


@pytest.mark.parametrize("variant", ["label_smoothing", "ignore_index", "reduction"])
def test_other_loss_variants_are_declined_with_the_reason(variant):
    kwargs = {"label_smoothing": {"label_smoothing": 0.1}, "ignore_index": {"ignore_index": -1},
              "reduction": {"reduction": "none"}}[variant]

    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                                 **{"ignore_index": -100, **kwargs})

    logits = torch.randn(2, 5, 37, dtype=torch.bfloat16)
    labels = torch.randint(0, 37, (2, 5))
    rep = fxfuse.explain(loss, logits, labels, options={**ENABLE, "inner": "eager"})
    assert rep.counts() == {}, str(rep)
    reasons = [d.reason for d in rep.declines if d.pattern == "causal_lm_loss"]
    assert reasons, str(rep)


def test_pattern_on_the_bare_loss_function():
    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                                 ignore_index=-100)

    logits = torch.randn(3, 7, 1000, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (3, 7))
    rep = fxfuse.explain(loss, logits, labels, options={**ENABLE, "inner": "eager"})
    assert rep.counts() == {"causal_lm_loss": 1}, str(rep)
