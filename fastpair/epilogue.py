"""Statistics -> loss: the one epilogue of every backend (torch and Triton alike) and both objectives.

A backend hands over, for every pair k = (p, q) and each row i this process computes (rows [r0, r1) of
the batch: all N, or one rank's share under a process group), in natural-log units:

    lse_row[k, i] = logsumexp_{j in V_k} S_ij,   lse_col[k, i] = logsumexp_{j in V_k} S_ji,
    target[k, i]  = sum_j T_ij S_ij + sum_j T_ji S_ji       (2 S_ii by default; fastpair.targets otherwise)

and, with return_stats, its top-1 hit counts over those rows. From them, with n_k = |V_k| over the whole
batch and W the world size:

    local_k = sum_{i in V_k, r0 <= i < r1} (lse_row + lse_col - target) / (2 n_k)     this process's share of L_k
    loss    = W * sum_k w'_k local_k / sum_k w'_k,        w'_k = w_k [n_k > 0]        (0 when every n_k = 0)
    coef_k  = W w'_k / (sum_k w'_k * 2 n_k)

The sigmoid objective has one term per sample (its row): lse_row is the row's sum of softplus(S_ij + b),
lse_col is 0 and target the positives' S_ij + b, and the 2 in the denominators is 1 (``directions``).
Each rank returns W times its share, so the mean over ranks is the loss of the whole batch
(fastpair.distributed). coef_k is d loss / d(a term of pair k): the backward's dL/dS = g coef_k (P + Q - 2T)
for an incoming gradient g. Without a process group W = 1, r0 = 0, r1 = N and local_k = L_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .call import Call
from .tables import constant, pair_valid


@dataclass(frozen=True)
class Finished:
    loss: torch.Tensor  # 0-d, in the compute dtype
    pair_losses: torch.Tensor  # (P,) float32, detached: local_k, or L_k of the whole batch with return_stats
    accuracy: torch.Tensor  # (P, 2) float32: top-1 retrieval x->y, y->x over each pair's valid samples
    coef: torch.Tensor  # (P,) compute dtype, for the backward


def finish(call: Call, n: int, lse_row, lse_col, target, hits=None, unit: float = 1.0,
           directions: int = 2, lone_zero: bool | None = None) -> Finished:
    """lse_row, lse_col, target: (P, rows) in the compute dtype, rows = this process's rows, in units of
    `unit` nats (1: natural logs; ln 2: base-2 logs, converted once, after the sum); target: the row's two
    target terms (2 S_ii, or fastpair.targets'); hits: (2, P) this process's row hits x->y and y->x
    (counts over its valid rows), or None without return_stats. directions: 2 for InfoNCE (a row and a
    column term per sample), 1 for the sigmoid objective, whose lse_row is the row's sum of softplus(S_ij + b),
    lse_col 0 and target its positives' S_ij + b. lone_zero: a term set with a single valid sample is exactly 0
    (its only candidate is its positive; default: for InfoNCE, directions == 2); GRAM passes its two
    directions as two term sets with directions=1 and lone_zero=True."""
    lone_zero = directions == 2 if lone_zero is None else lone_zero
    dtype, device = lse_row.dtype, lse_row.device
    terms = lse_row + lse_col - target
    if unit != 1.0:
        terms = terms * unit
    if call.mask is None:
        counts = None
        local, loss, coef = _unmasked(call, n, terms, directions, lone_zero)
    else:
        valid = pair_valid(call.mask, call.pairs)
        terms = _valid_rows(call, n, terms, valid)
        counts = valid.sum(dim=1).to(dtype)
        if lone_zero:  # InfoNCE: a pair with one valid sample is exactly 0 (see _unmasked)
            terms = terms * (counts[:, None] != 1)  # a product, so that a NaN input stays visible
        local = terms.sum(dim=1) / (directions * counts.clamp_min(1.0))
        weights = constant(call.weights, dtype, str(device)) * (counts > 0)
        total = weights.sum().clamp_min(torch.finfo(dtype).tiny)
        loss = call.world * (weights * local).sum() / total
        coef = call.world * weights / (total * directions * counts.clamp_min(1.0))
        if lone_zero:
            coef = torch.where(counts == 1, torch.zeros_like(coef), coef)

    if hits is None:  # without return_stats the accuracy is never read: a placeholder, no fill
        accuracy = torch.empty(len(call.pairs), 2, dtype=torch.float32, device=device)
        return Finished(loss, local.detach().float(), accuracy, coef)
    sums = torch.cat([local[None], hits.to(dtype)])
    if call.shard is not None:  # the whole batch's statistics
        sums = distributed.all_reduce(call.shard, sums)
    per_row = float(max(n, 1)) if counts is None else counts.clamp_min(1.0)[:, None]
    return Finished(loss, sums[0].detach().float(), (sums[1:].T / per_row).float(), coef)


def _unmasked(call: Call, n: int, terms: torch.Tensor, directions: int, lone_zero: bool):
    """(local, loss, coef) without a mask: every n_k is the batch's N > 0, so w' = w and the weights'
    factors are host numbers: a cached table (coef) and scalars, no kernels for them on the device.
    InfoNCE with N = 1: a sample's only candidate is its positive, so every term and dL/dS are exactly 0
    (computed, logsumexp_j S_ij - S_ii leaves a rounding residue of about 1e-7)."""
    total = sum(call.weights)  # > 0: fastpair.call checks that not every weight is 0
    dtype, device = terms.dtype, str(terms.device)
    if n == 1 and lone_zero:
        terms = terms * 0.0  # a product, so that a NaN input stays visible
        zero = constant((0.0,) * len(call.weights), dtype, device)
        return terms.sum(dim=1), (zero * terms.sum(dim=1)).sum(), zero
    local = terms.sum(dim=1) / float(directions * n)
    loss = (constant(tuple(call.world * w / total for w in call.weights), dtype, device) * local).sum()
    coef = constant(tuple(call.world * w / (total * directions * n) for w in call.weights), dtype, device)
    return local, loss, coef


def valid_row_sums(call: Call, n: int, values: torch.Tensor) -> torch.Tensor:
    """(P,): the sums of (P, rows) values over this process's rows of each pair's valid samples."""
    return _valid_rows(call, n, values).sum(dim=1)


def _valid_rows(call: Call, n: int, values: torch.Tensor, valid=None) -> torch.Tensor:
    """(P, rows) values with 0 at the rows outside each pair's valid samples (valid: the (P, N) table of
    tables.pair_valid, when the caller has it)."""
    if call.mask is None:
        return values
    r0, r1 = call.rows(n)
    valid = pair_valid(call.mask, call.pairs) if valid is None else valid
    return torch.where(valid[:, r0:r1], values, torch.zeros_like(values))
