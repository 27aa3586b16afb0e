"""Providers measured by the benchmark: one callable per provider, fwd+bwd of M=3 pairwise InfoNCE.

Every provider gets the same inputs (three (N, D) leaf tensors) and runs forward and backward once.
Baselines come from fastpair.reference (the tests' oracle), not re-written here.
"""

from __future__ import annotations

import itertools

import torch

from fastpair import pairwise_nce
from fastpair.reference import pairwise_nce_reference

TEMPERATURE = 0.07


def make_inputs(n: int, d: int, m: int = 3, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
            for _ in range(m)]


def _zero_grads(zs):
    for z in zs:
        z.grad = None


def fastpair_torch(zs):
    _zero_grads(zs)
    pairwise_nce(*zs, temperature=TEMPERATURE, backend="torch").backward()


def plain_pytorch(zs):
    """Materialized N x N logits + F.cross_entropy in both directions, in the input dtype."""
    _zero_grads(zs)
    pairwise_nce_reference(*zs, temperature=TEMPERATURE, upcast=False).backward()


_compiled = None


def torch_compile(zs):
    """torch.compile of plain PyTorch (what a CPU user would pick instead); compiled once, dynamic=False."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(lambda *z: pairwise_nce_reference(*z, temperature=TEMPERATURE, upcast=False))
    _zero_grads(zs)
    _compiled(*zs).backward()


def gemm_floor_inputs(zs):
    """Operands of the 12-GEMM floor: per pair S = X Y^T, S again, dX = G Y, dY = G^T X (G: any N x N)."""
    xs = [z.detach() for z in zs]
    g = torch.randn(xs[0].shape[0], xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)
    return xs, g


def gemm_floor(xs, g):
    for p, q in itertools.combinations(range(len(xs)), 2):
        torch.matmul(xs[p], xs[q].T)
        torch.matmul(xs[p], xs[q].T)
        torch.matmul(g, xs[q])
        torch.matmul(g.T, xs[p])


PROVIDERS = {
    "fastpair-torch": fastpair_torch,
    "plain-pytorch": plain_pytorch,
    "torch-compile": torch_compile,
}
