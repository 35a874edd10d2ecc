"""transformers' `enable_input_require_grads` hook, as fxfuse_autoload replaces it (see that module).

The hook makes the input embeddings' output require grad (for reentrant checkpointing with a frozen
embedding). Its `requires_grad_` on an intermediate cannot stay in a Dynamo graph; torch 2.13 traced the
whole model once per enclosing frame before giving up on it (nine times here), where the replacement makes
Dynamo break at once. Eager results and graphs are as before."""
import pytest
import torch
import transformers.modeling_utils as modeling_utils
from torch._dynamo import symbolic_convert
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fxfuse
import fxfuse_autoload

from qlora_llama import batch, build

HOOK = fxfuse_autoload.make_inputs_require_grads


def _embedding_hooks(model):
    return list(model.get_input_embeddings()._forward_hooks.values())


def test_the_hook_installed_is_the_eager_only_one_and_makes_a_leaf_that_requires_grad():
    assert getattr(modeling_utils.PreTrainedModel.enable_input_require_grads, "fxfuse_patched", False)
    model, _ = build(layers=1, checkpointing=True, twin=False)  # gradient_checkpointing_enable, then by hand
    assert _embedding_hooks(model) and all(h is HOOK for h in _embedding_hooks(model))
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out))
    model(**batch(seed=1, t=7)).loss.backward()
    handle.remove()
    (embeds,) = seen
    assert embeds.requires_grad and embeds.is_leaf and embeds.grad is not None and embeds.grad.abs().sum() > 0
    # transformers' handles still remove what they registered (its last call's hooks: build called it twice).
    before = len(_embedding_hooks(model))
    model.base_model.model.disable_input_require_grads()
    assert len(_embedding_hooks(model)) == before - 1


def test_a_hook_of_another_name_is_left_alone_and_patching_twice_wraps_once():
    model, _ = build(layers=1, twin=False)

    def mine(module, input, output):
        return output

    model.get_input_embeddings().register_forward_hook(mine)
    wrapped = modeling_utils.PreTrainedModel.enable_input_require_grads
    fxfuse_autoload.break_graph_at_input_require_grads(modeling_utils)
    assert modeling_utils.PreTrainedModel.enable_input_require_grads is wrapped
    model.enable_input_require_grads()
    assert _embedding_hooks(model) == [mine, HOOK]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_dynamo_traces_each_layer_once(monkeypatch, checkpointing):
    """With transformers' own hook torch 2.13 inlined each layer's forward 9 times (27 for 3 layers)."""
    traced = []
    build_inline_tracer = symbolic_convert.InliningInstructionTranslator.build_inline_tracer

    def counting(parent, func, *args, **kwargs):
        if getattr(func, "get_code", lambda: None)() is LlamaDecoderLayer.forward.__code__:
            traced.append(func)
        return build_inline_tracer(parent, func, *args, **kwargs)

    monkeypatch.setattr(symbolic_convert.InliningInstructionTranslator, "build_inline_tracer", staticmethod(counting))
    model, _ = build(layers=3, checkpointing=checkpointing, twin=False)
    model.enable_input_require_grads()
    inputs = batch(seed=2, t=9)
    report = fxfuse.Report()
    compiled = torch.compile(model, backend=lambda gm, ex: fxfuse.fxfuse_backend(
        gm, ex, options={"inner": "aot_eager"}, report=report))
    loss = compiled(**inputs).loss
    loss.backward()
    assert len(traced) == 3, len(traced)
    # The graph breaks where it always did: after the embedding, the layers in one graph, patterns firing.
    assert report.counts()["nf4_lora"] == 3 * 7, report.counts()
    stock, _ = build(layers=3, checkpointing=checkpointing, twin=False)
    stock.enable_input_require_grads()
    assert loss.item() == pytest.approx(stock(**inputs).loss.item(), rel=1e-3)
