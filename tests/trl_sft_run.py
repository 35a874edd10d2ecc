"""Stock TRL SFTTrainer on a tiny random QLoRA Llama with `torch_compile_backend="fxfuse"` and nothing
else fxfuse-specific: fxfuse is not imported before training. Run as a script by tests/test_trl.py;
prints one JSON line with the losses and what fired."""
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


def main():
    texts = [f"user: what is {i} plus {i + 1} ? assistant: it is {2 * i + 1} ." for i in range(48)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=160, special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    model, _ = build(layers=1, twin=False, checkpointing=len(sys.argv) > 1 and sys.argv[1] == "ckpt")
    assert "fxfuse" not in sys.modules, "the test must not import fxfuse before training"
    cfg = SFTConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fxfuse-trl"), max_steps=3,
                    per_device_train_batch_size=4, logging_steps=1, report_to=[], save_strategy="no",
                    torch_compile=True, torch_compile_backend="fxfuse", use_cpu=True, max_length=32,
                    learning_rate=1e-3, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    trainer.train()
    import fxfuse
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"losses": losses, "counts": fxfuse.last_report().counts()}))


if __name__ == "__main__":
    main()
