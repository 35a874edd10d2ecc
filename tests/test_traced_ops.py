"""fxfuse's ops as torch.compile sees them on a GPU: traced into their kernel launches, writing only
buffers of their own, one graph for every token count.

On the GPU the ops are `torch.library.triton_op`s (fxfuse/ops/library.py): AOTAutograd decomposes
them and Inductor launches their kernels. Three things must hold, and all are decided before any
kernel runs, so a CPU can check them (tests/traced_ops_child.py: meta tensors and an sm_90 target):
- no op stays an opaque call (it would cost a Python call per step), but for the cuBLAS addmm that
  adds the frozen product in place (fxfuse/ops/nf4_lora.py says why), which must stay in place;
- torch's analysis of each kernel's TTIR finds that it writes only buffers the op allocated, each
  passed once and read by no other node: a kernel seen writing one of its inputs, a buffer it also
  gets under another name, or one that another node reads, makes Inductor copy that tensor first
  (x or dy: hundreds of MB; measured on the H200, 2026-12-01: 45 such copies, 1.7 ms of a 65 ms
  step, when lora_outer got its output as its bias);
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


DQ, PROJECT, OUTER, DY, WGRAD, SPLIT = ("_dequant_4bit_words_kernel", "_rank_r_project_kernel", "_lora_outer_kernel",
                                      "_lora_dy_kernel", "_rank_r_weight_grad_kernel", "_split_columns_kernel")
# The launches of fwd+bwd, and how many cuBLAS addmms add the frozen product in place. Where the output
# is much wider than the input (y of a wide group, dx of down_proj: fxfuse/ops/nf4_lora.py) the GEMM
# is K-extended: the input's copy (made by the kernel reading it for the rank-r product) and the
# dequantized weight get the adapter's bf16 parts as extra columns (SPLIT); elsewhere the adapter
# term (OUTER) plus an in-place addmm.
EXPECTED = {
    "lora nf4": ([DQ, PROJECT, OUTER, DY, WGRAD, DQ, OUTER], 2),
    "lora nf4 narrowing": ([DQ, PROJECT, OUTER, DY, WGRAD, DQ, SPLIT, SPLIT], 1),
    "lora nf4 group": ([DQ, DQ, PROJECT, OUTER, DY, DY, WGRAD, DQ, DQ, OUTER], 2),
    "lora nf4 wide group": ([PROJECT, DQ, DQ, SPLIT, SPLIT, DY, DY, WGRAD, DQ, DQ, OUTER], 1),
    "lora plain base": ([PROJECT, OUTER, DY, WGRAD, OUTER], 2),
    # down_proj reading [gate | up] (activation "swiglu_halves"): the narrowing case's launches around the
    # SwiGLU ops, which are opaque everywhere (fxfuse/ops/swiglu.py): h in the forward, h again and the
    # gradient of [gate | up] in the backward.
    "lora nf4 down of swiglu": ([DQ, PROJECT, OUTER, DY, WGRAD, DQ, SPLIT, SPLIT], 1),
}
OPAQUE = {"lora nf4 down of swiglu": ["fxfuse.swiglu_halves.default", "fxfuse.swiglu_halves_again.default",
                                      "fxfuse.swiglu_halves_backward.default"]}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_op_traces_into_its_kernels(traced, case):
    result = traced[case]
    assert result["opaque"] == OPAQUE.get(case, []), f"{case}: ops left opaque: {result['opaque']}"
    assert [launch["kernel"] for launch in result["launches"]] == EXPECTED[case][0]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_frozen_product_is_added_in_place(traced, case):
    # Each updates a tensor nothing else reads, so Inductor calls it in place (an addmm with a
    # separate output copies its bias matrix into that output first).
    assert [c["op"] for c in traced[case]["in_place"]] == ["fxfuse.frozen_addmm_.default"] * EXPECTED[case][1]
    assert not any(c["shared"] for c in traced[case]["in_place"]), traced[case]["in_place"]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_kernels_write_only_their_own_buffers(traced, case):
    for launch in traced[case]["launches"]:
        assert launch["written"], f"{launch['kernel']}: the analysis found no output"
        assert launch["written_inputs"] == [], f"{case}: {launch['kernel']} writes inputs {launch['written_inputs']}"
        assert launch["written_aliased"] == [], \
            f"{case}: {launch['kernel']} writes {launch['written_aliased']}, also passed as another argument"
        assert launch["written_shared"] == [], \
            f"{case}: {launch['kernel']} updates {launch['written_shared']} in place, which other nodes read too"


@pytest.mark.parametrize("case", ["lora nf4 narrowing", "lora nf4 down of swiglu"])
def test_only_the_op_input_is_saved_at_token_size(traced, case):
    """Under Inductor's partitioner (min-cut rematerialization) the forward keeps, of the token-sized bf16
    tensors, only the op's input (or a view of it): x, or down_proj's [gate | up], never h = silu(gate) * up, which the
    backward forms again (fxfuse::swiglu_halves_again says how that call is kept in the backward)."""
    saved = [t for t in traced[case]["saved"] if t["token_sized"] and t["dtype"] == "torch.bfloat16"]
    assert [t["input"] for t in saved] == [True], saved


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_token_count_stays_symbolic(traced, case):
    for launch in traced[case]["launches"]:
        assert launch["m_symbolic"] in (None, True), f"{case}: {launch['kernel']} specialised the token count"


def test_kernel_access_analysis_runs_once_per_kernel_and_argument_kind(monkeypatch):
    """torch compiles a kernel to TTIR for every launch it traces, to find what the kernel writes (seconds per
    layer of a 32-layer step); fxfuse memoizes the answer for its own kernels, keyed by what the analysis can
    see: each tensor's dtype, every other argument's value, symbolic sizes not at all."""
    import sympy
    import torch
    import triton
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    from fxfuse.kernels.common import memoize_access_analysis
    from fxfuse.kernels.rms_norm import _rms_norm_fwd_kernel as ours

    @triton.jit
    def theirs(x):
        pass

    memoize_access_analysis()
    memoized = getattr(wrap, "identify_accessed_tensors", None) or wrap.identify_mutated_tensors  # torch 2.12+ / 2.11
    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return {"written": ["y"]}
    monkeypatch.setattr(memoized, "original", analysis)
    monkeypatch.setattr(memoized, "fxfuse_memo", {})

    def launch(kernel=ours, tma=None, **kwargs):
        return memoized(kernel, kwargs, tma or {})
    bf16 = dict(dtype=torch.bfloat16)
    first = launch(x=torch.empty(3, **bf16), n=7, eps=1e-5, ACC=triton.language.float32)
    assert first == {"written": ["y"]} and len(calls) == 1
    first["written"].append("x")  # a caller's edit must not reach the next caller
    # Another shape, another symbolic size: the same analysis.
    again = launch(x=torch.empty(5, 2, **bf16), n=7, eps=1e-5, ACC=triton.language.float32)
    assert again == {"written": ["y"]} and len(calls) == 1
    launch(x=torch.empty(3, **bf16), n=sympy.Symbol("s0"), eps=1e-5, ACC=triton.language.float32)
    launch(x=torch.empty(3, **bf16), n=sympy.Symbol("s1"), eps=1e-5, ACC=triton.language.float32)
    assert len(calls) == 2
    # What the analysis sees differently is analysed again: a dtype, a value, a constexpr, True for 1.
    launch(x=torch.empty(3), n=7, eps=1e-5, ACC=triton.language.float32)
    launch(x=torch.empty(3, **bf16), n=8, eps=1e-5, ACC=triton.language.float32)
    launch(x=torch.empty(3, **bf16), n=7, eps=1e-6, ACC=triton.language.float32)
    launch(x=torch.empty(3, **bf16), n=7, eps=1e-5, ACC=triton.language.float64)
    launch(x=torch.empty(3, **bf16), n=True, eps=1e-5, ACC=triton.language.float64)
    assert len(calls) == 7
    # Other libraries' kernels, TMA descriptors and arguments of unknown kinds: never memoized.
    for _ in range(2):
        launch(kernel=theirs, x=torch.empty(3))
        launch(x=torch.empty(3, **bf16), n=7, eps=1e-5, ACC=triton.language.float32, tma={"x": ("stable", (8,))})
        launch(x=torch.empty(3, **bf16), n=[7], eps=1e-5, ACC=triton.language.float32)
    assert len(calls) == 13
