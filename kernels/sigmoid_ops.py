"""The sigmoid objective (pairwise_sigmoid) on the Triton kernels, as torch.library custom ops.

The same tile machinery as InfoNCE (ops.py) with the SIGMOID flag: the forward sweeps each pair's rows
once and sums softplus(S + b) per row (no column statistics, no atomics; both directions only for the
column argmax of return_stats); the backward writes panels of G = c (sigmoid(S + b) - I) and takes them to
both gradients with two GEMMs, with per-tile partial sums of G S and G for dL/dt and dL/db. Positives by
id are added on the host (fastpair.targets, O(N*D)). The math: fastpair/_torch_sigmoid.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpair import distributed, epilogue
from fastpair.call import Call, PerPair
from fastpair.numerics import LN2
from fastpair.targets import Groups, add_target_grads, group_labels, target_terms

from . import launch
from .ops import (
    _device_values,
    _hits,
    _normalized,
    _scales,
    _unflatten,
    nan_unless_valid,
    own_coef,
)

OPS_VERSION = 3  # bump when an op's signature or autograd formula changes (see ops.OPS_VERSION)


def _call(zs, temperature, known_t, bias, known_b, mask, weights, normalize, stats, sizes, rank, group, pairs,
          ids) -> Call:
    """The Call the public function validated, rebuilt from the op's flattened arguments."""
    pairs = _unflatten(pairs)
    num_pairs = len(pairs)

    def per_pair(name, known, tensor):  # a tensor's values stay on the device (see ops.nan_unless_valid)
        return PerPair(name, tuple(known) if known else None, None if known else tensor, (num_pairs,))

    return Call(pairs=pairs, temperature=per_pair("temperature", known_t, temperature), weights=tuple(weights),
                mask=mask, ids=ids, label_smoothing=0.0, normalize=normalize, return_stats=stats, backend="triton",
                block_size=None, objective="sigmoid", bias=per_pair("bias", known_b, bias),
                shard=distributed.shard_from_op_arguments(sizes, rank, group))


def _positives(call: Call, staged: launch.Staged, n: int, inverse: torch.Tensor):
    """(P, rows) at this process's rows: the positives' sum of S and their number |P(i)| (1 without ids);
    inverse: 1/t per pair."""
    r0, r1 = call.rows(n)
    labels = group_labels(call.ids)
    xs, s_part, count = _normalized(staged), [], []
    for k, (p, q) in enumerate(call.pairs):
        groups = Groups.of(labels, call.mask, (p, q), 0.0, xs[p], mean=False)
        s_part.append(target_terms(xs[p], xs[q], groups, inverse[k], r0, r1, both=False))
        count.append(groups.sizes[r0:r1])
    return torch.stack(s_part), torch.stack(count)


@torch.library.custom_op(f"fastpair::pairwise_sigmoid_fwd_v{OPS_VERSION}", mutates_args=())
def pairwise_sigmoid_fwd(zs: list[torch.Tensor], temperature: torch.Tensor, known_t: list[float], bias: torch.Tensor,
                         known_b: list[float], mask: torch.Tensor | None, weights: list[float], normalize: bool,
                         stats: bool, sizes: list[int], rank: int, group: str, pairs: list[int],
                         ids: torch.Tensor | None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor]:
    """Returns loss, pair_losses (P,), accuracy (P, 2), r (M, N), coef (P,), and with ids the positives'
    sum of S and their number over this process's valid rows (P,) each (zeros without ids).
    temperature, bias: (P,) tensors; known_t, known_b: their values when the caller had numbers."""
    call = _call(zs, temperature, known_t, bias, known_b, mask, weights, normalize, stats, sizes, rank, group,
                 pairs, ids)
    n = zs[0].shape[0]
    r0, r1 = call.rows(n)
    num_pairs = len(call.pairs)
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        b = bias.float().contiguous()
        inverse, scale2 = _scales(temperature, known_t)
        staged = launch.stage(zs, mask, scale2, call.pairs, normalize, bias=b)
        swept = launch.forward(staged, False, stats, torch.are_deterministic_algorithms_enabled(),
                               row0=r0, rows=r1 - r0)
        two_way = swept.lse.shape[0] == 2 * num_pairs
        rowsum, diag = (swept.lse[0::2], swept.diag[0::2]) if two_way else (swept.lse, swept.diag)
        hits = _hits(call, swept.args, r0, r1) if stats else None
        if ids is None:  # the positive of row i is its own column: S_ii + b
            target = diag * LN2 + b[:, None]
            s_sums, positives = (torch.zeros(num_pairs, dtype=torch.float32, device=rowsum.device) for _ in range(2))
        else:
            s_part, count = _positives(call, staged, n, inverse)
            target = s_part + b[:, None] * count
            s_sums, positives = epilogue.valid_row_sums(call, n, s_part), epilogue.valid_row_sums(call, n, count)
        done = epilogue.finish(call, n, rowsum, torch.zeros_like(rowsum), target, hits, directions=1)
        loss, pair_losses = nan_unless_valid([("temperature", None if known_t else temperature),
                                              ("bias", None if known_b else bias)], done.loss, done.pair_losses)
    return loss, pair_losses, done.accuracy, staged.rnorm, own_coef(call, done), s_sums, positives


@pairwise_sigmoid_fwd.register_fake
def _(zs, temperature, known_t, bias, known_b, mask, weights, normalize, stats, sizes, rank, group, pairs, ids):
    m, n, p = len(zs), zs[0].shape[0], len(pairs) // 2

    def f32(*shape):
        return zs[0].new_empty(shape, dtype=torch.float32)

    return f32(), f32(p), f32(p, 2), f32(m, n), f32(p), f32(p), f32(p)


@torch.library.custom_op(f"fastpair::pairwise_sigmoid_bwd_v{OPS_VERSION}", mutates_args=())
def pairwise_sigmoid_bwd(grad: torch.Tensor, zs: list[torch.Tensor], temperature: torch.Tensor, known_t: list[float],
                         bias: torch.Tensor, mask: torch.Tensor | None, rnorm: torch.Tensor, coef: torch.Tensor,
                         normalize: bool, needs_dt: bool, needs_db: bool, sizes: list[int], rank: int,
                         pairs: list[int], ids: torch.Tensor | None, s_sums: torch.Tensor, positives: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dL/dz stacked (M, N, D) in the input dtype, dL/dt (P,) and dL/db (P,) (unset when not
    needed: discarded). known_t: the temperatures as numbers, when the caller gave numbers. With a process
    group, the gradient of this rank's share w.r.t. the gathered batch."""
    n = zs[0].shape[0]
    r0, rows = distributed.rows_from_op_arguments(sizes, rank, n)
    num_pairs = len(pairs) // 2
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        scale, scale2 = _scales(temperature, known_t)
        staged = launch.stage(zs, mask, scale2, _unflatten(pairs), normalize, rnorm=rnorm,
                              bias=bias.float().contiguous())
        c = (grad.float() * coef).contiguous()
        dxw, sgs, sgb = launch.backward(staged, staged.rnorm, c, False, needs_dt, ids is None, row0=r0, rows=rows,
                                        needs_db=needs_db)
        dt, db = (torch.empty(num_pairs, dtype=torch.float32, device=zs[0].device) for _ in range(2))
        if needs_dt:  # dL/dt = -(1/t) sum G S, S = S2 ln 2
            dt = sgs * (scale * -LN2)
        if needs_db:  # dL/db = sum G
            db = sgb
        if ids is not None:  # the positives' part of G, -c [j in P(i)]
            _add_positive_grads(staged, mask, ids, c, scale, dxw, r0, r0 + rows)
            if needs_dt:
                dt = dt + c * s_sums * scale  # the loss holds -c sum_pos S, and S is proportional to 1/t
            if needs_db:
                db = db - c * positives
        grads = launch.input_grads(dxw, staged, normalize)
    return grads, dt, db


def _add_positive_grads(staged: launch.Staged, mask, ids, coef, scale, dxw, r0: int, r1: int) -> None:
    """dxw (dL/dx * r) += the positives' part of every pair's gradient, -c [j in P(i)] / t."""
    labels = group_labels(ids)
    xs = _normalized(staged)
    for k, (p, q) in enumerate(staged.pairs):
        groups = Groups.of(labels, mask, (p, q), 0.0, xs[p], mean=False)
        c = -coef[k] * scale[k]  # times r per row: dxw holds dL/dx * r
        add_target_grads(xs[p], xs[q], groups, c * staged.rnorm[p, :, None], c * staged.rnorm[q, :, None],
                         dxw[p], dxw[q], r0, r1, both=False)


@pairwise_sigmoid_bwd.register_fake
def _(grad, zs, temperature, known_t, bias, mask, rnorm, coef, normalize, needs_dt, needs_db, sizes, rank, pairs,
      ids, s_sums, positives):
    m, (n, d), p = len(zs), zs[0].shape, len(pairs) // 2
    return zs[0].new_empty((m, n, d)), zs[0].new_empty((p,), dtype=torch.float32), \
        zs[0].new_empty((p,), dtype=torch.float32)


@dataclass(frozen=True)
class _State:
    """Forward -> backward, besides the saved tensors (temperature, bias, r, coef, s_sums, positives,
    ids or a placeholder, *zs)."""

    mask: torch.Tensor | None
    normalize: bool
    needs_dt: bool
    needs_db: bool
    sizes: list[int]
    rank: int
    known_t: list[float]
    known_b: list[float]
    pairs: list[int]
    has_ids: bool


def _setup_context(ctx, inputs, output):
    zs, temperature, known_t, bias, known_b, mask, weights, normalize, stats, sizes, rank, _group, pairs, ids = inputs
    _, pair_losses, accuracy, rnorm, coef, s_sums, positives = output
    ids_saved = ids if ids is not None else torch.empty(0, dtype=torch.int64)
    ctx.save_for_backward(temperature, bias, rnorm, coef, s_sums, positives, ids_saved, *zs)
    ctx.set_materialize_grads(False)  # the other outputs take no gradient: no zero tensors made for them
    ctx.state = _State(mask, normalize, temperature.requires_grad, bias.requires_grad, sizes, rank, known_t, known_b,
                       pairs, ids is not None)
    ctx.mark_non_differentiable(pair_losses, accuracy, rnorm, coef, s_sums, positives)


def _backward(ctx, grad_loss, *_unused):
    temperature, bias, rnorm, coef, s_sums, positives, ids, *zs = ctx.saved_tensors
    st: _State = ctx.state
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized: see _setup_context)
        return _input_grads(st, [None] * len(zs), None, None)
    grads, dt, db = pairwise_sigmoid_bwd(grad_loss, zs, temperature, st.known_t, bias, st.mask, rnorm, coef,
                                         st.normalize, st.needs_dt, st.needs_db, st.sizes, st.rank, st.pairs,
                                         ids if st.has_ids else None, s_sums, positives)
    return _input_grads(st, list(grads.unbind(0)), dt if st.needs_dt else None, db if st.needs_db else None)


def _input_grads(st: _State, zs_grads: list, dt, db) -> tuple:
    """The forward op's inputs' gradients. torch.library matches their structure to the inputs' pytree, where
    an empty list stays a list."""
    empty = lambda values: [] if not values else None  # noqa: E731
    return (zs_grads, dt, empty(st.known_t), db, empty(st.known_b), None, None, None, None, empty(st.sizes), None,
            None, None, None)


pairwise_sigmoid_fwd.register_autograd(_backward, setup_context=_setup_context)


def pairwise_sigmoid_triton(zs, call: Call):
    """(loss, pair_losses, accuracy) of a validated pairwise_sigmoid call through the custom ops."""
    device, num_pairs = zs[0].device, len(call.pairs)
    t, known_t = _device_values(call.temperature, num_pairs, device)
    b, known_b = _device_values(call.bias, num_pairs, device)
    pairs = [i for pair in call.pairs for i in pair]
    sizes, rank, group = distributed.op_arguments(call.shard)
    loss, pair_losses, accuracy, *_ = pairwise_sigmoid_fwd(
        zs, t, known_t, b, known_b, call.mask, list(call.weights), call.normalize, call.return_stats,
        sizes, rank, group, pairs, call.ids)
    return loss, pair_losses, accuracy

