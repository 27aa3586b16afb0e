"""How a provider's step is timed: CPU by wall clock over rounds, CUDA by triton.testing.do_bench.

CPU: `warmup` untimed calls, then `rounds` calls each timed with time.perf_counter (garbage collection
left on); the median is reported with the interquartile range, whose quartiles are computed as
pytest-benchmark computed them (the CPU benchmark's harness until 2026-11), so older IQRs compare.
CUDA: the median of triton.testing.do_bench (which synchronizes and clears the L2 cache between calls)
for each mode asked: full (forward + backward), forward, backward (of one retained graph). For the
latency-bound sizes two more views of the full step: a back-to-back eager loop synchronized once at the
end (what a training loop sees: host work and launches included, warm L2), and the replay of the step
captured as a CUDA graph (host work and launch gaps gone; impossible where the step syncs or touches CPU
tensors, which the run records).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


def time_cpu(step, rounds: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    q1, q3 = _quartiles(sorted(times))
    return {"full_ms": statistics.median(times) * 1e3, "iqr_ms": (q3 - q1) * 1e3, "rounds": rounds}


def _quartiles(data: list[float]) -> tuple[float, float]:
    """Q1 and Q3 of sorted data: Wikipedia's method 3 for odd counts, method 2 for even."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2 == 0:
        return statistics.median(data[: n // 2]), statistics.median(data[n // 2:])
    k, r = divmod(n, 4)
    if r == 1:
        return 0.25 * data[k - 1] + 0.75 * data[k], 0.75 * data[3 * k] + 0.25 * data[3 * k + 1]
    return 0.75 * data[k] + 0.25 * data[k + 1], 0.25 * data[3 * k + 1] + 0.75 * data[3 * k + 2]


def time_cuda(provider, zs, modes, warmup: int = 5, rep: int = 40) -> dict:
    """Median ms per mode; forward and backward need a provider with a loss (not the floor)."""
    from triton.testing import do_bench

    out = {}
    if "full" in modes:
        out["full_ms"] = do_bench(provider.step(zs), warmup=warmup, rep=rep, return_mode="median")
    if "forward" in modes:
        out["forward_ms"] = do_bench(lambda: provider.loss(zs), warmup=warmup, rep=rep, return_mode="median")
    if "backward" in modes:
        loss = provider.loss(zs)
        out["backward_ms"] = do_bench(lambda: loss.backward(retain_graph=True), warmup=warmup, rep=rep,
                                      grad_to_none=zs, return_mode="median")
    return out


def time_cuda_loop(step, iters: int = 30) -> float:
    """ms per step of `iters` steps run back to back, one synchronization at the end."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def time_cuda_graph(step, iters: int = 30) -> float:
    """ms per replay of one step captured as a CUDA graph (warmed up on a side stream first, as PyTorch's
    whole-network capture does). Raises where the step cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3 / iters
    del graph
    return elapsed


@contextlib.contextmanager
def deterministic(flag: bool):
    """torch.use_deterministic_algorithms(flag) for the block, off again after it."""
    torch.use_deterministic_algorithms(flag, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
