"""Triton kernels of GRAM's volume loss (fastpair.gram_nce): the forward sweep in both directions and the
backward's gradient panels. Host code: gram_ops.py; the math: fastpair/volumes.py; batches of N <= 64:
gram_small.py.

Inputs are the unit vectors, stacked as x (1 + K, N, Dp): the anchor's plane, then the others', rows padded
to 16 elements (one pointer: planes are offsets inside the kernels); per column j the packed upper triangle
of adj(C_j) (N, K(K+1)/2, fp32) and det C_j (N,).
A tile of anchor rows i and columns j computes the K similarity tiles in one pass over D (the anchor's
operand loaded once per step for all K dots), then, elementwise,

    det G = det C_j - s^T adj(C_j) s,   V = sqrt(max(det G, 0) + 1e-8),   S2 = -V / t * log2(e),

kept in base 2 as the pairwise kernels keep theirs. `gram_fwd_kernel` sweeps every column for a block of
anchor rows (DIRECTION 0: the rows' log2-sum-exp2) or every anchor row for a block of columns (DIRECTION 1:
the columns'), with the target terms sum_j T_ij S2_ij (positives by id and smoothing) or S2_ii, and the
first argmax for statistics. `gram_grad_kernel` recomputes a tile of a row panel and writes, with
W = dL/dS = c_row P + c_col Q - (c_row + c_col) T and U = W [det G > 0] / (t V),

    G_l = U (adj(C_j) s)_l        (K panels in the inputs' dtype: the host's GEMMs give dL/dx_a and dL/dx_ol)

and per tile the column sums of U / 2 and of U s_l s_m / 2 (for dL/dC_j, host side) and the sum of W V
(for dL/dt), as partials per row tile: no atomics, the same bits on every run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import _first_argmax


@triton.jit
def _similarities(x_ptr, offs_m, offs_n, N, D, stride, K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """The K tiles s_l = <x_a[i], x_ol[j]> (fp32 accumulation) from x (1 + K, N, Dp): the anchor's plane,
    then the others'; unused tiles are zero."""
    s0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    plane = N.to(tl.int64) * stride
    a_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride
    b_rows = x_ptr + plane + offs_n.to(tl.int64)[:, None] * stride
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_rows + kk[None, :], mask=(offs_m[:, None] < N) & (kk[None, :] < D), other=0.0)
        b_mask = (offs_n[:, None] < N) & (kk[None, :] < D)
        b = tl.load(b_rows + kk[None, :], mask=b_mask, other=0.0)
        s0 = tl.dot(a, tl.trans(b), s0, input_precision=INPUT_PRECISION)
        if K > 1:
            b = tl.load(b_rows + plane + kk[None, :], mask=b_mask, other=0.0)
            s1 = tl.dot(a, tl.trans(b), s1, input_precision=INPUT_PRECISION)
        if K > 2:
            b = tl.load(b_rows + 2 * plane + kk[None, :], mask=b_mask, other=0.0)
            s2 = tl.dot(a, tl.trans(b), s2, input_precision=INPUT_PRECISION)
    return s0, s1, s2


@triton.jit
def _adj(adj_ptr, offs_n, N, idx: tl.constexpr, K: tl.constexpr):
    """Entry idx of the packed upper triangle of adj(C_j), per column, as a (1, BLOCK_N) row."""
    return tl.load(adj_ptr + offs_n * (K * (K + 1) // 2) + idx, mask=offs_n < N, other=0.0)[None, :]


@triton.jit
def _volumes(s0, s1, s2, det_ptr, adj_ptr, offs_n, N, K: tl.constexpr):
    """(V, det G > 0) of a tile from its similarity tiles and the columns' det C and adj(C)."""
    if K == 1:
        q = _adj(adj_ptr, offs_n, N, 0, K) * s0 * s0
    elif K == 2:
        q = (_adj(adj_ptr, offs_n, N, 0, K) * s0 * s0 + 2.0 * _adj(adj_ptr, offs_n, N, 1, K) * s0 * s1
             + _adj(adj_ptr, offs_n, N, 2, K) * s1 * s1)
    else:
        q = (_adj(adj_ptr, offs_n, N, 0, K) * s0 * s0 + 2.0 * _adj(adj_ptr, offs_n, N, 1, K) * s0 * s1
             + 2.0 * _adj(adj_ptr, offs_n, N, 2, K) * s0 * s2 + _adj(adj_ptr, offs_n, N, 3, K) * s1 * s1
             + 2.0 * _adj(adj_ptr, offs_n, N, 4, K) * s1 * s2 + _adj(adj_ptr, offs_n, N, 5, K) * s2 * s2)
    det = tl.load(det_ptr + offs_n, mask=offs_n < N, other=1.0)[None, :] - q
    return tl.sqrt(tl.maximum(det, 0.0) + 1e-8), det > 0.0


@triton.jit
def _targets(s2, offs_m, offs_n, ok, labels_ptr, sizes_ptr, eps, count, N, IDENTITY: tl.constexpr):
    """T_ij S2_ij of a tile: S2_ii (IDENTITY), else ((1 - eps) [l_i == l_j] / |P(i)| + eps / n) S2_ij."""
    if IDENTITY:
        return tl.where(ok & (offs_m[:, None] == offs_n[None, :]), s2, 0.0)
    li = tl.load(labels_ptr + offs_m, mask=offs_m < N, other=-1)
    lj = tl.load(labels_ptr + offs_n, mask=offs_n < N, other=-2)
    size = tl.load(sizes_ptr + offs_m, mask=offs_m < N, other=1.0)
    t = tl.where(li[:, None] == lj[None, :], (1.0 - eps) / size[:, None], 0.0) + eps / count
    return tl.where(ok, t * s2, 0.0)


@triton.jit
def _first_argmax_columns(s, offs_m, best, best_idx):
    """_first_argmax along the rows: per column the tile's maximum and its first row, kept where it beats the
    earlier row blocks' strictly."""
    t_max = tl.max(s, axis=0)
    t_arg = tl.min(tl.where(s == t_max[None, :], offs_m[:, None], 2147483647), axis=0)
    better = t_max > best
    return tl.where(better, t_max, best), tl.where(better, t_arg, best_idx)


@triton.jit(do_not_specialize=["N", "ROW0", "N_ROWS"])
def gram_fwd_kernel(x_ptr, det_ptr, adj_ptr, valid_ptr, labels_ptr, sizes_ptr, scale_ptr,
                    lse_ptr, tgt_ptr, best_ptr, arg_ptr, eps, count, N, ROW0, N_ROWS, D, stride,
                    K: tl.constexpr, DIRECTION: tl.constexpr, HAS_MASK: tl.constexpr, IDENTITY: tl.constexpr,
                    STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """DIRECTION 0: per anchor row i in [ROW0, ROW0 + N_ROWS), over every valid column j: log2-sum-exp2 of
    S2_ij, sum_j T_ij S2_ij and (STATS) the first argmax. DIRECTION 1: per column j, the same over the
    anchor rows of [ROW0, ROW0 + N_ROWS) (a rank's share; the host merges the ranks' columns)."""
    scale2 = -tl.load(scale_ptr) * 1.4426950408889634  # S2 = -V / t * log2(e)
    own = tl.program_id(0)
    if DIRECTION == 0:
        offs_own = ROW0 + own * BLOCK_M + tl.arange(0, BLOCK_M)
        own_in = offs_own < ROW0 + N_ROWS
        sweep_start, sweep_end = 0, N
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        t_i = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_M,), tl.int32)
    else:
        offs_own = own * BLOCK_N + tl.arange(0, BLOCK_N)
        own_in = offs_own < N
        sweep_start, sweep_end = ROW0, ROW0 + N_ROWS
        m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_N,), tl.float32)
        t_i = tl.zeros((BLOCK_N,), tl.float32)
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
    own_ok = own_in
    if HAS_MASK:
        own_ok = own_ok & (tl.load(valid_ptr + offs_own, mask=own_in, other=0) != 0)
    step = BLOCK_N if DIRECTION == 0 else BLOCK_M
    for start in range(sweep_start, sweep_end, step):
        if DIRECTION == 0:
            offs_m = offs_own
            offs_n = start + tl.arange(0, BLOCK_N)
            other_ok = offs_n < N
            if HAS_MASK:
                other_ok = other_ok & (tl.load(valid_ptr + offs_n, mask=offs_n < N, other=0) != 0)
            ok = own_ok[:, None] & other_ok[None, :]
        else:
            offs_m = start + tl.arange(0, BLOCK_M)
            offs_n = offs_own
            other_ok = offs_m < sweep_end
            if HAS_MASK:
                other_ok = other_ok & (tl.load(valid_ptr + offs_m, mask=offs_m < N, other=0) != 0)
            ok = other_ok[:, None] & own_ok[None, :]
        s0, s1, s2 = _similarities(x_ptr, offs_m, offs_n, N, D, stride, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                   INPUT_PRECISION)
        vol, _ = _volumes(s0, s1, s2, det_ptr, adj_ptr, offs_n, N, K)
        logits = tl.where(ok, vol * scale2, float("-inf"))
        tt = _targets(tl.where(ok, vol * scale2, 0.0), offs_m, offs_n, ok, labels_ptr, sizes_ptr, eps, count, N,
                      IDENTITY)
        if DIRECTION == 0:  # reduce along the columns
            t_i += tl.sum(tt, axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), axis=1)
            if STATS:
                best, best_idx = _first_argmax(logits, offs_n, best, best_idx)
        else:  # along the anchor rows (no transpose: it would go through shared memory)
            t_i += tl.sum(tt, axis=0)
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(logits - m_safe[None, :]), axis=0)
            if STATS:
                best, best_idx = _first_argmax_columns(logits, offs_m, best, best_idx)
        m_i = m_new
    lse = tl.where(own_ok, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i), 0.0)
    out = offs_own - ROW0 if DIRECTION == 0 else offs_own
    tl.store(lse_ptr + out, lse, mask=own_in)
    tl.store(tgt_ptr + out, t_i, mask=own_in)
    if STATS:
        tl.store(best_ptr + out, best, mask=own_in)
        tl.store(arg_ptr + out, best_idx, mask=own_in)


@triton.jit(do_not_specialize=["N", "row0", "rows", "r0"])
def gram_grad_kernel(x_ptr, det_ptr, adj_ptr, valid_ptr, labels_ptr, sizes_ptr, scale_ptr, coef_ptr,
                     lse_row_ptr, lse_col_ptr, g_ptr, part_ptr, wv_ptr, eps, count, row0, rows, r0, N, D, stride,
                     K: tl.constexpr, HAS_MASK: tl.constexpr, IDENTITY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """One tile of the row panel [row0, row0 + rows): G_l = U (adj s)_l into g (K, rows, N); the column
    partial sums of U/2 and U s_l s_m / 2 into part (row tiles, 1 + K(K+1)/2, N); sum W V into wv (tiles).
    lse_row holds this process's rows from r0 (base 2), lse_col every column's (base 2)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale = tl.load(scale_ptr)
    offs_m = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_panel = offs_m < row0 + rows
    row_ok = in_panel
    col_ok = offs_n < N
    if HAS_MASK:
        row_ok = row_ok & (tl.load(valid_ptr + offs_m, mask=offs_m < N, other=0) != 0)
        col_ok = col_ok & (tl.load(valid_ptr + offs_n, mask=offs_n < N, other=0) != 0)
    ok = row_ok[:, None] & col_ok[None, :]
    s0, s1, s2 = _similarities(x_ptr, offs_m, offs_n, N, D, stride, K, BLOCK_M, BLOCK_N, BLOCK_K,
                               INPUT_PRECISION)
    vol, positive = _volumes(s0, s1, s2, det_ptr, adj_ptr, offs_n, N, K)
    logits = -vol * (scale * 1.4426950408889634)
    lse_row = tl.load(lse_row_ptr + (offs_m - r0), mask=row_ok, other=0.0)
    lse_col = tl.load(lse_col_ptr + offs_n, mask=col_ok, other=0.0)
    c_row = tl.load(coef_ptr)
    c_col = tl.load(coef_ptr + 1)
    logits = tl.where(ok, logits, float("-inf"))  # outside the valid samples: 0, never an overflow
    w = c_row * tl.exp2(logits - lse_row[:, None]) + c_col * tl.exp2(logits - lse_col[None, :])
    w = w - (c_row + c_col) * _targets(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), offs_m, offs_n, ok,
                                       labels_ptr, sizes_ptr, eps, count, N, IDENTITY)
    w = tl.where(ok, w, 0.0)
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(wv_ptr + tile, tl.sum(tl.sum(w * vol, axis=1), axis=0))
    u = tl.where(positive, w * scale / vol, 0.0)
    parts = 1 + K * (K + 1) // 2
    base = part_ptr + pid_m.to(tl.int64) * parts * N + offs_n
    tl.store(base, tl.sum(u, axis=0) * 0.5, mask=offs_n < N)
    tl.store(base + N, tl.sum(u * s0 * s0, axis=0) * 0.5, mask=offs_n < N)
    if K > 1:
        tl.store(base + 2 * N, tl.sum(u * s0 * s1, axis=0) * 0.5, mask=offs_n < N)
        tl.store(base + (K + 1) * N, tl.sum(u * s1 * s1, axis=0) * 0.5, mask=offs_n < N)
    if K > 2:
        tl.store(base + 3 * N, tl.sum(u * s0 * s2, axis=0) * 0.5, mask=offs_n < N)
        tl.store(base + 5 * N, tl.sum(u * s1 * s2, axis=0) * 0.5, mask=offs_n < N)
        tl.store(base + 6 * N, tl.sum(u * s2 * s2, axis=0) * 0.5, mask=offs_n < N)
    g_rows = g_ptr + (offs_m - row0).to(tl.int64)[:, None] * N + offs_n[None, :]
    out_ty = g_ptr.dtype.element_ty  # the inputs' dtype: the host's GEMMs take it (fp32 accumulation)
    store_ok = in_panel[:, None] & (offs_n[None, :] < N)
    plane = rows.to(tl.int64) * N
    if K == 1:
        tl.store(g_rows, (u * _adj(adj_ptr, offs_n, N, 0, K) * s0).to(out_ty), mask=store_ok)
    elif K == 2:
        a00, a01, a11 = _adj(adj_ptr, offs_n, N, 0, K), _adj(adj_ptr, offs_n, N, 1, K), _adj(adj_ptr, offs_n, N, 2, K)
        tl.store(g_rows, (u * (a00 * s0 + a01 * s1)).to(out_ty), mask=store_ok)
        tl.store(g_rows + plane, (u * (a01 * s0 + a11 * s1)).to(out_ty), mask=store_ok)
    else:
        a00, a01, a02 = _adj(adj_ptr, offs_n, N, 0, K), _adj(adj_ptr, offs_n, N, 1, K), _adj(adj_ptr, offs_n, N, 2, K)
        a11, a12, a22 = _adj(adj_ptr, offs_n, N, 3, K), _adj(adj_ptr, offs_n, N, 4, K), _adj(adj_ptr, offs_n, N, 5, K)
        tl.store(g_rows, (u * (a00 * s0 + a01 * s1 + a02 * s2)).to(out_ty), mask=store_ok)
        tl.store(g_rows + plane, (u * (a01 * s0 + a11 * s1 + a12 * s2)).to(out_ty), mask=store_ok)
        tl.store(g_rows + 2 * plane, (u * (a02 * s0 + a12 * s1 + a22 * s2)).to(out_ty), mask=store_ok)
