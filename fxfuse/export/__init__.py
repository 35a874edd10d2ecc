"""Export a trained QLoRA model: merge the LoRA adapters into a plain model, and write GGUF.

    merged = fxfuse.export.merge(peft_model, dtype=torch.bfloat16)   # plain transformers model
    merged.save_pretrained("out")                                    # from_pretrained reads it back
    fxfuse.export.to_gguf(merged, "out/model.gguf", dtype="q8_0", tokenizer=tok)   # for llama.cpp

    python -m fxfuse.export ADAPTER_DIR --base BASE_DIR --out OUT [--gguf] [--dtype bf16]

`merge` turns a PEFT model whose frozen base layers are bitsandbytes 4-bit (`Linear4bit`, NF4 or
FP4, single or double quantization) wrapped by PEFT's `lora.Linear4bit` into the same transformers
class with ordinary `nn.Linear` layers: no PEFT, no bitsandbytes. Each merged weight is

    W = round_to_dtype( W4 + scaling * (B @ A) )        (the sum and the product in float64)

where W4 is the base weight exactly as the QLoRA forward saw it: fxfuse's `dequantize_params4bit`
(bit-identical to bitsandbytes) to `quant_state.dtype`, then cast to the layer's compute dtype, as
bitsandbytes' `matmul_4bit` does. B @ A of rank r has r-term dot products, and float64 holds them
and the sum with W4 to far below a bf16/fp16/fp32 ulp, so the merged weight is rounded once, to
nearest even. `dtype=torch.float64` returns the unrounded sum: the float64 evaluation the tests
hold the merged model's logits against (fxfuse.testing.assert_exact).

`to_gguf` writes such a merged Llama-family model as a GGUF file through the `gguf` package
(pip install gguf), with the metadata keys and tensor names llama.cpp's `llama` architecture reads,
and q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does (see `permute_qk`).
"""
from __future__ import annotations

import copy
import json
import math
import os

import torch

__all__ = ["merge", "to_gguf", "permute_qk", "unpermute_qk", "gguf_tensor_name", "read_gguf_tensor",
           "gguf_size_estimate", "GGUF_DTYPES", "MergeError"]


class MergeError(ValueError):
    """The model cannot be merged as asked (a LoRA variant, several adapters, ...)."""


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------

def _peft_types():
    """PEFT classes merge must recognise, or Nones when peft is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper
    except ImportError:  # a model without PEFT layers merges to a plain copy (dequantized)
        return None, None, None
    return LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper


def _is_linear4bit(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _base_weight64(layer, name: str) -> torch.Tensor:
    """The frozen weight of `layer` (a Linear4bit or a plain Linear) as its forward sees it, in float64."""
    if _is_linear4bit(layer):
        from ..kernels.common import interpreted
        from ..kernels.nf4 import dequantize_params4bit
        w = layer.weight
        if w.device.type == "cpu" and not interpreted():
            raise MergeError(f"merge: {name} is a 4-bit weight on the CPU; fxfuse's dequantization is a "
                             f"Triton kernel, so run with TRITON_INTERPRET=1 set before Python starts, "
                             f"or move the model to a CUDA device")
        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU Linear4bit on its first eval-mode, no-grad forward (when
            # the CPU has AVX512-BF16) and rounds its absmax to bf16 on the way: the weights the
            # adapter was trained against are gone, and no inverse gives them back.
            raise MergeError(f"merge: {name} was repacked by bitsandbytes' CPU inference path (an eval-mode "
                             f"forward on the CPU), which rounds its absmax to bf16 irreversibly; reload the "
                             f"model and merge it before any eval-mode CPU forward (or run it in train mode)")
        # bitsandbytes' forward: dequantize to quant_state.dtype (one fp32 product, rounded once),
        # then `.to(x.dtype)`, x being cast to compute_dtype first. That value, not the fp32
        # product, is the weight the adapters were trained against.
        w4 = dequantize_params4bit(w, dtype=qs.dtype)
        compute = getattr(layer, "compute_dtype", None)
        if compute is not None and compute != w4.dtype:
            w4 = w4.to(compute)
        return w4.to(torch.float64)
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise MergeError(f"merge: {name}: base layer {type(layer).__name__} has no floating-point weight "
                         f"(only bitsandbytes Linear4bit and plain Linear bases are supported)")
    return w.detach().to(torch.float64)


def _check_lora_layer(lora, name: str) -> str | None:
    """The one active adapter of a PEFT LoRA layer to merge (None: the layer has none), or raise."""
    if lora.merged or lora.merged_adapters:
        raise MergeError(f"merge: {name} already has adapter(s) {lora.merged_adapters} merged into its base "
                         f"weight (merge_adapter() was called); unmerge_adapter() first so that the 4-bit "
                         f"base is the one the adapter was trained on")
    if lora.disable_adapters:
        raise MergeError(f"merge: adapters are disabled on {name} (inside disable_adapter()?); enable them "
                         f"to merge, or export the base model without an adapter")
    active = list(lora.active_adapters)
    present = [a for a in active if a in lora.lora_A or a in lora.lora_embedding_A]
    if len(active) > 1:
        raise MergeError(f"merge: {name} has several active adapters {active}; merge one adapter at a time "
                         f"(model.set_adapter(name))")
    if not present:
        return None
    adapter = present[0]
    if adapter in lora.lora_embedding_A:
        raise MergeError(f"merge: {name}: LoRA on an embedding layer is not supported")
    if lora.use_dora.get(adapter, False) or adapter in getattr(lora, "lora_variant", {}):
        variant = getattr(lora, "lora_variant", {}).get(adapter)
        kind = "DoRA" if lora.use_dora.get(adapter, False) else type(variant).__name__
        raise MergeError(f"merge: {name} uses a LoRA variant ({kind}) for adapter {adapter!r}; only plain "
                         f"LoRA (scaling * B @ A) is supported")
    if lora.lora_bias.get(adapter, False):
        raise MergeError(f"merge: {name}: adapter {adapter!r} has lora_bias=True, not supported")
    if getattr(lora, "fan_in_fan_out", False):
        raise MergeError(f"merge: {name}: fan_in_fan_out (Conv1D) layers are not supported")
    a, b = lora.lora_A[adapter], lora.lora_B[adapter]
    if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
        raise MergeError(f"merge: {name}: LoRA A/B are {type(a).__name__}/{type(b).__name__}, expected Linear "
                         f"(only LoRA on linear layers is supported)")
    return adapter


def _merged_linear64(lora, adapter: str | None, name: str) -> torch.Tensor:
    """W4 + scaling * B @ A in float64 for one PEFT LoRA layer."""
    base = lora.get_base_layer()
    w = _base_weight64(base, name)
    if adapter is None:
        return w
    a = lora.lora_A[adapter].weight.detach().to(w.device, torch.float64)
    b = lora.lora_B[adapter].weight.detach().to(w.device, torch.float64)
    if (b.shape[0], a.shape[1]) != tuple(w.shape):
        raise MergeError(f"merge: {name}: LoRA B @ A is {b.shape[0]}x{a.shape[1]}, base weight {tuple(w.shape)}")
    # scaling is a Python float (alpha / r, or alpha / sqrt(r) with rsLoRA): exactly a double.
    return w + float(lora.scaling[adapter]) * (b @ a)


def _source(base_model, module_name: str, types):
    """The module of the (possibly PEFT-wrapped) base model that holds the plain model's `module_name`."""
    _, ModulesToSave, TrainableTokens = types
    src = base_model.get_submodule(module_name) if module_name else base_model
    if TrainableTokens is not None and isinstance(src, TrainableTokens):
        raise MergeError(f"merge: {module_name} uses PEFT trainable_token_indices, not supported")
    if ModulesToSave is not None and isinstance(src, ModulesToSave):
        active = list(src.active_adapters)
        if len(active) > 1:
            raise MergeError(f"merge: {module_name} has several active modules_to_save adapters {active}")
        if not src.disable_adapters and active and active[0] in src.modules_to_save:
            return src.modules_to_save[active[0]]  # the fully trained copy
        return src.original_module
    return src


def _plain_config(config, dtype: torch.dtype):
    config = copy.deepcopy(config)
    # The exported model is not quantized: drop bitsandbytes' config, or from_pretrained would
    # quantize it again.
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = dtype
    config.use_cache = True
    return config


def merge(model, dtype: torch.dtype = torch.bfloat16, *, progress: bool = False):
    """Merge the LoRA adapters of a QLoRA model into a plain transformers model of `dtype`.

    model: a PEFT model (or a transformers model with PEFT LoRA layers injected) whose targeted
        linear layers are bitsandbytes `Linear4bit` (NF4/FP4) or plain `nn.Linear`, with one active
        plain-LoRA adapter. Un-targeted `Linear4bit` layers are dequantized.
    dtype: bf16, fp16, fp32 (each weight rounded once from its float64 sum) or fp64 (unrounded).
    Returns a new model of the base model's transformers class, in eval mode, on the device of
    the input's parameters, with `nn.Linear` layers; the input model is not modified.
    Raises MergeError (a ValueError) for DoRA and other LoRA variants, several active adapters,
    adapters already merged into the 4-bit weight, disabled adapters, LoRA on embeddings, and
    8-bit bitsandbytes layers.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"merge: dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"merge: expected a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    types = _peft_types()
    LoraLayer = types[0]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "save_pretrained"):
        raise ValueError(f"merge: the base model ({type(base).__name__}) is not a transformers PreTrainedModel")
    if hasattr(model, "peft_config"):
        active = getattr(model, "active_adapters", None)
        active = list(active() if callable(active) else active or [])
        if len(active) > 1:
            raise MergeError(f"merge: several active adapters {active}; merge one at a time "
                             f"(model.set_adapter(name))")
        for name in active:
            pc = model.peft_config[name]
            peft_type = str(getattr(pc.peft_type, "value", pc.peft_type))
            if peft_type != "LORA":
                raise MergeError(f"merge: adapter {name!r} is {peft_type}, only LoRA is supported")
            if getattr(pc, "use_dora", False):
                raise MergeError(f"merge: adapter {name!r} uses DoRA; only plain LoRA is supported")

    # Refuse layers this module cannot read before allocating anything.
    for name, mod in base.named_modules():
        if LoraLayer is not None and isinstance(mod, LoraLayer):
            _check_lora_layer(mod, name)
        elif type(mod).__name__ in ("Linear8bitLt",):
            raise MergeError(f"merge: {name} is a bitsandbytes 8-bit layer; only 4-bit (Linear4bit) bases "
                             f"are supported")

    cls = type(base)
    plain_config = _plain_config(config, dtype)
    # Built on the meta device: no random init of a model whose every tensor is then overwritten.
    # _from_config with dtype, not .to(dtype): buffers keep the dtype transformers gives them (the
    # rotary inv_freq stays fp32, as from_pretrained of the saved model will have it).
    with torch.device("meta"):
        out = cls._from_config(plain_config, dtype=dtype)
    device = next((p.device for p in base.parameters() if p.device.type != "meta"), torch.device("cpu"))
    out = out.to_empty(device=device)

    tensors = [("param", n, p) for n, p in out.named_parameters()]
    # Buffers (e.g. the rotary inv_freq, non-persistent) are not in checkpoints; to_empty left them
    # uninitialized, so they are copied from the base model too.
    tensors += [("buffer", n, b) for n, b in out.named_buffers()]
    try:
        from tqdm.auto import tqdm
        it = tqdm(tensors, desc="merging", unit="tensor", disable=not progress)
    except ImportError:
        it = tensors
    with torch.no_grad():
        for kind, full, dst in it:
            module_name, _, leaf = full.rpartition(".")
            try:
                src = _source(base, module_name, types)
            except AttributeError:
                raise MergeError(f"merge: the plain {cls.__name__} has {full}, the model to merge has no "
                                 f"{module_name}") from None
            if LoraLayer is not None and isinstance(src, LoraLayer):
                adapter = _check_lora_layer(src, module_name)
                if leaf == "weight":
                    value = _merged_linear64(src, adapter, module_name)
                else:
                    value = getattr(src.get_base_layer(), leaf)
            elif leaf == "weight" and _is_linear4bit(src):
                value = _base_weight64(src, module_name)
            else:
                value = getattr(src, leaf, None)
            if not isinstance(value, torch.Tensor):
                raise MergeError(f"merge: no tensor for {full} in the model to merge")
            if tuple(value.shape) != tuple(dst.shape):
                raise MergeError(f"merge: {full} is {tuple(value.shape)} in the model to merge, "
                                 f"{tuple(dst.shape)} in the plain {cls.__name__}")
            # One rounding: from the float64 sum (or the stored value) to the output dtype.
            dst.copy_(value.detach().to(device=dst.device, dtype=dst.dtype))
    if hasattr(out, "tie_weights"):
        out.tie_weights()
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        out.generation_config = copy.deepcopy(gen)
    return out.eval()


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------

# to_gguf dtype -> (GGML type of 2-D weights, llama.cpp file type). Norms and other 1-D tensors are
# always F32, as convert_hf_to_gguf.py writes them (llama.cpp computes norms in fp32).
GGUF_DTYPES = ("bf16", "f16", "f32", "q8_0")
_Q8_0_BLOCK = 32

_LLAMA_ARCHS = ("llama", "mistral")  # convert_hf_to_gguf.py writes both as arch "llama"


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q_proj/k_proj rows (or bias) from HF's rotate-half RoPE layout to llama.cpp's.

    HF rotates pairs (i, i + head_dim/2) of each head; llama.cpp's llama architecture rotates
    adjacent pairs (2i, 2i + 1). convert_hf_to_gguf.py (LlamaModel.permute) interleaves the two
    halves of every head's rows; so does this. n_head: attention heads for q, KV heads for k."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"permute_qk: {rows} rows are not a whole number of heads x 2 ({n_head} heads)")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"unpermute_qk: {rows} rows are not a whole number of heads x 2 ({n_head} heads)")
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("to_gguf needs the gguf package: pip install gguf") from None
    return gguf


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None)  # transformers 5
    if rp is None:
        rp = dict(getattr(config, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rp = dict(rp)
    if "rope_type" not in rp:
        rp["rope_type"] = rp.get("type", "default")
    return rp


def _llama3_rope_factors(rp: dict, head_dim: int) -> torch.Tensor:
    # Exactly convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (rope_freqs for Llama 3.1+).
    base = rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _llama_hparams(model) -> dict:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in _LLAMA_ARCHS:
        raise ValueError(f"to_gguf: only Llama-family models ({', '.join(_LLAMA_ARCHS)}) are supported, "
                         f"got model_type {model_type!r}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("to_gguf: mlp_bias=True is not supported by llama.cpp's llama architecture")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return dict(n_head=n_head, n_kv=n_kv, head_dim=head_dim)


# HF Llama parameter suffix -> llama.cpp tensor name (per block).
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF Llama parameter (None: not written, e.g. a rotary buffer)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in _BLOCK_TENSORS and leaf in ("weight", "bias"):
            return f"blk.{int(parts[2])}.{_BLOCK_TENSORS[module]}.{leaf}"
    return None


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    """Minimal llama.cpp tokenizer metadata from a Hugging Face tokenizer (see to_gguf)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"to_gguf: the tokenizer has {n} tokens, the model's vocabulary {vocab_size}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    T = gguf.TokenType
    spec = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
    bpe = spec.get("model", {}).get("type") == "BPE" and not spec.get("model", {}).get("byte_fallback", False)
    types = []
    for i, tok in enumerate(tokens):
        if i in special or (i in added and getattr(added[i], "special", False)):
            types.append(T.CONTROL)
        elif i in added:
            types.append(T.USER_DEFINED)
        elif not bpe and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    # Rows of the embedding beyond the tokenizer (vocabularies padded to a multiple): placeholders,
    # as convert_hf_to_gguf.py writes them.
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
    if bpe:
        # A byte-level BPE (GPT-2 / Llama 3 style): tokens and merges.
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        merges = spec["model"].get("merges", [])
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        # SentencePiece-like (Unigram, or BPE with byte fallback): tokens with scores.
        writer.add_tokenizer_model("llama")
        scores = [-float(i) for i in range(len(tokens))]  # BPE: earlier tokens merge first
        vocab = spec.get("model", {}).get("vocab")
        if spec.get("model", {}).get("type") == "Unigram" and isinstance(vocab, list):
            scores[:len(vocab)] = [float(s) for _, s in vocab]
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types([int(t) for t in types])
    for key, adder in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, key, None)
        if tid is not None:
            adder(int(tid))
    if getattr(tokenizer, "add_bos_token", None) is not None:
        writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def gguf_size_estimate(model_or_numel, dtype: str = "bf16") -> int:
    """Bytes of a GGUF file for a model (or a parameter count) in `dtype`, metadata aside."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"gguf dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    numel = model_or_numel if isinstance(model_or_numel, int) else sum(p.numel() for p in model_or_numel.parameters())
    per = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}[dtype]
    return int(numel * per) + (1 << 20)


def to_gguf(model, path, *, dtype: str = "bf16", tokenizer=None, name: str | None = None,
            progress: bool = False) -> str:
    """Write a merged Llama-family model (e.g. `merge(...)`'s result) to a GGUF file for llama.cpp.

    dtype: "bf16", "f16", "f32" or "q8_0" for the 2-D weights (q8_0: ggml's Q8_0, 32-element
        blocks with an fp16 scale, through gguf.quants; a weight whose rows are not a multiple
        of 32 falls back to f16, as in convert_hf_to_gguf.py). Norms and rope factors are f32.
    tokenizer: a Hugging Face tokenizer, for minimal `tokenizer.ggml.*` metadata: the token list,
        token types, scores (SentencePiece-like) or merges (byte-level BPE, pre-tokenizer
        "default"), bos/eos/unk/pad ids, add_bos and the chat template. Without one the file has
        no vocabulary: llama.cpp requires `tokenizer.ggml.model` and refuses to load it, but
        gguf readers and tools that add a vocabulary later can use it. Model-specific
        pre-tokenizers (Llama 3's "llama-bpe" regex, etc.) are not detected; for those, use
        llama.cpp's convert_hf_to_gguf.py on the saved merged model.
    Tied embeddings: output.weight is omitted (llama.cpp then uses token_embd.weight), as the
    converter does. Rope scaling: none, "linear" and "llama3" (the rope_freqs tensor).
    Returns the path written.
    """
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"to_gguf: dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"to_gguf: expected a transformers model, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("to_gguf: the model is PEFT-wrapped; call fxfuse.export.merge(model) first")
    for mname, mod in model.named_modules():
        if _is_linear4bit(mod) or hasattr(mod, "lora_A"):
            raise ValueError(f"to_gguf: {mname or 'the model'} is still quantized or PEFT-wrapped; "
                             f"call fxfuse.export.merge(model) first")
    hp = _llama_hparams(model)
    config = model.config
    path = os.fspath(path)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    rp = _rope_parameters(config)
    rope_type = rp.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"to_gguf: rope type {rope_type!r} is not supported (default, linear, llama3)")

    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or getattr(config, "_name_or_path", None) or "fxfuse-merged")
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_kv"])
    writer.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != config.hidden_size // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rp["factor"]))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer(writer, gguf, tokenizer, vocab_size)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    named = dict(model.named_parameters(remove_duplicate=False))
    if rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rp, hp["head_dim"]).numpy())
    for hf_name, p in named.items():
        gname = gguf_tensor_name(hf_name)
        if gname is None:
            raise ValueError(f"to_gguf: no llama.cpp name for parameter {hf_name}")
        if gname == "output.weight" and tied:
            continue
        t = p.detach().cpu()
        if ".attn_q." in gname:
            t = permute_qk(t, hp["n_head"])
        elif ".attn_k." in gname:
            t = permute_qk(t, hp["n_kv"])
        data, raw_dtype = _encode(gguf, t, dtype)
        writer.add_tensor(gname, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return path


def _encode(gguf, t: torch.Tensor, dtype: str):
    """(numpy data, raw_dtype or None) for GGUFWriter.add_tensor."""
    Q = gguf.GGMLQuantizationType
    if t.dim() < 2 or dtype == "f32":
        return t.to(torch.float32).numpy(), None
    if dtype == "q8_0" and t.shape[-1] % _Q8_0_BLOCK == 0:
        return gguf.quants.quantize(t.to(torch.float32).numpy(), Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        # bf16 bits straight from torch (round to nearest even if the model is wider); numpy has
        # no bf16, so they travel as uint16.
        bits = t.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
        return bits, Q.BF16
    return t.to(torch.float16).numpy(), None  # f16, and q8_0's fallback for rows not of whole blocks


def read_gguf_tensor(reader_tensor) -> torch.Tensor:
    """A GGUFReader tensor back as a float32 torch tensor in HF's [out, in] layout (dequantized)."""
    gguf = _gguf()
    shape = tuple(int(s) for s in reversed(list(reader_tensor.shape)))  # ggml ne is innermost-first
    data = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return torch.from_numpy(data.astype("float32").reshape(shape).copy())
