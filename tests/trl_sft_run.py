"""Stock TRL SFTTrainer on a tiny random QLoRA Llama with `torch_compile_backend="fxfuse"` and nothing
else fxfuse-specific: fxfuse is not imported before training. Run as a script by tests/test_trl.py;
prints one JSON line (`RESULT {...}`) with what the fxfuse run and the same run on the stock eager path
(no torch_compile, the model built again from the same seed) logged, and what fired.

    python tests/trl_sft_run.py no-ckpt        # padded batches, no gradient checkpointing
    python tests/trl_sft_run.py packed-accum   # packing + padding-free batches, gradient accumulation 2,
                                               # gradient checkpointing

The trainer is spied on only to record what it hands `compute_loss` (the batch's keys and shapes, and
`num_items_in_batch`); the call goes through unchanged."""
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from qlora_llama import build  # noqa: E402

# gradient_checkpointing is set either way: TRL's default is True (the Trainer then enables non-reentrant
# checkpointing on the model itself). pad_to_multiple_of: every batch of a mode has one shape (4x16 padded,
# 1x128 packed), so the run compiles once (recompiles are tests/test_robustness.py's subject, and cost
# minutes here).
MODES = {
    "no-ckpt": dict(gradient_checkpointing=False, pad_to_multiple_of=16),
    "packed-accum": dict(gradient_checkpointing=True, packing=True, padding_free=True, pad_to_multiple_of=128,
                         gradient_accumulation_steps=2),
}
LOG_KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


def tokenizer_and_texts():
    # Three lengths (10, 12 and 14 tokens; 11, 13 and 15 with the EOS TRL appends): padded rows in the padded
    # batches, documents of different lengths packed together in the packed ones.
    forms = ["user: {a} plus {b} ? assistant: {c} .", "user: what is {a} plus {b} ? assistant: {c} .",
             "user: what is {a} plus {b} ? assistant: it is {c} ."]
    texts = [forms[i % 3].format(a=i, b=i + 1, c=2 * i + 1) for i in range(48)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=160,
                                                             special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    return tokenizer, texts


def train(mode: str, compiled: bool) -> dict:
    tokenizer, texts = tokenizer_and_texts()
    # initializer_range 0.1 (not Llama's 0.02), and SGD at lr 1: the random model's next-token distribution
    # is far from uniform and it learns within the 3 steps (loss ~5.3 -> ~4.1, token accuracy 0 -> ~0.3),
    # so the logged loss, entropy and accuracy depend on what the model computes (with the defaults every
    # step logs entropy ~ln(160) and accuracy 0, whatever it computes). SGD rather than AdamW: Adam's first
    # steps are ~lr * sign(gradient), so a near-zero gradient whose sign rounding flips moves its weight by
    # the full lr, and the fxfuse and stock runs part (AdamW at lr 3e-2 measured 4.7e-3 apart in loss by
    # step 3, against <= 1e-3 with SGD).
    model, _ = build(layers=1, twin=False, initializer_range=0.1)
    compile_kwargs = dict(torch_compile=True, torch_compile_backend="fxfuse") if compiled else {}
    cfg = SFTConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fxfuse-trl"), max_steps=3,
                    per_device_train_batch_size=4, logging_steps=1, report_to=[], save_strategy="no",
                    use_cpu=True, max_length=32, optim="sgd", learning_rate=1.0, bf16=False, seed=0,
                    disable_tqdm=True, **MODES[mode], **compile_kwargs)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    calls = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, num_items_in_batch=None, **kwargs):
        calls.append({"keys": sorted(inputs), "input_ids": list(inputs["input_ids"].shape),
                      "targets": int((inputs["labels"][:, 1:] != -100).sum()),
                      "position_ids": inputs["position_ids"].tolist() if "position_ids" in inputs else None,
                      "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch)})
        return compute_loss(model, inputs, *args, num_items_in_batch=num_items_in_batch, **kwargs)

    trainer.compute_loss = spy
    if compiled:
        assert "fxfuse" not in sys.modules, "the test must not import fxfuse before training"
    trainer.train()
    logs = [{k: h.get(k) for k in LOG_KEYS} for h in trainer.state.log_history if "loss" in h]
    hooks = model.get_input_embeddings()._forward_hooks.values()
    return {"logs": logs, "calls": calls, "checkpointing": model.get_base_model().is_gradient_checkpointing,
            "embedding_hooks": sorted({f"{h.__module__}.{h.__name__}" for h in hooks})}


def main():
    mode = sys.argv[1]
    ours = train(mode, compiled=True)
    import fxfuse
    report = fxfuse.last_report()
    result = {"mode": mode, "fxfuse": ours, "counts": report.counts(), "graphs": len(report.graphs),
              "declines": [f"{d.pattern} at {d.where}: {d.reason}" for d in report.declines]}
    result["stock"] = train(mode, compiled=False)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
