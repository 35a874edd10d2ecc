#!/usr/bin/env bash
# Issue 3's GPU checks and timings, from the repository root, carrying .whl and .whlu
# (bash ../shared/device/fetch_wheels.sh [unsloth]); two device calls of at most 10 minutes each:
#   bash benchmarks/nf4_lora_session.sh timing   exactness of the three GEMM forms, then fwd+bwd times: stock and
#                                                fxfuse-compiled 3 times interleaved, eager fxfuse and Unsloth once
#                                                (about 6 minutes)
#   bash benchmarks/nf4_lora_session.sh checks   per-kernel busy time of the compiled op and of stock, and the
#                                                whole-model gradient check with the traced op (about 4 minutes)
#   bash benchmarks/nf4_lora_session.sh diagnose the CUDA-graph replay kernel by kernel, cuBLAS eager against
#                                                captured, ncu counters of the rank-r kernels (about 6 minutes)
# Outputs land in $OUT (or benchmarks/results).
source "$(dirname "$0")/device_env.sh"
case "${1:-}" in
  timing)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/usite .whlu/*.whl >/dev/null 2>&1
    python benchmarks/nf4_lora.py --unsloth-site /tmp/usite --repeats 3 \
        --json "$OUT/nf4_lora.json" 2>&1 | tail -50 ;;
  checks)
    python benchmarks/kernel_profile.py lora --systems fxfuse-compiled,stock --json "$OUT/lora_profile.json" \
        > "$OUT/lora_profile.txt" 2>&1
    grep -E "^### |^wall" "$OUT/lora_profile.txt"
    python benchmarks/foundation.py --parts grad --out "$OUT/foundation_grad.json" --results-md /dev/null 2>&1 \
        | tail -5 ;;
  diagnose)
    # Where the CUDA-graph replay's time goes (kernels in order, idle gaps), whether capture or the BLAS
    # library changes cuBLAS's choice for the K-extended GEMMs, and the rank-r kernels' hardware counters.
    python benchmarks/kernel_profile.py lora --graph --timeline --systems fxfuse-compiled,stock \
        --case "down,gate/up,gate,up" --json "$OUT/lora_graph_profile.json" > "$OUT/lora_graph_profile.txt" 2>&1
    grep -E "^### |^wall|^span" "$OUT/lora_graph_profile.txt"
    python benchmarks/gemm_k_extension.py --graph --json "$OUT/gemm_graph.json" 2>&1 | tail -20
    timeout 240 ncu --clock-control none --kernel-name regex:'_lora|_rank_r|_dequant' \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        python benchmarks/ncu_lora.py "down 14336->4096" "gate,up group 4096->2x14336" > "$OUT/ncu_lora.txt" 2>&1 || true
    grep -E "^  _|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Stall" "$OUT/ncu_lora.txt" \
        | head -150 ;;
  *) echo "usage: $0 timing|checks|diagnose" >&2; exit 2 ;;
esac
