"""A tiny random-weight QLoRA Llama (bitsandbytes NF4 + PEFT LoRA), and its float64 twin.

The twin has the same weights (the NF4 base dequantized, which is exact in float64) so the
exactness criterion can be applied to whole-model gradients: fxfuse's error against the twin must
be no larger than 1.25x the stock bf16 model's error against it.
"""
from __future__ import annotations

import contextlib
import copy
import tempfile

import torch

# Feature sizes are multiples of the NF4 block (64): bitsandbytes' CPU dequantization kernel blocks
# each row separately and disagrees with its own quantizer (and with CUDA) when a row is not a
# whole number of blocks (tests/test_nf4_kernel.py shows it); odd sizes are tested at op level.
CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            # Non-zero B too: with PEFT's zero init the A gradients would be zero and prove nothing.
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device) * 0.05)


def build(layers=2, checkpointing=False, double_quant=True, seed=0, attn="sdpa", lora_dropout=0.0, device="cpu",
          twin=True, rank=8, quant_type="nf4", lora_kwargs=None, config=None, model_cls=None, targets=TARGETS,
          norm_center=1.0, quant_storage=torch.uint8, adapter_dtype=None, dtype=torch.bfloat16,
          **overrides):
    """Return (qlora_model, float64_twin or None), both PEFT-wrapped, in train mode, on `device`.

    `overrides` change the Llama config (e.g. the Llama-3-8B shapes for the GPU check). Another
    architecture: `config` (a transformers config) and `model_cls`, LoRA on `targets`, norm weights
    drawn around `norm_center` (0 for Gemma's `1 + weight` norms). `quant_storage`: the dtype the
    packed 4-bit bytes are stored as (bf16 for FSDP). quant_type "none": no quantization (plain LoRA
    on the bf16 base). `adapter_dtype`: the LoRA weights cast to it after init, as TRL's bf16=True does
    for a 4-bit model (its twin holds the same rounded values). `dtype`: the model's dtype (the base is
    built, saved and loaded in it, and it is bitsandbytes' compute dtype): fp32 or fp16 models."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    import bitsandbytes.functional as bnbf

    model_cls = model_cls or LlamaForCausalLM
    cfg = config if config is not None else LlamaConfig(**{**CONFIG, "num_hidden_layers": layers, **overrides})
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU when there is one: minutes faster at 8B shapes
        base = model_cls(cfg).to(dtype)
    with torch.no_grad():  # random norm weights, not the all-ones init
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(norm_center + 0.1 * torch.randn_like(p))
    path = tempfile.mkdtemp(prefix="fxfuse-qlora-")
    base.save_pretrained(path)
    if quant_type == "none":  # plain LoRA on the bf16 (or `dtype`) base
        q = None
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_quant_storage=quant_storage)
    model = model_cls.from_pretrained(path, quantization_config=q, dtype=dtype, device_map=device,
                                      attn_implementation=attn)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=lora_dropout, target_modules=targets,
                      **(lora_kwargs or {}))
    model.config.use_cache = False
    if twin:
        # The float64 twin: the same weights, the NF4 ones as the 4-bit model actually sees them.
        with torch.device(device):
            twin = model_cls(copy.deepcopy(cfg)).to(torch.float64)
        state = {k: v.to(torch.float64) for k, v in base.state_dict().items()}
        for name, mod in model.named_modules():
            if type(mod).__name__ == "Linear4bit":
                w = mod.weight
                state[name + ".weight"] = bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float64)
        twin.load_state_dict(state)
        twin.config.use_cache = False
        twin = get_peft_model(twin, copy.deepcopy(lcfg))
        _random_lora(twin, seed + 1)
        _cast_lora(twin, adapter_dtype)
        twin.to(torch.float64)
        twin.train()
    else:
        twin = None
    del base
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lcfg)
    _random_lora(model, seed + 1)
    _cast_lora(model, adapter_dtype)
    model.train()
    return model, twin


def _cast_lora(model, dtype):
    if dtype is not None:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)


def batch(vocab=CONFIG["vocab_size"], b=2, t=24, seed=0, device="cpu", layout="plain"):
    """Random token ids and their labels. layout "padded": the last row right-padded by a third (its
    attention_mask 0 and labels -100 there); "packed": every row three sequences packed back to back
    (position_ids restarting at 0, TRL's padding-free batches)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
    out = {"input_ids": ids, "labels": ids.clone()}
    if layout == "padded":
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        mask[-1, t - t // 3:] = 0
        out["attention_mask"] = mask
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif layout == "packed":
        cuts = [0, t // 3, t // 3 + t // 4 + 1, t]
        pos = torch.cat([torch.arange(cuts[i + 1] - cuts[i]) for i in range(3)])
        out["position_ids"] = pos[None].expand(b, t).contiguous().to(device)
    elif layout != "plain":
        raise ValueError(layout)
    return out


@contextlib.contextmanager
def peft_cuda_autocast():
    """What PEFT does under the Trainer's CUDA autocast (bf16=True), on a CPU: bf16 autocast, and
    `torch.is_autocast_enabled()` (no device given: CUDA's flag, which PEFT's 4-bit LoRA reads to
    skip its fp32 casts) answering True. The backward runs outside, as the Trainer runs it."""
    original = torch.is_autocast_enabled

    def enabled(device_type=None):
        return True if device_type is None else original(device_type)
    torch.is_autocast_enabled = enabled
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        torch.is_autocast_enabled = original


def lora_grads(model, inputs, forward_context=contextlib.nullcontext) -> dict:
    model.zero_grad(set_to_none=True)
    with forward_context():
        out = model(**inputs)
    out.loss.backward()
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def declines_besides_attention_policy(report) -> list:
    """report.declines less the attention patterns' policy declines: off CUDA the default policy keeps every
    attention on the stock path (nothing measured there), and explain() says so for each one."""
    return [d for d in report.declines if "no measurement on" not in d.reason]


def check_compiled_gradients(checkpointing: bool, options: dict | None = None, layers: int = 2, t: int = 96,
                             seeds=(1, 2, 3), dynamic: bool = False, forward_context=contextlib.nullcontext,
                             layout: str = "plain", **build_kwargs):
    """Compile a tiny QLoRA Llama with fxfuse, backpropagate a few batches, and hold every LoRA
    gradient to the exactness criterion against the float64 twin and the stock path. Returns the
    backend's report of that compile. `layout`: the batch's form (see `batch`). `forward_context`: around
    the stock and compiled forwards (e.g. peft_cuda_autocast); the float64 twin runs without it.

    The statistic is each tensor's RMS error pooled over the batches (see fxfuse.testing for why
    whole-model gradients use RMS). One batch is too few rounding events: a path with strictly fewer
    roundings than stock (y and dx of LoRA rounded once) measured 1.35x stock on one tensor of one
    96-token batch while its median over all tensors was 0.94x; pooled over three batches no
    tensor exceeds 1.25x unless the path is really less accurate."""
    import fxfuse
    from fxfuse.testing import assert_exact
    model, twin = build(layers=layers, checkpointing=checkpointing, **build_kwargs)
    compiled = torch.compile(model, backend="fxfuse", options=options, dynamic=dynamic)
    fxfuse.last_report().graphs.clear()
    ours, ref, stock = {}, {}, {}
    for seed in seeds:
        inputs = batch(seed=seed, t=t, layout=layout)
        for acc, m, ctx in ((ref, twin, contextlib.nullcontext), (stock, model, forward_context),
                            (ours, compiled, forward_context)):
            for name, g in lora_grads(m, inputs, ctx).items():
                acc.setdefault(name, []).append(g.flatten())
    report = fxfuse.last_report()
    n_targets = len(build_kwargs.get("targets", TARGETS))
    n_layers = build_kwargs["config"].num_hidden_layers if "config" in build_kwargs else layers
    assert ours.keys() == ref.keys() and len(ref) == n_layers * n_targets * 2, sorted(ref)
    for name in ref:
        assert_exact(name, torch.cat(ours[name]), torch.cat(ref[name]), torch.cat(stock[name]), max_factor=None)
    return report
