"""Exact, memory-lean pure-PyTorch backend of the modality-pairwise InfoNCE loss.

For every pair (p, q) the N x N similarity matrix S = x_p x_q^T / t is visited in row blocks of
``block`` rows and never held whole: the forward pass keeps only per-pair row and column
statistics (O(N)), the backward pass recomputes each block. Memory is O(M*N*D + block*N).

Two exact variants, chosen per pair on the host:

* bounded (normalized inputs and 1/t <= ``exp_bound(dtype)``): |S| <= 1/t, so E = exp(S) neither
  overflows nor leaves the normal range, and *one* exponential per element serves both the row
  and the column sums, forward and backward (P = E / rowsum, Q = E / colsum):
      dL/dS_ij = c * (E_ij * (v_j / rowsum_i + v_i / colsum_j) - 2 v_i [i == j]),  c = w / (W * 2n)
  (the -2 [i == j] is the target T = I; with ids or label smoothing the blocks hold the softmax part
  only and fastpair.targets adds -2 c T, O(N*D)). The exponential is evaluated as exp2 with log2(e)
  folded into the matmul's scale (as Triton's fused-attention tutorial does), several times cheaper than
  exp on CPU.
* online (normalize=False, or a scale above the bound): row logsumexp per block, column
  logsumexp merged across blocks with logaddexp2; backward evaluates P and Q separately.

Masks (missing modalities) are applied without host syncs: as 0/1 weights in the bounded variant
and as -inf logits in the online variant. Float64 inputs are computed in float64, everything else
in float32; gradients come back in the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed, epilogue
from .call import Call
from .numerics import LN2, LOG2E, NORM_EPS, exp_bound
from .op import through_autograd
from .targets import Groups, add_target_grads, group_labels, target_terms, top1_hits


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_block(n: int) -> int:
    """Rows per block: about 2^21 logits (8 MiB in fp32) per block, 64..512 rows."""
    rows = (1 << 21) // max(n, 1)
    return int(max(64, min(512, rows)))


@dataclass(frozen=True)
class Plan:
    """This backend's host-side numbers for one call: the call itself, 1/t per pair, rows per block."""

    call: Call
    scales: tuple[float, ...]
    block: int
    biases: tuple[float, ...] = ()  # the sigmoid objective's b per pair, on the host

    def bounded(self, k: int, dtype: torch.dtype) -> bool:
        return self.call.normalize and self.scales[k] <= exp_bound(dtype)

    def active(self, k: int) -> bool:
        """A pair with weight 0 is skipped unless its statistics were asked for."""
        return self.call.weights[k] > 0 or self.call.return_stats


@dataclass(frozen=True)
class Saved:
    """Forward -> backward, besides the normalized inputs and inverse norms (saved as tensors)."""

    plan: Plan
    stats: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # per pair (row, col) of _forward_pair
    coef: torch.Tensor  # (P,) the epilogue's coefficients
    target_sums: torch.Tensor | None  # (P,) A of fastpair.targets over this process's valid rows, or None
    labels: torch.Tensor | None  # group labels of the ids (fastpair.targets), or None
    in_dtype: torch.dtype  # the gradients' dtype
    num_embeddings: int
    temperature_meta: tuple[torch.dtype, torch.device] | None  # the temperature tensor's, when it learns


@torch.compiler.disable  # runs eagerly inside a compiled step: host-side numbers and a blocked Python loop
def pairwise_nce_torch(embeddings, call: Call):
    """(loss, pair_losses, accuracy) of a validated call; the temperature tensor, if any, is read here."""
    n = embeddings[0].shape[0]
    scales = tuple(1.0 / t for t in call.temperature.host_values(len(call.pairs)))
    plan = Plan(call=call, scales=scales, block=call.block_size or default_block(n))
    temperature = call.temperature.tensor if call.temperature.learnable else None
    return PairwiseNCEFunction.apply(plan, temperature, *embeddings)


def _normalize(z: torch.Tensor, cdtype: torch.dtype, normalize: bool):
    """Return x (contiguous, compute dtype) and 1/max(||z||, eps) (or None when not normalizing)."""
    z = z.to(cdtype)
    if not normalize:
        return z.contiguous(), None
    denom = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return (z / denom).contiguous(), 1.0 / denom  # divide, as F.normalize does


def prepare(plan: Plan, embeddings):
    """What every forward starts from: the compute dtype, N, this process's rows [r0, r1), the inputs in the
    compute dtype (L2-normalized unless the call says not) with their inverse norms, and a (block, N) buffer
    for the logits."""
    cdtype = compute_dtype(embeddings[0].dtype)
    n = embeddings[0].shape[0]
    r0, r1 = plan.call.rows(n)
    xs, invs = zip(*(_normalize(z, cdtype, plan.call.normalize) for z in embeddings))
    buf = torch.empty(min(plan.block, max(r1 - r0, 1)), n, dtype=cdtype, device=embeddings[0].device)
    return cdtype, n, r0, r1, xs, invs, buf


def _normalize_backward(g: torch.Tensor, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Backward of x = z / max(||z||, eps): r * (g - x <x, g>) where the norm is above eps, r * g below."""
    active = inv < 1.0 / NORM_EPS  # ||z|| > eps (the clamp passes no gradient to the norm)
    dot = (x * g).sum(dim=1, keepdim=True) * active
    return inv * (g - x * dot)


def _log2sumexp2(s2: torch.Tensor, dim: int) -> torch.Tensor:
    """log2(sum(2^s2)) along dim, safe for rows that are all -inf (gives -inf)."""
    m = s2.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (torch.exp2(s2 - m).sum(dim=dim, keepdim=True).log2() + m).squeeze(dim)


def _mask_bias(v: torch.Tensor) -> torch.Tensor:
    """0 where valid, -inf where not (added to base-2 logits in the online variant)."""
    return torch.zeros_like(v).masked_fill_(v == 0, float("-inf"))


def _forward_pair(x, y, v, scale, bounded, block, stats, ids, buf, r0, r1):
    """Statistics of the rows [r0, r1) of S = scale * x y^T over valid samples (v: 0/1 weights or None).

    Returns (row, col, row_hits, col_best, col_arg): row (r1 - r0,) and col (N,) are, bounded, sums of
    exp(S) and, online, log2-sum-exp2 of S*log2(e), the column ones over these rows only (all rows
    without a process group; otherwise merged across ranks by _merge_columns). For statistics: row_hits
    (r1 - r0,) top-1 retrieval hits (by ids when given), and per column the best logit over these rows
    and its first row.
    """
    n = x.shape[0]
    xs = x[r0:r1] * (scale * LOG2E)  # S * log2(e) comes straight out of the matmul
    row = torch.empty(r1 - r0, dtype=x.dtype, device=x.device)
    if bounded:
        col = torch.zeros(n, dtype=x.dtype, device=x.device)
    else:
        col = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
        bias = _mask_bias(v) if v is not None else None
    row_hits, col_best, col_arg = top1_buffers(r1 - r0, n, x) if stats else (None, None, None)
    for i0 in range(r0, r1, block):
        i1 = min(i0 + block, r1)
        s2 = torch.mm(xs[i0 - r0:i1 - r0], y.T, out=buf[: i1 - i0])
        if stats:  # exp2 below is monotone, so the argmax is taken on the logits
            col_best, col_arg = track_top1(s2, v, ids, i0, i1, r0, row_hits, col_best, col_arg)
        if bounded:
            e = torch.exp2(s2, out=s2)
            if v is None:
                row[i0 - r0:i1 - r0] = e.sum(dim=1)
                col += e.sum(dim=0)
            else:
                row[i0 - r0:i1 - r0] = torch.mv(e, v)
                col += torch.mv(e.T, v[i0:i1])
        else:
            if v is not None:
                s2 += bias[None, :]
                s2 += bias[i0:i1, None]
            row[i0 - r0:i1 - r0] = _log2sumexp2(s2, dim=1)
            col = torch.logaddexp2(col, _log2sumexp2(s2, dim=0))
    return row, col, row_hits, col_best, col_arg


def top1_buffers(rows: int, n: int, like: torch.Tensor):
    """(row_hits, col_best, col_arg) for track_top1: no hits yet, no column maximum yet."""
    return (torch.zeros(rows, dtype=like.dtype, device=like.device),
            torch.full((n,), float("-inf"), dtype=like.dtype, device=like.device),
            torch.zeros(n, dtype=torch.long, device=like.device))


def track_top1(s, v, ids, i0: int, i1: int, r0: int, row_hits, col_best, col_arg):
    """One row block [i0, i1) of S: its rows' top-1 hits into row_hits, and each column's best logit so far
    and its first row (argmax over valid entries only). Returns the updated (col_best, col_arg)."""
    cand = s if v is None else s + _mask_bias(v)[None, :] + _mask_bias(v[i0:i1])[:, None]
    best = cand.argmax(dim=1)
    row_hits[i0 - r0:i1 - r0] = top1_hits(ids, best, torch.arange(i0, i1, device=s.device)).to(row_hits.dtype)
    carg = cand.argmax(dim=0)  # first maximal row (max(dim) does not promise the first)
    cbest = cand.gather(0, carg[None, :]).squeeze(0)
    better = cbest > col_best  # strict: the first row block with the maximum wins
    return torch.where(better, cbest, col_best), torch.where(better, carg + i0, col_arg)


def _merge_columns(shard, cols: list, bounded: list[bool]) -> None:
    """Column statistics of every rank's rows, in place: sums add; log2-sum-exp2s merge through their max."""
    if shard is None or not cols:
        return
    for kind in (True, False):
        idx = [i for i, b in enumerate(bounded) if b == kind]
        if not idx:
            continue
        c = torch.stack([cols[i] for i in idx])
        c = distributed.all_reduce(shard, c) if kind else distributed.merge_column_log2sumexp2(shard, c)
        for j, i in enumerate(idx):
            cols[i] = c[j]


def _backward_pair(x, y, v, scale, bounded, block, row, col, c, identity, gx, gy, want_dt, buf, tmp, r0, r1):
    """Accumulate dL/dx into gx and dL/dy into gy (w.r.t. the normalized inputs) from the rows [r0, r1).

    c: 0-d tensor, grad_output * w / (W * 2n) (0 when the pair has no valid sample); row: the (r1 - r0,)
    row statistics, col: the (N,) column statistics of the whole batch. G = dL/dS = c (P + Q - 2T): with
    identity targets T = I is applied here; otherwise G = c (P + Q) and fastpair.targets adds the T part.
    dL/dx = scale * G y, dL/dy = scale * G^T x; scale is folded into c.
    Returns sum_ij G_ij S_ij = <dL/dx, x> over these rows (for dL/dt = -scale * that), or None.
    """
    n = x.shape[0]
    cs = c * scale
    xs = x * (scale * LOG2E)
    if identity:
        diag = -2.0 * cs * (v if v is not None else torch.ones(n, dtype=x.dtype, device=x.device))
    if bounded:
        # G' = scale * G = E * (a_i v_j + v_i b_j) - 2 c' v_i [i == j],  a = c' v / rowsum, b = c' v / colsum
        tiny = torch.finfo(x.dtype).tiny
        a = cs * (v[r0:r1] if v is not None else 1.0) / row.clamp_min(tiny)
        b = cs * (v if v is not None else 1.0) / col.clamp_min(tiny)
        if v is not None:
            left = torch.stack([a, v[r0:r1]], dim=1)  # rank-2 outer sum a_i v_j + v_i b_j as a tiny matmul
            right = torch.stack([v, b], dim=0)
    else:
        bias = _mask_bias(v) if v is not None else None
    sgs = torch.zeros((), dtype=x.dtype, device=x.device) if want_dt else None
    for i0 in range(r0, r1, block):
        i1 = min(i0 + block, r1)
        rows, local = i1 - i0, slice(i0 - r0, i1 - r0)
        g = torch.mm(xs[i0:i1], y.T, out=buf[:rows])  # S * log2(e), recomputed
        t = tmp[:rows]
        if bounded:
            torch.exp2(g, out=g)
            if v is None:
                torch.add(a[local, None], b[None, :], out=t)
            else:
                torch.mm(left[local], right, out=t)
            g.mul_(t)
        else:
            if v is not None:
                g += bias[None, :]
                g += bias[i0:i1, None]
            torch.sub(g, col[None, :], out=t).exp2_()  # Q (column softmax), log2 domain
            g.sub_(row[local, None]).exp2_()  # P (row softmax)
            g.add_(t).mul_(cs)
        if identity:
            g[:, i0:i1].diagonal().add_(diag[i0:i1])
        sgs = add_block_grads(g, x, y, i0, i1, gx, gy, sgs)
    return sgs


def add_block_grads(g, x, y, i0: int, i1: int, gx, gy, sgs):
    """dL/dS of rows [i0, i1) (g) into gx[i0:i1] += g y and gy += g^T x[i0:i1]; with sgs (not None) also
    sgs += sum(dL/dS * S) * t = <g y, x[i0:i1]>, what the temperature's gradient needs."""
    if sgs is not None:
        dx = torch.mm(g, y)
        sgs = sgs + (dx * x[i0:i1]).sum()
        gx[i0:i1] += dx
    else:
        gx[i0:i1].addmm_(g, y)
    gy.addmm_(g.T, x[i0:i1])
    return sgs


class PairwiseNCEFunction(torch.autograd.Function):
    """All pairs in one call: inputs (plan, temperature tensor that needs a gradient or None, *embeddings)."""

    @staticmethod
    def forward(ctx, plan: Plan, temperature, *embeddings):
        with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
            return _forward(ctx, plan, temperature, embeddings)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_pair_losses, _grad_accuracy):
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            return _backward(ctx, grad_loss)


def _valid(call: Call, k: int, cdtype: torch.dtype) -> torch.Tensor | None:
    """(N,) 0/1 weights of pair k's valid samples, or None without a mask. A tensor of its own, not a row of
    a (P, N) table: BLAS sums an aligned vector in the same order on every call, so results stay bitwise."""
    if call.mask is None:
        return None
    p, q = call.pairs[k]
    return (call.mask[p] & call.mask[q]).to(cdtype)


def _forward(ctx, plan: Plan, temperature, embeddings):
    call = plan.call
    in_dtype, device = embeddings[0].dtype, embeddings[0].device
    cdtype, n, r0, r1, xs, invs, buf = prepare(plan, embeddings)
    num_pairs = len(call.pairs)

    # 1. row statistics of this process's rows; column statistics merged over every rank's rows
    active = [k for k in range(num_pairs) if plan.active(k)]
    valid = {k: _valid(call, k, cdtype) for k in active}
    found = {}
    for k in active:
        p, q = call.pairs[k]
        v = valid[k]
        found[k] = _forward_pair(xs[p], xs[q], v, plan.scales[k], plan.bounded(k, cdtype), plan.block,
                                 call.return_stats, call.ids, buf, r0, r1)
    cols = [found[k][1] for k in active]
    _merge_columns(call.shard, cols, [plan.bounded(k, cdtype) for k in active])

    # 2. per pair, at this process's rows: logsumexp of its row and of its column, the target terms
    #    (S_ii twice, or those of fastpair.targets), top-1 hits
    lse_row, lse_col, target = (torch.zeros(num_pairs, r1 - r0, dtype=cdtype, device=device) for _ in range(3))
    labels = None if call.ids is None else group_labels(call.ids)
    hits = torch.zeros(2, num_pairs, dtype=cdtype, device=device) if call.return_stats else None
    stats = [None] * num_pairs
    for k, col in zip(active, cols):
        p, q = call.pairs[k]
        row, _, row_hits, col_best, col_arg = found[k]
        v = valid[k]
        if not plan.bounded(k, cdtype) and v is not None:  # invalid samples: finite placeholders, never used
            row = torch.where(v[r0:r1] > 0, row, torch.zeros_like(row))
            col = torch.where(v > 0, col, torch.zeros_like(col))
        if call.identity_targets:
            target[k] = 2.0 * ((xs[p][r0:r1] * xs[q][r0:r1]).sum(dim=1) * plan.scales[k])
        else:
            groups = Groups.of(labels, call.mask, (p, q), call.label_smoothing, xs[p])
            target[k] = target_terms(xs[p], xs[q], groups, plan.scales[k], r0, r1)
        if plan.bounded(k, cdtype):
            lse_row[k], lse_col[k] = torch.log(row), torch.log(col[r0:r1])
        else:
            lse_row[k], lse_col[k] = row * LN2, col[r0:r1] * LN2
        if hits is not None:
            if call.shard is not None:
                col_arg = distributed.merge_first_argmax(call.shard, col_best, col_arg)
            col_hit = top1_hits(call.ids, col_arg[r0:r1], torch.arange(r0, r1, device=device)).to(cdtype)
            hits[0, k] = row_hits.sum() if v is None else row_hits @ v[r0:r1]
            hits[1, k] = col_hit.sum() if v is None else col_hit @ v[r0:r1]
        stats[k] = (row, col)

    # 3. the shared epilogue: the loss (W times this process's share under a group), stats, coefficients
    done = epilogue.finish(call, n, lse_row, lse_col, target, hits)
    meta = (temperature.dtype, temperature.device) if temperature is not None else None
    sums = None if call.identity_targets else epilogue.valid_row_sums(call, n, target)
    ctx.saved = Saved(plan=plan, stats=tuple(stats), coef=done.coef, target_sums=sums, labels=labels,
                      in_dtype=in_dtype, num_embeddings=len(embeddings), temperature_meta=meta)
    ctx.save_for_backward(*xs, *(inv if inv is not None else torch.empty(0) for inv in invs))
    ctx.mark_non_differentiable(done.pair_losses, done.accuracy)
    return done.loss, done.pair_losses, done.accuracy


def _backward(ctx, grad_loss):
    saved: Saved = ctx.saved
    plan, call = saved.plan, saved.plan.call
    m = saved.num_embeddings
    xs, invs = ctx.saved_tensors[:m], ctx.saved_tensors[m:]
    cdtype = xs[0].dtype
    n = xs[0].shape[0]
    r0, r1 = call.rows(n)
    device = xs[0].device
    buf = torch.empty(min(plan.block, max(r1 - r0, 1)), n, dtype=cdtype, device=device)
    tmp = torch.empty_like(buf)

    grads = [torch.zeros_like(x) for x in xs]
    coef = grad_loss.to(cdtype) * saved.coef  # zero for a pair without a valid sample
    want_dt = saved.temperature_meta is not None and ctx.needs_input_grad[1]
    dts = []
    for k, (p, q) in enumerate(call.pairs):
        if saved.stats[k] is None or call.weights[k] == 0:
            dts.append(torch.zeros((), dtype=cdtype, device=device))
            continue
        row, col = saved.stats[k]
        v = _valid(call, k, cdtype)
        sgs = _backward_pair(xs[p], xs[q], v, plan.scales[k], plan.bounded(k, cdtype), plan.block, row, col,
                             coef[k], call.identity_targets, grads[p], grads[q], want_dt, buf, tmp, r0, r1)
        # dL/dt = -(1/t) sum_ij G_ij S_ij = -scale * <dL/dx, x> (before the normalization backward)
        dt = -plan.scales[k] * sgs if want_dt else None
        if not call.identity_targets:  # the T part of G: -2 c T, through fastpair.targets
            groups = Groups.of(saved.labels, call.mask, (p, q), call.label_smoothing, xs[p])
            c = -coef[k] * plan.scales[k]
            add_target_grads(xs[p], xs[q], groups, c, c, grads[p], grads[q], r0, r1)
            if want_dt:  # the loss holds -c A, and A is proportional to 1/t
                dt = dt + coef[k] * saved.target_sums[k] * plan.scales[k]
        dts.append(dt)

    if call.normalize:
        grads = [_normalize_backward(gr, x, inv) for gr, x, inv in zip(grads, xs, invs)]
    grads = [gr.to(saved.in_dtype) for gr in grads]

    grad_t = None
    if want_dt:
        dt = torch.stack(dts)
        dtype, dev = saved.temperature_meta
        grad_t = (dt.sum() if call.temperature.shape == () else dt).to(dtype=dtype, device=dev)
        grad_t = grad_t.reshape(call.temperature.shape)
    return (None, grad_t, *grads)


__all__ = ["PairwiseNCEFunction", "Plan", "pairwise_nce_torch", "default_block", "compute_dtype"]



nce_op = through_autograd(pairwise_nce_torch)
