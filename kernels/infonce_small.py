"""Small batches (N <= 64, one process): the whole InfoNCE loss of every pair, its statistics and its gradients
in one Triton program, one launch per step.

At the batch sizes this paper trains at, a GPU step is bound by host work: the tiled path's sweep, panels,
GEMMs and epilogue are each cheap on the device and each a launch and a dispatch on the host. Here the
program holds every pair's N x N logits in registers, one pair at a time:

    S = diag(r_p) Z_p Z_q^T diag(r_q) / t_k        (r: inverse norms, summed over D in the same loop)
    P = softmax over columns, Q = softmax over rows (valid samples only), T the targets by id and smoothing,
    G = c_k (P + Q - T - T')   with c_k = w'_k [n_k != 1] / (sum_k w'_k * 2 n_k)   (the epilogue's coef),

the loss, the per-pair losses and both directions' first-argmax hits, and stores G (fp32) in a scratch
buffer. A second pass per modality m and D-chunk then writes dL/dz_m in the input dtype:

    dx_i = sum_k sum_j G_ij y_j / t_k,    dz_i = r_i (dx_i - x_i <x_i, dx_i>)

(<x_i, dx_i> summed over D in a pass of its own), and dL/dt_k = -(1/t_k) sum_ij G_ij S_ij. G is stored in
fp32, so no 16-bit gradient panel can flush to zero. No atomics: the result is the same bits every run.
Numeric temperatures and the weights are kernel arguments (no device table, nothing a CUDA graph could lose).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpair.call import Call
from fastpair.op import Needs, Result

from . import tuning
from .launch import input_precision

MAX_N = 64  # the largest batch held in one program (its N x N tiles in registers)


def takes(call: Call, zs) -> bool:
    """Whether this one-program path computes the call: one process, N <= MAX_N."""
    return call.shard is None and zs[0].shape[0] <= MAX_N


@triton.jit
def _pair_logits(zp, zq, stride_pn, stride_pd, stride_qn, stride_qd, offs_n, N, D,
                 NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """(<z_p[i], z_q[j]> r_p[i] r_q[j], r_p, r_q): one pass over D for the products and both sides' norms."""
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    sp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)[:, None]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        inside = (offs_n[:, None] < N) & (dd[None, :] < D)
        a = tl.load(zp + rows * stride_pn + dd[None, :] * stride_pd, mask=inside, other=0.0)
        b = tl.load(zq + rows * stride_qn + dd[None, :] * stride_qd, mask=inside, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        if NORMALIZE:
            af = a.to(tl.float32)
            bf = b.to(tl.float32)
            sp += tl.sum(af * af, axis=1)
            sq += tl.sum(bf * bf, axis=1)
    if NORMALIZE:
        rp = 1.0 / tl.maximum(tl.sqrt(sp), 1e-12)  # fastpair.numerics.NORM_EPS
        rq = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    else:
        rp = tl.full((BLOCK_N,), 1.0, tl.float32)
        rq = tl.full((BLOCK_N,), 1.0, tl.float32)
    return acc * rp[:, None] * rq[None, :], rp, rq


@triton.jit
def _hit_rate(s_masked, same, offs_n, valid, axis: tl.constexpr, BLOCK_N: tl.constexpr):
    """The share of valid rows (axis 1) or columns (axis 0) whose first argmax is a positive."""
    best = tl.max(s_masked, axis=axis)
    if axis == 1:
        at_best = s_masked == best[:, None]
        first = tl.min(tl.where(at_best, offs_n[None, :], BLOCK_N), axis=1)
        hit = tl.sum(tl.where(offs_n[None, :] == first[:, None], same, 0.0), axis=1)
    else:
        at_best = s_masked == best[None, :]
        first = tl.min(tl.where(at_best, offs_n[:, None], BLOCK_N), axis=0)
        hit = tl.sum(tl.where(offs_n[:, None] == first[None, :], same, 0.0), axis=0)
    return tl.sum(tl.where(valid, hit, 0.0))


@triton.jit
def nce_small_kernel(
    zs, stride_zn, stride_zd,  # tuples over the M modalities: pointers to (N, D) and their strides
    t_ptr, inv_t, weights,  # temperatures from a tensor (T_FROM_PTR) or 1/t as numbers; w per pair (numbers)
    mask_ptr, stride_maskm, stride_maskn, ids_ptr, stride_idsn,
    loss_ptr, pair_loss_ptr, acc_ptr, dz_ptr, stride_dzm, stride_dzn, dt_ptr, scratch_ptr,
    N, D, eps,
    PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr, T_FROM_PTR: tl.constexpr, T_SHARED: tl.constexpr, NEEDS_DZ: tl.constexpr,
    NEEDS_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    NUM_P: tl.constexpr = len(PAIRS)
    offs_n = tl.arange(0, BLOCK_N)
    inside = offs_n < N
    eye = offs_n[:, None] == offs_n[None, :]
    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_n * stride_idsn, mask=inside, other=-1)
        same_id = ids[:, None] == ids[None, :]
    else:
        same_id = eye
    # scratch: G / t per pair (P, BN, BN), r per modality (M, BN), then per pair c_k * total and
    # sum_ij G_ij S_ij / t_k (2P)
    g_base = scratch_ptr
    r_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N
    c_base = r_base + NUM_M * BLOCK_N
    tile = offs_n[:, None] * BLOCK_N + offs_n[None, :]

    # a temperature tensor's values are checked here, not on the host (a sync): invalid ones give NaN losses
    t_ok = True
    if T_FROM_PTR:
        for k in tl.static_range(1 if T_SHARED else NUM_P):
            t = tl.load(t_ptr + k)
            t_ok = t_ok & (t > 0.0) & (t < float("inf"))
    numerator = 0.0
    total = 0.0
    for k in tl.static_range(NUM_P):
        p: tl.constexpr = PAIRS[k][0]
        q: tl.constexpr = PAIRS[k][1]
        if T_FROM_PTR:
            scale = 1.0 / (tl.load(t_ptr) if T_SHARED else tl.load(t_ptr + k))
        else:
            scale = inv_t[k]
        cos, rp, rq = _pair_logits(zs[p], zs[q], stride_zn[p], stride_zd[p], stride_zn[q], stride_zd[q], offs_n,
                                   N, D, NORMALIZE, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        s = cos * scale
        valid = inside
        if HAS_MASK:
            present_p = tl.load(mask_ptr + p * stride_maskm + offs_n * stride_maskn, mask=inside, other=0)
            present_q = tl.load(mask_ptr + q * stride_maskm + offs_n * stride_maskn, mask=inside, other=0)
            valid = valid & (present_p != 0) & (present_q != 0)
        both = valid[:, None] & valid[None, :]
        n = tl.sum(valid.to(tl.float32))
        s_masked = tl.where(both, s, float("-inf"))
        # log-sum-exp of every valid row and column (0 elsewhere, so that no -inf - -inf appears)
        row_max = tl.where(valid, tl.max(s_masked, axis=1), 0.0)
        col_max = tl.where(valid, tl.max(s_masked, axis=0), 0.0)
        e_row = tl.exp(s_masked - row_max[:, None])
        e_col = tl.exp(s_masked - col_max[None, :])
        lse_row = tl.where(valid, row_max + tl.log(tl.maximum(tl.sum(e_row, axis=1), 1.0)), 0.0)  # sum >= 1 if valid
        lse_col = tl.where(valid, col_max + tl.log(tl.maximum(tl.sum(e_col, axis=0), 1.0)), 0.0)
        # targets: (1 - eps) uniform over the positives, eps uniform over the valid samples
        same = tl.where(both & same_id, 1.0, 0.0)
        per_row = tl.maximum(tl.sum(same, axis=1), 1.0)
        smooth = tl.where(both, eps / tl.maximum(n, 1.0), 0.0)
        t_row = (1.0 - eps) * same / per_row[:, None] + smooth
        t_col = (1.0 - eps) * same / per_row[None, :] + smooth
        terms = tl.sum(lse_row) + tl.sum(lse_col) - tl.sum(tl.sum((t_row + t_col) * s, axis=1))
        lone = tl.where(n == 1.0, 0.0, 1.0)  # one valid sample: its only candidate is its positive, exactly 0
        pair_loss = terms * lone / (2.0 * tl.maximum(n, 1.0))
        w = weights[k] * tl.where(n > 0.0, 1.0, 0.0)
        numerator += w * pair_loss
        total += w
        tl.store(pair_loss_ptr + k, tl.where(t_ok, pair_loss, float("nan")))
        tl.store(acc_ptr + 2 * k, _hit_rate(s_masked, same, offs_n, valid, 1, BLOCK_N) / tl.maximum(n, 1.0))
        tl.store(acc_ptr + 2 * k + 1, _hit_rate(s_masked, same, offs_n, valid, 0, BLOCK_N) / tl.maximum(n, 1.0))
        if NEEDS_DZ or NEEDS_DT:
            probs = tl.exp(s_masked - lse_row[:, None]) + tl.exp(s_masked - lse_col[None, :])
            g = tl.where(both, probs - t_row - t_col, 0.0)
            gs = g * s
            tl.store(c_base + k, w * lone / (2.0 * tl.maximum(n, 1.0)))
            tl.store(c_base + NUM_P + k, tl.sum(tl.sum(gs, axis=1)) * scale)
            if NEEDS_DZ:
                tl.store(g_base + k * BLOCK_N * BLOCK_N + tile, g * scale)
                tl.store(r_base + p * BLOCK_N + offs_n, rp)
                tl.store(r_base + q * BLOCK_N + offs_n, rq)
    total = tl.maximum(total, 1.1754943508222875e-38)
    tl.store(loss_ptr, tl.where(t_ok, numerator / total, float("nan")))
    if NEEDS_DZ or NEEDS_DT:
        tl.debug_barrier()  # the scratch stores above are read by every thread below
    if NEEDS_DT:
        _temperature_grads(c_base, dt_ptr, total, NUM_P, T_SHARED)
    if NEEDS_DZ:
        _embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, g_base, r_base, c_base, total,
                         offs_n, N, D, PAIRS, NUM_M, NORMALIZE, BLOCK_N, BLOCK_D, INPUT_PRECISION)


@triton.jit
def _temperature_grads(c_base, dt_ptr, total, NUM_P: tl.constexpr, T_SHARED: tl.constexpr):
    """dL/dt_k = -c_k sum_ij G_ij S_ij / t_k (the scratch holds c_k total and sum G o S / t_k)."""
    shared = 0.0
    for k in tl.static_range(NUM_P):
        dt = -tl.load(c_base + k) / total * tl.load(c_base + NUM_P + k)
        if T_SHARED:
            shared += dt
        else:
            tl.store(dt_ptr + k, dt)
    if T_SHARED:
        tl.store(dt_ptr, shared)


@triton.jit
def _embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, g_base, r_base, c_base, total,
                     offs_n, N, D, PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dL/dz_m for every modality. With normalization, <x_i, dx_i> is summed over D first (one pass), as the
    torch backend does: taken from the same dx, so that dz vanishes exactly where it should (D = 1)."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)[:, None]
    for m in tl.static_range(NUM_M):
        r_m = tl.load(r_base + m * BLOCK_N + offs_n)
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                dx, x = _dx_chunk(zs, stride_zn, stride_zd, g_base, r_base, c_base, total, r_m, offs_n, d0 + offs_d,
                                  N, D, m, PAIRS, BLOCK_N, INPUT_PRECISION)
                dot += tl.sum(x * dx, axis=1)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dx, x = _dx_chunk(zs, stride_zn, stride_zd, g_base, r_base, c_base, total, r_m, offs_n, dd, N, D, m,
                              PAIRS, BLOCK_N, INPUT_PRECISION)
            if NORMALIZE:
                dx = r_m[:, None] * (dx - x * dot[:, None])
            out = dz_ptr + m * stride_dzm + rows * stride_dzn + dd[None, :]
            tl.store(out, dx.to(dz_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (dd[None, :] < D))


@triton.jit
def _dx_chunk(zs, stride_zn, stride_zd, g_base, r_base, c_base, total, r_m, offs_n, dd, N, D, m: tl.constexpr,
              PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(dL/dx_m, x_m) on columns dd: every pair's c_k G / t_k against the other side's unit vectors."""
    NUM_P: tl.constexpr = len(PAIRS)
    tile = offs_n[:, None] * BLOCK_N + offs_n[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    inside = (offs_n[:, None] < N) & (dd[None, :] < D)
    dx = tl.zeros((BLOCK_N, dd.shape[0]), dtype=tl.float32)
    for k in tl.static_range(NUM_P):
        p: tl.constexpr = PAIRS[k][0]
        q: tl.constexpr = PAIRS[k][1]
        if (p == m) or (q == m):
            o: tl.constexpr = q if p == m else p
            g = tl.load(g_base + k * BLOCK_N * BLOCK_N + tile) * (tl.load(c_base + k) / total)
            other = tl.load(zs[o] + rows * stride_zn[o] + dd[None, :] * stride_zd[o], mask=inside, other=0.0)
            y = other.to(tl.float32) * tl.load(r_base + o * BLOCK_N + offs_n)[:, None]
            if p == m:
                dx = tl.dot(g, y, dx, input_precision=INPUT_PRECISION)
            else:
                dx = tl.dot(tl.trans(g), y, dx, input_precision=INPUT_PRECISION)
    own = tl.load(zs[m] + rows * stride_zn[m] + dd[None, :] * stride_zd[m], mask=inside, other=0.0)
    return dx, own.to(tl.float32) * r_m[:, None]


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def nce_op(call: Call, zs, needs: Needs) -> Result:
    """The op of fastpair.op for a call that `takes` accepts: one launch, every output written by it."""
    z = zs[0]
    n, d = z.shape
    num_m, num_p = len(zs), len(call.pairs)
    block_n = _block(n)
    if tuning.INTERPRET and z.dtype == torch.bfloat16:  # numpy has no bf16: the interpreter reads fp32 copies
        zs = [t.float() for t in zs]
    parameter = call.temperature
    from_ptr = parameter.values is None
    t = parameter.tensor.detach().float().reshape(-1) if from_ptr else None
    inv_t = (1.0,) * num_p if from_ptr else tuple(1.0 / v for v in parameter.values)
    needs_dt = needs.temperature and from_ptr
    f32 = dict(dtype=torch.float32, device=z.device)
    loss, pair_losses, accuracy = torch.empty((), **f32), torch.empty(num_p, **f32), torch.empty(num_p, 2, **f32)
    dz = torch.empty((num_m, n, d), dtype=zs[0].dtype, device=z.device) if needs.z else loss
    dt = torch.empty(parameter.tensor.shape, **f32) if needs_dt else loss
    words = num_p * block_n * block_n + num_m * block_n + 2 * num_p
    scratch = torch.empty(words if needs.any else 1, **f32)
    mask, ids = call.mask, call.ids
    nce_small_kernel[(1,)](
        zs=tuple(zs), stride_zn=tuple(x.stride(0) for x in zs), stride_zd=tuple(x.stride(1) for x in zs),
        t_ptr=t if from_ptr else loss, inv_t=inv_t, weights=tuple(float(w) for w in call.weights),
        mask_ptr=mask if mask is not None else loss,
        stride_maskm=mask.stride(0) if mask is not None else 0, stride_maskn=mask.stride(1) if mask is not None else 0,
        ids_ptr=ids if ids is not None else loss, stride_idsn=ids.stride(0) if ids is not None else 0,
        loss_ptr=loss, pair_loss_ptr=pair_losses, acc_ptr=accuracy, dz_ptr=dz,
        stride_dzm=dz.stride(0) if needs.z else 0, stride_dzn=dz.stride(1) if needs.z else 0,
        dt_ptr=dt, scratch_ptr=scratch, N=n, D=d, eps=float(call.label_smoothing),
        PAIRS=tuple(call.pairs), NUM_M=num_m, NORMALIZE=call.normalize, HAS_MASK=mask is not None,
        HAS_IDS=ids is not None, T_FROM_PTR=from_ptr, T_SHARED=from_ptr and t.numel() == 1,
        NEEDS_DZ=needs.z, NEEDS_DT=needs_dt, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        INPUT_PRECISION=input_precision(z.dtype), num_warps=4)
    grads = ()
    if needs.z:
        grads = dz.to(z.dtype).unbind(0)
    if needs.temperature:
        grads = (*grads, dt.to(parameter.tensor.dtype))
    return Result(loss, (pair_losses, accuracy), tuple(grads))


def _block_d(d: int) -> int:
    return 32 if d <= 32 else 64
