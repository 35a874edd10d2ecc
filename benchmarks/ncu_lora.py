"""Drive one eager fwd+bwd of `fxfuse::lora_linear` per case, for Nsight Compute (`ncu`) to read the
hardware counters of its Triton kernels (on Firecracker machines, where ncu works):

    ncu --clock-control none --kernel-name regex:'_lora|_rank_r|_dequant' --section SpeedOfLight \\
        --section WarpStateStats python benchmarks/ncu_lora.py "down 14336->4096"

The cases are benchmarks/nf4_lora.py's. Two iterations: the first compiles the kernels."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import nf4_lora as bench  # noqa: E402

for name in sys.argv[1:] or ["down 14336->4096"]:
    x, projs, dys = bench._make(bench.CASES[name], 4096, 16)
    dys = bench._grads_for("fxfuse", dys)
    run = bench._system_fns("fxfuse", x, projs)
    params = [x] + [t for _, _, a, b in projs for t in (a, b)]
    for _ in range(2):
        torch.autograd.grad(run(), params, dys)
    torch.cuda.synchronize()
