"""`python -m fxfuse.export`: merge a trained QLoRA adapter into its base model and save it.

    python -m fxfuse.export ADAPTER_DIR --base BASE_DIR --out OUT [--gguf] [--dtype bf16]

Loads BASE_DIR with bitsandbytes 4-bit quantization as QLoRA training did (NF4, double
quantization, bf16 compute by default; flags change each), attaches the PEFT adapter from
ADAPTER_DIR, merges it (fxfuse.export.merge), writes OUT with save_pretrained (plus the tokenizer
files found in ADAPTER_DIR or BASE_DIR), and with --gguf also OUT/model-<type>.gguf.

The merge must start from the same 4-bit weights training saw, so the base is re-quantized from
BASE_DIR (bitsandbytes' quantization is deterministic) rather than loaded unquantized.
Errors (missing directories, an adapter that does not fit the base, too little disk space) print
one line, `fxfuse.export: error: ...`, and exit with status 2 (1 for anything unexpected).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "vocab.json", "merges.txt")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxfuse.export",
                                description="Merge a QLoRA (bitsandbytes 4-bit + PEFT LoRA) adapter into its "
                                            "base model; save it for transformers and optionally as GGUF.")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory (adapter_config.json)")
    p.add_argument("--base", required=True, metavar="BASE_DIR",
                   help="the base model directory (unquantized, as save_pretrained wrote it)")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="dtype of the merged model (bf16)")
    p.add_argument("--gguf", action="store_true", help="also write OUT/model-<gguf-dtype>.gguf for llama.cpp")
    p.add_argument("--gguf-dtype", choices=["bf16", "f16", "f32", "q8_0"], default=None,
                   help="GGUF weight type (default: --dtype)")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="bnb_4bit_quant_type used in training")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="training used bnb_4bit_use_double_quant=False")
    p.add_argument("--compute-dtype", choices=sorted(_DTYPES), default="bf16",
                   help="bnb_4bit_compute_dtype used in training (bf16)")
    p.add_argument("--device", default="auto",
                   help="where to load and merge: cuda, cpu, or auto (cuda when available). On the CPU "
                        "the Triton dequantization runs in Triton's interpreter")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _check_dirs(args) -> None:
    if not os.path.isdir(args.base):
        raise CliError(f"base model directory not found: {args.base}")
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        raise CliError(f"{args.base} is not a transformers model directory (no config.json)")
    if not os.path.isdir(args.adapter):
        raise CliError(f"adapter directory not found: {args.adapter}")
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise CliError(f"{args.adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise CliError(f"--out {args.out} is not empty (use --force to write into it)")
    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise CliError(f"the adapter is {adapter_config.get('peft_type')}, only LoRA can be merged")
    if adapter_config.get("use_dora"):
        raise CliError("the adapter uses DoRA; only plain LoRA can be merged")


def _base_numel(base_dir: str) -> int:
    """Element count of the base checkpoint, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open
    files = [f for f in os.listdir(base_dir) if f.endswith(".safetensors")]
    if not files:
        raise CliError(f"no .safetensors files in {base_dir}")
    numel = 0
    for name in files:
        with safe_open(os.path.join(base_dir, name), "pt") as f:
            for key in f.keys():
                n = 1
                for s in f.get_slice(key).get_shape():
                    n *= s
                numel += n
    return numel


def _check_disk(args, numel: int) -> int:
    from . import gguf_size_estimate
    itemsize = {"bf16": 2, "f16": 2, "f32": 4}[args.dtype]
    need = numel * itemsize + (1 << 20)
    if args.gguf:
        need += gguf_size_estimate(numel, args.gguf_dtype)
    # The filesystem OUT will be on: OUT itself, or its nearest existing parent.
    where = os.path.abspath(args.out)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < need:
        raise CliError(f"not enough disk space in {where}: the export needs about {need / 2**20:.1f} MiB, "
                       f"{free / 2**20:.1f} MiB free")
    return need


def _device(args) -> str:
    import torch
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA device is available")
    return args.device


def _load(args, device: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = getattr(torch, _DTYPES[args.compute_dtype])
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                           bnb_4bit_use_double_quant=args.double_quant, bnb_4bit_compute_dtype=compute)
    try:
        base = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=q, dtype=compute,
                                                    device_map=device)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the base model from {args.base}: {_one_line(e)}") from None
    try:
        model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False)
    except RuntimeError as e:  # load_state_dict: size mismatch for lora_A/B
        raise CliError(f"the adapter in {args.adapter} does not fit the base model {args.base} "
                       f"(shapes differ): {_one_line(e)}") from None
    except (ValueError, KeyError) as e:  # target modules not found, bad config
        raise CliError(f"the adapter in {args.adapter} does not fit the base model {args.base}: "
                       f"{_one_line(e)}") from None
    _check_adapter_loaded(model, args)
    return model


def _check_adapter_loaded(model, args) -> None:
    # PEFT only warns about adapter tensors it could not place (a checkpoint for other module names);
    # merging then would silently drop them, so every saved tensor must have landed.
    from peft.utils import load_peft_weights
    saved = load_peft_weights(args.adapter, device="cpu")
    names = {n for n, _ in model.named_parameters()}
    missing = []
    for key in saved:
        stem = key.rsplit(".", 1)[0]
        if not any(n.startswith(stem + ".") for n in names):
            missing.append(key)
    if missing:
        raise CliError(f"the adapter in {args.adapter} does not fit the base model {args.base}: "
                       f"{len(missing)} adapter tensors match no module (e.g. {missing[0]})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _copy_tokenizer(args) -> list:
    copied = []
    for src_dir in (args.adapter, args.base):
        for name in _TOKENIZER_FILES:
            src, dst = os.path.join(src_dir, name), os.path.join(args.out, name)
            if os.path.isfile(src) and not os.path.exists(dst):
                shutil.copyfile(src, dst)
                copied.append(name)
    return copied


def run(args) -> None:
    import torch
    if args.gguf_dtype is None:
        args.gguf_dtype = args.dtype
    _check_dirs(args)
    need = _check_disk(args, _base_numel(args.base))
    device = _device(args)
    from ..kernels.common import interpreted
    if device == "cpu" and not interpreted():
        raise CliError("--device cpu needs Triton's interpreter for the 4-bit dequantization: "
                       "run with TRITON_INTERPRET=1 set")
    from . import merge, to_gguf

    print(f"fxfuse.export: loading {args.base} (4-bit {args.quant_type}) + adapter {args.adapter} on {device}",
          file=sys.stderr)
    model = _load(args, device)
    merged = merge(model, dtype=getattr(torch, _DTYPES[args.dtype]), progress=args.progress)
    del model
    os.makedirs(args.out, exist_ok=True)
    merged.save_pretrained(args.out)
    _copy_tokenizer(args)
    if args.gguf:
        tokenizer = None
        if any(os.path.isfile(os.path.join(args.out, f)) for f in ("tokenizer.json", "tokenizer.model")):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(args.out)
        path = os.path.join(args.out, f"model-{args.gguf_dtype}.gguf")
        to_gguf(merged, path, dtype=args.gguf_dtype, tokenizer=tokenizer, progress=args.progress)
        if tokenizer is None:
            print(f"fxfuse.export: warning: no tokenizer in {args.adapter} or {args.base}; {path} has no "
                  f"vocabulary (llama.cpp needs one)", file=sys.stderr)
    print(f"fxfuse.export: wrote {args.out} (estimated {need / 2**20:.1f} MiB)", file=sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except CliError as e:
        print(f"fxfuse.export: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # MergeError and argument errors from merge/to_gguf
        print(f"fxfuse.export: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
