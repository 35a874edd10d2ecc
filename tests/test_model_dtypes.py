"""Models outside bf16 (issue 8: "a graph outside a pattern's constraints keeps the stock path and
`fxfuse.explain` gives the reason"): a whole tiny Llama with LoRA in fp32 and in fp16, on a plain base and
on a 4-bit (NF4) base whose bitsandbytes compute dtype is the model's dtype.

For each, what fires and what is declined (and why, as `fxfuse.explain` reports it), and the compiled
model's loss and every LoRA gradient against the uncompiled model and its float64 twin:
- fp32: only `swiglu` fires (it accepts fp32 and computes it in fp64); everything else keeps the stock path,
  so with `swiglu` disabled the compiled model is bit-equal to the uncompiled one.
- fp16: on a plain base every default pattern fires (rms_norm, lora, swiglu, the loss); on a 4-bit base the
  LoRA patterns decline fp16 compute (see the README: bitsandbytes dequantizes to the stored dtype, then
  casts) and the rest fires.

A bf16 model whose 4-bit layers compute in fp16 (bnb_4bit_compute_dtype=torch.float16) keeps those layers
stock, and explain gives the compute dtype as the reason (nf4_lora's anchor reason reads the linear's input).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fxfuse
from fxfuse.testing import assert_exact, float64_casts

from qlora_llama import TARGETS, batch, build, declines_besides_attention_policy

LAYERS = 2
T = 32  # tokens per row: a 2 x 32 batch keeps the Triton interpreter's share of the file small
OPTIONS = {"inner": "eager"}
NOTHING_IN_FP32 = {**OPTIONS, "disable": ["swiglu"]}  # swiglu is the one pattern that takes fp32
NORMS = sorted([f"layers.{i}.{n}" for i in range(LAYERS) for n in ("input_layernorm", "post_attention_layernorm")]
               + ["norm"])
PROJS = sorted(f"layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}" for i in range(LAYERS) for t in TARGETS)
MLPS = [f"layers.{i}.mlp" for i in range(LAYERS)]
ATTNS = [f"layers.{i}.self_attn" for i in range(LAYERS)]
LOSS_AT = "base_model.model"  # where causal_lm_loss fires (the top-level module of the PEFT model)
NF4_REASON = {torch.float32: "`x` is torch.float32; the kernel supports torch.bfloat16",
              torch.float16: "`x` is torch.float16; the kernel supports torch.bfloat16"}


@dataclass
class Run:
    model: torch.nn.Module
    inputs: dict
    explained: fxfuse.Report  # fxfuse.explain's report
    trained_counts: dict  # what fired in the compile that trained (torch.compile(backend="fxfuse"))
    losses: dict  # "ref" (float64 twin), "stock" (uncompiled), "ours" (compiled): python floats
    grads: dict  # the same keys: {parameter name: gradient}


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                         for n, p in model.named_parameters() if p.requires_grad}


def _run(dtype, quant_type, train_options=None) -> Run:
    """Build the model in `dtype`, explain it, and backpropagate one batch through the float64 twin, the
    uncompiled model and the model compiled with fxfuse (`train_options`: its options, default OPTIONS)."""
    torch._dynamo.reset()
    model, twin = build(layers=LAYERS, quant_type=quant_type, dtype=dtype)
    assert model.get_input_embeddings().weight.dtype == dtype
    inputs = batch(seed=1, t=T)
    explained = fxfuse.explain(model, options=OPTIONS, **inputs)
    losses, grads = {}, {}
    with float64_casts():  # the twin's casts (logits.float(), RoPE's .float()) stay float64
        losses["ref"], grads["ref"] = _loss_and_grads(twin, inputs)
    losses["stock"], grads["stock"] = _loss_and_grads(model, inputs)
    compiled = torch.compile(model, backend="fxfuse", options=train_options or OPTIONS)
    fxfuse.last_report().graphs.clear()
    losses["ours"], grads["ours"] = _loss_and_grads(compiled, inputs)
    trained_counts = fxfuse.last_report().counts()
    assert len(grads["ref"]) == LAYERS * len(TARGETS) * 2 and grads["ours"].keys() == grads["ref"].keys()
    assert all(g.dtype == torch.float32 for g in grads["ours"].values())  # fp32 adapters in every model
    torch._dynamo.reset()
    return Run(model, inputs, explained, trained_counts, losses, grads)


@pytest.fixture(scope="module")
def fp32_plain():
    return _run(torch.float32, "none")


@pytest.fixture(scope="module")
def fp32_qlora():
    # Trained with swiglu off: nothing fires, and the compiled model must be the uncompiled one bit for bit.
    return _run(torch.float32, "nf4", train_options=NOTHING_IN_FP32)


@pytest.fixture(scope="module")
def fp16_plain():
    return _run(torch.float16, "none")


@pytest.fixture(scope="module")
def fp16_qlora():
    return _run(torch.float16, "nf4")


def _declined(report, pattern) -> list[tuple[str, str]]:
    return sorted((d.where, d.reason) for d in report.declines if d.pattern == pattern)


def _assert_gradients_exact(run: Run):
    """The exactness criterion (RMS error at most 1.25x the stock path's, against the float64 twin) on all
    LoRA gradients pooled, each scaled by its float64 RMS so every tensor weighs the same. Per tensor, one
    2 x 32 batch is too few rounding events (see qlora_llama.check_compiled_gradients): one tensor of a
    2 x 96 fp16 batch measured 1.32x while three such batches pooled gave at most 1.05x."""
    pooled = {k: [] for k in ("ours", "ref", "stock")}
    for name, ref in run.grads["ref"].items():
        scale = ref.pow(2).mean().sqrt()
        assert scale > 0, name
        for k in pooled:
            pooled[k].append((run.grads[k][name].to(torch.float64) / scale).flatten())
    ours, ref, stock = (torch.cat(pooled[k]) for k in ("ours", "ref", "stock"))
    # Scaled in float64 (no rounding added to either side's error).
    assert_exact("LoRA gradients, pooled", ours, ref, stock, max_factor=None)


def _assert_close_to_stock(run: Run, loss_rtol: float, grad_rtol: float):
    """Loss and every LoRA gradient (norm-wise) within the given relative distance of the uncompiled model's."""
    assert run.losses["ours"] == pytest.approx(run.losses["stock"], rel=loss_rtol), run.losses
    for name, stock in run.grads["stock"].items():
        ours = run.grads["ours"][name]
        assert torch.isfinite(ours).all(), name
        d = ((ours - stock).norm() / stock.norm()).item()
        assert d <= grad_rtol, (name, d)


def _assert_bit_equal(loss, grads, run: Run):
    assert loss == run.losses["stock"], (loss, run.losses)
    for name, g in run.grads["stock"].items():
        assert torch.equal(grads[name], g), name


def _assert_stock_path_bit_equal(run: Run):
    """With swiglu disabled nothing fires in fp32, and the compiled model is the uncompiled one bit for bit:
    the loss and every LoRA gradient."""
    torch._dynamo.reset()
    compiled = torch.compile(run.model, backend="fxfuse", options=NOTHING_IN_FP32)
    fxfuse.last_report().graphs.clear()
    loss, grads = _loss_and_grads(compiled, run.inputs)
    assert fxfuse.last_report().counts() == {}, str(fxfuse.last_report())
    _assert_bit_equal(loss, grads, run)


# ------------------------------------------------------------------------------------------------
# fp32
# ------------------------------------------------------------------------------------------------

def _assert_fp32_report(rep: fxfuse.Report):
    # Only swiglu fires in fp32; the attention patterns decline by dtype before their CPU policy.
    assert rep.counts() == {"swiglu": LAYERS}, str(rep)
    assert sorted(rep.where("swiglu")) == MLPS
    attention = [d for d in rep.declines if d.pattern.startswith("sdpa_attention")]
    assert sorted(d.where for d in attention) == ATTNS, str(rep)
    assert all(d.reason == "`query` is torch.float32; the kernel supports torch.bfloat16, torch.float16"
               for d in attention), str(rep)
    # Every norm is left alone and explain lists each one, with the graph's dtype as the reason.
    assert sorted(d.where for d in rep.declines if d.pattern == "rms_norm") == NORMS, str(rep)
    assert all("torch.float32" in d.reason for d in rep.declines if d.pattern == "rms_norm"), str(rep)


def test_fp32_plain_lora_keeps_the_stock_path(fp32_plain):
    run = fp32_plain
    rep = run.explained
    _assert_fp32_report(rep)
    assert run.trained_counts == rep.counts()
    # No LoRA or loss pattern fires on the fp32 graph, and explain says why once for the graph.
    graph_level = {d.pattern for d in rep.declines if d.where == "<graph>"}
    assert {"lora", "causal_lm_loss"} <= graph_level, str(rep)
    # swiglu in fp64 rounds once where stock rounds twice: fp32 rounding apart, no more.
    _assert_close_to_stock(run, loss_rtol=1e-6, grad_rtol=1e-5)
    _assert_gradients_exact(run)
    _assert_stock_path_bit_equal(run)


def test_fp32_qlora_keeps_the_stock_path_and_says_the_dtype(fp32_qlora):
    """bitsandbytes on CPU computes in fp32 (bnb_4bit_compute_dtype=torch.float32). PEFT's casts are no-ops
    then, so the 4-bit LoRA layers take the autocast form, whose pattern declines them by dtype."""
    run = fp32_qlora
    rep = run.explained
    _assert_fp32_report(rep)
    assert _declined(rep, "nf4_lora_autocast") == [(p, NF4_REASON[torch.float32]) for p in PROJS], str(rep)
    # nf4_lora's anchor also reports each 4-bit linear (at its base_layer), by the graph's dtype.
    assert sorted(w for w, _ in _declined(rep, "nf4_lora")) == [p + ".base_layer" for p in PROJS], str(rep)
    assert all("torch.float32" in r for _, r in _declined(rep, "nf4_lora")), str(rep)
    # The 4-bit layers declined run bitsandbytes' own path: with swiglu off, bit-equal to the uncompiled model.
    assert run.trained_counts == {}
    _assert_bit_equal(run.losses["ours"], run.grads["ours"], run)


@pytest.mark.parametrize("quant_type", ["none", "nf4"], ids=["plain", "qlora"])
def test_fp32_every_region_left_alone_is_explained_by_its_dtype(quant_type, fp32_plain, fp32_qlora):
    """Every region left alone is explained by the dtype: at its place, or (where the canonical form dropped the
    no-op casts the pattern is written with, so nothing came close to matching) once for the graph."""
    rep = (fp32_plain if quant_type == "none" else fp32_qlora).explained
    lora = ("lora",) if quant_type == "none" else ("nf4_lora", "nf4_lora_autocast")
    expected = [(("rms_norm",), w) for w in NORMS] + [(lora, p) for p in PROJS] + [(("causal_lm_loss",), LOSS_AT)]
    missing = [(names, w) for names, w in expected
               if not any(d.pattern in names and d.where in (w, "<graph>") and "float32" in d.reason
                          for d in rep.declines)]
    other = [(d.pattern, d.where, d.reason) for d in rep.declines if "float32" not in d.reason]
    assert not missing and not other, f"{len(missing)} places unexplained, {len(other)} other reasons:\n{rep}"


# ------------------------------------------------------------------------------------------------
# fp16
# ------------------------------------------------------------------------------------------------

def test_fp16_plain_lora_fires_every_default_pattern_and_is_exact(fp16_plain):
    run = fp16_plain
    rep = run.explained
    assert rep.counts() == {"rms_norm": 2 * LAYERS + 1, "lora": len(TARGETS) * LAYERS, "swiglu": LAYERS,
                            "causal_lm_loss": 1}, str(rep)
    assert run.trained_counts == rep.counts()
    assert sorted(rep.where("rms_norm")) == NORMS
    assert sorted(rep.where("lora")) == PROJS
    assert sorted(rep.where("swiglu")) == MLPS
    assert rep.where("causal_lm_loss") == [LOSS_AT]
    # Off CUDA only the attention policy keeps SDPA; nothing else is declined.
    assert declines_besides_attention_policy(rep) == [], str(rep)
    assert sorted(d.where for d in rep.declines) == ATTNS
    _assert_gradients_exact(run)
    # And close to the uncompiled fp16 model (whose loss is itself ~5e-6 from float64's, relative).
    _assert_close_to_stock(run, loss_rtol=2e-5, grad_rtol=1e-2)
    assert run.losses["ours"] == pytest.approx(run.losses["ref"], rel=5e-5), run.losses


def test_fp16_qlora_declines_the_4bit_lora_and_fires_the_rest(fp16_qlora):
    """bnb_4bit_compute_dtype=torch.float16: nf4_lora declines each 4-bit LoRA layer with the dtype as its
    reason (bf16 only: bitsandbytes dequantizes to the stored dtype and then casts, which the graph does not
    show); the norms, SwiGLU and the loss fire in fp16."""
    run = fp16_qlora
    rep = run.explained
    assert rep.counts() == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "causal_lm_loss": 1}, str(rep)
    assert run.trained_counts == rep.counts()
    assert sorted(rep.where("rms_norm")) == NORMS
    assert rep.where("causal_lm_loss") == [LOSS_AT]
    assert _declined(rep, "nf4_lora") == [(p, NF4_REASON[torch.float16]) for p in PROJS], str(rep)
    # The autocast form's near misses at the same layers (PEFT's casts are there: not that form).
    autocast = _declined(rep, "nf4_lora_autocast")
    assert [w for w, _ in autocast] == PROJS and all(r.startswith("not this pattern") for _, r in autocast)
    assert {d.pattern for d in declines_besides_attention_policy(rep)} == {"nf4_lora", "nf4_lora_autocast"}
    _assert_gradients_exact(run)
    _assert_close_to_stock(run, loss_rtol=2e-5, grad_rtol=1e-2)
    assert run.losses["ours"] == pytest.approx(run.losses["ref"], rel=5e-5), run.losses


@pytest.fixture(scope="module")
def bf16_with_fp16_4bit_compute():
    """The default bf16 QLoRA model with each 4-bit layer computing in fp16, as
    BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float16) on a bf16 model gives it (bitsandbytes casts x
    to fp16 inside the layer and its output back to bf16): explain's report."""
    import bitsandbytes as bnb
    torch._dynamo.reset()
    model, _ = build(layers=1, twin=False)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == len(TARGETS)
    for m in linears:
        m.compute_dtype = torch.float16
        m.compute_type_is_set = True
    rep = fxfuse.explain(model, options=OPTIONS, **batch(t=8))
    torch._dynamo.reset()
    return rep


ONE_LAYER_PROJS = [p for p in PROJS if p.startswith("layers.0.")]


def test_bf16_model_with_fp16_4bit_compute_keeps_the_4bit_layers_stock(bf16_with_fp16_4bit_compute):
    rep = bf16_with_fp16_4bit_compute
    assert rep.counts() == {"rms_norm": 3, "swiglu": 1, "causal_lm_loss": 1}, str(rep)
    # Each 4-bit layer is reported as declined (the reason: the next test).
    assert sorted(d.where for d in rep.declines if d.pattern == "nf4_lora") == \
        [p + ".base_layer" for p in ONE_LAYER_PROJS], str(rep)


def test_bf16_model_with_fp16_4bit_compute_is_explained_by_the_compute_dtype(bf16_with_fp16_4bit_compute):
    declined = [d for d in bf16_with_fp16_4bit_compute.declines if d.pattern.startswith("nf4_lora")]
    assert len(declined) == len(ONE_LAYER_PROJS), str(bf16_with_fp16_4bit_compute)
    assert all("computing in torch.float16" in d.reason and "bfloat16 compute only" in d.reason
               for d in declined), str(bf16_with_fp16_4bit_compute)
