"""The work of one forward + backward, counted: the formula the benchmark's TFLOP/s and floor ratios use.

Any exact method that keeps O(N * D) memory does, per pair, four N x N x D matmul passes: S in the
forward, S again in the backward, dX = G Y and dY = G^T X (the "12-GEMM floor" for M = 3, 3 pairs).
"""

from __future__ import annotations


def flop_count(n: int, d: int, num_pairs: int) -> int:
    """FLOPs of the floor: 4 N x N x D matmuls per pair, 2 FLOPs per multiply-add."""
    return 4 * 2 * n * n * d * num_pairs
