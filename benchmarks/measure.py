"""What the GPU benchmarks share: the peak memory one call allocates."""
from __future__ import annotations

import torch


def peak_extra(step, unit: int = 2 ** 20) -> float:
    """Run `step` once (warmed up by the caller) and return the peak memory it allocated above what was
    in use before it, in units of `unit` bytes (MiB by default)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / unit
