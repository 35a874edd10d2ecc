"""What every fxfuse Triton kernel shares: the interpreter switch and stock-exact rounding and division."""
from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl

__all__ = ["interpreted", "launch", "memoize_access_analysis", "round_to", "div_rn"]


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import).

    triton.jit returns an InterpretedFunction instead of a JITFunction then; that is the one
    reliable signal of which path the kernels take."""
    return type(_probe).__name__ == "InterpretedFunction"


def launch(kernel, probe: torch.Tensor):
    """`kernel`, ready for `[grid](...)`: itself for real tensors, `torch.library.wrap_triton(kernel)`
    while torch.compile traces the caller (`probe`, any tensor argument of the launch, is then a
    fake or functional tensor, or a proxy mode is active): the launch then enters the graph, and
    Inductor compiles and launches the kernel itself, with no Python per call at run time."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    if isinstance(probe, (FakeTensor, FunctionalTensor)) or \
            torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return torch.library.wrap_triton(kernel)
    return kernel


def _access_key(value):
    """What of a launch argument can change Inductor's read/write analysis of a kernel, or None when
    the argument is of a kind not seen before (then nothing is cached). The analysis compiles the kernel to
    TTIR with every tensor replaced by a 2-element one of its dtype and every symbolic size by 2, so a
    tensor counts by its dtype, a symbolic value not at all, and any other value by itself."""
    import sympy
    from torch._inductor.ir import TensorBox
    if isinstance(value, (torch.Tensor, TensorBox)):
        return ("tensor", value.dtype)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbolic",)
    try:  # ints, floats, None, tl.dtype constants: by type and value (1 and True must differ)
        hash(value)
    except TypeError:
        return None
    return (type(value).__qualname__, value)


def memoize_access_analysis() -> None:
    """Make Inductor's read/write analysis of fxfuse's kernels run once per kernel and argument kind.

    For every launch of a user Triton kernel in a traced graph, torch compiles the kernel to TTIR to find
    which arguments it writes (`identify_mutated_tensors` in torch 2.11, `identify_accessed_tensors`
    from 2.12), several times per launch (functionalization, graph lowering, the IR node), and caches
    nothing. A checkpointed 32-layer QLoRA step holds thousands of fxfuse launches, nearly all repeats of
    a few dozen (kernel, dtypes, constants) combinations. The answer names the kernel's formal arguments,
    not the tensors passed, so it is the same for every launch with the same key (`_access_key`).
    Kernels of other libraries are left alone."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:
        return
    for name in ("identify_accessed_tensors", "identify_mutated_tensors"):
        analysis = getattr(wrap, name, None)
        if analysis is not None and not hasattr(analysis, "fxfuse_memo"):
            setattr(wrap, name, _memoized(analysis))


def _memoized(analysis):
    """`analysis(kernel, kwargs, tma_descriptor_metadata)`, its answers for fxfuse's kernels memoized."""
    def memoized(kernel, kwargs, tma_descriptor_metadata):
        analyse, memo = memoized.original, memoized.fxfuse_memo
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
            fn = fn.fn
        key = None
        if getattr(fn, "__module__", "").startswith("fxfuse.") and not tma_descriptor_metadata:
            args = tuple((name, _access_key(value)) for name, value in sorted(kwargs.items()))
            if all(k is not None for _, k in args):
                key = (fn, args)
        if key is None:
            return analyse(kernel, kwargs, tma_descriptor_metadata)
        if key not in memo:
            memo[key] = analyse(kernel, kwargs, tma_descriptor_metadata)
        else:
            memoized.hits += 1
        return copy.deepcopy(memo[key])  # callers own their copy, as with the uncached analysis

    memoized.original = analysis
    memoized.fxfuse_memo = {}
    memoized.hits = 0  # analyses saved, for benchmarks/kernel_profile.py
    memoized.__name__ = analysis.__name__
    return memoized


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round `x` (fp32, or fp64 for fp32 outputs) to `dtype`, to nearest even, as torch's .to()."""
    # Triton's interpreter (3.6) converts fp32 -> bf16 by truncation, not round-to-nearest-even,
    # which would make every bf16 result up to 1 ulp off on CPU. When interpreted we therefore
    # round by hand on the bit pattern; on the GPU the native cvt.rn.bf16.f32 is used.
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the kept lsb rounds half to even; a carry out of the mantissa bumps
        # the exponent, which is the correct result (up to +Inf on overflow).
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # A NaN payload could carry into the exponent/sign; keep NaN a (quiet) NaN instead.
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def div_rn(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest, as torch divides. Triton's fp32 `/` is approximate on NVIDIA GPUs
    (div.full); tl.math.div_rn is the IEEE one but takes fp32 only, and fp64 `/` is already IEEE."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)
