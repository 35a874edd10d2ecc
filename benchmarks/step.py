"""The whole QLoRA training step, side by side: eager, Inductor, Liger Kernel, Unsloth (when installed) and
fxfuse, each system in its own process, on the workload of ../shared/DESIGN.md.

Workload: Llama-3-8B shape (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256), random weights
(seeded, the same for every system), NF4 with double quantization, bf16 compute, LoRA r=16 alpha=32
dropout 0 on q,k,v,o,gate,up,down, batch 2 x 2048 random tokens, gradient checkpointing on (non-reentrant)
or off, AdamW (lr 1e-4) on the adapters. Per system: median step time over the steps after warm-up,
first-step time (compile included), memory (memory_allocated after loading, peak over the steps, and
after the last step: weights, optimizer states, gradients set to None), tokens/s and the losses; with
the float64 system run, each system's per-step relative deviation of its loss from float64's.

    python benchmarks/step.py [--systems eager,inductor,liger,unsloth,fxfuse,float64] [--layers 32] [--seq 2048]
                              [--no-checkpointing] [--steps 12] [--warmup 3] [--json PATH] [--results-md PATH]
                              [--fxfuse-options '{"regional": false}']   # fxfuse's options= (JSON)
    python benchmarks/step.py --systems eager,fxfuse,float64 --steps 17 --warmup 3
        # the loss over the first 20 steps (warm-up included) held to the float64 reference
    python benchmarks/step.py --plot JSON [JSON ...] --png benchmarks/results/step.png   # the chart, anywhere
    FXFUSE_BENCH_DEVICE=cpu TRITON_INTERPRET=1 python benchmarks/step.py --layers 1 --seq 32 --steps 2 --warmup 1 \
        --systems eager,float64,fxfuse   # a tiny CPU run of the same code paths (eager, float64 and fxfuse only)

The random bf16 model is written once to --tmp and each child loads it quantized (bitsandbytes' NF4 at
load, as `from_pretrained(..., quantization_config=...)` does for users). Systems:
  eager     HF transformers + PEFT + bitsandbytes, SDPA attention: the stock path
  inductor  the same under torch.compile (Inductor, default options)
  liger     Liger Kernel's Llama patches (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), eager
  unsloth   Unsloth's FastLanguageModel on the same weights (its own checkpointing: "unsloth")
  fxfuse    torch.compile(model, backend="fxfuse"), default options
  float64   the loss reference: eager's model (same NF4 weights, same LoRA init) converted to float64 with
            the same values, the 4-bit weights dequantized, computed in float64 throughout, AdamW in
            float64. A system more exact than eager can still leave eager's loss by more than 1e-3
            (PEFT's bf16 add rounds the small early adapter term away; fxfuse adds it in float32), so
            each system's loss is held to this one instead (`loss_dev_vs_float64` in the JSON).
            About 64 GB of float64 weights at the 8B shape: an H200 (or a --layers count that fits).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PERF_SYSTEMS = ("eager", "inductor", "liger", "unsloth", "fxfuse")  # the chart's
SYSTEMS = PERF_SYSTEMS + ("float64",)
# Issue 6's targets for this workload with checkpointing (../shared/DESIGN.md), drawn on the chart.
TARGETS_CKPT = {"median_step_ms": 280.0, "peak_gib": 7.0}
DEVICE = os.environ.get("FXFUSE_BENCH_DEVICE", "cuda")  # "cpu": tiny shapes, to try the script out


def _shapes(layers: int) -> dict:
    if DEVICE == "cuda":
        return {**LLAMA3_8B, "num_hidden_layers": layers}
    from qlora_llama import CONFIG
    return {**CONFIG, "num_hidden_layers": layers}


def prepare(args) -> str:
    """The random bf16 model (seed 0) in a folder the children load; reused when it is there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = os.path.join(args.tmp, f"fxfuse-step-{DEVICE}-{args.layers}l")
    if os.path.exists(os.path.join(path, "config.json")):
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            _save_tokenizer(path)
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(**_shapes(args.layers))
    with torch.device(DEVICE):  # random init on the GPU: minutes faster at 8B shapes
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: str) -> None:
    """A small byte-level BPE tokenizer beside the weights, trained offline: Unsloth's from_pretrained loads
    one from the model's folder (the benchmark's batches are random ids, not text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok.train_from_iterator([f"user asks {i} and the assistant answers {i * 7}" for i in range(200)],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def _load(system: str, path: str, args):
    """(model with LoRA, in train mode) for one system."""
    import torch
    if system == "unsloth":
        import unsloth  # noqa: F401  (patches transformers; must come first)
        from unsloth import FastLanguageModel
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, random_state=1,
                                                 use_gradient_checkpointing="unsloth" if args.checkpointing else False)
        model.train()
        return model
    if system == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                    cross_entropy=False)
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map=DEVICE,
                                             attn_implementation="sdpa")
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if system == "float64":
        _to_float64(model)
    model.train()
    return model


def _to_float64(model) -> None:
    """In place: eager's QLoRA model as a float64 model holding the same values, the loss reference.

    Every 4-bit base layer becomes a frozen float64 nn.Linear holding its dequantized weight (the bf16
    values every system computes with; exact in float64), one layer at a time, each Linear4bit freed as
    it is replaced, so the peak is the NF4 model plus the float64 weights. Every other floating parameter
    and buffer (embeddings, norms, lm_head, RoPE's inv_freq, LoRA A and B) is cast to float64. Three
    places in the stock code round through float32 whatever the model's dtype: LlamaRMSNorm, the rotary
    embedding and the causal-LM loss (`.float()`); here they compute in float64. Attention is SDPA's,
    whose math path takes float64 (the fused CUDA kernels do not)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import LoraLayer
    f64 = torch.float64
    # A list of the LoRA layers only: one holding the Linear4bit modules too would keep them all alive.
    for mod in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        if isinstance(mod.base_layer, bnb.nn.Linear4bit):
            old = mod.base_layer
            with torch.no_grad():
                w = bnbf.dequantize_4bit(old.weight.data, old.weight.quant_state).to(f64)
                lin = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                                      device="meta")
                lin.weight = torch.nn.Parameter(w, requires_grad=False)
                if old.bias is not None:
                    lin.bias = torch.nn.Parameter(old.bias.detach().to(f64), requires_grad=False)
            mod.base_layer = lin
            del old, w
    left = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not left, f"4-bit layers outside LoRA's reach: {left[:5]}"
    # nn.Module._apply, not .to(): transformers refuses .to(dtype) on a bitsandbytes-loaded model.
    torch.nn.Module._apply(model, lambda t: t.to(f64) if t.is_floating_point() else t)
    base = model.get_base_model()
    for m in base.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = _rms_norm64.__get__(m)
        elif type(m).__name__.endswith("RotaryEmbedding"):
            assert m.rope_type == "default", m.rope_type
            m.forward = _rotary64.__get__(m)
    base.loss_function = _causal_lm_loss64
    assert base.loss_function is _causal_lm_loss64, "this transformers ignores loss_function's setter"
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _rms_norm64(self, hidden_states):
    """LlamaRMSNorm's forward without its float32 round trip."""
    import torch
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary64(self, x, position_ids):
    """LlamaRotaryEmbedding's forward (default RoPE) in x's dtype rather than float32."""
    import torch
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _causal_lm_loss64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **kwargs):
    """transformers' ForCausalLMLoss without its `logits.float()` (a cast down from float64)."""
    import torch.nn.functional as F
    from transformers.loss.loss_utils import fixed_cross_entropy
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return fixed_cross_entropy(logits.view(-1, vocab_size), shift_labels.view(-1).to(logits.device),
                               num_items_in_batch, ignore_index, **kwargs)


def _sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _allocated_gib():
    import torch
    return torch.cuda.memory_allocated() / 2 ** 30 if DEVICE == "cuda" else None


def _origin(frames: list) -> str:
    """The innermost frames of an allocation's Python stack outside torch's own files."""
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in frames
                      if "/torch/" not in f["filename"] and "<" not in f["filename"])[:400] or "(torch)"


def composition_at_peak(events: list, start_bytes: int, top: int = 30) -> dict:
    """What was live at the highest point of one recorded step: `events`, the allocator's trace of the
    step (torch.cuda.memory._snapshot()["device_traces"][0] from the step's start; `start_bytes`
    allocated then). Allocations made during the step and still live at the peak, the largest first,
    each with its size and origin."""
    live, total, best, best_live = {}, start_bytes, start_bytes, {}
    for ev in events:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
            total -= ev["size"]
        else:
            continue
        if total > best:
            best, best_live = total, dict(live)
    blocks = sorted(best_live.values(), key=lambda ev: -ev["size"])
    return {"peak_gib": best / 2 ** 30, "start_gib": start_bytes / 2 ** 30,
            "made_in_step_live_at_peak_gib": sum(ev["size"] for ev in blocks) / 2 ** 30,
            "largest": [{"mib": ev["size"] / 2 ** 20, "where": _origin(ev.get("frames", []))}
                        for ev in blocks[:top]]}


def live_by_origin(snapshot: dict, top: int = 25) -> list:
    """The blocks live now, summed by origin, the largest sums first (MiB, count, origin)."""
    sums: dict = {}
    for seg in snapshot["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                key = _origin(b.get("frames", []))
                mib, count = sums.get(key, (0.0, 0))
                sums[key] = (mib + b["size"] / 2 ** 20, count + 1)
    return [{"mib": round(m, 2), "count": c, "where": k} for k, (m, c) in
            sorted(sums.items(), key=lambda kv: -kv[1][0])[:top]]


def _grad_summary(model) -> dict:
    """Per kind (lora_A, lora_B): count, overall norm, max, nonzeros and nonzeros below Adam's eps."""
    import torch
    out = {}
    with torch.no_grad():
        for kind in ("lora_A", "lora_B"):
            gs = [p.grad.float() for n, p in model.named_parameters() if kind in n and p.grad is not None]
            out[kind] = {"count": len(gs), "norm": float(torch.stack([g.norm() for g in gs]).norm()),
                         "max": max(float(g.abs().max()) for g in gs),
                         "nonzero": int(sum(int((g != 0).sum()) for g in gs)),
                         "below_adam_eps": int(sum(int(((g != 0) & (g.abs() < 1e-8)).sum()) for g in gs))}
    return out


def run_system(system: str, args) -> dict:
    import torch
    from qlora_llama import batch
    path = prepare(args)
    if DEVICE == "cuda" and args.memory_trace:  # from before the load: every live block's origin is known
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=10_000_000)
    t_load = time.perf_counter()
    model = _load(system, path, args)
    load_s = time.perf_counter() - t_load
    _sync()
    model_gib = _allocated_gib()  # the weights as loaded (float64's converted), before compile and optimizer
    run = model
    if system == "inductor":
        run = torch.compile(model)
    elif system == "fxfuse":
        import fxfuse  # noqa: F401  (registers the backend where the package is not pip-installed)
        run = torch.compile(model, backend="fxfuse", options=json.loads(args.fxfuse_options))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch(vocab=_shapes(1)["vocab_size"], b=args.batch, t=args.seq, seed=1, device=DEVICE)
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, grads, step_peaks = [], [], {}, []
    peak_composition = None
    for i in range(args.warmup + args.steps):
        last = i == args.warmup + args.steps - 1
        if DEVICE == "cuda":
            step_peaks.append(torch.cuda.max_memory_allocated() / 2 ** 30)
            torch.cuda.reset_peak_memory_stats()
            if last and args.memory_trace:
                start_bytes = torch.cuda.memory_allocated()
                start_event = len(torch.cuda.memory._snapshot()["device_traces"][0])
        t0 = time.perf_counter()
        loss = run(**inputs).loss
        loss.backward()
        if i == 0:  # the first step's gradients, to compare systems: norms, and A's (zero under PEFT's B = 0)
            grads = _grad_summary(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        # As the Hugging Face trainer does (it returns loss.detach()): the step's autograd graph goes
        # now, not when the next step's forward replaces it (it holds the embedding's output, a leaf).
        losses.append(loss.item())
        del loss
        if DEVICE == "cuda" and last and args.memory_trace:
            snapshot = torch.cuda.memory._snapshot()
            peak_composition = composition_at_peak(snapshot["device_traces"][0][start_event:], start_bytes)
            peak_composition["live_after_step"] = live_by_origin(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
    if DEVICE == "cuda":
        step_peaks = step_peaks[1:] + [torch.cuda.max_memory_allocated() / 2 ** 30]
    median = statistics.median(times[args.warmup:])
    steady_gib = _allocated_gib()  # weights + optimizer states, gradients set to None
    out = {"system": system, "layers": args.layers, "batch": args.batch, "seq": args.seq,
           "checkpointing": args.checkpointing, "load_s": load_s, "first_step_s": times[0],
           "median_step_ms": 1e3 * median, "step_ms": [1e3 * t for t in times],
           "tokens_per_s": args.batch * args.seq / median, "losses": losses, "step1_grads": grads,
           "peak_gib": max(step_peaks) if DEVICE == "cuda" else None,
           "model_gib": model_gib, "steady_gib": steady_gib, "step_peaks_gib": step_peaks}
    if peak_composition is not None:
        out["last_step_peak"] = peak_composition
    if system == "fxfuse":
        import fxfuse
        out["fired"] = fxfuse.last_report().counts()
        out["declined"] = sorted({f"{d.pattern}: {d.reason}" for d in fxfuse.last_report().declines})[:20]
        out["post_passes"] = sorted({line.split(" at ")[0].split(" (")[0] for line in fxfuse.last_report().post_passes})
        graphs = fxfuse.last_report().graphs
        out["compile_s"] = {"rewrite": sum(g.rewrite_s for g in graphs), "inner_forward": sum(g.inner_compile_s
                                                                                            for g in graphs)}
        out["fxfuse_options"] = json.loads(args.fxfuse_options)
        from torch._dynamo.utils import compile_times  # the first step's compile by phase (seconds, summed)
        names, values = compile_times(repr="csv", aggregate=True)
        out["dynamo_phases_s"] = {n: float(v) for n, v in zip(names, values)}
        out["regional"] = [str(g.regional) for g in graphs]
        out["graph_compile_s"] = [{"inner_forward": g.inner_compile_s, "pieces": getattr(g.regional, "compile_s", None)}
                                  for g in graphs]
    return out


def _child(system: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--tmp", args.tmp, "--fxfuse-options", args.fxfuse_options] + (
               [] if args.checkpointing else ["--no-checkpointing"]) + (["--memory-trace"] if args.memory_trace else [])
    env = dict(os.environ)
    if system == "unsloth" and args.unsloth_site:
        env["PYTHONPATH"] = os.pathsep.join([args.unsloth_site, env.get("PYTHONPATH", "")])
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {args.child_timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = time.time() - t0
            return res
    return {"system": system, "error": (p.stderr or p.stdout)[-1500:]}


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def add_loss_deviations(results: list) -> None:
    """In place: where a float64 result exists, every other system's per-step relative deviation of its
    loss from float64's, |loss - loss64| / |loss64| (`loss_dev_vs_float64`), and its maximum over the steps."""
    ref = next((r for r in results if r.get("system") == "float64" and "error" not in r), None)
    if ref is None:
        return
    for r in results:
        if "error" in r or r is ref:
            continue
        devs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])]
        r["loss_dev_vs_float64"] = devs
        r["max_loss_dev_vs_float64"] = max(devs) if devs else None


def merge(paths: list, out_path: str) -> None:
    """Join runs of one setting into one JSON (systems in SYSTEMS' order), as if run in one call: a 32-layer
    Inductor compile and the float64 reference do not fit in one 10-minute device call with the rest."""
    runs = [json.load(open(p)) for p in paths]
    if len({(r["device"], r["torch"], r["setting"]) for r in runs}) != 1:
        raise SystemExit("--merge: the runs differ in device, torch or setting: "
                         + "; ".join(f"{p}: {r['device']}, {r['torch']}, {r['setting']}" for p, r in zip(paths, runs)))
    results = [dict(r) for run in runs for r in run["results"]]
    names = [r["system"] for r in results]
    if len(set(names)) != len(names):
        raise SystemExit(f"--merge: a system appears twice: {names}")
    results.sort(key=lambda r: SYSTEMS.index(r["system"]))
    add_loss_deviations(results)
    out = {**{k: runs[0][k] for k in ("device", "torch", "setting")},
           "date": " / ".join(sorted({r["date"] for r in runs})), "merged_from": [os.path.basename(p) for p in paths],
           "results": results}
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(table(results))


def table(results: list) -> str:
    """Markdown: one row per system, ratios against eager's step time; memory as peak / after load / steady
    (GiB); with a float64 run, each system's largest relative loss deviation from it over the steps."""
    eager = next((r for r in results if r.get("system") == "eager" and "error" not in r), None)
    f64 = any(r.get("system") == "float64" and "error" not in r for r in results)
    head = ["system", "median step ms", "vs eager", "tokens/s", "GiB peak / load / steady", "first step s",
            "loss step 1 / last"] + (["max loss dev vs float64"] if f64 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error'].strip().splitlines()[-1][:120]} |"
                         + " |" * (len(head) - 2))
            continue
        ratio = r["median_step_ms"] / eager["median_step_ms"] if eager else None
        mem = " / ".join(_fmt(r.get(k), ".2f") for k in ("peak_gib", "model_gib", "steady_gib"))
        row = [r["system"], f"{r['median_step_ms']:.1f}", _fmt(ratio, ".3f"), f"{r['tokens_per_s']:.0f}",
               "-" if mem == "- / - / -" else mem, f"{r['first_step_s']:.1f}",
               f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}"]
        if f64:
            row.append("reference" if r["system"] == "float64" else _fmt(r.get("max_loss_dev_vs_float64"), ".2e"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(paths: list, png: str, floor: str | None = None) -> None:
    """A bar chart of median step time and peak memory per system, one group per JSON file (setting);
    with `floor` (benchmarks/step_floor.py's JSON), the floor of any exact step drawn on the time panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.load(open(p)) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "median_step_ms", "median step (ms)", TARGETS_CKPT["median_step_ms"]),
              (axes[1], "peak_gib", "peak memory (GiB)", TARGETS_CKPT["peak_gib"]))
    for ax, key, label, target in panels:
        width = 0.8 / max(1, len(runs))
        for i, run in enumerate(runs):
            rows = [r for r in run["results"] if "error" not in r and r["system"] in PERF_SYSTEMS]
            xs = [PERF_SYSTEMS.index(r["system"]) + i * width for r in rows]
            bars = ax.bar(xs, [r[key] or 0 for r in rows], width, label=run["setting"])
            ax.bar_label(bars, fmt="%.0f" if key == "median_step_ms" else "%.1f", fontsize=8)
            for j, name in enumerate(PERF_SYSTEMS):
                if name not in {r["system"] for r in rows}:
                    ax.text(j + i * width, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
        if "checkpointing on" in runs[0]["setting"]:
            ax.axhline(target, color="k", linestyle="--", linewidth=0.8)
            ax.text(-0.45, target, "issue 6's target", va="top", ha="left", fontsize=8)
        if floor and key == "median_step_ms":
            low = json.load(open(floor))["floor_ms_checkpointing"]
            ax.axhline(low, color="tab:red", linestyle=":", linewidth=0.8)
            ax.text(0.6, low, "floor of an exact step (GEMMs + SDPA), checkpointing", va="bottom", ha="left",
                    fontsize=7, color="tab:red")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PERF_SYSTEMS))], PERF_SYSTEMS)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"QLoRA training step, Llama-3-8B shape, NF4 + LoRA r=16 ({runs[0]['device']}, {runs[0]['date']})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", default="eager,inductor,liger,unsloth,fxfuse")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--fxfuse-options", default="{}", help="JSON: torch.compile's options= for fxfuse, e.g. "
                    "'{\"regional\": false}' to compile each graph whole")
    ap.add_argument("--unsloth-site", help="a folder with the Unsloth wheels installed (it pins its own trl/datasets)")
    ap.add_argument("--memory-trace", action="store_true",
                    help="record the last step's allocations and report what is live at its peak (JSON last_step_peak)")
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "step.json"))
    ap.add_argument("--results-md", default=None, help="append a dated section with the table here")
    ap.add_argument("--plot", nargs="*", help="draw the chart from these JSON files and exit")
    ap.add_argument("--merge", nargs="*", help="join these JSON files of one setting (systems run in several "
                    "device calls) into --json, with the loss deviations and the table, and exit")
    ap.add_argument("--png", default=os.path.join(HERE, "results", "step.png"))
    ap.add_argument("--floor", default=None, help="with --plot: benchmarks/step_floor.py's JSON, drawn as a line")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.png, args.floor)
        return
    if args.merge:
        merge(args.merge, args.json)
        return
    if args.child:
        print("RESULT " + json.dumps(run_system(args.child, args)), flush=True)
        return
    import torch
    prepare(args)
    results = []
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; one of {SYSTEMS}")
        res = _child(system, args)
        results.append(res)
        if "error" in res:
            print(f"{system}: failed: {res['error'][-600:]}", flush=True)
        else:
            print(f"{system}: median {res['median_step_ms']:.1f} ms, peak {_fmt(res['peak_gib'], '.2f')} GiB (after load "
                  f"{_fmt(res['model_gib'], '.2f')}, steady {_fmt(res['steady_gib'], '.2f')}), first step "
                  f"{res['first_step_s']:.1f} s, losses {[round(x, 4) for x in res['losses']]}"
                  + (f", fired {res['fired']}" if "fired" in res else "") + f", step-1 grads {res['step1_grads']}",
                  flush=True)
    add_loss_deviations(results)
    for r in results:
        if "max_loss_dev_vs_float64" in r:
            print(f"{r['system']}: loss deviation from float64 per step "
                  f"{[float(f'{d:.2e}') for d in r['loss_dev_vs_float64']]}", flush=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    setting = f"{args.layers} layers, {args.batch} x {args.seq}, checkpointing {'on' if args.checkpointing else 'off'}"
    out = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "setting": setting, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    md = table(results)
    print(md)
    if args.results_md:
        with open(args.results_md, "a") as fh:
            fh.write(f"\n## Whole step: {setting} ({out['date']}, {device}, torch {torch.__version__})\n\n"
                     f"`python benchmarks/step.py --systems {args.systems} --layers {args.layers} --seq {args.seq}"
                     f" --steps {args.steps} --warmup {args.warmup}"
                     f"{'' if args.checkpointing else ' --no-checkpointing'}` (JSON {os.path.relpath(args.json)}):\n\n"
                     f"{md}\n")


if __name__ == "__main__":
    main()
