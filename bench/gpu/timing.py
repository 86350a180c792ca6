"""Timing on the GPU machines, shared by the bench/gpu scripts: a CUDA-graph replay of
`calls` calls (no launch overhead, as a decode step's graph runs them), median over replays."""

from __future__ import annotations

import time

import torch


def graph_time(fn, calls: int, replays: int = 5) -> float:
    """Median seconds per call of fn(i) for i in range(calls), captured as one CUDA graph
    (on a CPU, --dry-run: one timed loop)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - t0) / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(2, calls)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]
