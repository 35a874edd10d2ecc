"""What the GPU benchmarks share: the peak memory one call allocates, and a call captured as a CUDA graph."""
from __future__ import annotations

import sys

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


def graph_replay_ms(step) -> tuple[float, float] | None:
    """Device time of one fwd+bwd, replayed as a CUDA graph (no host work between its kernels):
    (back to back: the median over 15 batches of 10 replays queued together, per replay;
    alone: the median of 50 replays each timed by itself, which adds the graph's launch latency,
    up to 0.3 ms at these shapes, to every replay)."""
    try:
        replay = capture_graph(step)

        def median(batch, reps):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(batch):
                    replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / batch)
            return sorted(times)[len(times) // 2]
        return median(10, 15), median(1, 50)
    except Exception as exc:  # not capturable (e.g. a host sync inside)
        print(f"graph_replay_ms: not captured: {type(exc).__name__}: {exc}"[:500], file=sys.stderr)
        return None
