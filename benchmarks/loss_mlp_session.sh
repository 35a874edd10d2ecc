#!/usr/bin/env bash
# Issue 4's GPU checks and timings, from the repository root, carrying .whl
# (bash ../shared/device/fetch_wheels.sh); device calls of at most 10 minutes each:
#   bash benchmarks/loss_mlp_session.sh sections  the loss section (lm_head + ForCausalLMLoss, 2 x 2048 tokens,
#                                                 vocab 128256) and SwiGLU at 4096 x 14336, every system in its own
#                                                 process, exactness against float64 (about 4 minutes; ONLY=loss or
#                                                 ONLY=swiglu runs one of the two)
#   bash benchmarks/loss_mlp_session.sh step      the 4-layer Llama-3-8B-shaped QLoRA training step with the defaults,
#                                                 and with causal_lm_loss and swiglu on (about 3 minutes; PARTS=
#                                                 overrides foundation.py's parts)
# Outputs land in $OUT (or benchmarks/results).
source "$(dirname "$0")/device_env.sh"
case "${1:-}" in
  sections)
    python benchmarks/loss_mlp.py --json "$OUT/loss_mlp.json" ${ONLY:+--only "$ONLY"} 2>&1 | grep -v "^loss:\|^swiglu:" ;;
  step)
    python benchmarks/foundation.py --parts "${PARTS:-step:fxfuse-inductor,step:fxfuse-inductor+causal_lm_loss+causal_lm_loss_sum+swiglu}" \
        --out "$OUT/step_loss_swiglu.json" --results-md /dev/null 2>&1 | cut -c1-900 ;;
  *)
    echo "usage: $0 sections|step" >&2; exit 2 ;;
esac
