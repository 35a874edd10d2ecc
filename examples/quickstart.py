"""fxfuse in one screen: a QLoRA Llama (NF4 base + LoRA), compiled with `backend="fxfuse"`, trained a
few steps beside the same model without fxfuse; prints what fxfuse rewrote and both loss curves.

    python examples/quickstart.py                      # CPU: tiny model, Triton interpreter
    python examples/quickstart.py --device cuda --size small

Offline: the model is built from a config with random weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

if __name__ == "__main__":
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--device", default="cpu")
    if _pre.parse_known_args()[0].device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors: set before import

import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import fxfuse

SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4),
}


def qlora_llama(size: str, device: str):
    cfg = LlamaConfig(**SIZES[size])
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="fxfuse-quickstart-")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map=device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def train(model, batches, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, t0 = [], time.perf_counter()
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    stock = qlora_llama(args.size, args.device)
    ours = copy.deepcopy(stock)
    g = torch.Generator().manual_seed(1)
    vocab = SIZES[args.size]["vocab_size"]
    batches = [torch.randint(0, vocab, (2, args.seq), generator=g).to(args.device) for _ in range(args.steps)]

    print(fxfuse.explain(ours, input_ids=batches[0], labels=batches[0]))
    compiled = torch.compile(ours, backend="fxfuse")  # the only change a user makes
    fx_losses, fx_time = train(compiled, batches)
    st_losses, st_time = train(stock, batches)
    print(f"\n{'step':>4}  {'stock loss':>10}  {'fxfuse loss':>11}")
    for i, (a, b) in enumerate(zip(st_losses, fx_losses)):
        print(f"{i:>4}  {a:>10.4f}  {b:>11.4f}")
    print(f"\nwall time: stock {st_time:.1f}s, fxfuse {fx_time:.1f}s (first step includes compilation)")
    worst = max(abs(a - b) / abs(a) for a, b in zip(st_losses, fx_losses))
    print(f"largest relative loss difference: {worst:.2e}")


if __name__ == "__main__":
    main()
