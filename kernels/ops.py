"""The Triton backend as torch.library custom ops: opaque to torch.compile (a compiled step keeps one
graph), each with a fake implementation for tracing and the backward registered as their autograd.

The forward op launches the sweep (launch.forward), merges statistics across ranks under a process group
(fastpair.distributed) and hands them to the shared epilogue (fastpair.epilogue); the backward op launches
the gradient panels (launch.backward) and the input gradient. A custom op takes tensors and plain values
only, so the validated Call travels flattened and is rebuilt inside (`_call`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpair import distributed, epilogue
from fastpair.call import Call, PerPair
from fastpair.numerics import LN2, LOG2E, exp_bound
from fastpair.tables import constant, pair_valid
from fastpair.targets import Groups, add_target_grads, group_labels, identity_targets, target_terms, top1_hits

from . import launch

# Bump when an op's signature or autograd formula changes: torch.compile's on-disk caches key a compiled
# step on its forward graph and could replay a backward recorded against the old op.
OPS_VERSION = 6


def _call(zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, group, pairs, ids,
          label_smoothing) -> Call:
    """The Call the public function validated, rebuilt from the op's flattened arguments."""
    pairs = _unflatten(pairs)
    # a tensor's values stay on the device: reading them would wait for the GPU (see _bound, nan_unless_valid)
    temperature = PerPair("temperature", tuple(known_t) if known_t else None, None if known_t else temperature,
                          (len(pairs),))
    return Call(pairs=pairs, temperature=temperature, weights=tuple(weights), mask=mask, ids=ids,
                label_smoothing=label_smoothing, normalize=normalize, return_stats=stats, backend="triton",
                block_size=None, shard=distributed.shard_from_op_arguments(sizes, rank, group))


def _unflatten(pairs: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple(zip(pairs[0::2], pairs[1::2]))


def _scales(temperature: torch.Tensor, known_t) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/t, log2(e)/t) per pair, (P,) fp32 on the device: cached tables for numbers (no kernel); from a
    tensor, one reciprocal and one product (no copy from the host)."""
    if known_t:
        device = str(temperature.device)
        return (constant(tuple(1.0 / t for t in known_t), torch.float32, device),
                constant(tuple(LOG2E / t for t in known_t), torch.float32, device))
    inverse = torch.reciprocal(temperature.float())
    return inverse, inverse * LOG2E


def _bound(call: Call, inverse: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """(bounded, flag): whether |S| <= 1/t <= exp_bound(float32) for every pair (normalized inputs), on the
    host from numeric temperatures; from a tensor (inverse: its 1/t), a 0-d int32 flag computed on the
    device (bounded is then False and the kernels read the flag)."""
    if not call.normalize or call.temperature.values is not None:
        return _host_bounded(call.temperature.values or (), call.normalize), None
    return False, ((inverse > 0) & (inverse <= exp_bound(torch.float32))).all().to(torch.int32)


def _host_bounded(known_t, normalize: bool) -> bool:
    return bool(known_t) and normalize and max(1.0 / t for t in known_t) <= exp_bound(torch.float32)


def nan_unless_valid(parameters, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs, or NaN where a parameter tensor holds an invalid value (a temperature not finite and
    > 0, a bias not finite): the device-side counterpart of the host's ValueError, which would need a sync.
    parameters: (name, tensor) pairs; a tensor None (numbers, checked on the host) is skipped."""
    ok = None
    for name, tensor in parameters:
        if tensor is None:
            continue
        valid = torch.isfinite(tensor) & (tensor > 0) if name == "temperature" else torch.isfinite(tensor)
        ok = valid.all() if ok is None else ok & valid.all()
    if ok is None:
        return outputs
    return tuple(torch.where(ok, out, float("nan")) for out in outputs)


@torch.library.custom_op(f"fastpair::pairwise_nce_fwd_v{OPS_VERSION}", mutates_args=())
def pairwise_nce_fwd(zs: list[torch.Tensor], temperature: torch.Tensor, known_t: list[float],
                     mask: torch.Tensor | None, weights: list[float], normalize: bool, stats: bool,
                     sizes: list[int], rank: int, group: str, pairs: list[int], ids: torch.Tensor | None,
                     label_smoothing: float,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    """Returns loss, pair_losses (P,), accuracy (P, 2), lse2 (2P, N), r (M, N), coef (P,), the target terms'
    sums over this process's valid rows (P,) (fastpair.targets; unset for identity targets) and the bound
    flag of `_bound` (0-d int32; unset and unread with numeric temperatures).
    temperature: (P,) tensor; known_t: the same values as numbers when the caller had them. A tensor's
    values are never read on the host: invalid ones make the loss NaN (`nan_unless_valid`).
    sizes, rank, group: fastpair.distributed.op_arguments of a process group ([], 0, "" without one).
    pairs: the P pairs flattened (p0, q0, p1, q1, ...)."""
    call = _call(zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, group, pairs, ids,
                 label_smoothing)
    n = zs[0].shape[0]
    r0, r1 = call.rows(n)
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        inverse, scale2 = _scales(temperature, known_t)
        bounded, flag = _bound(call, inverse)
        staged = launch.stage(zs, mask, scale2, call.pairs, normalize, flag=flag)
        swept = launch.forward(staged, bounded, stats, torch.are_deterministic_algorithms_enabled(),
                               row0=r0, rows=r1 - r0)
        table, lse_row, lse_col, diag = _statistics(call, swept, n, flag)
        hits = _hits(call, swept.args, r0, r1) if stats else None
        if call.identity_targets:
            done = epilogue.finish(call, n, lse_row, lse_col, 2.0 * diag, hits, unit=LN2)
            sums = torch.empty(len(call.pairs), dtype=torch.float32, device=table.device)  # unread: no fill
        else:
            target = _target_terms(call, staged, n, inverse)
            done = epilogue.finish(call, n, lse_row * LN2, lse_col * LN2, target, hits)
            sums = epilogue.valid_row_sums(call, n, target)
        loss, pair_losses = nan_unless_valid([("temperature", None if known_t else temperature)], done.loss,
                                             done.pair_losses)
        if flag is None:  # an output must be a fresh tensor: an unread placeholder, no launch
            flag = torch.empty((), dtype=torch.int32, device=table.device)
    return loss, pair_losses, done.accuracy, table, staged.rnorm, own_coef(call, done), sums, flag


def own_coef(call: Call, done: epilogue.Finished) -> torch.Tensor:
    """The epilogue's coefficients as an op may return them: its own tensor. Without a mask they are a
    cached table shared by every call (epilogue._unmasked): a copy, one small kernel."""
    return done.coef.clone() if call.mask is None else done.coef


def _hits(call: Call, args: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """(2, P) top-1 hits over this process's valid rows, x->y and y->x, from the two-direction sweep's
    first argmax per row (a hit: the row itself, or a sample with the row's id)."""
    same = top1_hits(call.ids, args.long(), torch.arange(r0, r1, device=args.device))
    if call.mask is not None:
        same = same & pair_valid(call.mask, call.pairs)[:, r0:r1].repeat_interleave(2, dim=0)
    same = same.float()
    return torch.stack([same[0::2].sum(dim=1), same[1::2].sum(dim=1)])


def _normalized(staged: launch.Staged) -> dict[int, torch.Tensor]:
    """x_m = z_m r_m in fp32 (N, D) for every modality in a pair: the target side's operands
    (fastpair.targets), made once per call."""
    used = dict.fromkeys(m for pair in staged.pairs for m in pair)
    return {m: staged.z[m].float() * staged.rnorm[m, :, None] for m in used}


def _target_terms(call: Call, staged: launch.Staged, n: int, inverse: torch.Tensor) -> torch.Tensor:
    """(P, rows) the target terms of fastpair.targets at this process's rows, in nats (inverse: 1/t per pair)."""
    r0, r1 = call.rows(n)
    labels = None if call.ids is None else group_labels(call.ids)
    xs, out = _normalized(staged), []
    for k, (p, q) in enumerate(call.pairs):
        groups = Groups.of(labels, call.mask, (p, q), call.label_smoothing, xs[p])
        out.append(target_terms(xs[p], xs[q], groups, inverse[k], r0, r1))
    return torch.stack(out)


def _add_target_grads(staged: launch.Staged, mask, ids, eps: float, coef, scale, dxw, r0: int, r1: int) -> None:
    """dxw (dL/dx * r, fp32) += the targets' part of every pair's gradient (coef: the incoming gradient
    times the epilogue's coefficients; scale: 1/t per pair, on the device)."""
    labels = None if ids is None else group_labels(ids)
    xs = _normalized(staged)
    for k, (p, q) in enumerate(staged.pairs):
        groups = Groups.of(labels, mask, (p, q), eps, xs[p])
        c = -coef[k] * scale[k]  # times r per row: dxw holds dL/dx * r
        add_target_grads(xs[p], xs[q], groups, c * staged.rnorm[p, :, None], c * staged.rnorm[q, :, None],
                         dxw[p], dxw[q], r0, r1)


def _statistics(call: Call, swept: launch.Swept, n: int, flag: torch.Tensor | None):
    """The backward's (2P, N) lse2 table (row 2k: pair k's row statistics, needed at this process's rows;
    row 2k+1: its column statistics, needed at every row) and, at this process's rows, the epilogue's
    (P, rows) row and column lse2 and S2_ii. Column statistics of every rank's rows: all-gathered from the
    reverse direction's rows (two-direction path) or from the all-reduced column sums (fast path); with
    the bound decided on the device, both, and the flag picks (the collectives run either way, so that
    every rank makes the same calls)."""
    if swept.on_device:
        one_way = _one_way(call, swept.lse[0::2], swept.colsum, swept.diag[0::2], n)
        two_way = _two_way(call, swept.lse, swept.diag)
        fast = flag.bool()
        return tuple(torch.where(fast, a, b) for a, b in zip(one_way, two_way))
    if swept.colsum is None:
        return _two_way(call, swept.lse, swept.diag)
    return _one_way(call, swept.lse, swept.colsum, swept.diag, n)


def _two_way(call: Call, lse: torch.Tensor, diag: torch.Tensor):
    """_statistics from both directions' row statistics (2P, rows)."""
    table = lse if call.shard is None else distributed.gather_rows(call.shard, lse.T).T.contiguous()
    return table, lse[0::2], lse[1::2], diag[0::2]


def _one_way(call: Call, lse: torch.Tensor, colsum: torch.Tensor, diag: torch.Tensor, n: int):
    """_statistics from one direction's row statistics (P, rows) and the column sums of exp2 (P, N)."""
    r0, r1 = call.rows(n)
    num_pairs = len(call.pairs)
    colsum = colsum if call.shard is None else distributed.all_reduce(call.shard, colsum)
    col = torch.log2(colsum)
    if call.mask is not None:
        col = torch.where(pair_valid(call.mask, call.pairs), col, torch.zeros_like(col))
    row = lse
    if call.shard is not None:  # other ranks' row statistics are never read: zeros
        row = torch.zeros(num_pairs, n, dtype=row.dtype, device=row.device)
        row[:, r0:r1] = lse
    table = torch.stack([row, col], dim=1).reshape(2 * num_pairs, n)
    return table, lse, col[:, r0:r1], diag


@pairwise_nce_fwd.register_fake
def _(zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, group, pairs, ids, label_smoothing):
    m, n, p = len(zs), zs[0].shape[0], len(pairs) // 2

    def f32(*shape):
        return zs[0].new_empty(shape, dtype=torch.float32)

    return (f32(), f32(p), f32(p, 2), f32(2 * p, n), f32(m, n), f32(p), f32(p),
            zs[0].new_empty((), dtype=torch.int32))


@torch.library.custom_op(f"fastpair::pairwise_nce_bwd_v{OPS_VERSION}", mutates_args=())
def pairwise_nce_bwd(grad: torch.Tensor, zs: list[torch.Tensor], temperature: torch.Tensor, known_t: list[float],
                     mask: torch.Tensor | None, lse: torch.Tensor, rnorm: torch.Tensor, coef: torch.Tensor,
                     bounded: bool, flag: torch.Tensor | None, normalize: bool, needs_dt: bool, sizes: list[int],
                     rank: int, pairs: list[int], ids: torch.Tensor | None, label_smoothing: float,
                     target_sums: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dL/dz stacked (M, N, D) in the input dtype and dL/dt (P,) (unset when not needed: discarded).
    known_t: the temperatures as numbers, when the caller gave numbers; bounded: from them (host); flag:
    the forward's device flag for a temperature tensor (None otherwise). With a process group, the
    gradient of this rank's share of the loss w.r.t. the gathered batch (no communication here: the
    gather's backward sums the ranks' gradients)."""
    identity = identity_targets(ids, label_smoothing)
    n = zs[0].shape[0]
    r0, rows = distributed.rows_from_op_arguments(sizes, rank, n)
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        scale, scale2 = _scales(temperature, known_t)
        staged = launch.stage(zs, mask, scale2, _unflatten(pairs), normalize, rnorm=rnorm, flag=flag)
        c = (grad.float() * coef).contiguous()
        dxw, sgs, _ = launch.backward(staged, lse, c, bounded, needs_dt, identity, row0=r0, rows=rows)
        if not identity:
            _add_target_grads(staged, mask, ids, label_smoothing, c, scale, dxw, r0, r0 + rows)
        grads = launch.input_grads(dxw, staged, normalize)
        if needs_dt:  # dL/dt = -(1/t) sum G S, S = S2 ln 2; the targets' part: the loss holds -c A, A ~ 1/t
            dt = sgs * (scale * -LN2)
            if not identity:
                dt = dt + c * target_sums * scale
        else:
            dt = torch.empty(len(pairs) // 2, dtype=torch.float32, device=zs[0].device)
    return grads, dt


@pairwise_nce_bwd.register_fake
def _(grad, zs, temperature, known_t, mask, lse, rnorm, coef, bounded, flag, normalize, needs_dt, sizes, rank, pairs,
      ids, label_smoothing, target_sums):
    m, (n, d) = len(zs), zs[0].shape
    return zs[0].new_empty((m, n, d)), zs[0].new_empty((len(pairs) // 2,), dtype=torch.float32)


@dataclass(frozen=True)
class _State:
    """Forward -> backward, besides the saved tensors (temperature, lse2, r, coef, target sums, the bound
    flag, ids (or an empty placeholder), *zs)."""

    mask: torch.Tensor | None
    normalize: bool
    needs_dt: bool
    sizes: list[int]
    rank: int
    known_t: list[float]
    pairs: list[int]
    has_ids: bool
    label_smoothing: float


def _setup_context(ctx, inputs, output):
    zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, _group, pairs, ids, eps = inputs
    _, pair_losses, accuracy, lse, rnorm, coef, sums, flag = output
    ids_saved = ids if ids is not None else torch.empty(0, dtype=torch.int64)
    ctx.save_for_backward(temperature, lse, rnorm, coef, sums, flag, ids_saved, *zs)
    ctx.set_materialize_grads(False)  # the other outputs take no gradient: no zero tensors made for them
    ctx.state = _State(mask, normalize, temperature.requires_grad, sizes, rank, known_t, pairs, ids is not None, eps)
    ctx.mark_non_differentiable(pair_losses, accuracy, lse, rnorm, coef, sums, flag)


def _backward(ctx, grad_loss, *_unused):
    temperature, lse, rnorm, coef, sums, flag, ids, *zs = ctx.saved_tensors
    state: _State = ctx.state
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized: see _setup_context)
        return _input_grads(state, [None] * len(zs), None)
    known = state.known_t  # numbers: the bound is the host's; a tensor: the forward's device flag
    bounded = _host_bounded(known, state.normalize)
    grads, dt = pairwise_nce_bwd(grad_loss, zs, temperature, known, state.mask, lse, rnorm, coef, bounded,
                                 None if known or not state.normalize else flag, state.normalize, state.needs_dt,
                                 state.sizes, state.rank, state.pairs, ids if state.has_ids else None,
                                 state.label_smoothing, sums)
    return _input_grads(state, list(grads.unbind(0)), dt if state.needs_dt else None)


def _input_grads(state: _State, zs_grads: list, dt) -> tuple:
    """The forward op's inputs' gradients. torch.library matches their structure to the inputs' pytree, where
    an empty list stays a list."""
    known_grad = [] if not state.known_t else None
    sizes_grad = [] if not state.sizes else None
    return zs_grads, dt, known_grad, None, None, None, None, sizes_grad, None, None, None, None, None


pairwise_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def _device_values(parameter: PerPair, num_pairs: int, device) -> tuple[torch.Tensor, list[float]]:
    """A temperature or bias as the ops take it: a (P,) fp32 tensor (the gradient flows through a tensor
    argument), and its host values when the caller gave numbers ([] for a tensor, whose values stay on the
    device)."""
    if parameter.values is None:
        value = parameter.tensor.to(device=device, dtype=torch.float32).reshape(-1)
        return (value.expand(num_pairs).contiguous() if value.numel() == 1 else value), []
    known = list(parameter.values)
    if torch.compiler.is_compiling():  # a constant of the graph (dynamo does not trace lru_cache)
        return torch.tensor(known, dtype=torch.float32, device=device), known
    return constant(tuple(known), torch.float32, str(device)), known


def pairwise_nce_triton(zs, call: Call):
    """(loss, pair_losses, accuracy) of a validated call through the custom ops. A temperature tensor
    keeps its gradient and is never read on the host (no sync): the bound of the fast path is decided on
    the device, and invalid values give a NaN loss instead of the ValueError numbers get."""
    t, known = _device_values(call.temperature, len(call.pairs), zs[0].device)
    pairs = [i for pair in call.pairs for i in pair]
    sizes, rank, group = distributed.op_arguments(call.shard)
    loss, pair_losses, accuracy, *_ = pairwise_nce_fwd(zs, t, known, call.mask, list(call.weights),
                                                       call.normalize, call.return_stats, sizes, rank, group,
                                                       pairs, call.ids, call.label_smoothing)
    return loss, pair_losses, accuracy
