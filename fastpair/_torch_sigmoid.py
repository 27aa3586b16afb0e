"""Exact, memory-lean pure-PyTorch backend of the pairwise sigmoid (SigLIP) loss.

For a pair (p, q) with valid samples V (n = |V|), S = x y^T / t, a bias b and z_ij = +1 for positives
(j in P(i): by default j = i) and -1 elsewhere, log sigmoid(-u) = -softplus(u) and
log sigmoid(u) - log sigmoid(-u) = u give

    L_pq = -(1/n) sum_ij log sigmoid(z_ij (S_ij + b))
         = (1/n) [ sum_{i, j in V} softplus(S_ij + b) - sum_{i in V} sum_{j in P(i)} (S_ij + b) ]

so the tiles need one elementwise function of S (no row or column statistics), and the positives' part is
the diagonal (by default) or, with ids, segment sums over id groups (fastpair.targets, O(N*D)). Its
gradient dL/dS_ij = (sigmoid(S_ij + b) - [j in P(i)]) / n, dL/db = sum_ij dL/dS_ij,
dL/dt = -sum_ij dL/dS_ij S_ij / t. The forward visits each row block of S once; the backward recomputes it.
softplus(u) = max(u, 0) + log1p(exp(-|u|)) is exact for every u. Memory is O(M*N*D + block*N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed, epilogue
from ._torch_backend import (
    Plan,
    _normalize_backward,
    add_block_grads,
    default_block,
    prepare,
    top1_buffers,
    track_top1,
)
from .call import Call
from .numerics import LOG2E, exp_bound
from .op import through_autograd
from .targets import Groups, add_target_grads, group_labels, target_terms, top1_hits


@dataclass(frozen=True)
class Saved:
    """Forward -> backward, besides the normalized inputs and inverse norms (saved as tensors)."""

    plan: Plan
    biases: tuple  # per pair: b as a float, or a 0-d tensor of the compute dtype
    coef: torch.Tensor  # (P,) the epilogue's coefficients
    target_sums: torch.Tensor | None  # (P,) the positives' sum of S over this process's valid rows (with ids)
    positives: torch.Tensor | None  # (P,) the number of positive (i, j) over this process's valid rows (with ids)
    labels: torch.Tensor | None
    in_dtype: torch.dtype
    num_embeddings: int
    metas: tuple  # (dtype, device) of the temperature and the bias tensors that learn, or None each


@torch.compiler.disable  # runs eagerly inside a compiled step: host-side numbers and a blocked Python loop
def pairwise_sigmoid_torch(embeddings, call: Call):
    """(loss, pair_losses, accuracy) of a validated pairwise_sigmoid call."""
    n = embeddings[0].shape[0]
    scales = tuple(1.0 / t for t in call.temperature.host_values(len(call.pairs)))
    biases = call.bias.host_values(len(call.pairs))  # a tensor's: read and checked once, here
    plan = Plan(call=call, scales=scales, block=call.block_size or default_block(n), biases=biases)
    temperature = call.temperature.tensor if call.temperature.learnable else None
    bias = call.bias.tensor if call.bias.learnable else None
    return PairwiseSigmoidFunction.apply(plan, temperature, bias, *embeddings)


class PairwiseSigmoidFunction(torch.autograd.Function):
    """All pairs in one call: inputs (plan, temperature or None, bias or None, *embeddings); a tensor is
    passed only when it needs a gradient."""

    @staticmethod
    def forward(ctx, plan: Plan, temperature, bias, *embeddings):
        with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
            return _forward(ctx, plan, temperature, bias, embeddings)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_pair_losses, _grad_accuracy):
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            return _backward(ctx, grad_loss)


def _biases(call: Call, cdtype, device) -> tuple:
    """b per pair: floats, or 0-d tensors (detached) of the bias tensor."""
    if call.bias.tensor is None:
        return call.bias.values
    b = call.bias.tensor.detach().to(device=device, dtype=cdtype).reshape(-1).expand(len(call.pairs))
    return tuple(b[k] for k in range(len(call.pairs)))


def _valid(call: Call, k: int, cdtype):
    if call.mask is None:
        return None
    p, q = call.pairs[k]
    return (call.mask[p] & call.mask[q]).to(cdtype)


def _softplus_(s: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """s <- softplus(s) = max(s, 0) + log1p(exp(-|s|)), in place (tmp: a buffer of s's shape)."""
    torch.abs(s, out=tmp).neg_().exp_().log1p_()
    return s.clamp_(min=0.0).add_(tmp)


def _forward_pair(x, y, v, scale, b, bounded, block, stats, ids, buf, tmp, r0, r1):
    """Rows [r0, r1): each row's sum over valid columns of softplus(S_ij + b); for statistics, top-1
    hits and each column's best logit and first row (as the InfoNCE backend's). bounded: u = S + b <=
    exp_bound, so softplus(u) = log1p(exp(u)) in two passes, with exp as exp2 and log2(e) folded into the
    matmul's scale; otherwise the form exact for every u."""
    n = x.shape[0]
    unit = LOG2E if bounded else 1.0
    xs = x[r0:r1] * (scale * unit)
    rowsum = torch.empty(r1 - r0, dtype=x.dtype, device=x.device)
    row_hits, col_best, col_arg = top1_buffers(r1 - r0, n, x) if stats else (None, None, None)
    for i0 in range(r0, r1, block):
        i1 = min(i0 + block, r1)
        s = torch.mm(xs[i0 - r0:i1 - r0], y.T, out=buf[: i1 - i0])
        if stats:  # on S (times log2 e when bounded): the same argmax
            col_best, col_arg = track_top1(s, v, ids, i0, i1, r0, row_hits, col_best, col_arg)
        s.add_(b * unit)
        sp = torch.exp2(s, out=s).log1p_() if bounded else _softplus_(s, tmp[: i1 - i0])
        rowsum[i0 - r0:i1 - r0] = sp.sum(dim=1) if v is None else torch.mv(sp, v)
    return rowsum, row_hits, col_best, col_arg


def _backward_pair(x, y, v, scale, b, block, c, identity, gx, gy, want_dt, buf, tmp, r0, r1):
    """gx += dL/dx, gy += dL/dy from rows [r0, r1) (w.r.t. the normalized inputs), with
    G = c (sigmoid(S + b) [i, j valid] - [identity and i == j valid]); returns (sum_ij G_ij S_ij or None,
    sum_ij G_ij)."""
    n = x.shape[0]
    cs = c * scale
    xs = x * scale
    sgs = torch.zeros((), dtype=x.dtype, device=x.device) if want_dt else None
    gsum = torch.zeros((), dtype=x.dtype, device=x.device)
    ones = torch.ones(n, dtype=x.dtype, device=x.device)
    v_rows = cs * (v if v is not None else ones)  # c' v_i: the row factor of G' = scale * G
    for i0 in range(r0, r1, block):
        i1 = min(i0 + block, r1)
        g = torch.mm(xs[i0:i1], y.T, out=buf[: i1 - i0])  # S, recomputed
        torch.sigmoid_(g.add_(b))
        if v is None:
            g.mul_(cs)
        else:
            g.mul_(torch.outer(v_rows[i0:i1], v, out=tmp[: i1 - i0]))
        if identity:
            g[:, i0:i1].diagonal().sub_(v_rows[i0:i1])
        gsum = gsum + g.sum()
        sgs = add_block_grads(g, x, y, i0, i1, gx, gy, sgs)
    return sgs, gsum / scale


def _forward(ctx, plan: Plan, temperature, bias, embeddings):
    call = plan.call
    in_dtype, device = embeddings[0].dtype, embeddings[0].device
    cdtype, n, r0, r1, xs, invs, buf = prepare(plan, embeddings)
    num_pairs = len(call.pairs)
    biases = _biases(call, cdtype, device)
    tmp = torch.empty_like(buf)
    labels = None if call.ids is None else group_labels(call.ids)

    # per pair, at this process's rows: the softplus sums, the positives' S + b, top-1 hits
    rowsum, target = (torch.zeros(num_pairs, r1 - r0, dtype=cdtype, device=device) for _ in range(2))
    hits = torch.zeros(2, num_pairs, dtype=cdtype, device=device) if call.return_stats else None
    s_part = torch.zeros(num_pairs, r1 - r0, dtype=cdtype, device=device)  # the positives' S alone
    count = torch.zeros(num_pairs, r1 - r0, dtype=cdtype, device=device)  # |P(i)| per row
    for k in (k for k in range(num_pairs) if plan.active(k)):
        p, q = call.pairs[k]
        v = _valid(call, k, cdtype)
        bounded = call.normalize and plan.scales[k] + plan.biases[k] <= exp_bound(cdtype)
        rowsum[k], row_hits, col_best, col_arg = _forward_pair(xs[p], xs[q], v, plan.scales[k], biases[k], bounded,
                                                               plan.block, call.return_stats, call.ids, buf, tmp,
                                                               r0, r1)
        if call.ids is None:
            s_part[k] = (xs[p][r0:r1] * xs[q][r0:r1]).sum(dim=1) * plan.scales[k]
            count[k] = 1.0
        else:
            groups = Groups.of(labels, call.mask, (p, q), 0.0, xs[p], mean=False)
            s_part[k] = target_terms(xs[p], xs[q], groups, plan.scales[k], r0, r1, both=False)
            count[k] = groups.sizes[r0:r1]
        target[k] = s_part[k] + biases[k] * count[k]
        if hits is not None:
            _count_hits(call, hits, k, v, row_hits, col_best, col_arg, r0, r1)

    done = epilogue.finish(call, n, rowsum, torch.zeros_like(rowsum), target, hits, directions=1)
    with_ids = call.ids is not None
    metas = tuple((t.dtype, t.device) if t is not None else None for t in (temperature, bias))
    ctx.saved = Saved(plan=plan, biases=biases, coef=done.coef,
                      target_sums=epilogue.valid_row_sums(call, n, s_part) if with_ids else None,
                      positives=epilogue.valid_row_sums(call, n, count) if with_ids else None,
                      labels=labels, in_dtype=in_dtype, num_embeddings=len(embeddings), metas=metas)
    ctx.save_for_backward(*xs, *(inv if inv is not None else torch.empty(0) for inv in invs))
    ctx.mark_non_differentiable(done.pair_losses, done.accuracy)
    return done.loss, done.pair_losses, done.accuracy


def _count_hits(call: Call, hits, k: int, v, row_hits, col_best, col_arg, r0: int, r1: int) -> None:
    """hits[:, k] = this process's top-1 hits x->y and y->x over its valid rows."""
    if call.shard is not None:
        col_arg = distributed.merge_first_argmax(call.shard, col_best, col_arg)
    col_hit = top1_hits(call.ids, col_arg[r0:r1], torch.arange(r0, r1, device=col_arg.device)).to(hits.dtype)
    hits[0, k] = row_hits.sum() if v is None else row_hits @ v[r0:r1]
    hits[1, k] = col_hit.sum() if v is None else col_hit @ v[r0:r1]


def _backward(ctx, grad_loss):
    saved: Saved = ctx.saved
    plan, call = saved.plan, saved.plan.call
    m = saved.num_embeddings
    xs, invs = ctx.saved_tensors[:m], ctx.saved_tensors[m:]
    cdtype, device, n = xs[0].dtype, xs[0].device, xs[0].shape[0]
    r0, r1 = call.rows(n)
    buf = torch.empty(min(plan.block, max(r1 - r0, 1)), n, dtype=cdtype, device=device)
    tmp = torch.empty_like(buf)
    grads = [torch.zeros_like(x) for x in xs]
    coef = grad_loss.to(cdtype) * saved.coef
    t_meta, b_meta = saved.metas
    want_dt = t_meta is not None and ctx.needs_input_grad[1]
    want_db = b_meta is not None and ctx.needs_input_grad[2]
    zero = torch.zeros((), dtype=cdtype, device=device)
    dts, dbs = [], []
    for k, (p, q) in enumerate(call.pairs):
        if not plan.active(k) or call.weights[k] == 0:
            dts.append(zero)
            dbs.append(zero)
            continue
        v = _valid(call, k, cdtype)
        sgs, gsum = _backward_pair(xs[p], xs[q], v, plan.scales[k], saved.biases[k], plan.block, coef[k],
                                   call.ids is None, grads[p], grads[q], want_dt, buf, tmp, r0, r1)
        dt = -plan.scales[k] * sgs if want_dt else zero  # dL/dt = -(1/t) sum_ij G_ij S_ij
        if call.ids is not None:  # the positives' part of G, -c [j in P(i)], through fastpair.targets
            groups = Groups.of(saved.labels, call.mask, (p, q), 0.0, xs[p], mean=False)
            c = -coef[k] * plan.scales[k]
            add_target_grads(xs[p], xs[q], groups, c, c, grads[p], grads[q], r0, r1, both=False)
            gsum = gsum - coef[k] * saved.positives[k]
            if want_dt:  # the loss holds -c sum_pos S, and S is proportional to 1/t
                dt = dt + coef[k] * saved.target_sums[k] * plan.scales[k]
        dts.append(dt)
        dbs.append(gsum)

    if call.normalize:
        grads = [_normalize_backward(gr, x, inv) for gr, x, inv in zip(grads, xs, invs)]
    grads = [gr.to(saved.in_dtype) for gr in grads]
    grad_t = _per_pair_grad(dts, t_meta, call.temperature.shape) if want_dt else None
    grad_b = _per_pair_grad(dbs, b_meta, call.bias.shape) if want_db else None
    return (None, grad_t, grad_b, *grads)


def _per_pair_grad(values, meta, shape):
    """The gradient of a 0-d (summed over pairs) or (P,) parameter, in its dtype and on its device."""
    stacked = torch.stack(values)
    dtype, device = meta
    return (stacked.sum() if shape == () else stacked).to(dtype=dtype, device=device).reshape(shape)



sigmoid_op = through_autograd(pairwise_sigmoid_torch)
