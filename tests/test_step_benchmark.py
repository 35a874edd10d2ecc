"""benchmarks/step.py's float64 loss reference, in its tiny CPU mode, in this process (no children).

The float64 system is eager's QLoRA model converted to float64 with the same values: its first loss
(LoRA B = 0, so the base model alone) must agree with eager's bf16 loss to bf16's accuracy, every
tensor must be float64 with no 4-bit layer left and no operation rounding through another dtype, and the
parent's deviation fields and table column must appear."""
import argparse
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
import step  # noqa: E402


@pytest.fixture
def args(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "DEVICE", "cpu")
    return argparse.Namespace(layers=1, batch=2, seq=32, checkpointing=True, steps=2, warmup=1, tmp=str(tmp_path))


def test_float64_model_is_float64_throughout(args):
    import bitsandbytes as bnb
    from torch.utils._python_dispatch import TorchDispatchMode
    from qlora_llama import batch
    model = step._load("float64", step.prepare(args), args)
    assert not [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float64}
    others = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            others.update((str(func), t.dtype) for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64)
            return out
    with Dtypes():  # RMSNorm, RoPE and the loss would round through float32 in the stock code
        model(**batch(vocab=step._shapes(1)["vocab_size"], b=2, t=32, seed=1)).loss.backward()
    assert not others, sorted(others)


def test_float64_reference_and_deviation_fields(args):
    results = [step.run_system(s, args) for s in ("eager", "float64")]
    eager, f64 = results
    assert len(f64["losses"]) == args.steps + args.warmup and all(math.isfinite(x) for x in f64["losses"])
    assert abs(eager["losses"][0] - f64["losses"][0]) <= 1e-3 * abs(f64["losses"][0])
    for r in results:
        assert r["model_gib"] is None and r["steady_gib"] is None  # cuda only
    step.add_loss_deviations(results)
    assert "loss_dev_vs_float64" not in f64
    assert len(eager["loss_dev_vs_float64"]) == len(eager["losses"])
    assert eager["max_loss_dev_vs_float64"] == max(eager["loss_dev_vs_float64"]) < 1e-3
    md = step.table(results)
    assert "max loss dev vs float64" in md and "| float64 |" in md and "reference" in md
