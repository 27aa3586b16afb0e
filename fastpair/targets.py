"""Positives by id and label smoothing: the target side of the loss, O(N*D), outside every tile loop.

For a pair (p, q) with valid samples V (n = |V|), ids (by default each sample its own id) and
eps = label_smoothing, the target of row i is the distribution (docs/design.md, "The loss family")

    T_ij = (1 - eps) [ids_i == ids_j] / |P(i)| + eps / n          (i, j in V; T is symmetric)

so the target terms of the loss are averages of logits, i.e. of vectors:

    sum_j T_ij S_ij = <x_i, ybar_i> / t,   ybar_i = (1 - eps) mean_{j in P(i)} y_j + eps mean_{j in V} y_j
    sum_i T_ij S_ij = <xbar_j, y_j> / t,   xbar_j likewise from x.

A process computes the rows [r0, r1) of S (all N without a process group); its target terms are

    A = sum_{i in V, r0 <= i < r1} (<x_i, ybar_i> + <xbar_i, y_i>) / t       (2 sum_i S_ii by default)

and, T being symmetric, dA/dx_a = ([r0 <= a < r1] ybar_a + ybar'_a) / t and dA/dy_b likewise with xbar,
where ' sums over this process's j only (the same as the full sum without a process group). The softmax
side of the loss (the kernels' work) is untouched. Segment sums use group labels from one stable sort (no
host sync) and index_add, which PyTorch runs deterministically under torch.use_deterministic_algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_labels(ids: torch.Tensor) -> torch.Tensor:
    """(N,) int64 labels in [0, N): equal ids <-> equal labels (the rank of each id among the distinct ids)."""
    sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    labels = torch.empty_like(order)
    labels[order] = starts.cumsum(0) - 1
    return labels


@dataclass(frozen=True)
class Groups:
    """Each sample's positives within one pair's valid set, and the smoothing weight."""

    labels: torch.Tensor | None  # (N,) group labels (None: each sample alone)
    valid: torch.Tensor | None  # (N,) 0/1 weights of the pair's valid samples (None: all)
    sizes: torch.Tensor | None  # (N,) |P(i)|, at least 1
    count: torch.Tensor  # 0-d: n = |V|
    eps: float

    @staticmethod
    def of(labels, valid, n: int, eps: float, dtype, device) -> Groups:
        ones = torch.ones(n, dtype=dtype, device=device) if valid is None else valid
        sizes = None
        if labels is not None:
            sizes = torch.zeros(n, dtype=dtype, device=device).index_add_(0, labels, ones)[labels].clamp_min(1.0)
        return Groups(labels, valid, sizes, ones.sum(), eps)

    def mean(self, y: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, D): row i is sum_j T_ij y_j, over the j in rows = [r0, r1) only when given."""
        part = y if self.valid is None else y * self.valid[:, None]
        if rows is not None:
            local = torch.zeros_like(part)
            local[rows[0]:rows[1]] = part[rows[0]:rows[1]]
            part = local
        if self.labels is None:
            out = part * (1.0 - self.eps)
        else:  # a gathered (new) tensor: scaled in place
            out = torch.zeros_like(part).index_add_(0, self.labels, part)[self.labels]
            out.mul_(((1.0 - self.eps) / self.sizes)[:, None])
        if self.eps:
            out.add_(part.sum(dim=0) * (self.eps / self.count.clamp_min(1.0)))
        return out


def target_terms(x, y, groups: Groups, scale: float, r0: int, r1: int) -> torch.Tensor:
    """(r1 - r0,): <x_i, ybar_i> / t + <xbar_i, y_i> / t at this process's rows (the epilogue masks V)."""
    ybar, xbar = groups.mean(y)[r0:r1], groups.mean(x)[r0:r1]
    return ((x[r0:r1] * ybar).sum(dim=1) + (xbar * y[r0:r1]).sum(dim=1)) * scale


def add_target_grads(x, y, groups: Groups, c: torch.Tensor, gx, gy, r0: int, r1: int) -> None:
    """gx += c t dA/dx and gy += c t dA/dy (A of target_terms, c a 0-d tensor), zero outside the pair's
    valid samples."""
    everything = (r0, r1) == (0, x.shape[0])
    for other, grad in ((y, gx), (x, gy)):
        full = groups.mean(other)
        bar = full.clone() if everything else groups.mean(other, (r0, r1))
        bar[r0:r1] += full[r0:r1]
        if groups.valid is not None:
            bar.mul_(groups.valid[:, None])
        grad.addcmul_(bar, c)
