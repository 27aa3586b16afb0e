"""The sigmoid objective for small batches (N <= 64, one process): loss, statistics and gradients of every pair
in one Triton program, one launch per step (the shared machinery: kernels/small.py). Per pair, in registers,
with u = S + b and z_ij = +1 for the positives P(i) (j = i, or the same id) and -1 elsewhere:

    L_k = (1/n) [ sum_{i, j in V} softplus(u_ij) - sum_{i in V} sum_{j in P(i)} u_ij ],
    G   = sigmoid(u) - [j in P(i)]  on valid (i, j),   c_k = w'_k / (sum_k w'_k * n_k)   (the epilogue's coef),

softplus(u) = max(u, 0) + log1p(exp(-|u|)) and sigmoid(u) from the same e = exp(-|u|): exact for every u
(no overflow, no cancellation). G goes to small.py's scratch, from which dL/dz, dL/dt and dL/db are written.
The math in full: fastpair/_torch_sigmoid.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpair.call import Call
from fastpair.op import Needs, Result

from . import small


@triton.jit
def _log1p_small(e):
    """log(1 + e) for 0 <= e <= 1, accurate where 1 + e rounds (Goldberg: the rounding of 1 + e cancels)."""
    one_plus = 1.0 + e
    rounded = tl.where(one_plus == 1.0, 1.0, one_plus - 1.0)  # (the branch that divides by it is not taken)
    return tl.where(one_plus == 1.0, e, tl.log(one_plus) * (e / rounded))


@triton.jit
def sigmoid_small_kernel(
    zs, stride_zn, stride_zd,  # tuples over the M modalities: pointers to (N, D) and their strides
    t_ptr, t_values, b_ptr, b_values, weights,  # t and b from tensors (*_FROM_PTR) or 1/t and b as numbers
    mask_ptr, stride_maskm, stride_maskn, ids_ptr, stride_idsn,
    loss_ptr, pair_loss_ptr, acc_ptr, dz_ptr, stride_dzm, stride_dzn, dt_ptr, db_ptr, scratch_ptr,
    N, D,
    PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr, T_FROM_PTR: tl.constexpr, T_SHARED: tl.constexpr, B_FROM_PTR: tl.constexpr,
    B_SHARED: tl.constexpr, NEEDS_DZ: tl.constexpr, NEEDS_DT: tl.constexpr, NEEDS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    NUM_P: tl.constexpr = len(PAIRS)
    NEEDS_G: tl.constexpr = NEEDS_DZ or NEEDS_DT or NEEDS_DB
    offs_n = tl.arange(0, BLOCK_N)
    keys = small.sample_keys(ids_ptr, stride_idsn, offs_n, N, HAS_IDS)
    ok = small.parameter_ok(t_ptr, T_FROM_PTR, 1 if T_SHARED else NUM_P, True)
    ok = ok & small.parameter_ok(b_ptr, B_FROM_PTR, 1 if B_SHARED else NUM_P, False)
    numerator = 0.0
    total = 0.0
    for k in tl.static_range(NUM_P):  # (pairs by index: a name bound in a static_range body is no constexpr)
        scale = small.parameter_value(t_ptr, t_values, k, T_FROM_PTR, T_SHARED)
        if T_FROM_PTR:
            scale = 1.0 / scale
        b = small.parameter_value(b_ptr, b_values, k, B_FROM_PTR, B_SHARED)
        weighted, w = _pair(zs, stride_zn, stride_zd, scale, b, weights[k], mask_ptr, stride_maskm, stride_maskn,
                            keys, ok, pair_loss_ptr, acc_ptr, scratch_ptr, offs_n, N, D, k, PAIRS[k][0],
                            PAIRS[k][1], NUM_P, NUM_M, NORMALIZE, HAS_MASK, NEEDS_G, NEEDS_DZ, BLOCK_N, BLOCK_D,
                            INPUT_PRECISION)
        numerator += weighted
        total += w
    total = tl.maximum(total, 1.1754943508222875e-38)
    tl.store(loss_ptr, tl.where(ok, numerator / total, float("nan")))
    if NEEDS_G:
        tl.debug_barrier()  # the scratch stores above are read by every thread below
    if NEEDS_DT:
        small.parameter_grads(scratch_ptr, dt_ptr, total, 1, -1.0, NUM_P, NUM_M, BLOCK_N, T_SHARED)
    if NEEDS_DB:
        small.parameter_grads(scratch_ptr, db_ptr, total, 2, 1.0, NUM_P, NUM_M, BLOCK_N, B_SHARED)
    if NEEDS_DZ:
        small.embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, scratch_ptr, total, offs_n,
                              N, D, PAIRS, NUM_M, NORMALIZE, False, BLOCK_N, BLOCK_DG, GRAD_PRECISION)


@triton.jit
def _pair(zs, stride_zn, stride_zd, scale, b, weight, mask_ptr, stride_maskm, stride_maskn, keys, ok,
          pair_loss_ptr, acc_ptr, scratch_ptr, offs_n, N, D, k: tl.constexpr, p: tl.constexpr, q: tl.constexpr,
          NUM_P: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
          NEEDS_G: tl.constexpr, NEEDS_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          INPUT_PRECISION: tl.constexpr):
    """Pair k = (p, q): its loss and hits stored, its G in the scratch; returns (w'_k L_k, w'_k)."""
    cos, rp, rq = small.pair_logits(zs[p], zs[q], stride_zn[p], stride_zd[p], stride_zn[q], stride_zd[q], offs_n, N,
                                    D, NORMALIZE, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    s = cos * scale
    u = s + b
    valid = small.pair_valid(mask_ptr, stride_maskm, stride_maskn, offs_n, N, p, q, HAS_MASK)
    both = valid[:, None] & valid[None, :]
    n = tl.sum(valid.to(tl.float32))
    same = tl.where(both & (keys[:, None] == keys[None, :]), 1.0, 0.0)
    e = tl.exp(-tl.abs(u))
    softplus = tl.maximum(u, 0.0) + _log1p_small(e)
    terms = tl.sum(tl.sum(tl.where(both, softplus, 0.0) - same * u, axis=1))
    pair_loss = terms / tl.maximum(n, 1.0)
    w = weight * tl.where(n > 0.0, 1.0, 0.0)
    tl.store(pair_loss_ptr + k, tl.where(ok, pair_loss, float("nan")))
    s_masked = tl.where(both, s, float("-inf"))
    tl.store(acc_ptr + 2 * k, small.hit_rate(s_masked, same, offs_n, valid, 1, BLOCK_N))
    tl.store(acc_ptr + 2 * k + 1, small.hit_rate(s_masked, same, offs_n, valid, 0, BLOCK_N))
    if NEEDS_G:
        sigmoid = tl.where(u >= 0.0, 1.0, e) / (1.0 + e)
        g = tl.where(both, sigmoid - same, 0.0)
        small.store_pair_grad(scratch_ptr, k, g, s, scale, w / tl.maximum(n, 1.0), rp, rq, p, q, offs_n, NUM_P,
                              NUM_M, BLOCK_N, NEEDS_DZ)
    return w * pair_loss, w


def sigmoid_op(call: Call, zs, needs: Needs) -> Result:
    """The op of fastpair.op for a call that small.takes accepts: one launch, every output written by it."""
    args, out = small.arguments(call, zs, needs)
    sigmoid_small_kernel[(1,)](**args)
    return small.result(call, zs, needs, out)
