"""Exact, memory-lean pure-PyTorch backend of GRAM's volume loss (fastpair.gram_nce).

The N x N logits S_ij = -V_ij / t (fastpair.volumes) are visited in row blocks of anchors and never held:
a block computes its k similarity tiles s_l = x_a[rows] x_ol^T (one matmul each), the volumes from the
columns' det C_j and adj(C_j), and InfoNCE's row and column statistics, as the pairwise backend does:

* bounded (1/t <= exp_bound): V is in [0, 1] for unit vectors (Hadamard), so E = exp((1 - V) / t) lies in
  [1, e^(1/t)] and one exponential serves the row and the column sums, forward and backward;
  logsumexp_j S_ij = log(sum_j E_ij) - 1/t;
* online (a larger 1/t): row log-sum-exps per block and column ones merged across blocks, base 2.

The backward recomputes each block; with W = dL/dS (c (P + Q - 2T), T the targets),
U = W [det G > 0] / (t V):
    dL/ds_l,ij = U_ij (adj(C_j) s_ij)_l          -> dx_a += sum_l G_l x_ol, dx_ol += G_l^T x_a (2k matmuls)
    a_j += sum_i U_ij / 2,  M_j += sum_i U_ij s_ij s_ij^T / 2   -> dL/dC_j (fastpair.volumes.column_grad)
    dL/dt = sum_ij W_ij V_ij / t^2
Positives by id and label smoothing weigh the logits of a block (S is not bilinear, so fastpair.targets'
vector averages do not apply): O(N^2) elementwise work, still O(N) memory. Memory: O(N (M D + k^2)) and
a few (block, N) buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed, epilogue
from ._torch_backend import (
    _log2sumexp2,
    _mask_bias,
    _normalize_backward,
    default_block,
    prepare,
    top1_buffers,
    track_top1,
)
from .call import Call, gram_directions
from .numerics import LN2, LOG2E, exp_bound
from .op import through_autograd
from .targets import Groups, group_labels, top1_hits
from .volumes import EPS_V, column_grad, det_adj, gram, pairs_of, quadratic


@dataclass(frozen=True)
class GramPlan:
    """This backend's host-side numbers for one call: the call, 1/t, rows per block."""

    call: Call
    scale: float
    block: int

    @property
    def anchor(self) -> int:
        return self.call.pairs[0][0]

    @property
    def others(self) -> list[int]:
        return [q for _, q in self.call.pairs]

    def bounded(self, dtype: torch.dtype) -> bool:
        return self.scale <= exp_bound(dtype)


@torch.compiler.disable  # runs eagerly inside a compiled step: host-side numbers and a blocked Python loop
def gram_nce_torch(embeddings, call: Call):
    """(loss, direction losses (2,), accuracy (2,)) of a validated call; a temperature tensor is read here."""
    n = embeddings[0].shape[0]
    scale = 1.0 / call.temperature.host_values(1)[0]
    # k + 1 tiles live per block besides the logits: fewer rows than the pairwise backend's blocks
    block = call.block_size or max(16, default_block(n) // 2)
    plan = GramPlan(call=call, scale=scale, block=block)
    temperature = call.temperature.tensor if call.temperature.learnable else None
    return GramNCEFunction.apply(plan, temperature, *embeddings)


class GramNCEFunction(torch.autograd.Function):
    """Inputs (plan, temperature tensor that needs a gradient or None, *embeddings)."""

    @staticmethod
    def forward(ctx, plan: GramPlan, temperature, *embeddings):
        with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
            return _forward(ctx, plan, temperature, embeddings)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_losses, _grad_accuracy):
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            return _backward(ctx, grad_loss)


@dataclass(frozen=True)
class Columns:
    """The per-column part: C_j, det C_j, adj(C_j), the valid samples (0/1 or None), the target groups."""

    c: torch.Tensor  # (N, k, k)
    det: torch.Tensor  # (N,)
    adj: torch.Tensor  # (N, k, k)
    valid: torch.Tensor | None  # (N,) 0/1 in the compute dtype: all M modalities present
    groups: Groups | None  # positives by id and smoothing; None: T = I


def _columns(call: Call, xo, labels) -> Columns:
    c = gram(xo)
    det, adj = det_adj(c)
    valid = None if call.mask is None else call.mask.all(dim=0).to(xo[0].dtype)
    groups = None
    if not call.identity_targets:
        one = gram_directions(call).mask  # (1, N): the samples with all M modalities
        groups = Groups.of(labels, one, (0, 0), call.label_smoothing, xo[0])
    return Columns(c, det, adj, valid, groups)


def _volumes(adj, det, s, buf) -> torch.Tensor:
    """V = sqrt(max(det C_j - s^T adj(C_j) s, 0) + eps_v) of a tile whose columns have adj and det, into buf;
    returns V."""
    v = quadratic(adj, s, buf)
    torch.sub(det[None, :], v, out=v)
    return v.clamp_(min=0.0).add_(EPS_V).sqrt_()


def _diagonal_logits(plan: GramPlan, cols: Columns, xa, xo, r0: int, r1: int) -> torch.Tensor:
    """S_ii at this process's rows, O(N k D): the logits of the positives by default (the diagonal as a
    one-row tile whose columns are the samples r0 .. r1)."""
    s = [(xa[r0:r1] * x[r0:r1]).sum(dim=1)[None] for x in xo]
    return _volumes(cols.adj[r0:r1], cols.det[r0:r1], s, torch.empty_like(s[0]))[0] * -plan.scale


def _target_block(groups: Groups, n: int, i0: int, i1: int, dtype) -> torch.Tensor:
    """Rows [i0, i1) of T_ij = (1 - eps) [ids_i == ids_j] / |P(i)| + eps / n over the valid samples."""
    if groups.labels is None:  # each sample its own positive
        t = torch.zeros(i1 - i0, n, dtype=dtype, device=groups.count.device)
        t[:, i0:i1].diagonal().fill_(1.0 - groups.eps)
    else:
        same = groups.labels[i0:i1, None] == groups.labels[None, :]
        t = same.to(dtype) * ((1.0 - groups.eps) / groups.sizes[i0:i1, None])
    if groups.eps:
        t += groups.eps / groups.count.clamp_min(1.0)
    if groups.valid is not None:
        t *= groups.valid[i0:i1, None] * groups.valid[None, :]
    return t


@dataclass(frozen=True)
class Saved:
    """Forward -> backward, besides the normalized inputs and inverse norms (saved as tensors)."""

    plan: GramPlan
    cols: Columns
    row: torch.Tensor  # (r1 - r0,) row statistics: sums of E (bounded) or log2-sum-exp2s
    col: torch.Tensor  # (N,) column statistics of the whole batch
    coef: torch.Tensor  # (2,) the epilogue's coefficients of the two directions
    in_dtype: torch.dtype
    temperature_meta: tuple[torch.dtype, torch.device] | None


def _forward(ctx, plan: GramPlan, temperature, embeddings):
    call = plan.call
    cdtype, n, r0, r1, xs, invs, buf = prepare(plan, embeddings)
    xa, xo = xs[plan.anchor], [xs[o] for o in plan.others]
    cols = _columns(call, xo, None if call.ids is None else group_labels(call.ids))
    row, col, targets, top1 = _forward_blocks(plan, cols, xa, xo, n, r0, r1, buf)

    bounded, v = plan.bounded(cdtype), cols.valid
    if bounded:
        lse_row, lse_col = torch.log(row) - plan.scale, torch.log(col[r0:r1]) - plan.scale
    else:
        if v is not None:  # samples without every modality: finite placeholders, never used
            row = torch.where(v[r0:r1] > 0, row, torch.zeros_like(row))
            col = torch.where(v > 0, col, torch.zeros_like(col))
        lse_row, lse_col = row * LN2, col[r0:r1] * LN2
    if targets is None:
        diag = _diagonal_logits(plan, cols, xa, xo, r0, r1)
        targets = (diag, diag)
    hits = None
    if call.return_stats:
        row_hits, col_best, col_arg = top1
        if call.shard is not None:
            col_arg = distributed.merge_first_argmax(call.shard, col_best, col_arg)
        hits = direction_hits(call, row_hits, col_arg, v, r0, r1, cdtype)
    lse = torch.stack([lse_row, lse_col])
    done = epilogue.finish(gram_directions(call), n, lse, torch.zeros_like(lse), torch.stack(targets), hits,
                           directions=1, lone_zero=True)

    meta = (temperature.dtype, temperature.device) if temperature is not None else None
    ctx.saved = Saved(plan=plan, cols=cols, row=row, col=col, coef=done.coef, in_dtype=embeddings[0].dtype,
                      temperature_meta=meta)
    ctx.save_for_backward(*xs, *invs)
    accuracy = done.accuracy[:, 0].contiguous()
    ctx.mark_non_differentiable(done.pair_losses, accuracy)
    return done.loss, done.pair_losses, accuracy


def _forward_blocks(plan: GramPlan, cols: Columns, xa, xo, n: int, r0: int, r1: int, buf):
    """The rows [r0, r1): (row statistics, column statistics merged over the ranks, target terms of the two
    directions at these rows or None for T = I, top-1 buffers or None)."""
    call, cdtype, v = plan.call, xa.dtype, cols.valid
    bounded = plan.bounded(cdtype)
    tiles = [torch.empty_like(buf) for _ in xo]
    row = torch.empty(r1 - r0, dtype=cdtype, device=xa.device)
    col = torch.zeros(n, dtype=cdtype, device=xa.device) if bounded else torch.full_like(row.new_empty(n), -torch.inf)
    grouped = cols.groups is not None
    t_row, t_col = (torch.zeros_like(row), torch.zeros(n, dtype=cdtype, device=xa.device)) if grouped else (None,) * 2
    top1 = top1_buffers(r1 - r0, n, xa) if call.return_stats else None
    bias = _mask_bias(v) if v is not None and not bounded else None
    for i0 in range(r0, r1, plan.block):
        i1 = min(i0 + plan.block, r1)
        here = slice(i0 - r0, i1 - r0)
        s = [torch.mm(xa[i0:i1], y.T, out=t[: i1 - i0]) for y, t in zip(xo, tiles)]
        vol = _volumes(cols.adj, cols.det, s, buf[: i1 - i0])
        if top1 is not None:  # the best tuple of a row is its smallest volume
            top1 = (top1[0], *track_top1(-vol, v, call.ids, i0, i1, r0, *top1))
        if grouped:  # sum_j T_ij S_ij, and sum_i T_ij S_ij over these rows, with S = -scale V
            weighted = _target_block(cols.groups, n, i0, i1, cdtype).mul_(vol)
            t_row[here] = weighted.sum(dim=1) * -plan.scale
            t_col -= weighted.sum(dim=0) * plan.scale
        if bounded:
            e = vol.neg_().add_(1.0).mul_(plan.scale * LOG2E).exp2_()  # exp((1 - V) / t)
            row[here] = e.sum(dim=1) if v is None else torch.mv(e, v)
            col += e.sum(dim=0) if v is None else torch.mv(e.T, v[i0:i1])
        else:
            s2 = vol.mul_(-plan.scale * LOG2E)  # S log2(e)
            if bias is not None:
                s2 += bias[None, :]
                s2 += bias[i0:i1, None]
            row[here] = _log2sumexp2(s2, dim=1)
            col = torch.logaddexp2(col, _log2sumexp2(s2, dim=0))
    if call.shard is not None:
        col = (distributed.all_reduce(call.shard, col[None]) if bounded
               else distributed.merge_column_log2sumexp2(call.shard, col[None]))[0]
        if grouped:
            t_col = distributed.all_reduce(call.shard, t_col[None])[0]
    targets = (t_row, t_col[r0:r1]) if grouped else None
    return row, col, targets, top1


def direction_hits(call: Call, row_hits, col_arg, valid, r0: int, r1: int, dtype) -> torch.Tensor:
    """(2, 2): the top-1 hits of this process's samples as anchors (row_hits, 0/1 per row) and as tuples
    (col_arg: each column's first best anchor over the whole batch) in the first row, over the valid
    samples (valid: 0/1 or None): the epilogue's (2, P) layout with P = the two directions. Both backends."""
    col_hits = top1_hits(call.ids, col_arg[r0:r1].long(), torch.arange(r0, r1, device=col_arg.device))
    per_direction = torch.stack([row_hits.to(dtype), col_hits.to(dtype)])
    if valid is not None:
        per_direction = per_direction * valid[r0:r1].to(dtype)
    return torch.cat([per_direction.sum(dim=1)[None], torch.zeros(1, 2, dtype=dtype, device=col_arg.device)])


def _backward(ctx, grad_loss):
    saved: Saved = ctx.saved
    plan, call, cols = saved.plan, saved.plan.call, saved.cols
    num = len(call.pairs) + 1
    xs, invs = ctx.saved_tensors[:num], ctx.saved_tensors[num:]
    xa, xo = xs[plan.anchor], [xs[o] for o in plan.others]
    n = xa.shape[0]
    r0, r1 = call.rows(n)
    coef = grad_loss.to(xa.dtype) * saved.coef  # (2,): rows, columns
    want_dt = saved.temperature_meta is not None and ctx.needs_input_grad[1]

    grad_a, grad_o = torch.zeros_like(xa), [torch.zeros_like(x) for x in xo]
    a, moments, wv = _backward_blocks(plan, cols, saved, coef, xa, xo, grad_a, grad_o, want_dt, r0, r1)
    dc = column_grad(cols.c, a, moments)
    dc = dc + dc.transpose(1, 2)  # C = X X^T: dL/dX_j = (dC + dC^T) X_j
    for l, g in enumerate(grad_o):
        for m, x in enumerate(xo):
            g.addcmul_(dc[:, l, m, None], x)

    grads = [None] * num
    grads[plan.anchor] = grad_a
    for o, g in zip(plan.others, grad_o):
        grads[o] = g
    grads = [_normalize_backward(g, x, inv).to(saved.in_dtype) for g, x, inv in zip(grads, xs, invs)]
    grad_t = None
    if want_dt:  # dS/dt = V / t^2
        dtype, device = saved.temperature_meta
        grad_t = (wv * plan.scale**2).to(dtype=dtype, device=device).reshape(call.temperature.shape)
    return (None, grad_t, *grads)


def _backward_blocks(plan: GramPlan, cols: Columns, saved: Saved, coef, xa, xo, grad_a, grad_o, want_dt: bool,
                     r0: int, r1: int):
    """Accumulate the rows [r0, r1)'s dL/dx_a into grad_a and dL/dx_ol into grad_o[l] (through s); return the
    column sums (a (N,), M (N, k(k+1)/2)) for dL/dC, and sum_ij W_ij V_ij (for dL/dt) or None."""
    cdtype, n, k, v = xa.dtype, xa.shape[0], len(xo), cols.valid
    bounded = plan.bounded(cdtype)
    rows = min(plan.block, max(r1 - r0, 1))
    tiles = [torch.empty(rows, n, dtype=cdtype, device=xa.device) for _ in xo]
    vol_buf, w_buf, g_buf = (torch.empty_like(tiles[0]) for _ in range(3))
    a = torch.zeros(n, dtype=cdtype, device=xa.device)
    moments = torch.zeros(n, len(pairs_of(k)), dtype=cdtype, device=xa.device)
    wv = torch.zeros((), dtype=cdtype, device=xa.device) if want_dt else None
    if bounded:  # W = E (a_i v_j + v_i b_j) - T terms, a = c_row v / rowsum, b = c_col v / colsum
        tiny = torch.finfo(cdtype).tiny
        row_a = coef[0] * (v[r0:r1] if v is not None else 1.0) / saved.row.clamp_min(tiny)
        col_b = coef[1] * (v if v is not None else 1.0) / saved.col.clamp_min(tiny)
    bias = _mask_bias(v) if v is not None and not bounded else None
    for i0 in range(r0, r1, plan.block):
        i1 = min(i0 + plan.block, r1)
        b, here = i1 - i0, slice(i0 - r0, i1 - r0)
        s = [torch.mm(xa[i0:i1], y.T, out=t[:b]) for y, t in zip(xo, tiles)]
        det = quadratic(cols.adj, s, vol_buf[:b])
        torch.sub(cols.det[None, :], det, out=det)  # det G
        positive = det > 0
        vol = det.clamp_(min=0.0).add_(EPS_V).sqrt_()
        w = w_buf[:b]
        if bounded:
            torch.mul(vol, -plan.scale * LOG2E, out=w).add_(plan.scale * LOG2E).exp2_()  # E
            if v is None:
                w.mul_(row_a[here, None] + col_b[None, :])
            else:
                w.mul_(torch.outer(row_a[here], v) + torch.outer(v[i0:i1], col_b))
        else:
            s2 = torch.mul(vol, -plan.scale * LOG2E, out=g_buf[:b])
            if bias is not None:
                s2 += bias[None, :]
                s2 += bias[i0:i1, None]
            torch.sub(s2, saved.col[None, :], out=w).exp2_().mul_(coef[1])  # c_col Q
            w.add_(s2.sub_(saved.row[here, None]).exp2_().mul_(coef[0]))  # + c_row P
        _subtract_targets(w, cols, coef, n, i0, i1)
        if wv is not None:
            wv = wv + (w * vol).sum()
        u = w.mul_(plan.scale).div_(vol).mul_(positive)  # U = W [det G > 0] / (t V)
        a += u.sum(dim=0) * 0.5
        for idx, (l, m) in enumerate(pairs_of(k)):
            moments[:, idx] += torch.mul(u, s[l], out=g_buf[:b]).mul_(s[m]).sum(dim=0) * 0.5
        for l in range(k):  # G_l = U (adj(C_j) s)_l: dL/ds_l
            g = torch.mul(s[0], cols.adj[None, :, l, 0], out=g_buf[:b])
            for m in range(1, k):
                g.addcmul_(s[m], cols.adj[None, :, l, m])
            g.mul_(u)
            grad_a[i0:i1].addmm_(g, xo[l])
            grad_o[l].addmm_(g.T, xa[i0:i1])
    return a, moments, wv


def _subtract_targets(w, cols: Columns, coef, n: int, i0: int, i1: int) -> None:
    """W -= (c_row + c_col) T at the rows [i0, i1): both directions' targets (T is symmetric)."""
    c = coef[0] + coef[1]
    if cols.groups is None:
        diag = w[:, i0:i1].diagonal()
        diag -= c * (cols.valid[i0:i1] if cols.valid is not None else 1.0)
    else:
        w.sub_(_target_block(cols.groups, n, i0, i1, w.dtype).mul_(c))


__all__ = ["GramNCEFunction", "GramPlan", "gram_nce_torch"]



gram_op = through_autograd(gram_nce_torch)
