"""What every fxfuse Triton kernel shares: the interpreter switch and stock-exact rounding and division."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["interpreted", "launch", "round_to", "div_rn"]


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
