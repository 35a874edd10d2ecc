#!/usr/bin/env bash
# Issue 3's GPU checks and timings, from the repository root, carrying .whl and .whlu
# (bash ../shared/device/fetch_wheels.sh [unsloth]); two device calls of at most 10 minutes each:
#   bash benchmarks/nf4_lora_session.sh timing   exactness of the three GEMM forms, then fwd+bwd times: stock,
#                                                fxfuse-compiled and the variant fxfuse-compiled@1 (every widening
#                                                forward K-extended) 3 times interleaved, eager fxfuse and Unsloth
#                                                once (about 7 minutes)
#   bash benchmarks/nf4_lora_session.sh checks   per-kernel busy time of the compiled op and of stock, and the
#                                                whole-model gradient check with the traced op (about 4 minutes)
# Outputs land in $OUT (or benchmarks/results).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
case "${1:-}" in
  timing)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/usite .whlu/*.whl >/dev/null 2>&1
    python benchmarks/nf4_lora.py --unsloth-site /tmp/usite --repeats 3 --widening-variants 1 \
        --json "$OUT/nf4_lora.json" 2>&1 | tail -50 ;;
  checks)
    python benchmarks/kernel_profile.py lora --systems fxfuse-compiled,stock --json "$OUT/lora_profile.json" \
        > "$OUT/lora_profile.txt" 2>&1
    grep -E "^### |^wall" "$OUT/lora_profile.txt"
    python benchmarks/foundation.py --parts grad --out "$OUT/foundation_grad.json" --results-md /dev/null 2>&1 \
        | tail -5 ;;
  *) echo "usage: $0 timing|checks" >&2; exit 2 ;;
esac
