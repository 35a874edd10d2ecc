"""The causal-LM loss patterns (transformers' ForCausalLMLoss, 'mean' and 'sum' / num_items_in_batch)
on the tiny QLoRA Llama: where they fire, the loss and every LoRA gradient against float64, declines.
The kernel itself is tested in tests/test_cross_entropy.py."""
import pytest
import torch

import fxfuse
from fxfuse.testing import assert_exact

from qlora_llama import batch, build, check_compiled_gradients, lora_grads

ENABLE = {"enable": ["causal_lm_loss", "causal_lm_loss_sum"]}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_loss_pattern_fires_and_gradients_are_exact(checkpointing):
    report = check_compiled_gradients(checkpointing, ENABLE)
    assert report.counts() == {"rms_norm": 5, "nf4_lora": 14, "causal_lm_loss": 1}, str(report)


@pytest.mark.parametrize("num_items", [None, "tensor"], ids=["mean", "sum-over-num-items"])
def test_loss_value_is_exact(num_items):
    model, twin = build(layers=1)
    inputs = batch(seed=4, t=64)
    inputs["labels"][0, :9] = -100  # some ignored positions, as a padded or prompt-masked batch has
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
