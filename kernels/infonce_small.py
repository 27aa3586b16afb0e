"""InfoNCE for small batches (N <= 64, one process): the loss of every pair, its statistics and its gradients
in one Triton program, one launch per step (the shared machinery: kernels/small.py). Per pair, in registers:

    S = diag(r_p) Z_p Z_q^T diag(r_q) / t_k
    P = softmax over columns, Q = softmax over rows (valid samples only), T the targets by id and smoothing,
    G = P + Q - T - T',   c_k = w'_k [n_k != 1] / (sum_k w'_k * 2 n_k)   (the epilogue's coef),

the loss, the per-pair losses and both directions' first-argmax hits; G goes to small.py's scratch, from
which the embeddings' and the temperature's gradients are written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpair.call import Call
from fastpair.op import Needs, Result

from . import small


@triton.jit
def nce_small_kernel(
    zs, stride_zn, stride_zd,  # tuples over the M modalities: pointers to (N, D) and their strides
    t_ptr, t_values, weights,  # temperatures from a tensor (T_FROM_PTR) or 1/t as numbers; w per pair (numbers)
    mask_ptr, stride_maskm, stride_maskn, ids_ptr, stride_idsn,
    loss_ptr, pair_loss_ptr, acc_ptr, dz_ptr, stride_dzm, stride_dzn, dt_ptr, scratch_ptr,
    N, D, eps,
    PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr, T_FROM_PTR: tl.constexpr, T_SHARED: tl.constexpr, NEEDS_DZ: tl.constexpr,
    NEEDS_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    NUM_P: tl.constexpr = len(PAIRS)
    offs_n = tl.arange(0, BLOCK_N)
    keys = small.sample_keys(ids_ptr, stride_idsn, offs_n, N, HAS_IDS)
    ok = small.parameter_ok(t_ptr, T_FROM_PTR, 1 if T_SHARED else NUM_P, True)
    numerator = 0.0
    total = 0.0
    for k in tl.static_range(NUM_P):  # (pairs by index: a name bound in a static_range body is no constexpr)
        scale = small.parameter_value(t_ptr, t_values, k, T_FROM_PTR, T_SHARED)
        if T_FROM_PTR:
            scale = 1.0 / scale
        weighted, w = _pair(zs, stride_zn, stride_zd, scale, weights[k], eps, mask_ptr, stride_maskm, stride_maskn,
                            keys, ok, pair_loss_ptr, acc_ptr, scratch_ptr, offs_n, N, D, k, PAIRS[k][0],
                            PAIRS[k][1], NUM_P, NUM_M, NORMALIZE, HAS_MASK, NEEDS_DZ or NEEDS_DT, NEEDS_DZ, BLOCK_N,
                            BLOCK_D, INPUT_PRECISION)
        numerator += weighted
        total += w
    total = tl.maximum(total, 1.1754943508222875e-38)
    tl.store(loss_ptr, tl.where(ok, numerator / total, float("nan")))
    if NEEDS_DZ or NEEDS_DT:
        tl.debug_barrier()  # the scratch stores above are read by every thread below
    if NEEDS_DT:
        small.parameter_grads(scratch_ptr, dt_ptr, total, 1, -1.0, NUM_P, NUM_M, BLOCK_N, T_SHARED)
    if NEEDS_DZ:
        small.embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, scratch_ptr, total, offs_n,
                              N, D, PAIRS, NUM_M, NORMALIZE, False, BLOCK_N, BLOCK_DG, GRAD_PRECISION)


@triton.jit
def _pair(zs, stride_zn, stride_zd, scale, weight, eps, mask_ptr, stride_maskm, stride_maskn, keys, ok,
          pair_loss_ptr, acc_ptr, scratch_ptr, offs_n, N, D, k: tl.constexpr, p: tl.constexpr, q: tl.constexpr,
          NUM_P: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
          NEEDS_G: tl.constexpr, NEEDS_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          INPUT_PRECISION: tl.constexpr):
    """Pair k = (p, q): its loss and hits stored, its G in the scratch; returns (w'_k L_k, w'_k)."""
    cos, rp, rq = small.pair_logits(zs[p], zs[q], stride_zn[p], stride_zd[p], stride_zn[q], stride_zd[q], offs_n, N,
                                    D, NORMALIZE, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    s = cos * scale
    valid = small.pair_valid(mask_ptr, stride_maskm, stride_maskn, offs_n, N, p, q, HAS_MASK)
    both = valid[:, None] & valid[None, :]
    n = tl.sum(valid.to(tl.float32))
    s_masked = tl.where(both, s, float("-inf"))
    lse_row = small.masked_lse(s_masked, valid, 1)
    lse_col = small.masked_lse(s_masked, valid, 0)
    # T + T': (1 - eps) uniform over each row's (column's) positives, eps uniform over the valid samples
    same = tl.where(both & (keys[:, None] == keys[None, :]), 1.0, 0.0)
    per_row = tl.maximum(tl.sum(same, axis=1), 1.0)  # = per column: the positives' relation is symmetric
    targets = (1.0 - eps) * same * (1.0 / per_row[:, None] + 1.0 / per_row[None, :]) \
        + tl.where(both, 2.0 * eps / tl.maximum(n, 1.0), 0.0)
    terms = tl.sum(lse_row) + tl.sum(lse_col) - tl.sum(tl.sum(targets * s, axis=1))
    lone = tl.where(n == 1.0, 0.0, 1.0)  # one valid sample: its only candidate is its positive, exactly 0
    pair_loss = terms * lone / (2.0 * tl.maximum(n, 1.0))
    w = weight * tl.where(n > 0.0, 1.0, 0.0)
    tl.store(pair_loss_ptr + k, tl.where(ok, pair_loss, float("nan")))
    tl.store(acc_ptr + 2 * k, small.hit_rate(s_masked, same, offs_n, valid, 1, BLOCK_N))
    tl.store(acc_ptr + 2 * k + 1, small.hit_rate(s_masked, same, offs_n, valid, 0, BLOCK_N))
    if NEEDS_G:
        probs = tl.exp(s_masked - lse_row[:, None]) + tl.exp(s_masked - lse_col[None, :])
        g = tl.where(both, probs - targets, 0.0)
        small.store_pair_grad(scratch_ptr, k, g, s, scale, w * lone / (2.0 * tl.maximum(n, 1.0)), rp, rq, p, q,
                              offs_n, NUM_P, NUM_M, BLOCK_N, NEEDS_DZ)
    return w * pair_loss, w


def nce_op(call: Call, zs, needs: Needs) -> Result:
    """The op of fastpair.op for a call that small.takes accepts: one launch, every output written by it."""
    args, out = small.arguments(call, zs, needs)
    nce_small_kernel[(1,)](eps=float(call.label_smoothing), **args)
    return small.result(call, zs, needs, out)
