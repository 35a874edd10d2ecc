"""A Triton kernel that fails at run time or while a graph compiles (issue 8: e.g. out of shared memory on
a smaller GPU) is raised as `fxfuse.KernelError` naming the pattern, the op, the kernel and the shapes, and
how to turn the pattern off; errors that are not Triton's pass through unchanged.

The failure is made by replacing one kernel with a stand-in whose launch raises Triton's own
`OutOfResources`, as a kernel asking for more shared memory than the device has does."""
import pytest
import torch
from triton.runtime.errors import OutOfResources

import fxfuse
from fxfuse.kernels import rms_norm as rms_norm_kernels
from fxfuse.kernels.common import interpreted

from test_matcher import HFNorm

EAGER = {"inner": "eager"}


class _OutOfSharedMemory:
    """Launches like a Triton kernel (`kernel[grid](...)`) and fails like one that needs 300 KB of shared memory."""

    def __init__(self, real):
        self.fn = real.fn  # what failed_kernel reads to name the kernel

    def __getitem__(self, grid):
        return self.run

    def run(self, *args, **kwargs):  # as JITFunction.run: `self` in the failing frame
        raise OutOfResources(300_000, 232_448, "shared memory")


def _compiled(options=EAGER, module=None):
    torch._dynamo.reset()
    return torch.compile(module or HFNorm(), backend="fxfuse", options=options)


@pytest.mark.skipif(not interpreted(), reason="the op-level path: ops are custom ops under the interpreter")
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_a_failing_kernel_names_its_pattern_op_and_shapes(monkeypatch, which):
    name = "_rms_norm_fwd_kernel" if which == "forward" else "_rms_norm_bwd_kernel"
    monkeypatch.setattr(rms_norm_kernels, name, _OutOfSharedMemory(getattr(rms_norm_kernels, name)))
    m = _compiled()
    x = torch.randn(4, 3, 40, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(fxfuse.KernelError) as info:
        y = m(x)
        y.sum().backward()
    text = str(info.value)
    op = "fxfuse::rms_norm" + ("_backward" if which == "backward" else "")
    assert op in text and name in text
    assert "patterns that use this op: rms_norm" in text and "'disable': ['rms_norm']" in text
    assert "x: bfloat16[4, 3, 40]" in text  # the op's input shapes
    assert "shared memory, Required: 300000" in text
    assert isinstance(info.value.__cause__, OutOfResources)


def test_the_disable_option_it_names_runs_the_stock_path(monkeypatch):
    monkeypatch.setattr(rms_norm_kernels, "_rms_norm_fwd_kernel",
                        _OutOfSharedMemory(rms_norm_kernels._rms_norm_fwd_kernel))
    norm = HFNorm()
    m = _compiled({**EAGER, "disable": ["rms_norm"]}, norm)
    x = torch.randn(4, 3, 40, dtype=torch.bfloat16)
    assert torch.equal(m(x), norm(x))


def test_a_failure_while_the_inner_compiler_builds_kernels_names_the_graphs_patterns(monkeypatch):
    """As Inductor raises when it compiles its copy of a kernel that cannot fit the device."""
    import fxfuse.backend as backend

    def inner_compile(gm, example_inputs, options, name_failures=None):
        try:
            raise OutOfResources(300_000, 232_448, "shared memory")
        except OutOfResources as e:
            raise RuntimeError("No valid triton configs. while compiling _rms_norm_fwd_kernel") from e
    monkeypatch.setattr(backend, "_inner_compile", inner_compile)
    with pytest.raises(Exception) as info:
        _compiled({"inner": "aot_eager"})(torch.randn(4, 3, 40, dtype=torch.bfloat16))
    err = info.value
    while err is not None and not isinstance(err, fxfuse.KernelError):
        err = err.__cause__ or err.__context__  # Dynamo wraps a backend's exception
    assert err is not None, f"no KernelError in {info.value!r}"
    text = str(err)
    assert "_rms_norm_fwd_kernel" in text and "while compiling graph" in text
    assert "rms_norm x1 (outputs bfloat16[4, 3, 40])" in text and "'disable': ['rms_norm']" in text


def test_errors_that_are_not_triton_failures_pass_through(monkeypatch):
    def bad_forward(*args, **kwargs):
        raise ValueError("rms_norm: an argument check")
    monkeypatch.setattr(rms_norm_kernels, "rms_norm_forward", bad_forward)
    import fxfuse.ops.rms_norm as ops_rms_norm
    if hasattr(ops_rms_norm, "rms_norm_forward"):
        monkeypatch.setattr(ops_rms_norm, "rms_norm_forward", bad_forward)
    with pytest.raises(ValueError, match="an argument check"):
        _compiled()(torch.randn(4, 3, 40, dtype=torch.bfloat16))


def test_a_failure_while_inductor_compiles_the_backward_names_the_graphs_patterns(monkeypatch):
    """Inductor compiles the backward at the first backward, outside the forward's compile: the failure is
    still named (as when it cannot fit its copy of a backward kernel in the device's shared memory)."""
    from torch._inductor import compile_fx as inductor
    real = inductor.compile_fx_inner

    def compile_fx_inner(*args, **kwargs):
        if not kwargs.get("is_backward"):
            return real(*args, **kwargs)
        try:
            raise OutOfResources(300_000, 232_448, "shared memory")
        except OutOfResources as e:
            raise RuntimeError("No valid triton configs for _rms_norm_bwd_kernel") from e
    monkeypatch.setattr(inductor, "compile_fx_inner", compile_fx_inner)
    x = torch.randn(4, 3, 40, dtype=torch.bfloat16, requires_grad=True)
    y = _compiled({"inner": "inductor"})(x)
    with pytest.raises(fxfuse.KernelError) as info:
        y.sum().backward()
    text = str(info.value)
    assert "while Inductor compiled the backward of graph" in text and "_rms_norm_bwd_kernel" in text
    assert "rms_norm x1 (outputs bfloat16[4, 3, 40])" in text and "'disable': ['rms_norm']" in text
