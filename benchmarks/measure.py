"""What the GPU benchmarks share: the peak memory one call allocates, and a call captured as a CUDA graph."""
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


def capture_graph(fn):
    """fn captured as a CUDA graph, warmed up first on a side stream (as capture requires): returns the
    graph's `replay`, which launches the same kernels with no host work between them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
