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


def _run_json(path, systems, setting="1 layers, 2 x 32, checkpointing on", date="2026-12-04"):
    import json
    results = [{"system": s, "losses": [10.0 + i, 9.0 + i], "median_step_ms": 100.0 + i, "tokens_per_s": 1.0,
                "first_step_s": 1.0, "peak_gib": None, "model_gib": None, "steady_gib": None}
               for i, s in systems]
    with open(path, "w") as fh:
        json.dump({"device": "cpu", "date": date, "torch": torch.__version__, "setting": setting,
                   "results": results}, fh)
    return str(path)


def test_merge_joins_runs_of_one_setting(tmp_path, capsys):
    import json
    a = _run_json(tmp_path / "a.json", [(0.0, "fxfuse"), (0.0, "float64")])
    b = _run_json(tmp_path / "b.json", [(1.0, "inductor"), (0.5, "eager")], date="2026-12-05")
    out = str(tmp_path / "merged.json")
    step.merge([a, b], out)
    merged = json.load(open(out))
    assert [r["system"] for r in merged["results"]] == ["eager", "inductor", "fxfuse", "float64"]
    assert merged["date"] == "2026-12-04 / 2026-12-05" and merged["merged_from"] == ["a.json", "b.json"]
    devs = {r["system"]: r.get("max_loss_dev_vs_float64") for r in merged["results"]}
    assert devs == {"eager": pytest.approx(0.5 / 9.0), "inductor": pytest.approx(1.0 / 9.0), "fxfuse": 0.0,
                    "float64": None}
    assert "| inductor | 101.0 |" in capsys.readouterr().out


def test_merge_refuses_other_settings_and_a_system_twice(tmp_path):
    a = _run_json(tmp_path / "a.json", [(0.0, "fxfuse")])
    other = _run_json(tmp_path / "b.json", [(0.0, "eager")], setting="1 layers, 2 x 32, checkpointing off")
    with pytest.raises(SystemExit, match="differ in device, torch or setting"):
        step.merge([a, other], str(tmp_path / "m.json"))
    again = _run_json(tmp_path / "c.json", [(0.0, "fxfuse")])
    with pytest.raises(SystemExit, match="appears twice"):
        step.merge([a, again], str(tmp_path / "m.json"))
