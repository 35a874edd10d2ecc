"""Every fxfuse Triton kernel compiles for the H100/H200 (sm_90), the A100 (sm_80) and Ada (sm_89) at the
Llama-3-8B shapes, on a CPU, and the kernels of the default patterns fit each one's shared memory.

benchmarks/sm90_resources.py runs the kernels' host functions on meta tensors with a stand-in sm_90
driver: each launch goes through Triton's whole compile (TTIR to cubin, ptxas included) without a
GPU. The interpreter the other tests use never compiles a kernel, so an error only the GPU compile
hits (an op Triton cannot lower for sm_90, a shared-memory overflow, a constexpr mismatch on the real
path) shows here first. Runs in a child process: the stand-in driver must not reach the interpreted
tests."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {"_rank_r_project_kernel", "_rank_r_weight_grad_kernel", "_lora_dy_kernel", "_lora_outer_kernel",
            "_split_columns_kernel", "_dequant_4bit_words_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
            "_rope_kernel", "_rope_qk_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_ce_fwd_kernel",
            "_ce_bwd_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}


# The kernels behind the patterns that are on by default (rms_norm, nf4_lora, swiglu, causal_lm_loss): these
# must also fit the shared memory of the other GPUs QLoRA users train on (A100; RTX 30xx/40xx at 99 KiB per block).
DEFAULT_ON = {"_rank_r_project_kernel", "_rank_r_weight_grad_kernel", "_lora_dy_kernel", "_lora_outer_kernel",
              "_split_columns_kernel", "_dequant_4bit_words_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
              "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel"}


@pytest.mark.parametrize("arch", [90, 80, 89])
def test_every_kernel_compiles(tmp_path, arch):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sm90_resources.py"), "--arch", str(arch),
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert EXPECTED <= {r["kernel"] for r in rows}, sorted(EXPECTED - {r["kernel"] for r in rows})
    for r in rows:
        # ptxas reported on each: a register count in range and at least one program per SM.
        assert 0 < r["registers"] <= 255 and r["programs_per_sm"] >= 1, r
    assert not DEFAULT_ON & set(res["over_the_shared_memory_limit"]), res["over_the_shared_memory_limit"]
