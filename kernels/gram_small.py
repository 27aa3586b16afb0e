"""GRAM's volume loss for small batches (one process, k = M - 1 <= 3, N <= 64; N <= 32 for k = 3): the loss, its
statistics and its gradients in one Triton program, one launch per step (the shared machinery: kernels/small.py).
In registers, from one pass over D for the k similarity tiles, the inverse norms and the columns' Gram matrices:

    s_l = x_a x_ol^T,   C_j = X_j X_j^T (k(k+1)/2 dot products per sample),   det C_j, adj(C_j) in closed form,
    det G = det C_j - s^T adj(C_j) s,   V = sqrt(max(det G, 0) + 1e-8),   S = -V / t,

then InfoNCE over S in both directions (the anchor's rows, the tuples' columns) over the samples with all M
modalities, as fastpair/_torch_gram.py does. The gradient, with c = [n != 1] / (2 n) (the epilogue's coef),
W = c (P + Q - 2T) and U = W [det G > 0] / (t V):

    dL/ds_l = U (adj(C_j) s)_l                      (k tiles: small.py's scratch, one per pair (a, o_l))
    a_j = sum_i U_ij / 2,   M_j = sum_i U_ij s_ij s_ij^T / 2,
    dL/dC_j = -(a_j adj(C_j) - d tr(adj(C_j) M_j) / dC_j),   dL/dX_j = 2 dL/dC_j X_j   (C_j, M_j symmetric)
    dL/dt = sum_ij W_ij V_ij / t^2

where d tr(adj(C) M) / dC is 0 for k = 1, tr(M) I - M for k = 2 (adj C = tr(C) I - C) and, for k = 3 (adj C =
((tr C)^2 - tr(C^2)) I / 2 - tr(C) C + C^2, Cayley-Hamilton), (tr C tr M - tr(CM)) I - tr(M) C - tr(C) M + CM + MC.
fastpair.volumes.column_grad takes the same derivative with autograd; tests/test_gram.py holds them together.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpair.call import Call
from fastpair.op import Needs, Result

from . import small

# k = 3 (M = 4) at 64 rows spills on sm_100a whatever the D chunks (the compile budgets): the tiled path takes it
MAX_N_K3 = 32


@triton.jit
def gram_small_kernel(
    zs, stride_zn, stride_zd,  # tuples over the M modalities: pointers to (N, D) and their strides
    t_ptr, t_values,  # the temperature from a tensor (T_FROM_PTR) or 1/t as a number
    mask_ptr, stride_maskm, stride_maskn, ids_ptr, stride_idsn,
    loss_ptr, pair_loss_ptr, acc_ptr, dz_ptr, stride_dzm, stride_dzn, dt_ptr, scratch_ptr, stage_ptr,
    N, D, eps,
    PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr, T_FROM_PTR: tl.constexpr, T_SHARED: tl.constexpr, NEEDS_DZ: tl.constexpr,
    NEEDS_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    K: tl.constexpr = len(PAIRS)
    offs_n = tl.arange(0, BLOCK_N)
    keys = small.sample_keys(ids_ptr, stride_idsn, offs_n, N, HAS_IDS)
    ok = small.parameter_ok(t_ptr, T_FROM_PTR, 1, True)
    scale = small.parameter_value(t_ptr, t_values, 0, T_FROM_PTR, True)
    if T_FROM_PTR:
        scale = 1.0 / scale
    s0, s1, s2, ra, r0, r1, r2, c00, c01, c02, c11, c12, c22 = _tiles(
        zs, stride_zn, stride_zd, offs_n, N, D, PAIRS[0][0], PAIRS[0][1], PAIRS[K // 2][1], PAIRS[K - 1][1], K,
        BLOCK_N, BLOCK_D, INPUT_PRECISION)
    if NEEDS_DZ:  # staged, not held: the forward's tiles would otherwise stay live to the gradient and spill
        _stage(scratch_ptr, stage_ptr, s0, s1, s2, ra, r0, r1, r2, offs_n, PAIRS, BLOCK_N)
    det, a00, a01, a02, a11, a12, a22 = _det_adj(c00, c01, c02, c11, c12, c22, K)
    q = _quadratic(s0, s1, s2, a00[None, :], a01[None, :], a02[None, :], a11[None, :], a12[None, :], a22[None, :], K)
    det_g = det[None, :] - q
    vol = tl.sqrt(tl.maximum(det_g, 0.0) + 1e-8)  # fastpair.volumes.EPS_V
    s = -vol * scale
    valid = _all_present(mask_ptr, stride_maskm, stride_maskn, offs_n, N, NUM_M, HAS_MASK)
    both = valid[:, None] & valid[None, :]
    n = tl.sum(valid.to(tl.float32))
    s_masked = tl.where(both, s, float("-inf"))
    lse_row = small.masked_lse(s_masked, valid, 1)
    lse_col = small.masked_lse(s_masked, valid, 0)
    same = tl.where(both & (keys[:, None] == keys[None, :]), 1.0, 0.0)
    per_row = tl.maximum(tl.sum(same, axis=1), 1.0)  # |P(i)| (= per column: the relation is symmetric)
    targets = (1.0 - eps) * same / per_row[:, None] + tl.where(both, eps / tl.maximum(n, 1.0), 0.0)
    lone = tl.where(n == 1.0, 0.0, 1.0)  # one valid sample: its only candidate is its positive, exactly 0
    c = lone / tl.maximum(n, 1.0)
    weighted = targets * s
    loss_row = (tl.sum(lse_row) - tl.sum(tl.sum(weighted, axis=1))) * c
    loss_col = (tl.sum(lse_col) - tl.sum(tl.sum(weighted, axis=1))) * c
    tl.store(loss_ptr, tl.where(ok, 0.5 * (loss_row + loss_col), float("nan")))
    tl.store(pair_loss_ptr, tl.where(ok, loss_row, float("nan")))
    tl.store(pair_loss_ptr + 1, tl.where(ok, loss_col, float("nan")))
    tl.store(acc_ptr, small.hit_rate(s_masked, same, offs_n, valid, 1, BLOCK_N))
    tl.store(acc_ptr + 1, small.hit_rate(s_masked, same, offs_n, valid, 0, BLOCK_N))
    if NEEDS_DZ or NEEDS_DT:
        probs = tl.exp(s_masked - lse_row[:, None]) + tl.exp(s_masked - lse_col[None, :])
        w = tl.where(both, probs - 2.0 * targets, 0.0) * (0.5 * c)
        if NEEDS_DT:  # dS/dt = V / t^2
            tl.store(dt_ptr, tl.sum(tl.sum(w * vol, axis=1)) * scale * scale)
        if NEEDS_DZ:
            u = tl.where((det_g > 0.0) & both, w * scale / vol, 0.0)  # V' = 1 / 2V, 0 under the clamp
            tl.store(stage_ptr + K * BLOCK_N * BLOCK_N + small.tile_offsets(offs_n, BLOCK_N), u)
            tl.debug_barrier()  # the staged tiles are read back by other threads
            _store_grads(scratch_ptr, stage_ptr, a00, a01, a02, a11, a12, a22, offs_n, PAIRS, NUM_M, BLOCK_N)
            _store_mix(scratch_ptr, stage_ptr, c00, c01, c02, c11, c12, c22, a00, a01, a02, a11, a12, a22, offs_n,
                       PAIRS, NUM_M, BLOCK_N)
            tl.debug_barrier()  # the scratch stores above are read by every thread below
            small.embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, scratch_ptr, 1.0, offs_n,
                                  N, D, PAIRS, NUM_M, NORMALIZE, True, BLOCK_N, BLOCK_DG, GRAD_PRECISION)


@triton.jit
def _staged(stage_ptr, slot: tl.constexpr, offs_n, BLOCK_N: tl.constexpr):
    """Staged tile `slot`: s_l for l < k, U at k."""
    return tl.load(stage_ptr + slot * BLOCK_N * BLOCK_N + small.tile_offsets(offs_n, BLOCK_N))


@triton.jit
def _stage(scratch_ptr, stage_ptr, s0, s1, s2, ra, r0, r1, r2, offs_n, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The similarity tiles into the stage (k, BLOCK_N, BLOCK_N) and the inverse norms into small.py's scratch."""
    K: tl.constexpr = len(PAIRS)
    tile = small.tile_offsets(offs_n, BLOCK_N)
    small.store_inverse_norms(scratch_ptr, PAIRS[0][0], ra, offs_n, K, BLOCK_N)
    tl.store(stage_ptr + tile, s0)
    small.store_inverse_norms(scratch_ptr, PAIRS[0][1], r0, offs_n, K, BLOCK_N)
    if K >= 2:
        tl.store(stage_ptr + BLOCK_N * BLOCK_N + tile, s1)
        small.store_inverse_norms(scratch_ptr, PAIRS[1][1], r1, offs_n, K, BLOCK_N)
    if K == 3:
        tl.store(stage_ptr + 2 * BLOCK_N * BLOCK_N + tile, s2)
        small.store_inverse_norms(scratch_ptr, PAIRS[2][1], r2, offs_n, K, BLOCK_N)


@triton.jit
def _all_present(mask_ptr, stride_maskm, stride_maskn, offs_n, N, NUM_M: tl.constexpr, HAS_MASK: tl.constexpr):
    """The valid samples: inside the batch and, with a mask, present in all M modalities."""
    valid = offs_n < N
    if HAS_MASK:
        for m in tl.static_range(NUM_M):
            present = tl.load(mask_ptr + m * stride_maskm + offs_n * stride_maskn, mask=offs_n < N, other=0)
            valid = valid & (present != 0)
    return valid


@triton.jit
def _tiles(zs, stride_zn, stride_zd, offs_n, N, D, a: tl.constexpr, o0: tl.constexpr, o1: tl.constexpr,
           o2: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
           INPUT_PRECISION: tl.constexpr):
    """One pass over D: the similarity tiles s_l of the unit vectors (anchor a; others o0, o1, o2, the first k
    of them used), the inverse norms (anchor, then the others) and C_j's upper triangle; what k < 3 leaves
    unused is zero."""
    acc0 = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    na, n0, n1, n2, x01, x02, x12 = zero, zero, zero, zero, zero, zero, zero
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        xa = _chunk(zs, stride_zn, stride_zd, offs_n, dd, N, D, a)
        b0 = _chunk(zs, stride_zn, stride_zd, offs_n, dd, N, D, o0)
        acc0 = tl.dot(xa, tl.trans(b0), acc0, input_precision=INPUT_PRECISION)
        af = xa.to(tl.float32)
        f0 = b0.to(tl.float32)
        na += tl.sum(af * af, axis=1)
        n0 += tl.sum(f0 * f0, axis=1)
        if K >= 2:
            b1 = _chunk(zs, stride_zn, stride_zd, offs_n, dd, N, D, o1)
            acc1 = tl.dot(xa, tl.trans(b1), acc1, input_precision=INPUT_PRECISION)
            f1 = b1.to(tl.float32)
            n1 += tl.sum(f1 * f1, axis=1)
            x01 += tl.sum(f0 * f1, axis=1)
            if K == 3:
                b2 = _chunk(zs, stride_zn, stride_zd, offs_n, dd, N, D, o2)
                acc2 = tl.dot(xa, tl.trans(b2), acc2, input_precision=INPUT_PRECISION)
                f2 = b2.to(tl.float32)
                n2 += tl.sum(f2 * f2, axis=1)
                x02 += tl.sum(f0 * f2, axis=1)
                x12 += tl.sum(f1 * f2, axis=1)
    ra, r0, r1, r2 = _inverse_norm(na), _inverse_norm(n0), _inverse_norm(n1), _inverse_norm(n2)
    return (acc0 * ra[:, None] * r0[None, :], acc1 * ra[:, None] * r1[None, :], acc2 * ra[:, None] * r2[None, :],
            ra, r0, r1, r2, n0 * r0 * r0, x01 * r0 * r1, x02 * r0 * r2, n1 * r1 * r1, x12 * r1 * r2, n2 * r2 * r2)


@triton.jit
def _chunk(zs, stride_zn, stride_zd, offs_n, dd, N, D, m: tl.constexpr):
    """Modality m's rows on columns dd, in its dtype (0 outside the batch)."""
    inside = (offs_n[:, None] < N) & (dd[None, :] < D)
    return tl.load(zs[m] + offs_n.to(tl.int64)[:, None] * stride_zn[m] + dd[None, :] * stride_zd[m], mask=inside,
                   other=0.0)


@triton.jit
def _inverse_norm(squares):
    return 1.0 / tl.maximum(tl.sqrt(squares), 1e-12)  # fastpair.numerics.NORM_EPS


@triton.jit
def _det_adj(c00, c01, c02, c11, c12, c22, K: tl.constexpr):
    """det C_j and adj(C_j)'s upper triangle per column (closed forms; unused entries 0)."""
    zero = tl.zeros(c00.shape, dtype=tl.float32)
    if K == 1:
        return c00, zero + 1.0, zero, zero, zero, zero, zero
    if K == 2:
        return c00 * c11 - c01 * c01, c11, -c01, zero, c00, zero, zero
    a00 = c11 * c22 - c12 * c12
    a01 = c02 * c12 - c01 * c22
    a02 = c01 * c12 - c11 * c02
    return (c00 * a00 + c01 * a01 + c02 * a02, a00, a01, a02, c00 * c22 - c02 * c02, c01 * c02 - c00 * c12,
            c00 * c11 - c01 * c01)


@triton.jit
def _quadratic(s0, s1, s2, a00, a01, a02, a11, a12, a22, K: tl.constexpr):
    """s^T adj(C_j) s per entry of the tile."""
    q = a00 * s0 * s0
    if K >= 2:
        q += 2.0 * a01 * s0 * s1 + a11 * s1 * s1
    if K == 3:
        q += 2.0 * a02 * s0 * s2 + 2.0 * a12 * s1 * s2 + a22 * s2 * s2
    return q


@triton.jit
def _store_grads(scratch_ptr, stage_ptr, a00, a01, a02, a11, a12, a22, offs_n, PAIRS: tl.constexpr,
                 NUM_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dL/ds_l = U (adj(C_j) s)_l as pair l's G in small.py's scratch, with c_l = 1 (t = 1: the tile is the
    whole gradient of s_l), from the staged tiles."""
    K: tl.constexpr = len(PAIRS)
    for l in tl.static_range(K):
        g = _adj_row(stage_ptr, l, 0, a00, a01, a02, offs_n, BLOCK_N)
        if K >= 2:
            g += _adj_row(stage_ptr, l, 1, a01, a11, a12, offs_n, BLOCK_N)
        if K == 3:
            g += _adj_row(stage_ptr, l, 2, a02, a12, a22, offs_n, BLOCK_N)
        small.store_grad_tile(scratch_ptr, l, g * _staged(stage_ptr, K, offs_n, BLOCK_N), offs_n, BLOCK_N)
        small.store_coef(scratch_ptr, l, 1.0, K, NUM_M, BLOCK_N)


@triton.jit
def _adj_row(stage_ptr, l: tl.constexpr, m: tl.constexpr, adj_0m, adj_1m, adj_2m, offs_n, BLOCK_N: tl.constexpr):
    """adj(C_j)_lm s_m: adj's column m given as its entries (0m, 1m, 2m), the symmetric matrix's row l picked."""
    if l == 0:
        entry = adj_0m
    elif l == 1:
        entry = adj_1m
    else:
        entry = adj_2m
    return entry[None, :] * _staged(stage_ptr, m, offs_n, BLOCK_N)


@triton.jit
def _moment(stage_ptr, u, l: tl.constexpr, m: tl.constexpr, offs_n, BLOCK_N: tl.constexpr):
    """M_j's entry (l, m): sum_i U_ij s_l,ij s_m,ij / 2."""
    return tl.sum(u * _staged(stage_ptr, l, offs_n, BLOCK_N) * _staged(stage_ptr, m, offs_n, BLOCK_N), axis=0) * 0.5


@triton.jit
def _store_mix(scratch_ptr, stage_ptr, c00, c01, c02, c11, c12, c22, a00, a01, a02, a11, a12, a22, offs_n,
               PAIRS: tl.constexpr, NUM_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """small._mix_term's coefficients: 2 dL/dC_j (the module's docstring), (k, k, BLOCK_N) in the scratch."""
    K: tl.constexpr = len(PAIRS)
    base = scratch_ptr + K * BLOCK_N * BLOCK_N + NUM_M * BLOCK_N + 3 * K
    u = _staged(stage_ptr, K, offs_n, BLOCK_N)
    a = tl.sum(u, axis=0) * 0.5
    m00 = _moment(stage_ptr, u, 0, 0, offs_n, BLOCK_N)
    if K == 1:
        tl.store(base + offs_n, -2.0 * a * a00)
    elif K == 2:
        m01 = _moment(stage_ptr, u, 0, 1, offs_n, BLOCK_N)
        m11 = _moment(stage_ptr, u, 1, 1, offs_n, BLOCK_N)
        d00, d01, d11 = -2.0 * (a * a00 - m11), -2.0 * (a * a01 + m01), -2.0 * (a * a11 - m00)
        _store_sym(base, offs_n, d00, d01, d01, d11, d11, d11, 2, BLOCK_N)
    else:
        m01 = _moment(stage_ptr, u, 0, 1, offs_n, BLOCK_N)
        m02 = _moment(stage_ptr, u, 0, 2, offs_n, BLOCK_N)
        m11 = _moment(stage_ptr, u, 1, 1, offs_n, BLOCK_N)
        m12 = _moment(stage_ptr, u, 1, 2, offs_n, BLOCK_N)
        m22 = _moment(stage_ptr, u, 2, 2, offs_n, BLOCK_N)
        tr_c = c00 + c11 + c22
        tr_m = m00 + m11 + m22
        diag = tr_c * tr_m - (c00 * m00 + c11 * m11 + c22 * m22 + 2.0 * (c01 * m01 + c02 * m02 + c12 * m12))
        # CM + MC, symmetric for symmetric C and M: entry (l, m) = sum_n c_ln m_nm + m_ln c_nm
        p00 = 2.0 * (c00 * m00 + c01 * m01 + c02 * m02)
        p11 = 2.0 * (c01 * m01 + c11 * m11 + c12 * m12)
        p22 = 2.0 * (c02 * m02 + c12 * m12 + c22 * m22)
        p01 = c00 * m01 + c01 * m11 + c02 * m12 + m00 * c01 + m01 * c11 + m02 * c12
        p02 = c00 * m02 + c01 * m12 + c02 * m22 + m00 * c02 + m01 * c12 + m02 * c22
        p12 = c01 * m02 + c11 * m12 + c12 * m22 + m01 * c02 + m11 * c12 + m12 * c22
        d00 = -2.0 * (a * a00 - diag + tr_m * c00 + tr_c * m00 - p00)
        d11 = -2.0 * (a * a11 - diag + tr_m * c11 + tr_c * m11 - p11)
        d22 = -2.0 * (a * a22 - diag + tr_m * c22 + tr_c * m22 - p22)
        d01 = -2.0 * (a * a01 + tr_m * c01 + tr_c * m01 - p01)
        d02 = -2.0 * (a * a02 + tr_m * c02 + tr_c * m02 - p02)
        d12 = -2.0 * (a * a12 + tr_m * c12 + tr_c * m12 - p12)
        _store_sym(base, offs_n, d00, d01, d02, d11, d12, d22, 3, BLOCK_N)


@triton.jit
def _store_sym(base, offs_n, d00, d01, d02, d11, d12, d22, K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A symmetric k x k (k = 2, 3) matrix of row vectors, row-major, every entry: (l * k + m) * BLOCK_N."""
    tl.store(base + offs_n, d00)
    tl.store(base + 1 * BLOCK_N + offs_n, d01)
    tl.store(base + K * BLOCK_N + offs_n, d01)
    tl.store(base + (K + 1) * BLOCK_N + offs_n, d11)
    if K == 3:
        tl.store(base + 2 * BLOCK_N + offs_n, d02)
        tl.store(base + 6 * BLOCK_N + offs_n, d02)
        tl.store(base + 5 * BLOCK_N + offs_n, d12)
        tl.store(base + 7 * BLOCK_N + offs_n, d12)
        tl.store(base + 8 * BLOCK_N + offs_n, d22)


def gram_op(call: Call, zs, needs: Needs) -> Result:
    """The op of fastpair.op for a call that small.takes accepts: one launch, every output written by it."""
    args, out = small.arguments(call, zs, needs, stats=((2,), (2,)), mix=True)
    del args["weights"]  # GRAM's two directions weigh the same
    block_n, k = args["BLOCK_N"], len(call.pairs)
    args["BLOCK_D"], args["BLOCK_DG"] = chunks(k, block_n, zs[0].element_size())
    stage = args["scratch_ptr"].new_empty((k + 1) * block_n * block_n if needs.z else 1)  # s_1 .. s_k, U
    gram_small_kernel[(1,)](stage_ptr=stage, eps=float(call.label_smoothing), **args)
    return small.result(call, zs, needs, out)


def takes(call: Call, zs) -> bool:
    """small.takes, and k = 3 (M = 4) up to MAX_N_K3 rows only."""
    return small.takes(call, zs) and (len(call.pairs) < 3 or zs[0].shape[0] <= MAX_N_K3)


def chunks(k: int, block_n: int, elem: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DG): the forward's and the gradient's D chunks. Not small.py's: k + 1 operand tiles and k
    accumulators (forward), k tiles of G and the mix (gradient). Found by compiling every (k, BLOCK_N,
    precision) for sm_80, sm_90a and sm_100a (bench/compile.py; held by tests/test_compile_budgets.py): 16
    columns everywhere but where that spilled. There ptxas either capped the block at 128 or 168 registers
    (16-bit: 32 columns fit) or ran out of 255 (three 16-bit tiles at 32 rows, two fp32 tiles at 64: 8)."""
    gradient = 16
    if elem == 2 and ((block_n == 16 and k >= 2) or (block_n == 32 and k == 1)):
        gradient = 32
    elif (elem == 2 and block_n == 32 and k == 3) or (elem == 4 and block_n == 64 and k == 2):
        gradient = 8
    return 16, gradient
