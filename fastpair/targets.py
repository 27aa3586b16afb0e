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


def identity_targets(ids, label_smoothing: float) -> bool:
    """Each row's target is its own column alone (T = I): the kernels' default, no target side needed."""
    return ids is None and label_smoothing == 0.0


def top1_hits(ids, chosen: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Top-1 retrieval hits: the chosen sample is the row's own, or (with ids) shares its id."""
    return chosen == rows if ids is None else ids[chosen] == ids[rows]


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
    """Each sample's positives within one pair's valid set, and how a row's target weighs them: InfoNCE's
    T_ij = (1 - eps) [j in P(i)] / |P(i)| + eps / n (mean=True), or the sigmoid's T_ij = [j in P(i)]."""

    labels: torch.Tensor | None  # (N,) group labels (None: each sample alone)
    valid: torch.Tensor | None  # (N,) 0/1 weights of the pair's valid samples (None: all)
    sizes: torch.Tensor | None  # (N,) |P(i)|, at least 1 (None without labels: 1)
    count: torch.Tensor  # 0-d: n = |V|
    eps: float
    mean_over_group: bool

    @staticmethod
    def of(labels, mask, pair: tuple[int, int], eps: float, like: torch.Tensor, mean: bool = True) -> Groups:
        """The groups of pair (p, q): its valid samples from the (M, N) mask (or all), positives by labels."""
        n, dtype = like.shape[0], like.dtype
        valid = None if mask is None else (mask[pair[0]] & mask[pair[1]]).to(dtype)
        ones = torch.ones(n, dtype=dtype, device=like.device) if valid is None else valid
        sizes = None
        if labels is not None:
            sizes = torch.zeros_like(ones).index_add_(0, labels, ones)[labels].clamp_min(1.0)
        return Groups(labels, valid, sizes, ones.sum(), eps, mean)

    def mean(self, y: torch.Tensor, over: tuple[int, int] | None = None, at: tuple[int, int] | None = None):
        """Rows i of sum_j T_ij y_j: summing over the j in `over` = [r0, r1) only when given, evaluated
        at the i in `at` only when given ((r1 - r0, D); else (N, D))."""
        part = y if self.valid is None else y * self.valid[:, None]
        src = part if over is None else part[over[0]:over[1]]
        if self.labels is None:  # each sample its own group: sum_j [j == i] y_j
            if over is None:
                out = part * (1.0 - self.eps)
            else:
                out = torch.zeros_like(part)
                out[over[0]:over[1]] = src * (1.0 - self.eps)
        else:
            labels = self.labels if over is None else self.labels[over[0]:over[1]]
            out = torch.zeros_like(part).index_add_(0, labels, src)[self.labels]  # gathered: a new tensor
            if self.mean_over_group:
                out.mul_(((1.0 - self.eps) / self.sizes)[:, None])
        if at is not None:
            out = out[at[0]:at[1]]
        if self.eps:
            out.add_(src.sum(dim=0) * (self.eps / self.count.clamp_min(1.0)))
        return out


def target_terms(x, y, groups: Groups, scale: float | torch.Tensor, r0: int, r1: int,
                 both: bool = True) -> torch.Tensor:
    """(r1 - r0,) at this process's rows: <x_i, ybar_i> / t, plus <xbar_i, y_i> / t when `both` directions
    have terms (InfoNCE; the sigmoid's sum over i and j has one); scale: 1/t, a number or a 0-d tensor. The
    epilogue masks V."""
    terms = (x[r0:r1] * groups.mean(y, at=(r0, r1))).sum(dim=1)
    if both:
        terms = terms + (groups.mean(x, at=(r0, r1)) * y[r0:r1]).sum(dim=1)
    return terms * scale


def add_target_grads(x, y, groups: Groups, cx, cy, gx, gy, r0: int, r1: int, both: bool = True) -> None:
    """gx += cx t dA/dx and gy += cy t dA/dy for A the sum of target_terms over this process's valid rows
    (cx, cy: 0-d, or (N, 1) per-row coefficients). The row terms sum_{i local} <x_i, ybar_i> give x_i
    (i local) ybar_i and every y_b the sum over local i of T_ib x_i; the column terms, the same with x and y
    swapped (T is symmetric). Zero outside the pair's valid samples."""
    local = None if (r0, r1) == (0, x.shape[0]) else (r0, r1)
    if local is None and both:  # no process group: both parts are the full sums
        _accumulate(gx, groups.mean(y).mul_(2.0), cx, groups.valid)
        _accumulate(gy, groups.mean(x).mul_(2.0), cy, groups.valid)
        return
    _accumulate(gx, groups.mean(y, at=(r0, r1)), cx, groups.valid, (r0, r1))
    _accumulate(gy, groups.mean(x, over=local), cy, groups.valid)
    if both:
        _accumulate(gy, groups.mean(x, at=(r0, r1)), cy, groups.valid, (r0, r1))
        _accumulate(gx, groups.mean(y, over=local), cx, groups.valid)


def _accumulate(grad, bar, c, valid, rows: tuple[int, int] | None = None) -> None:
    """grad[rows] += c[rows] * bar * valid[rows] (bar: a fresh tensor, scaled in place; c: 0-d or (N, 1))."""
    if rows is not None:
        grad = grad[rows[0]:rows[1]]
        c = c[rows[0]:rows[1]] if c.dim() else c
        valid = None if valid is None else valid[rows[0]:rows[1]]
    if valid is not None:
        bar.mul_(valid[:, None])
    grad.addcmul_(bar, c)
