"""fxfuse.export: merging a QLoRA adapter into a plain model, GGUF export, and the CLI.

The merged model is held to the exactness criterion: its logits' error against a float64
evaluation (the same merge kept in float64, which equals the QLoRA model evaluated in float64)
is no larger than 1.25x that of the un-merged QLoRA model run in bf16 (what the user had).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qlora_llama import CONFIG, TARGETS, _random_lora, batch, build  # noqa: E402

from fxfuse.export import (GGUF_DTYPES, MergeError, merge, permute_qk, read_gguf_tensor,  # noqa: E402
                           to_gguf, unpermute_qk)
from fxfuse.testing import assert_exact  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def qlora():
    # The QLoRA model stays in train mode (dropout is 0): in eval mode bitsandbytes' CPU path
    # repacks the 4-bit weights with a bf16-rounded absmax, another model than the trained one.
    model, twin = build(layers=2)
    return model, twin.eval()


@pytest.fixture(scope="module")
def merged(qlora):
    model, _ = qlora
    return merge(model), merge(model, dtype=torch.float64)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------

def test_merge_is_plain_and_exact(qlora, merged):
    model, twin = qlora
    m16, m64 = merged
    assert type(m16).__name__ == "LlamaForCausalLM" and not hasattr(m16, "peft_config")
    for name, mod in m16.named_modules():
        assert "lora" not in name and type(mod).__name__ not in ("Linear4bit", "LoraLayer"), name
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert getattr(m16.config, "quantization_config", None) is None
    # Each merged weight is its float64 sum rounded once.
    sd16, sd64 = m16.state_dict(), m64.state_dict()
    for k in sd16:
        assert torch.equal(sd16[k], sd64[k].to(torch.bfloat16)), k
    # The float64 merge is the QLoRA model in float64 (the twin built independently in
    # qlora_llama: bitsandbytes' dequantization + PEFT's forward), to rounding of float64.
    ids = batch(t=32)["input_ids"]
    ref = _logits(m64, ids)
    torch.testing.assert_close(_logits(twin, ids), ref, rtol=1e-12, atol=1e-12)
    stock = _logits(model, ids)
    assert stock.dtype == torch.bfloat16
    assert_exact("merged bf16 logits", _logits(m16, ids), ref, stock)
    # fp32 merge: far inside the bound.
    assert_exact("merged fp32 logits", _logits(merge(model, dtype=torch.float32), ids), ref, stock, factor=0.1,
                 max_factor=0.1)


def test_save_pretrained_round_trip(merged, tmp_path):
    from transformers import AutoModelForCausalLM
    m16, _ = merged
    m16.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is type(m16)
    sd, sd_back = m16.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert sd_back[k].dtype == sd[k].dtype and torch.equal(sd_back[k], sd[k]), k
    ids = batch(t=16)["input_ids"]
    assert torch.equal(_logits(back, ids), _logits(m16, ids))


def test_merge_fp4_single_quant_bias():
    # FP4, single quantization, attention biases (kept by Linear4bit), one layer.
    model, twin = build(layers=1, quant_type="fp4", double_quant=False, attention_bias=True, seed=3)
    twin.eval()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    m16, m64 = merge(model), merge(model, dtype=torch.float64)
    bias = m16.model.layers[0].self_attn.k_proj.bias
    src = model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.bias
    assert torch.equal(bias, src.to(torch.bfloat16))
    ids = batch(t=24, seed=4)["input_ids"]
    ref = _logits(m64, ids)
    torch.testing.assert_close(_logits(twin, ids), ref, rtol=1e-12, atol=1e-12)
    assert_exact("fp4 merged logits", _logits(m16, ids), ref, _logits(model, ids))
    # An eval-mode CPU forward lets bitsandbytes repack the weights (absmax rounded to bf16) on
    # CPUs with AVX512-BF16; merge must then refuse rather than merge other weights.
    model.eval()
    _logits(model, ids)
    if any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
           for m in model.modules() if type(m).__name__ == "Linear4bit"):
        with pytest.raises(MergeError, match="repacked"):
            merge(model)


def test_merge_refusals(qlora):
    model, _ = qlora
    with pytest.raises(ValueError, match="dtype"):
        merge(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="expected a torch.nn.Module"):
        merge("model")
    with model.disable_adapter(), pytest.raises(MergeError, match="disabled"):
        merge(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    # An adapter merged into the 4-bit weight (merge_adapter() would re-quantize it; the flag suffices).
    q.merged_adapters.append("default")
    try:
        with pytest.raises(MergeError, match="already has adapter"):
            merge(model)
    finally:
        q.merged_adapters.clear()
    # Several active adapters.
    from peft import LoraConfig
    model.add_adapter("second", LoraConfig(r=4, target_modules=TARGETS))
    try:
        model.base_model.set_adapter(["default", "second"])
        with pytest.raises(MergeError, match="several active adapters"):
            merge(model)
    finally:
        model.base_model.set_adapter("default")
        model.delete_adapter("second")
    merge(model)  # back to normal


def test_merge_refuses_dora():
    model, _ = build(layers=1, twin=False, lora_kwargs={"use_dora": True}, seed=5)
    with pytest.raises(MergeError, match="DoRA"):
        merge(model)


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------

def _hf_permute(weights, n_head, n_head_kv):
    # convert_hf_to_gguf.py's LlamaModel.permute, verbatim: the spec permute_qk must match.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_permute_qk_is_llama_cpp_rope_layout():
    g = torch.Generator().manual_seed(0)
    n_head, head_dim, hidden = 4, 16, 64
    w = torch.randn(n_head * head_dim, hidden, generator=g, dtype=torch.float64)
    assert torch.equal(permute_qk(w, n_head), _hf_permute(w, n_head, None))
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert torch.equal(permute_qk(w[:32], 2), _hf_permute(w[:32], 4, 2))
    # HF's rotate-half RoPE on W x equals llama.cpp's adjacent-pair RoPE on permute(W) x, permuted.
    x = torch.randn(hidden, generator=g, dtype=torch.float64)
    theta = torch.rand(head_dim // 2, generator=g, dtype=torch.float64) * 3
    cos, sin = theta.cos(), theta.sin()
    q = (w @ x).reshape(n_head, head_dim)
    x1, x2 = q[:, :head_dim // 2], q[:, head_dim // 2:]
    hf = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(-1)
    qp = (permute_qk(w, n_head) @ x).reshape(n_head, head_dim // 2, 2)
    a, b = qp[..., 0], qp[..., 1]
    cpp = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(-1)
    torch.testing.assert_close(cpp, permute_qk(hf, n_head), rtol=0, atol=1e-12)


def _expected_gguf_tensors(model):
    cfg = model.config
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
           "output.weight": model.lm_head.weight}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i, layer in enumerate(model.model.layers):
        for hf, g in names.items():
            out[f"blk.{i}.{g}.weight"] = getattr(layer.self_attn, hf).weight
        for hf, g in {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}.items():
            out[f"blk.{i}.{g}.weight"] = getattr(layer.mlp, hf).weight
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
    assert len(out) == 3 + 9 * cfg.num_hidden_layers
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("dtype", GGUF_DTYPES)
def test_gguf(merged, tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    m16, _ = merged
    cfg = m16.config
    path = to_gguf(m16, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    expected_meta = {
        "general.architecture": "llama", "llama.vocab_size": CONFIG["vocab_size"],
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    for key, value in expected_meta.items():
        assert fields[key] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)

    expected = _expected_gguf_tensors(m16)
    got = {t.name: t for t in reader.tensors}
    assert got.keys() == expected.keys()
    Q = gguf.GGMLQuantizationType
    for name, ref in expected.items():
        t = got[name]
        value = read_gguf_tensor(t)
        assert tuple(value.shape) == tuple(ref.shape), name
        if ".attn_q." in name:
            value = unpermute_qk(value, cfg.num_attention_heads)
        elif ".attn_k." in name:
            value = unpermute_qk(value, cfg.num_key_value_heads)
        ref = ref.float()
        if ref.dim() == 1 or dtype == "f32":
            assert t.tensor_type == Q.F32 and torch.equal(value, ref), name
        elif dtype == "bf16":
            assert t.tensor_type == Q.BF16 and torch.equal(value, ref), name
        elif dtype == "f16":
            assert t.tensor_type == Q.F16 and torch.equal(value, ref.half().float()), name
        else:
            # Q8_0: per 32-element block, d = amax / 127 stored as fp16 and q = round(x / d); the
            # error is at most d/2 plus d's own fp16 rounding carried to |q| <= 127.
            assert t.tensor_type == Q.Q8_0, name
            blocks, vblocks = ref.reshape(-1, 32), value.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / 127
            bound = d * (0.5 + 127 * 2.0 ** -11) + 1e-12
            assert ((vblocks - blocks).abs() <= bound).all(), name
            assert (vblocks - blocks).abs().max() > 0  # really quantized


def test_gguf_refusals(qlora, merged, tmp_path):
    pytest.importorskip("gguf")
    model, _ = qlora
    m16, _ = merged
    with pytest.raises(ValueError, match="merge"):
        to_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="dtype"):
        to_gguf(m16, tmp_path / "x.gguf", dtype="q4_k")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="Llama-family"):
        to_gguf(qwen, tmp_path / "x.gguf")


def _tiny_tokenizer(vocab_size):
    """A SentencePiece-like (Unigram) fast tokenizer with `vocab_size` tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581" + a for a in letters] + list(letters)
    words += ["\u2581" + a + b for a in letters for b in "aeiou"]
    pieces += [(w, -1.0 - i / 100) for i, w in enumerate(words[:vocab_size - 3])]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_gguf_tokenizer_and_llama_cpp(merged, tmp_path):
    gguf = pytest.importorskip("gguf")
    m16, m64 = merged
    tok = _tiny_tokenizer(CONFIG["vocab_size"])
    assert len(tok) == CONFIG["vocab_size"]
    path = to_gguf(m16, tmp_path / "m.gguf", dtype="bf16", tokenizer=tok)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert len(fields["tokenizer.ggml.tokens"]) == CONFIG["vocab_size"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    with pytest.raises(ValueError, match="tokens"):
        to_gguf(m16, tmp_path / "small.gguf", tokenizer=_tiny_tokenizer(CONFIG["vocab_size"] + 40))

    llama_cpp = pytest.importorskip("llama_cpp")
    ids = batch(b=1, t=12, seed=7)["input_ids"][0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    import numpy as np
    got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)).double()
    llm.close()
    ref = _logits(m64, torch.tensor([ids]))[0]
    hf = _logits(m16, torch.tensor([ids]))[0]
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # llama.cpp on the bf16 GGUF is as close to the float64 merge as transformers on the bf16
    # merged model (measured: 4.4e-3 vs 4.5e-3 max abs error, logits of size 0.6); a wrong q/k
    # permutation or metadata value gives errors of the logits' own size.
    assert (got - ref).abs().max() <= 2 * (hf.double() - ref).abs().max()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _env():
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, prelude=""):
    code = (f"import runpy, sys; {prelude or 'pass'}; sys.argv = ['fxfuse.export'] + {list(map(str, args))!r}; "
            f"runpy.run_module('fxfuse.export', run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base saved unquantized (as from the hub), and a LoRA adapter trained on its 4-bit version."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("cli")
    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(11)
    base = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": 1})).to(torch.bfloat16)
    base.save_pretrained(base_dir)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    _random_lora(model, 12)
    model.save_pretrained(adapter_dir)
    _tiny_tokenizer(CONFIG["vocab_size"]).save_pretrained(base_dir)
    return base_dir, adapter_dir, model


def test_cli_export(trained, tmp_path):
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, model = trained
    out = tmp_path / "out"
    r = _cli(adapter_dir, "--base", base_dir, "--out", out, "--gguf", "--gguf-dtype", "q8_0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    back = AutoModelForCausalLM.from_pretrained(out)
    # Re-quantizing the base is deterministic, so the CLI's merge equals the in-process one.
    expected = merge(model).state_dict()
    got = back.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert (out / "tokenizer.json").is_file() and (out / "model-q8_0.gguf").is_file()
    gguf = pytest.importorskip("gguf")
    fields = gguf.GGUFReader(out / "model-q8_0.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"


def test_cli_errors(trained, tmp_path):
    base_dir, adapter_dir, _ = trained

    def fails(r, message):
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("fxfuse.export: error:") and message in lines[-1], r.stderr

    fails(_cli(adapter_dir, "--base", tmp_path / "nope", "--out", tmp_path / "o1"), "base model directory not found")
    # Not enough disk space: shutil.disk_usage reports 1 MiB free.
    fails(_cli(adapter_dir, "--base", base_dir, "--out", tmp_path / "o2", "--device", "cpu",
               prelude="import shutil, collections; shutil.disk_usage = lambda p: "
                       "collections.namedtuple('u', 'total used free')(2**30, 2**30 - 2**20, 2**20)"),
          "not enough disk space")
    assert not (tmp_path / "o2").exists()
    # An adapter for another base: targets this base lacks, and shapes it does not have.
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["qkv_proj"]}))
    (bad / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    fails(_cli(bad, "--base", base_dir, "--out", tmp_path / "o3", "--device", "cpu"), "does not fit the base")
    from transformers import LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": 1, "intermediate_size": 192})).save_pretrained(other)
    fails(_cli(adapter_dir, "--base", other, "--out", tmp_path / "o4", "--device", "cpu"), "does not fit the base")
