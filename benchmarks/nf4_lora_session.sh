#!/usr/bin/env bash
# Issue 3's GPU checks and timings in one device call (about 8 minutes on an H200), from the repository root,
# carrying .whl and .whlu (bash ../shared/device/fetch_wheels.sh [unsloth]):
#   exactness (three GEMM forms) and fwd+bwd times of every system, 3 interleaved repeats, with the forward
#   K-extended everywhere as a variant (fxfuse-compiled@1); per-kernel busy time of the compiled op; the
#   whole-model gradient check with the traced op. Outputs land in $OUT (or benchmarks/results).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/usite .whlu/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python benchmarks/nf4_lora.py --unsloth-site /tmp/usite --repeats 3 --widening-variants 1 \
    --json "$OUT/nf4_lora.json" 2>&1 | tail -40
python benchmarks/kernel_profile.py lora --systems fxfuse-compiled,stock --json "$OUT/lora_profile.json" \
    > "$OUT/lora_profile.txt" 2>&1
grep -E "^### |^wall" "$OUT/lora_profile.txt"
python benchmarks/foundation.py --parts grad --out "$OUT/foundation_grad.json" --results-md /dev/null 2>&1 | tail -5
