"""fxfuse's ops as torch.compile sees them on a GPU: traced into their kernel launches, writing only
buffers of their own, one graph for every token count.

On the GPU the ops are `torch.library.triton_op`s (fxfuse/ops/library.py): AOTAutograd decomposes
them and Inductor launches their kernels. Three things must hold, and all are decided before any
kernel runs, so a CPU can check them (tests/traced_ops_child.py: meta tensors and an sm_90 target):
- no op stays an opaque call (it would cost a Python call per step);
- torch's analysis of each kernel's TTIR finds that it writes only buffers the op allocated, each
  passed once: a kernel seen writing one of its inputs, or a buffer it also gets under another
  name, makes Inductor copy that tensor first (x or dy: hundreds of MB; measured on the H200,
  2026-12-01: 45 such copies, 1.7 ms of a 65 ms step, when lora_outer got its output as its bias);
- the token count stays symbolic in every launch (specialising it recompiles for every length).
(The RMSNorm ops stay opaque for now: fxfuse/ops/rms_norm.py says why.)
"""
import json
import os
import subprocess
import sys

import pytest

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traced_ops_child.py")


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, CHILD], capture_output=True, text=True, env=env, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


EXPECTED = {
    # forward: dequant (per weight), xa, adapter term (+ cuBLAS addmm); backward: dxa and dB from one
    # read of dy, dA, dequant again, the adapter term of dx (+ addmm).
    "lora nf4": ["_dequant_4bit_words_kernel", "_rank_r_project_kernel", "_lora_outer_kernel", "_lora_dy_kernel",
                 "_rank_r_weight_grad_kernel", "_dequant_4bit_words_kernel", "_lora_outer_kernel"],
    "lora nf4 group": ["_dequant_4bit_words_kernel"] * 2 + ["_rank_r_project_kernel", "_lora_outer_kernel",
                                                            "_lora_dy_kernel", "_rank_r_weight_grad_kernel"]
    + ["_dequant_4bit_words_kernel"] * 2 + ["_lora_outer_kernel"],
    "lora plain base": ["_rank_r_project_kernel", "_lora_outer_kernel", "_lora_dy_kernel",
                        "_rank_r_weight_grad_kernel", "_lora_outer_kernel"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_op_traces_into_its_kernels(traced, case):
    result = traced[case]
    assert result["opaque"] == [], f"{case}: ops left opaque: {result['opaque']}"
    assert [launch["kernel"] for launch in result["launches"]] == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_kernels_write_only_their_own_buffers(traced, case):
    for launch in traced[case]["launches"]:
        assert launch["written"], f"{launch['kernel']}: the analysis found no output"
        assert launch["written_inputs"] == [], f"{case}: {launch['kernel']} writes inputs {launch['written_inputs']}"
        assert launch["written_aliased"] == [], \
            f"{case}: {launch['kernel']} writes {launch['written_aliased']}, also passed as another argument"


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_token_count_stays_symbolic(traced, case):
    for launch in traced[case]["launches"]:
        assert launch["m_symbolic"] in (None, True), f"{case}: {launch['kernel']} specialised the token count"
