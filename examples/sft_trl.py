"""Stock TRL supervised fine-tuning of a QLoRA Llama, with fxfuse as the torch.compile backend.

The only fxfuse-specific line is `SFTConfig(torch_compile=True, torch_compile_backend="fxfuse")`:
fxfuse is found through its entry point and is not imported by this script before training. The same
run is then repeated without fxfuse (no compile), and both loss curves are printed side by side.

    python examples/sft_trl.py                              # CPU: tiny model, Triton interpreter
    python examples/sft_trl.py --device cuda --size small   # GPU
    python examples/sft_trl.py --device cuda --size llama3-8b-4layers --steps 20 --checkpointing

Everything is offline: the model is a random-weight Llama built from a config, quantized to NF4 by
bitsandbytes when loaded; the tokenizer is trained on the fly with `tokenizers`; the chat dataset is
generated here.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

if __name__ == "__main__":
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--device", default="cpu")
    if _pre.parse_known_args()[0].device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors: set before import

import torch  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4),
    "llama3-8b-4layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                              num_key_value_heads=8, rope_theta=500000.0),
}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def chat_dataset(n: int, seed: int = 0):
    """A small arithmetic chat dataset in TRL's conversational format."""
    from datasets import Dataset
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, value = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
        rows.append({"messages": [{"role": "user", "content": f"what is {a} {op} {b} ?"},
                                  {"role": "assistant", "content": f"{a} {op} {b} is {value} ."}]})
    return Dataset.from_list(rows)


def tokenizer_for(dataset):
    """A word-level tokenizer trained on the dataset's words, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    words = [f"{m['role']} : {m['content']}" for row in dataset for m in row["messages"]]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qlora_model(size: str, vocab: int, device: str, checkpointing: bool, seed: int = 0):
    """A random-weight Llama of `size`, loaded in NF4 (double quantization), with LoRA r=16 on all linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, **SIZES[size])
    torch.manual_seed(seed)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tempfile.mkdtemp(prefix="fxfuse-sft-")
    base.save_pretrained(path)
    del base
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                             device_map=device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def train(args, dataset, tokenizer, backend: str | None) -> list[float]:
    from trl import SFTConfig, SFTTrainer
    model = qlora_model(args.size, len(tokenizer), args.device, args.checkpointing)
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="fxfuse-sft-out-"), max_steps=args.steps, learning_rate=2e-4,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum, logging_steps=1,
        max_length=args.max_length, packing=args.packing, padding_free=args.packing, seed=0, data_seed=0,
        report_to=[], save_strategy="no", use_cpu=args.device == "cpu",
        # The model is already bf16 (NF4 base, bf16 compute). --bf16 adds the Trainer's autocast, as many
        # scripts do: on CUDA PEFT then leaves out its fp32 adapter casts, and fxfuse's nf4_lora_autocast
        # matches that form (keeping the adapter in fp32, where the stock path rounds A and B to bf16).
        bf16=args.bf16,
        gradient_checkpointing=False,  # already set on the model above (non-reentrant)
        torch_compile=backend is not None, torch_compile_backend=backend,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default=None, choices=list(SIZES), help="default: tiny on CPU, small on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="default: 6 on CPU, 30 on CUDA")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--packing", action="store_true", help="padding-free packed batches")
    ap.add_argument("--bf16", action="store_true", help="SFTConfig(bf16=True): the forward under autocast")
    ap.add_argument("--no-compare", action="store_true", help="skip the run without fxfuse")
    args = ap.parse_args()
    args.size = args.size or ("tiny" if args.device == "cpu" else "small")
    args.steps = args.steps or (6 if args.device == "cpu" else 30)

    dataset = chat_dataset(64 * args.batch)
    tokenizer = tokenizer_for(dataset)
    ours = train(args, dataset, tokenizer, "fxfuse")
    stock = None if args.no_compare else train(args, dataset, tokenizer, None)

    import fxfuse  # only now, to show what it did
    print("\n" + str(fxfuse.last_report()))
    print("\nstep  loss (fxfuse)  loss (without)  rel. diff")
    for i, loss in enumerate(ours):
        other = stock[i] if stock else float("nan")
        print(f"{i + 1:4d}  {loss:13.4f}  {other:14.4f}  {abs(loss - other) / abs(other):9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
