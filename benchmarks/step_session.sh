#!/usr/bin/env bash
# Issue 6's GPU runs (the whole QLoRA step), from the repository root, carrying .whl
# (bash ../shared/device/fetch_wheels.sh); device calls of at most 10 minutes each:
#   bash benchmarks/step_session.sh diagnose   the floor of any exact step (benchmarks/step_floor.py, 32 layers),
#                                              then fxfuse's and eager's 8-layer step profiled by kernel category,
#                                              with fxfuse's compile time split and the memory after load, after a
#                                              step, and at peak (about 5 minutes)
#   bash benchmarks/step_session.sh verify     the GPU-only tests of the loss, regional compilation and offload,
#                                              then every LoRA gradient of 4 Llama-3-8B-shaped layers against the
#                                              float64 twin (benchmarks/foundation.py --parts grad; about 3 minutes)
#   bash benchmarks/step_session.sh step SYSTEMS [step.py options]   benchmarks/step.py for those systems
# Outputs land in $OUT (or benchmarks/results).
source "$(dirname "$0")/device_env.sh"
case "${1:-}" in
  diagnose)
    python benchmarks/step_floor.py --layers 32 --json "$OUT/step_floor.json"
    for variant in fxfuse stock; do
      python benchmarks/kernel_profile.py step --layers "${LAYERS:-8}" --variant $variant \
          --json "$OUT/step_profile_${variant}.json" 2>&1 | grep -v "^\s*$" | cut -c1-300
    done ;;
  verify)
    TRITON_INTERPRET=0 python -m pytest -q -p no:logging -p no:cacheprovider tests/test_cross_entropy.py \
        tests/test_causal_lm_loss.py tests/test_regional.py -k "cuda or offload" 2>&1 | tail -15
    python benchmarks/foundation.py --parts grad --layers 4 --out "$OUT/grad_regional_4l.json" \
        --results-md "$OUT/grad_regional_4l.md" 2>&1 | cut -c1-600 ;;
  step)
    systems=$2; shift 2
    python benchmarks/step.py --systems "$systems" --json "$OUT/step.json" "$@" 2>&1 | cut -c1-600 ;;
  *)
    echo "usage: $0 diagnose|verify|step SYSTEMS [options]" >&2; exit 2 ;;
esac
