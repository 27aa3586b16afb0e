"""Triton kernels of the modality-pairwise InfoNCE loss: the forward, the backward's gradient panels and the
input gradient. Host code that launches them: launch.py; tile configurations: tuning.py.

Notation (docs/design.md): embeddings z_a (N, D) stacked as z (M, N, D), inverse norms
r_a = 1/max(||z_a||, 1e-12) (1 when not normalizing), pair k = (p, q) with scale s_k = 1/t_k. Logits are
kept in base 2:
    S2_ij = log2(e) * s_k * r_p[i] r_q[j] <z_p[i], z_q[j]>        (S = S2 * ln 2)
so every exponential is an exp2 (Triton's fused-attention tutorial does the same). Normalization is
applied as the rank-1 factor r_p[i] r_q[j] on each logit tile, never as a copy of the embeddings.

Forward (`fwd_kernel`): one program per (row block, directed pair). A directed pair (a, b) sweeps all
column blocks of S_ab and keeps, per row, log2-sum-exp2 (online max, or none when bounded), the diagonal
S2_ii and, for statistics, the first argmax. The column statistics of S_pq are the row statistics of
S_qp, so the deterministic path launches both directions of every pair (2 matmul passes per pair). When
the logits are bounded (normalized inputs and 1/t <= 60: |S| <= 1/t, exp2 needs no max) the fast path
launches one direction and adds each tile's column sums of exp2(S2) into an fp32 buffer with atomics
(1 pass per pair; not bitwise reproducible). With a temperature tensor the host does not read 1/t (that
would wait for the GPU): BOUND_ON_DEVICE has the kernels read the bound from a device flag instead. The
launch then holds both directions; when the flag is set, the reverse directions sweep nothing and the
forward ones pin the running max at 0 (the bounded sum) and add the column sums.

Backward, G = dL/dS = c_k (P + Q - 2T) (c_k: the epilogue's coefficient times the incoming gradient; T
the targets: I by default, in which case the kernel subtracts it; with ids or label smoothing the host adds
the T part, O(N*D), fastpair.targets), P = exp2(S2 - lse2_row[i]), Q = exp2(S2 - lse2_col[j]); when
bounded one exp2 serves both (decided at run time under BOUND_ON_DEVICE):
G = c E (2^-lse2_row[i] + 2^-lse2_col[j]). `grad_panel_kernel` recomputes the tiles of one row panel and
writes W = diag(r_p) G diag(r_q) / t (input dtype); two GEMMs on the host then give both gradients
(atomic-free, deterministic). dL/dt_k = -s_k sum_ij G_ij S_ij is reduced from the tiles, no extra pass.
`input_grad_kernel` applies the normalization backward and writes dL/dz in the input dtype in one pass.

Limits: fp32, bf16, fp16 inputs, fp32 accumulation; fp32 inputs' products on tensor cores as 3xTF32 (fp32
accuracy) by default, TF32 where torch allows it, IEEE fp32 (FMA units) where torch was told so
(launch.input_precision); any N >= 1, any D (the host pads rows to 16 elements, the kernels mask to D);
int64 offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(z_ptr, a, b, offs_m, offs_n, N, D, stride_m, stride_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """<z_a[i], z_b[j]> for a BLOCK_M x BLOCK_N tile, fp32 accumulation over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = z_ptr + a.to(tl.int64) * stride_m + offs_m.to(tl.int64)[:, None] * stride_n
    b_rows = z_ptr + b.to(tl.int64) * stride_m + offs_n.to(tl.int64)[:, None] * stride_n
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        za = tl.load(a_rows + kk[None, :], mask=(offs_m[:, None] < N) & (kk[None, :] < D), other=0.0)
        zb = tl.load(b_rows + kk[None, :], mask=(offs_n[:, None] < N) & (kk[None, :] < D), other=0.0)
        acc = tl.dot(za, tl.trans(zb), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _scaled_tile(z_ptr, rnorm_ptr, a, b, offs_m, offs_n, row_f, N, D, stride_m, stride_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """S2 = row_f[i] * r_b[j] * <z_a[i], z_b[j]> (row_f = r_a * log2(e) / t), and r_b for the columns."""
    acc = _logits_tile(z_ptr, a, b, offs_m, offs_n, N, D, stride_m, stride_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    rb = tl.load(rnorm_ptr + b * N + offs_n, mask=offs_n < N, other=0.0)
    return acc * row_f[:, None] * rb[None, :], rb


@triton.jit
def _softplus(u):
    """log(1 + e^u) = max(u, 0) + ln 2 * log2(1 + 2^(-|u| log2 e)), exact for every u (no overflow)."""
    return tl.maximum(u, 0.0) + 0.6931471805599453 * tl.log2(1.0 + tl.exp2(-tl.abs(u) * 1.4426950408889634))


@triton.jit
def _first_argmax(s, offs_n, best, best_idx):
    """The running first argmax of each row over column blocks: the tile's maximum and its first column
    (the least column index holding it), kept where it beats the earlier blocks' strictly."""
    t_max = tl.max(s, axis=1)
    t_arg = tl.min(tl.where(s == t_max[:, None], offs_n[None, :], 2147483647), axis=1)
    better = t_max > best
    return tl.where(better, t_max, best), tl.where(better, t_arg, best_idx)


@triton.jit
def _valid(valid_ptr, a, b, offs, N, HAS_MASK: tl.constexpr):
    inside = offs < N
    if HAS_MASK:
        va = tl.load(valid_ptr + a * N + offs, mask=inside, other=0)
        vb = tl.load(valid_ptr + b * N + offs, mask=inside, other=0)
        inside = inside & (va != 0) & (vb != 0)
    return inside


# Batch-dependent integers are not specialized (Triton would otherwise compile a variant for N == 1 and for
# N % 16 == 0, and for every such class of a panel's offsets): fewer compilations, same loads (the large
# tile loads use the strides, which stay specialized).
@triton.jit(do_not_specialize=["N", "ROW0", "N_ROWS", "N_BUCKET", "D_BUCKET"])
def fwd_kernel(z_ptr, rnorm_ptr, valid_ptr, scale2_ptr, bias_ptr, dir_ptr, flag_ptr,
                lse_ptr, diag_ptr, arg_ptr, colsum_ptr,
                N, ROW0, N_ROWS, D, stride_m, stride_n, N_BUCKET, D_BUCKET,
                HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr, BOUND_ON_DEVICE: tl.constexpr,
                ATOMIC_COLS: tl.constexpr, STATS: tl.constexpr, SIGMOID: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """Per row of one directed pair: log2-sum-exp2 of S2 (InfoNCE), or (SIGMOID) the sum of
    softplus(S + b) over the valid columns, in nats; S2_ii; the first argmax (STATS).
    BOUND_ON_DEVICE: the flag at flag_ptr says whether the logits are bounded (BOUNDED is then False);
    with ATOMIC_COLS the directions come in pairs (p, q), (q, p), and a set flag skips the second."""
    pid_m = tl.program_id(0)
    d = tl.program_id(1)
    a = tl.load(dir_ptr + 3 * d)
    b = tl.load(dir_ptr + 3 * d + 1)
    k = tl.load(dir_ptr + 3 * d + 2)
    sweep_end = N
    if BOUND_ON_DEVICE:
        fast = tl.load(flag_ptr) != 0
        if ATOMIC_COLS:  # the column sums of the forward direction replace the reverse direction's sweep
            sweep_end = tl.where(fast & (d % 2 == 1), 0, N)
    m_start = ROW0 + pid_m * BLOCK_M  # rows [ROW0, ROW0 + N_ROWS) of S: all N, or one rank's share
    offs_m = m_start + tl.arange(0, BLOCK_M)
    in_rows = offs_m < ROW0 + N_ROWS
    row_ok = _valid(valid_ptr, a, b, offs_m, N, HAS_MASK) & in_rows
    row_f = tl.load(rnorm_ptr + a * N + offs_m, mask=in_rows, other=0.0) * tl.load(scale2_ptr + k)
    bias = 0.0
    if SIGMOID:
        bias = tl.load(bias_ptr + k)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    diag = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for start_n in range(0, sweep_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = _valid(valid_ptr, a, b, offs_n, N, HAS_MASK)
        s2, rb = _scaled_tile(z_ptr, rnorm_ptr, a, b, offs_m, offs_n, row_f, N, D, stride_m, stride_n,
                              BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        if (start_n < m_start + BLOCK_M) & (start_n + BLOCK_N > m_start):  # tile meets the diagonal
            diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], s2, 0.0), axis=1)
        if SIGMOID:
            # the row sums of softplus(S + b); S + b replaces S2 for the argmax (the same order, and S2 dies)
            s2 = s2 * 0.6931471805599453 + bias
            l_i += tl.sum(tl.where(col_ok[None, :], _softplus(s2), 0.0), axis=1)
        if STATS or not SIGMOID:
            s2 = tl.where(col_ok[None, :], s2, float("-inf"))
        if not SIGMOID:
            if BOUNDED:
                # |S| <= 1/t <= 60: exp2 of the raw logits stays in fp32's normal range, no max needed
                e = tl.exp2(s2)
                l_i += tl.sum(e, axis=1)
                if ATOMIC_COLS:
                    part = tl.sum(tl.where(row_ok[:, None], e, 0.0), axis=0)
                    tl.atomic_add(colsum_ptr + k * N + offs_n, part, mask=col_ok)
            else:
                # online log-sum-exp: l <- l * 2^(m_old - m_new) + sum 2^(s - m_new)
                m_new = tl.maximum(m_i, tl.max(s2, axis=1))
                if BOUND_ON_DEVICE:
                    m_new = tl.where(fast, 0.0, m_new)  # bounded: 2^s needs no max (the sum above)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                e = tl.exp2(s2 - m_safe[:, None])
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(e, axis=1)
                m_i = m_new
                if BOUND_ON_DEVICE and ATOMIC_COLS:
                    if fast:  # uniform across the launch
                        part = tl.sum(tl.where(row_ok[:, None], e, 0.0), axis=0)
                        tl.atomic_add(colsum_ptr + k * N + offs_n, part, mask=col_ok)
        if STATS:
            best, best_idx = _first_argmax(s2, offs_n, best, best_idx)
    if SIGMOID:
        lse = l_i
    elif BOUNDED:
        lse = tl.log2(l_i)
    else:
        lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i)
    lse = tl.where(row_ok, lse, 0.0)
    out = d.to(tl.int64) * N_ROWS + (offs_m - ROW0)
    tl.store(lse_ptr + out, lse, mask=in_rows)
    tl.store(diag_ptr + out, diag, mask=in_rows)
    if STATS:
        tl.store(arg_ptr + out, best_idx, mask=in_rows)  # the host compares it with the row (or its id)


@triton.jit(do_not_specialize=["N", "k", "row0", "rows", "N_BUCKET", "D_BUCKET"])
def grad_panel_kernel(z_ptr, rnorm_ptr, valid_ptr, scale2_ptr, bias_ptr, coef_ptr, lse_ptr, flag_ptr, w_ptr,
                      sgs_ptr, sgb_ptr, pair_ptr, k, row0, rows, N, D, stride_m, stride_n, N_BUCKET, D_BUCKET,
                      HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr, BOUND_ON_DEVICE: tl.constexpr,
                      NEEDS_DT: tl.constexpr,
                      IDENTITY: tl.constexpr, SIGMOID: tl.constexpr, NEEDS_DB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    """One tile of W = diag(r_p) G diag(r_q) / t for the row panel [row0, row0 + rows) of pair k = (p, q).

    InfoNCE: G = dL/dS = c_k (P + Q - 2I) (IDENTITY) or c_k (P + Q) from the saved row (2k) and column
    (2k+1) log2-sum-exp2. SIGMOID: G = c_k (sigmoid(S + b) - I) (IDENTITY) or c_k sigmoid(S + b). The panel
    then feeds two dense GEMMs on the host: dX_p[panel] r_p = W z_q and dX_q r_q += W^T z_p[panel]. Per
    tile partial sums: of G S2 (NEEDS_DT, for dL/dt) and of G (NEEDS_DB, for dL/db).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = tl.load(pair_ptr + 2 * k)  # loaded, not passed: Triton turns integer arguments 0 and 1 into constants
    q = tl.load(pair_ptr + 2 * k + 1)
    offs_m = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_panel = offs_m < row0 + rows
    row_ok = _valid(valid_ptr, p, q, offs_m, N, HAS_MASK) & in_panel
    col_ok = _valid(valid_ptr, p, q, offs_n, N, HAS_MASK)
    scale2 = tl.load(scale2_ptr + k)
    ra = tl.load(rnorm_ptr + p * N + offs_m, mask=offs_m < N, other=0.0)
    s2, rb = _scaled_tile(z_ptr, rnorm_ptr, p, q, offs_m, offs_n, ra * scale2, N, D, stride_m, stride_n,
                          BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    if SIGMOID:
        g = tl.sigmoid(s2 * 0.6931471805599453 + tl.load(bias_ptr + k))
    else:
        lse_row = tl.load(lse_ptr + (2 * k) * N + offs_m, mask=row_ok, other=0.0)
        lse_col = tl.load(lse_ptr + (2 * k + 1) * N + offs_n, mask=col_ok, other=0.0)
        if BOUNDED:
            g = tl.exp2(s2) * (tl.exp2(-lse_row)[:, None] + tl.exp2(-lse_col)[None, :])
        elif BOUND_ON_DEVICE:
            if tl.load(flag_ptr) != 0:  # uniform across the launch: one exp2 per logit when bounded
                g = tl.exp2(s2) * (tl.exp2(-lse_row)[:, None] + tl.exp2(-lse_col)[None, :])
            else:
                g = tl.exp2(s2 - lse_row[:, None]) + tl.exp2(s2 - lse_col[None, :])
        else:
            g = tl.exp2(s2 - lse_row[:, None]) + tl.exp2(s2 - lse_col[None, :])
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g, 0.0)
    if IDENTITY:  # T = I (weight 2 in InfoNCE's P + Q - 2T, 1 in the sigmoid's); other targets: on the host
        if SIGMOID:
            g = tl.where(ok & (offs_m[:, None] == offs_n[None, :]), g - 1.0, g)
        else:
            g = tl.where(ok & (offs_m[:, None] == offs_n[None, :]), g - 2.0, g)
    g = g * tl.load(coef_ptr + k)
    tile = pid_m * tl.num_programs(1) + pid_n
    if NEEDS_DT:
        tl.store(sgs_ptr + tile, tl.sum(tl.sum(g * s2, axis=1), axis=0))
    if NEEDS_DB:
        tl.store(sgb_ptr + tile, tl.sum(tl.sum(g, axis=1), axis=0))
    w = g * (ra * (scale2 * 0.6931471805599453))[:, None] * rb[None, :]
    w_ptrs = w_ptr + (offs_m - row0).to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=in_panel[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["N"])
def input_grad_kernel(dx_ptr, z_ptr, rnorm_ptr, out_ptr, N, D, stride,
                       NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """dL/dz from dL/dx in one pass over rows of (M*N, D), written in the input dtype (rows of D); dx and z
    have rows of `stride` (D padded, the extra columns zero).

    dx_ptr holds dL/dx * r (the panel backward's W carries r = 1/n), so dL/dx = dx_ptr / r.
    NORMALIZE: x = z / n, n = max(||z||, eps): dz = (dx - x <x, dx>) / n above eps, dx / n below;
    x by division, as F.normalize does (so x = +-1 exactly for D = 1, where dz is exactly 0).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    dx = tl.load(dx_ptr + offs, mask=inside, other=0.0)
    r = tl.load(rnorm_ptr + rows, mask=rows < N, other=1.0)
    dx = tl.div_rn(dx, r[:, None])
    if NORMALIZE:
        z = tl.load(z_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        # IEEE sqrt and division (Triton's defaults are approximate): x = +-1 exactly when D = 1
        norm = tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), 1e-12)
        x = tl.div_rn(z, norm[:, None])
        dot = tl.where(norm > 1e-12, tl.sum(x * dx, axis=1), 0.0)
        dx = tl.div_rn(dx - x * dot[:, None], norm[:, None])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(out_ptr.dtype.element_ty), mask=inside)
