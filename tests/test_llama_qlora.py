"""End to end on a tiny QLoRA Llama (bitsandbytes NF4 base + PEFT LoRA, bf16): the patterns fire
where they should, and every trainable gradient after `torch.compile(backend="fxfuse")` is exact."""
import pytest
import torch

import fxfuse
from fxfuse.testing import assert_exact

from qlora_llama import batch, build, lora_grads

LAYERS = 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_qlora_llama_gradients_exact(checkpointing, dynamic):
    model, twin = build(layers=LAYERS, checkpointing=checkpointing, double_quant=not dynamic)
    inputs = batch(seed=1, t=96)  # enough tokens that the statistic is not one rounding event
    ref = lora_grads(twin, inputs)
    stock = lora_grads(model, inputs)

    fxfuse.last_report().graphs.clear()
    # The RMSNorm path alone, on one batch per length (bit-equal LoRA elsewhere keeps the per-tensor
    # statistic tight); the default pattern set is checked on pooled batches in test_nf4_lora.py.
    compiled = torch.compile(model, backend="fxfuse", dynamic=dynamic,
                             options={"patterns": ["rms_norm"]})
    ours = lora_grads(compiled, inputs)

    report = fxfuse.last_report()
    assert report.counts() == {"rms_norm": 2 * LAYERS + 1}, str(report)
    places = sorted(report.where("rms_norm"))
    assert places == sorted([f"layers.{i}.{n}" for i in range(LAYERS)
                             for n in ("input_layernorm", "post_attention_layernorm")] + ["norm"])
    assert [d for d in report.declines if d.pattern == "rms_norm"] == [], str(report)
    assert len(ref) == LAYERS * 7 * 2  # every LoRA A and B
    for name in ref:
        # Whole-model gradients: RMS error bound (see fxfuse.testing for why not the max).
        assert_exact(name, ours[name], ref[name], stock[name], max_factor=None)

    if dynamic:  # another sequence length: no recompile, still exact
        n_graphs = len(report.graphs)
        inputs = batch(seed=2, t=77)
        ours = lora_grads(compiled, inputs)
        assert len(fxfuse.last_report().graphs) == n_graphs
        ref, stock = lora_grads(twin, inputs), lora_grads(model, inputs)
        for name in ref:
            assert_exact(name, ours[name], ref[name], stock[name], max_factor=None)


def test_explain_on_qlora_model_reports_rms_norm_and_share():
    model, _ = build(layers=LAYERS, checkpointing=True)
    rep = fxfuse.explain(model, **batch())
    assert rep.counts()["rms_norm"] == 2 * LAYERS + 1
    assert 0 < rep.replaced_fraction < 1
    text = str(rep)
    assert "rms_norm" in text and "layers.1.post_attention_layernorm" in text


def test_4bit_linear_is_one_canonical_node():
    """Each bitsandbytes Linear4bit is seen as one `linear_4bit` node, inside checkpoint bodies too."""
    from fxfuse.canonicalize import canon, subgraphs
    model, _ = build(layers=LAYERS, checkpointing=True)
    gms = []
    torch.compile(model, backend=lambda gm, ex: gms.append(gm) or gm.forward)(**batch())
    found = []
    for gm in gms:
        for _, sub in subgraphs(gm):
            for n in sub.graph.nodes:
                c = canon(n) if n.op in ("call_function", "call_method") else None
                if c is not None and c.key == "linear_4bit":
                    found.append(c.args[0].meta["example_value"].shape[-1])
    assert len(found) == 7 * LAYERS


def test_lora_dropout_model_still_trains_through_fxfuse():
    """Nothing in the model is unsupported for RMSNorm; dropout elsewhere must not disturb it."""
    model, _ = build(layers=1, lora_dropout=0.1)
    rep = fxfuse.explain(model, **batch())
    assert rep.counts() == {"rms_norm": 3, "swiglu": 1, "causal_lm_loss": 1}, str(rep)
