"""Fused Triton kernels of the modality-pairwise InfoNCE loss (forward and backward, all pairs per launch).

Notation (DESIGN.md): embeddings z_a (N, D), inverse norms r_a = 1/max(||z_a||, 1e-12) (1 when not
normalizing), pair k = (p, q) with scale s_k = 1/t_k. Logits are kept in base 2:
    S2_ij = log2(e) * s_k * r_p[i] r_q[j] <z_p[i], z_q[j]>        (S = S2 * ln 2)
so every exponential is an exp2 (Triton's fused-attention tutorial does the same). Normalization is
applied as the rank-1 factor r_p[i] r_q[j] on each logit tile, never as a copy of the embeddings.

Forward (`_fwd_kernel`): one program per (row block, directed pair). A directed pair (a, b) sweeps all
column blocks of S_ab and keeps, per row, log2-sum-exp2 (online max, or none when bounded), the diagonal
S2_ii and, for statistics, the first argmax. The column statistics of S_pq are the row statistics of
S_qp, so the deterministic path launches both directions of every pair (2 matmul passes per pair). When
the logits are bounded (normalized inputs and 1/t <= 60: |S| <= 1/t, exp2 needs no max) the fast path
launches one direction and adds each tile's column sums of exp2(S2) into an fp32 buffer with atomics
(1 pass per pair; not bitwise reproducible). torch.use_deterministic_algorithms(True), return_stats,
normalize=False or 1/t > 60 select the two-direction path.

Backward, G = dL/dS = c_k (P + Q - 2I), c_k = g w_k / (W 2 n_k), P = exp2(S2 - lse2_row[i]),
Q = exp2(S2 - lse2_col[j]); when bounded one exp2 serves both: G = c E (2^-lse2_row[i] + 2^-lse2_col[j]).
Two atomic-free, deterministic variants (BACKWARD, env FASTPAIR_TRITON_BACKWARD):
* "panel" (default; `_grad_panel_kernel` + cuBLAS): per pair and row panel, one fully parallel launch
  recomputes the tiles and writes W = diag(r_p) G diag(r_q) / t (input dtype), then two GEMMs with fp32
  accumulation give r_p dL/dx_p[panel] = W z_q and r_q dL/dx_q += W^T z_p[panel]. The 4 matmul passes
  per pair of the floor, plus writing W once and reading it twice; the panel is at most PANEL_BYTES.
* "fused" (`_bwd_kernel`, FlashAttention-shaped): one program per (row block, modality a, chunk of D)
  sweeps every partner b of a and every column block, recomputes the tile and accumulates
  dL/dx_a[i] = s_k sum_j G_ij r_b[j] z_b[j] in registers (for a = q the tile is S_pq^T and the two
  statistics swap roles, which the same formula covers). 2 directions x 2 matmul passes per pair, and
  one more logit pass per extra 256-wide chunk of D: a full step 2.7x slower than with "panel" at
  D = 512 on an H100 (93.2 vs 33.9 ms, bf16, N = 32768).
dL/dt_k = -s_k sum_ij G_ij S_ij is reduced from the tiles, no extra pass. `_input_grad_kernel` then
applies the normalization backward and writes dL/dz in the input dtype in one pass.

Limits: fp32, bf16, fp16 inputs (fp32 math; tf32 for fp32 inputs only when torch allows it; in Triton's
interpreter bf16 is computed from fp32 operands, see forward); any N >= 1, any D (masked to the block);
int64 offsets. Tiles of the forward and panel kernels are autotuned per (N, D) power-of-two bucket and
dtype (see _FWD_GPU_CONFIGS). The gradient is accumulated in an fp32 (M, N, D) buffer (memory above the
goal of DESIGN.md: see README).
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_EPS = 1e-12
BOUND = 60.0  # largest 1/t for which exp(S), |S| <= 1/t, is safe in fp32 without a running max

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# "panel" (W panels + cuBLAS GEMMs) or "fused" (FlashAttention-shaped, all in registers); see backward*.
BACKWARD = os.environ.get("FASTPAIR_TRITON_BACKWARD", "panel")


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
def _valid(valid_ptr, a, b, offs, N, HAS_MASK: tl.constexpr):
    inside = offs < N
    if HAS_MASK:
        va = tl.load(valid_ptr + a * N + offs, mask=inside, other=0)
        vb = tl.load(valid_ptr + b * N + offs, mask=inside, other=0)
        inside = inside & (va != 0) & (vb != 0)
    return inside


# Batch-dependent integers are not specialized (Triton would otherwise compile a variant for N == 1 and for
# N % 16 == 0, and for every such class of a panel's offsets): fewer compilations, same loads (the large
# tile loads use the strides, which stay specialized). Not yet measured on a GPU.
@triton.jit(do_not_specialize=["N", "ROW0", "N_ROWS", "N_BUCKET", "D_BUCKET"])
def _fwd_kernel(z_ptr, rnorm_ptr, valid_ptr, scale2_ptr, dir_ptr,
                lse_ptr, diag_ptr, hit_ptr, colsum_ptr,
                N, ROW0, N_ROWS, D, stride_m, stride_n, N_BUCKET, D_BUCKET,
                HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr, ATOMIC_COLS: tl.constexpr, STATS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    d = tl.program_id(1)
    a = tl.load(dir_ptr + 3 * d)
    b = tl.load(dir_ptr + 3 * d + 1)
    k = tl.load(dir_ptr + 3 * d + 2)
    m_start = ROW0 + pid_m * BLOCK_M  # rows [ROW0, ROW0 + N_ROWS) of S: all N, or one rank's share
    offs_m = m_start + tl.arange(0, BLOCK_M)
    in_rows = offs_m < ROW0 + N_ROWS
    row_ok = _valid(valid_ptr, a, b, offs_m, N, HAS_MASK) & in_rows
    row_f = tl.load(rnorm_ptr + a * N + offs_m, mask=in_rows, other=0.0) * tl.load(scale2_ptr + k)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    diag = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = _valid(valid_ptr, a, b, offs_n, N, HAS_MASK)
        s2, rb = _scaled_tile(z_ptr, rnorm_ptr, a, b, offs_m, offs_n, row_f, N, D, stride_m, stride_n,
                              BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        if (start_n < m_start + BLOCK_M) & (start_n + BLOCK_N > m_start):  # tile meets the diagonal
            diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], s2, 0.0), axis=1)
        s2 = tl.where(col_ok[None, :], s2, float("-inf"))
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
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
            m_i = m_new
        if STATS:
            t_max = tl.max(s2, axis=1)
            t_arg = tl.argmax(s2, axis=1, tie_break_left=True).to(tl.int32) + start_n
            better = t_max > best  # strict: the first column block holding the maximum wins
            best = tl.where(better, t_max, best)
            best_idx = tl.where(better, t_arg, best_idx)
    if BOUNDED:
        lse = tl.log2(l_i)
    else:
        lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i)
    lse = tl.where(row_ok, lse, 0.0)
    out = d.to(tl.int64) * N_ROWS + (offs_m - ROW0)
    tl.store(lse_ptr + out, lse, mask=in_rows)
    tl.store(diag_ptr + out, diag, mask=in_rows)
    if STATS:
        tl.store(hit_ptr + out, ((best_idx == offs_m) & row_ok).to(tl.float32), mask=in_rows)


@triton.jit(do_not_specialize=["N", "ROW0", "N_ROWS", "N_BUCKET", "NUM_ROW_BLOCKS"])
def _bwd_kernel(z_ptr, rnorm_ptr, valid_ptr, scale2_ptr, coef_ptr, partner_ptr, lse_ptr,
                dx_ptr, sgs_ptr,
                N, ROW0, N_ROWS, D, stride_m, stride_n, N_BUCKET, NUM_PARTNERS, NUM_ROW_BLOCKS,
                HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr, NEEDS_DT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    a = tl.program_id(1)
    pid_d = tl.program_id(2)
    m_start = ROW0 + pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    in_rows = offs_m < ROW0 + N_ROWS
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    ra = tl.load(rnorm_ptr + a * N + offs_m, mask=in_rows, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for j in range(NUM_PARTNERS):
        entry = partner_ptr + (a * NUM_PARTNERS + j) * 4
        b = tl.load(entry)
        k = tl.load(entry + 1)
        own = tl.load(entry + 2)  # index of the lse2 over a's rows (row stats if a = p, column stats if a = q)
        other = tl.load(entry + 3)
        scale2 = tl.load(scale2_ptr + k)
        coef = tl.load(coef_ptr + k)
        row_ok = _valid(valid_ptr, a, b, offs_m, N, HAS_MASK) & in_rows
        row_f = ra * scale2
        lse_own = tl.load(lse_ptr + own.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
        if BOUNDED:
            inv_own = tl.exp2(-lse_own)
        sgs = tl.zeros((BLOCK_M,), tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = _valid(valid_ptr, a, b, offs_n, N, HAS_MASK)
            s2, rb = _scaled_tile(z_ptr, rnorm_ptr, a, b, offs_m, offs_n, row_f, N, D, stride_m, stride_n,
                                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
            lse_other = tl.load(lse_ptr + other.to(tl.int64) * N + offs_n, mask=col_ok, other=0.0)
            ok = row_ok[:, None] & col_ok[None, :]
            if BOUNDED:
                g = tl.exp2(s2) * (inv_own[:, None] + tl.exp2(-lse_other)[None, :])  # P + Q from one exp2
            else:
                g = tl.exp2(s2 - lse_own[:, None]) + tl.exp2(s2 - lse_other[None, :])
            g = tl.where(ok, g, 0.0)
            if (start_n < m_start + BLOCK_M) & (start_n + BLOCK_N > m_start):
                g = tl.where(ok & (offs_m[:, None] == offs_n[None, :]), g - 2.0, g)
            g = g * coef  # G = dL/dS
            if NEEDS_DT:
                sgs += tl.sum(g * s2, axis=1)  # sum_ij G_ij S2_ij (S = S2 ln 2)
            # dL/dx_a = (1/t) G (r_b z_b): fold 1/t = scale2 ln 2 and r_b into the columns of G
            gs = g * (rb * (scale2 * 0.6931471805599453))[None, :]
            zb_ptrs = z_ptr + b.to(tl.int64) * stride_m + offs_n.to(tl.int64)[:, None] * stride_n + offs_do[None, :]
            zb = tl.load(zb_ptrs, mask=(offs_n[:, None] < N) & (offs_do[None, :] < D), other=0.0)
            acc = tl.dot(gs.to(zb.dtype), zb, acc, input_precision=INPUT_PRECISION)
        if NEEDS_DT:
            if (a < b) & (pid_d == 0):  # the p side of pair k writes its (pair, row block) partial
                tl.store(sgs_ptr + k * NUM_ROW_BLOCKS + pid_m, tl.sum(sgs, axis=0))
    out = dx_ptr + a.to(tl.int64) * N * D + offs_m.to(tl.int64)[:, None] * D + offs_do[None, :]
    tl.store(out, acc, mask=in_rows[:, None] & (offs_do[None, :] < D))


@triton.jit(do_not_specialize=["N", "k", "row0", "rows", "N_BUCKET", "D_BUCKET"])
def _grad_panel_kernel(z_ptr, rnorm_ptr, valid_ptr, scale2_ptr, coef_ptr, lse_ptr, w_ptr, sgs_ptr, pair_ptr,
                       k, row0, rows, N, D, stride_m, stride_n, N_BUCKET, D_BUCKET,
                       HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr, NEEDS_DT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """One tile of W = diag(r_p) G diag(r_q) / t for the row panel [row0, row0 + rows) of pair k = (p, q).

    G = dL/dS = c_k (P + Q - 2I) from the saved row (2k) and column (2k+1) log2-sum-exp2. The panel then
    feeds two dense GEMMs on the host: dX_p[panel] r_p = W z_q and dX_q r_q += W^T z_p[panel].
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
    lse_row = tl.load(lse_ptr + (2 * k) * N + offs_m, mask=row_ok, other=0.0)
    lse_col = tl.load(lse_ptr + (2 * k + 1) * N + offs_n, mask=col_ok, other=0.0)
    if BOUNDED:
        g = tl.exp2(s2) * (tl.exp2(-lse_row)[:, None] + tl.exp2(-lse_col)[None, :])
    else:
        g = tl.exp2(s2 - lse_row[:, None]) + tl.exp2(s2 - lse_col[None, :])
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g, 0.0)
    g = tl.where(ok & (offs_m[:, None] == offs_n[None, :]), g - 2.0, g) * tl.load(coef_ptr + k)
    if NEEDS_DT:
        tl.store(sgs_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * s2, axis=1), axis=0))
    w = g * (ra * (scale2 * 0.6931471805599453))[:, None] * rb[None, :]
    w_ptrs = w_ptr + (offs_m - row0).to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=in_panel[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["N"])
def _input_grad_kernel(dx_ptr, z_ptr, rnorm_ptr, out_ptr, N, D,
                       NORMALIZE: tl.constexpr, SCALED: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """dL/dz from dL/dx in one pass over rows of (M*N, D), written in the input dtype.

    SCALED: dx holds dL/dx * r (the panel backward's W carries r = 1/n), so dx = dx_ptr / r.
    NORMALIZE: x = z / n, n = max(||z||, eps): dz = (dx - x <x, dx>) / n above eps, dx / n below;
    x by division, as F.normalize does (so x = +-1 exactly for D = 1, where dz is exactly 0).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dx = tl.load(dx_ptr + offs, mask=inside, other=0.0)
    r = tl.load(rnorm_ptr + rows, mask=rows < N, other=1.0)
    if SCALED:
        dx = tl.div_rn(dx, r[:, None])
    if NORMALIZE:
        z = tl.load(z_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        # IEEE sqrt and division (Triton's defaults are approximate): x = +-1 exactly when D = 1
        norm = tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), 1e-12)
        x = tl.div_rn(z, norm[:, None])
        dot = tl.where(norm > 1e-12, tl.sum(x * dx, axis=1), 0.0)
        dx = tl.div_rn(dx - x * dot[:, None], norm[:, None])
    tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------
# Host side: block sizes, launches, epilogues.

def _buckets(n: int, d: int) -> tuple[int, int]:
    """The autotuning key's sizes: N and D rounded up to powers of two (D at least 16, tl.dot's minimum)."""
    return triton.next_power_of_2(n), max(16, triton.next_power_of_2(d))


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# Autotuning: Triton's autotuner times every kept config the first time a key is seen in a process (a few
# seconds, once per bucket) and keeps the fastest. Key: N and D bucketed to powers of two (_buckets), the
# flags that change the work per tile, and, added by Triton, the dtypes of the tensor arguments, so the
# kernels neither re-tune nor recompile for every batch size. Candidates are few on purpose; `_keep` drops
# those that cannot help at a given key. H100 timings: bench/results/nvidia-h100-80gb-hbm3-2026-11-24-tune.log
# (bf16, N=32768); nothing here has been timed on an A100 yet.
_FWD_GPU_CONFIGS = [
    # H100 winner at D=512 (9.07 ms): 128 x 256 logit tiles halve the row block's reloads per column
    # sweep; 8 warps hold the fp32 tile. 3 stages of (128 + 256) x 64 bf16 = 144 KiB: fits H100 (227 KiB)
    # and A100 (163 KiB) in 16-bit; in fp32 2 stages on an H100, none on an A100 (see _keep).
    _config(128, 256, 64, 8, 3),
    # H100 at D=512: 9.30 ms (2% behind), the choice at D <= 128 in the sweep; 96 KiB of stages in 16-bit,
    # so the fp32 (tf32) and Ampere configuration.
    _config(128, 128, 64, 4, 3),
    # Twice the programs for mid-size N: with 128-row blocks, N = 4096 launches 32 x 3 programs on the fast
    # path, fewer than the 132 SMs of an H100 (108 on an A100); a 4th stage for Ampere's cp.async pipeline.
    _config(64, 128, 64, 4, 4),
]
_PANEL_GPU_CONFIGS = [
    # H100 D=512: 20.67 ms for the three pairs' W panels + GEMMs (0.91x the 12-GEMM floor), D=128: 11.02 ms
    _config(128, 128, 64, 4, 3),
    # H100: 20.61 / 10.94 ms, a tie with the one above within noise; kept for the autotuner to settle per GPU
    _config(128, 256, 64, 8, 3),
    # Ampere (smaller shared memory, 108 SMs) and fp32; never the winner on the H100 sweep (not timed there)
    _config(64, 128, 64, 4, 4),
]
# Measured and dropped (same log): 256 x 128 tiles (forward 9.74 ms, panel 20.94), 8 warps on 128 x 128
# (forward 14.3 ms, panel 22.3), BLOCK_K = 32 (9.50 ms).
# Interpreter: the smallest legal tiles, one config (the CPU emulation's time grows with the tile)
_FWD_CONFIGS = [_config(16, 16, 16, 1, 1)] if INTERPRET else _FWD_GPU_CONFIGS
_PANEL_CONFIGS = [_config(16, 16, 16, 1, 1)] if INTERPRET else _PANEL_GPU_CONFIGS
SMALL_N = 2048  # at or below: no tuning (one config), whose cost would exceed any gain at this size
LARGE_N = 2**17  # above: no tuning either (each timed run takes seconds); the first config that fits


def _keep(configs, n_bucket: int, d_bucket: int, elem_bytes: int, shared_memory: int) -> list:
    """The candidates worth timing at one key: BLOCK_K no wider than D (wider only loads masked zeros);
    no more pipeline stages of the (BLOCK_M + BLOCK_N) x BLOCK_K operand tiles than shared memory holds
    (an estimate: fp32 inputs, or Ampere's 163 KiB, lose stages or the config); at small N only the
    smallest tile (more programs than SMs matters more there than tile efficiency, and one candidate means
    no tuning time); at huge N the first (timing a candidate there would take minutes)."""
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], min(c.kwargs["BLOCK_K"], d_bucket)
        stages = min(c.num_stages, shared_memory // ((bm + bn) * bk * elem_bytes))
        if stages >= 2:  # one stage would mean no overlap of loads and math: not a candidate
            kept.append(_config(bm, bn, bk, c.num_warps, stages))
    if not kept:  # a GPU with little shared memory: the smallest tile, unpipelined
        c = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        kept = [_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], min(c.kwargs["BLOCK_K"], d_bucket), 4, 1)]
    if n_bucket <= SMALL_N:
        kept = [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    elif n_bucket > LARGE_N:
        kept = kept[:1]  # the configs are listed best first (H100, N=32768), which holds for larger N
    return kept


@functools.lru_cache(maxsize=16)
def _shared_memory(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # an unknown driver: assume the smallest of the GPUs the configs were written for
        return 163 * 1024


def _prune(configs, nargs, **_):
    z = nargs["z_ptr"]
    return _keep(configs, nargs["N_BUCKET"], nargs["D_BUCKET"], z.element_size(),
                 _shared_memory(z.device.index if z.device.index is not None else 0))


_fwd_tuned = triton.autotune(
    _FWD_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "ATOMIC_COLS", "STATS"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["colsum_ptr"],  # the atomic column sums accumulate: zeroed before each timed run
)(_fwd_kernel)
_panel_tuned = triton.autotune(
    _PANEL_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "NEEDS_DT"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["sgs_ptr"],  # per-tile partials: a timed config with smaller tiles writes more of them
)(_grad_panel_kernel)


def _fused_bwd_blocks(d: int) -> dict:
    """Tiles of the fused backward (not the default, not autotuned; H100 sweep in the same log): the
    (BLOCK_M x BLOCK_DO) fp32 accumulator lives in registers; D > 256 is split into 256-wide chunks, each
    of which recomputes the logits (measured faster than a 512-wide accumulator)."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=32, num_warps=1, num_stages=1)
    d_pad = max(16, triton.next_power_of_2(d))
    bk = min(64, d_pad)
    if d_pad <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=d_pad, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=256, num_warps=8, num_stages=4)


@functools.lru_cache(maxsize=512)
def _const(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A small constant table on the device, made once: torch.tensor(..., device="cuda") copies from
    pageable memory and so waits for the GPU, which would serialize the host and the device every call."""
    return torch.tensor(values, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _pair_tables(num_modalities: int, pairs, device):
    partners = []
    for a in range(num_modalities):
        for k, (p, q) in enumerate(pairs):
            if a == p:
                partners.append((q, k, 2 * k, 2 * k + 1))
            elif a == q:
                partners.append((p, k, 2 * k + 1, 2 * k))
    return _const(tuple(partners), torch.int32, str(device))


def _stage(zs, mask):
    """The kernels' operands: the inputs stacked as (M, N, D) in their dtype, and the mask as int8 (M, N)
    (a 1-element placeholder without a mask)."""
    z = torch.stack([t.contiguous() for t in zs])
    if INTERPRET and z.dtype == torch.bfloat16:
        # Triton's interpreter misreads bf16 loads (numpy has no bf16). bf16 x bf16 products are exact in
        # fp32, so fp32 operands give the same logits; only the bf16 rounding of G in the backward dot
        # differs. bf16 kernel numerics are therefore tested on a GPU.
        z = z.float()
    if mask is None:
        return z, torch.empty(1, dtype=torch.int8, device=z.device)
    return z, mask.to(torch.int8).contiguous()


def forward(zs, scales, pairs, mask, normalize: bool, stats: bool, deterministic: bool, cfg=None, scale2=None,
            row0: int = 0, rows: int | None = None):
    """Returns a dict of O(N) statistics and the stacked inputs for the backward pass.

    rows [row0, row0 + rows) of S (default all N): lse, diag and hits are (directions, rows); the fast
    path's column sums (over these rows only) are returned as "colsum" (P, N) for the caller to merge
    across ranks, and its lse table then holds the row statistics only (P, rows)."""
    m = len(zs)
    n, d = zs[0].shape
    rows = n if rows is None else rows
    device = zs[0].device
    z, valid = _stage(zs, mask)
    if normalize:  # fp32 norms without an fp32 copy of the inputs
        rnorm = 1.0 / torch.linalg.vector_norm(z, dim=2, dtype=torch.float32).clamp_min(NORM_EPS)
    else:
        rnorm = torch.ones(m, n, dtype=torch.float32, device=device)
    if scale2 is None:
        scale2 = _const(tuple(s * LOG2E for s in scales), torch.float32, str(device))
    bounded = normalize and max(scales) <= BOUND
    atomic = bounded and not stats and not deterministic
    directed = [(p, q, k) for k, (p, q) in enumerate(pairs)]
    if not atomic:
        directed = [t for k, (p, q) in enumerate(pairs) for t in ((p, q, k), (q, p, k))]
    dirs = _const(tuple(directed), torch.int32, str(device))
    num_dir = len(directed)
    lse = torch.empty(num_dir, rows, dtype=torch.float32, device=device)
    diag = torch.empty(num_dir, rows, dtype=torch.float32, device=device)
    hits = torch.empty(num_dir, rows, dtype=torch.float32, device=device) if stats else lse
    colsum = torch.zeros(len(pairs), n, dtype=torch.float32, device=device) if atomic else lse
    # cfg: explicit tiles (bench/tune_gpu.py); by default the autotuned kernel picks them
    kernel, tiles = (_fwd_tuned, {}) if cfg is None else (_fwd_kernel, cfg)
    kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_dir)](
        z, rnorm, valid, scale2, dirs, lse, diag, hits, colsum,
        n, row0, rows, d, z.stride(0), z.stride(1), *_buckets(n, d),
        HAS_MASK=mask is not None, BOUNDED=bounded, ATOMIC_COLS=atomic, STATS=stats,
        INPUT_PRECISION=_input_precision(zs[0].dtype), **tiles,
    )
    if atomic and rows < n:  # one rank's rows: the column sums are partial, merged by the caller
        return dict(z=z, rnorm=rnorm, valid=valid, scale2=scale2, lse=lse, diag=diag, colsum=colsum,
                    hits=None, bounded=bounded)
    if atomic:
        # lse table in the two-direction layout: 2k = rows of p (row stats), 2k+1 = rows of q (column stats)
        col = torch.log2(colsum)
        if mask is not None:
            col = torch.where(_pair_valid(mask, pairs), col, torch.zeros_like(col))
        lse = torch.stack([lse, col], dim=1).reshape(2 * len(pairs), n)
        diag = diag.repeat_interleave(2, dim=0)
    return dict(z=z, rnorm=rnorm, valid=valid, scale2=scale2, lse=lse, diag=diag,
                hits=hits if stats else None, bounded=bounded)


def _pair_valid(mask, pairs):
    return torch.stack([mask[p] & mask[q] for p, q in pairs])


def backward(saved, coef, pairs, num_modalities, has_mask: bool, needs_dt: bool, in_dtype, cfg=None,
             row0: int = 0, rows: int | None = None):
    """dL/dx (w.r.t. the normalized inputs, fp32, (M, N, D)) and per-pair sum_ij G_ij S2_ij (or None).
    Only the rows [row0, row0 + rows) get their (complete) gradient; the others are zero."""
    z = saved["z"]
    _, n, d = z.shape
    rows = n if rows is None else rows
    device = z.device
    cfg = cfg or _fused_bwd_blocks(d)
    partners = _pair_tables(num_modalities, pairs, device)
    num_row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    dx = (torch.empty if rows == n else torch.zeros)(num_modalities, n, d, dtype=torch.float32, device=device)
    sgs = torch.zeros(len(pairs), num_row_blocks, dtype=torch.float32, device=device)
    grid = (num_row_blocks, num_modalities, triton.cdiv(d, cfg["BLOCK_DO"]))
    _bwd_kernel[grid](
        z, saved["rnorm"], saved["valid"], saved["scale2"], coef, partners, saved["lse"], dx, sgs,
        n, row0, rows, d, z.stride(0), z.stride(1), triton.next_power_of_2(n), num_modalities - 1, num_row_blocks,
        HAS_MASK=has_mask, BOUNDED=saved["bounded"], NEEDS_DT=needs_dt,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=cfg["BLOCK_DO"],
        INPUT_PRECISION=_input_precision(in_dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dx, (sgs.sum(dim=1) if needs_dt else None)


PANEL_BYTES = 256 * 2**20  # workspace for one row panel of W (the only O(rows * N) buffer)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b; 16-bit operands are multiplied by cuBLAS with fp32 accumulation and output."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        try:  # aten::addmm.dtype (CUDA, recent torch): bf16/fp16 operands, fp32 accumulator, no copies
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError, NotImplementedError):  # CPU (interpreter) or an older torch
            out.addmm_(a.float(), b.float())


def backward_panels(saved, coef, pairs, num_modalities, has_mask: bool, needs_dt: bool, in_dtype, cfg=None,
                    panel_rows=None, row0: int = 0, rows: int | None = None):
    """Like `backward`, but returns dL/dx times r = 1/max(||z||, eps) per row (fp32, (M, N, D)).

    Per pair and row panel, one Triton kernel writes the panel of W = diag(r_p) G diag(r_q) / t
    (recomputing S), then two GEMMs take it to both gradients. Work per pair: the 4 N x N x D passes of
    the floor (S forward, S again, dX, dY), plus writing and twice reading W (2 bytes per logit for
    16-bit inputs). Deterministic: no atomics, fixed summation order (cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG under torch.use_deterministic_algorithms, as PyTorch says).
    Only the rows [row0, row0 + rows) of each W (one rank's share) when given: the gradient of those
    rows of x_p, and their contribution to every row of x_q."""
    z = saved["z"]
    _, n, d = z.shape
    first, last = row0, row0 + (n if rows is None else rows)
    device = z.device
    w_dtype = z.dtype
    # panel height: independent of the tiles (a multiple of every BLOCK_M) so the autotuner may pick them
    step = max(c.kwargs["BLOCK_M"] for c in _PANEL_CONFIGS) if cfg is None else cfg["BLOCK_M"]
    rows = panel_rows or max(step, min(n, PANEL_BYTES // (n * z.element_size())))
    rows = max(1, min(last - first, -(-rows // step) * step))
    w = torch.empty(rows, n, dtype=w_dtype, device=device)
    dxw = torch.zeros(num_modalities, n, d, dtype=torch.float32, device=device)
    sgs = torch.zeros(len(pairs), dtype=torch.float32, device=device)
    # one sum_ij G_ij S2_ij partial per tile; sized for the smallest tiles a launch may use
    min_m = min(c.kwargs["BLOCK_M"] for c in _PANEL_CONFIGS) if cfg is None else cfg["BLOCK_M"]
    min_n = min(c.kwargs["BLOCK_N"] for c in _PANEL_CONFIGS) if cfg is None else cfg["BLOCK_N"]
    part = torch.zeros(triton.cdiv(rows, min_m) * triton.cdiv(n, min_n), dtype=torch.float32, device=device)
    pair_table = _const(tuple(pairs), torch.int32, str(device))
    kernel, tiles = (_panel_tuned, {}) if cfg is None else (_grad_panel_kernel, cfg)
    for k, (p, q) in enumerate(pairs):
        for row0 in range(first, last, rows):
            r = min(rows, last - row0)
            if needs_dt:
                part.zero_()  # a launch writes one partial per tile: none may stay from a larger grid
            kernel[lambda meta, r=r: (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
                z, saved["rnorm"], saved["valid"], saved["scale2"], coef, saved["lse"], w, part, pair_table,
                k, row0, r, n, d, z.stride(0), z.stride(1), *_buckets(n, d),
                HAS_MASK=has_mask, BOUNDED=saved["bounded"], NEEDS_DT=needs_dt,
                INPUT_PRECISION=_input_precision(in_dtype), **tiles,
            )
            if needs_dt:
                sgs[k] += part.sum()
            _accumulate(dxw[p, row0:row0 + r], w[:r], z[q])
            _accumulate(dxw[q], w[:r].T, z[p, row0:row0 + r])
    return dxw, (sgs if needs_dt else None)  # dL/dx * r: W carries r_p r_q


def input_grads(dx, z, rnorm, normalize: bool, scaled: bool, in_dtype):
    """dL/dz (M, N, D) in the input dtype from dL/dx (or dL/dx * r when scaled), one fused pass."""
    m, n, d = z.shape
    out = torch.empty(m, n, d, dtype=in_dtype, device=z.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_r = 16 if INTERPRET else max(1, min(64, 8192 // block_d))
    _input_grad_kernel[(triton.cdiv(m * n, block_r),)](
        dx, z, rnorm, out, m * n, d, NORMALIZE=normalize, SCALED=scaled, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (a compiled step keeps one graph), each with a fake
# implementation for tracing. The loss epilogue (O(P*N)) runs in PyTorch inside the forward op.

def _pairs(m: int):
    return list(itertools.combinations(range(m), 2))


def _temperatures(temperature: torch.Tensor, known: list[float]) -> list[float]:
    """The (P,) temperatures on the host: `known` when the caller passed numbers (already checked), else
    read from the tensor (one small sync) and checked as the public function would."""
    if known:
        return known
    from fastpair.loss import check_temperatures, tensor_values

    values = tensor_values(temperature, temperature.numel())
    check_temperatures(values)
    return values


# Bump when an op's signature or autograd formula changes: torch.compile's on-disk caches key a compiled
# step on its forward graph and could replay a backward recorded against the old op.
OPS_VERSION = 2

# Process groups by name: a custom op's arguments cannot hold a ProcessGroup (see pairwise_nce_triton)
_GROUPS: dict[str, object] = {}


def _shard(sizes: list[int], rank: int, group: str):
    """The fastpair.distributed.Shard of a call, or None without a process group (sizes == [])."""
    if not sizes:
        return None
    from fastpair.distributed import Shard

    return Shard(group=_GROUPS[group], rank=rank, sizes=tuple(sizes), masked=False)


def _row_range(sizes: list[int], rank: int, n: int) -> tuple[int, int]:
    """(first row, number of rows) of S this process computes: all N, or its rank's share of the batch."""
    return (0, n) if not sizes else (sum(sizes[:rank]), sizes[rank])


@torch.library.custom_op(f"fastpair::pairwise_nce_fwd_v{OPS_VERSION}", mutates_args=())
def pairwise_nce_fwd(zs: list[torch.Tensor], temperature: torch.Tensor, known_t: list[float],
                     mask: torch.Tensor | None, weights: list[float], normalize: bool, stats: bool,
                     sizes: list[int], rank: int, group: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """Returns loss, pair_losses (P,), accuracy (P, 2), lse2 (2P, N), r (M, N), coef (P,) = W' w / (W 2 n),
    and `bounded` as a 0-d bool tensor on the CPU (so that the backward reads it without a device sync).
    temperature: (P,) tensor; known_t: the same values as numbers when the caller had them (no sync).
    sizes, rank, group: with a process group of W' ranks, the zs are the gathered batch, this rank computes
    the rows of its samples, and the loss is W' times its share (fastpair.distributed); [] , 0, "" without."""
    pairs = _pairs(len(zs))
    scales = [1.0 / t for t in _temperatures(temperature, known_t)]
    n = zs[0].shape[0]
    shard = _shard(sizes, rank, group)
    row0, rows = _row_range(sizes, rank, n)
    world = 1 if shard is None else shard.world
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        scale2 = (LOG2E / temperature.float()).contiguous()  # on the device: no copy from the host
        saved = forward(zs, scales, pairs, mask, normalize, stats, torch.are_deterministic_algorithms_enabled(),
                        scale2=scale2, row0=row0, rows=rows)
        lse, diag = saved["lse"], saved["diag"]
        pv = _pair_valid(mask, pairs) if mask is not None else None
        if shard is not None:  # (2P, N): this rank's row statistics and the global column statistics
            lse = _global_table(shard, saved, pv, len(pairs), n)
            if "colsum" in saved:
                diag = diag.repeat_interleave(2, dim=0)
        local = lse[:, row0:row0 + rows]
        terms = (local[0::2] + local[1::2] - 2.0 * diag[0::2]) * LN2  # (P, rows): row + column term per sample
        if pv is not None:
            terms = torch.where(pv[:, row0:row0 + rows], terms, torch.zeros_like(terms))
            counts = pv.sum(dim=1).float()
        else:
            counts = torch.full((len(pairs),), float(n), device=terms.device)
        pair_losses = terms.sum(dim=1) / (2.0 * counts.clamp_min(1.0))
        w = _const(tuple(weights), torch.float32, str(terms.device)) * (counts > 0)
        total = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
        loss = world * (w * pair_losses).sum() / total
        accuracy = torch.zeros(len(pairs), 2, dtype=torch.float32, device=terms.device)
        if stats:
            hits = saved["hits"]
            sums = torch.stack([pair_losses, hits[0::2].sum(dim=1), hits[1::2].sum(dim=1)])
            if shard is not None:  # the global batch's statistics
                sums = shard.all_reduce(sums)
            pair_losses, accuracy = sums[0], sums[1:].T / counts.clamp_min(1.0)[:, None]
        coef = world * w / (total * 2.0 * counts.clamp_min(1.0))
    bounded = torch.tensor(saved["bounded"], dtype=torch.bool)  # host memory
    return loss, pair_losses, accuracy, lse.contiguous(), saved["rnorm"], coef, bounded


def _global_table(shard, saved, pair_valid, num_pairs: int, n: int) -> torch.Tensor:
    """The (2P, N) lse2 table of the whole batch that the backward reads (rows 2k: the row statistics of
    pair k, rows 2k+1: its column statistics), from every rank's rows, all-gathered; on the fast path the
    column statistics come from the all-reduced column sums instead. (The panel backward reads only this
    rank's row statistics; the fused one reads all of them.)"""
    table = shard.gather_rows(saved["lse"].T.contiguous()).T.contiguous()
    if "colsum" not in saved:  # two directions swept: both statistics of every row are in the table
        return table
    col = torch.log2(shard.all_reduce(saved["colsum"]))
    if pair_valid is not None:
        col = torch.where(pair_valid, col, torch.zeros_like(col))
    return torch.stack([table, col], dim=1).reshape(2 * num_pairs, n)


@pairwise_nce_fwd.register_fake
def _(zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, group):
    m, n = len(zs), zs[0].shape[0]
    p = m * (m - 1) // 2

    def f32(*shape):
        return zs[0].new_empty(shape, dtype=torch.float32)

    return f32(), f32(p), f32(p, 2), f32(2 * p, n), f32(m, n), f32(p), torch.empty((), dtype=torch.bool)


@torch.library.custom_op(f"fastpair::pairwise_nce_bwd_v{OPS_VERSION}", mutates_args=())
def pairwise_nce_bwd(grad: torch.Tensor, zs: list[torch.Tensor], temperature: torch.Tensor,
                     mask: torch.Tensor | None, lse: torch.Tensor, rnorm: torch.Tensor, coef: torch.Tensor,
                     bounded: torch.Tensor, normalize: bool, needs_dt: bool, sizes: list[int], rank: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dL/dz stacked (M, N, D) in the input dtype and dL/dt (P,) (zeros when not needed).
    bounded: the forward's 0-d CPU bool; the temperatures are not read on the host again. With a
    process group, the gradient of this rank's share of the loss w.r.t. the gathered batch (no
    communication here: the gather's backward sums the ranks' gradients). The fused variant instead
    gives this rank's rows the gradient of every rank's share (from the global statistics) and the other
    rows none: the same sum over ranks when every rank back-propagates the same grad (loss.backward())."""
    pairs = _pairs(len(zs))
    row0, rows = _row_range(sizes, rank, zs[0].shape[0])
    in_dtype = zs[0].dtype
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        z, valid = _stage(zs, mask)
        scale2 = (LOG2E / temperature.float()).contiguous()
        saved = dict(z=z, rnorm=rnorm, valid=valid, scale2=scale2, lse=lse, bounded=bool(bounded.item()))
        run = backward_panels if BACKWARD == "panel" else backward
        dx, sgs = run(saved, (grad.float() * coef).contiguous(), pairs, len(zs), mask is not None, needs_dt,
                      in_dtype, row0=row0, rows=rows)
        grads = input_grads(dx, z, rnorm, normalize, run is backward_panels, in_dtype)
        if needs_dt:  # dL/dt = -(1/t) sum G S, S = S2 ln 2
            dt = -(LN2 / temperature.float()) * sgs
        else:
            dt = torch.zeros(len(pairs), dtype=torch.float32, device=z.device)
    return grads, dt


@pairwise_nce_bwd.register_fake
def _(grad, zs, temperature, mask, lse, rnorm, coef, bounded, normalize, needs_dt, sizes, rank):
    m, (n, d) = len(zs), zs[0].shape
    return zs[0].new_empty((m, n, d)), zs[0].new_empty((m * (m - 1) // 2,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    zs, temperature, known_t, mask, weights, normalize, stats, sizes, rank, _group = inputs
    _, pair_losses, accuracy, lse, rnorm, coef, bounded = output
    ctx.save_for_backward(temperature, lse, rnorm, coef, bounded, *zs)
    ctx.mask = mask
    ctx.sizes, ctx.rank = sizes, rank
    ctx.known_t = known_t
    ctx.normalize = normalize
    ctx.needs_dt = temperature.requires_grad
    ctx.mark_non_differentiable(pair_losses, accuracy, lse, rnorm, coef, bounded)


def _backward(ctx, grad_loss, *_unused):
    temperature, lse, rnorm, coef, bounded, *zs = ctx.saved_tensors
    grads, dt = pairwise_nce_bwd(grad_loss, zs, temperature, ctx.mask, lse, rnorm, coef, bounded,
                                 ctx.normalize, ctx.needs_dt, ctx.sizes, ctx.rank)
    # torch.library matches the gradient structure to the inputs' pytree, where an empty list stays a list
    known_grad = [] if not ctx.known_t else None
    sizes_grad = [] if not ctx.sizes else None
    return (list(grads.unbind(0)), (dt if ctx.needs_dt else None), known_grad, None, None, None, None,
            sizes_grad, None, None)


pairwise_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def pairwise_nce_triton(zs, temperature, num_pairs: int, weights, mask, normalize: bool, stats: bool,
                        shard=None):
    """Loss, pair losses and accuracy through the custom ops. temperature: the P checked host values, or
    a 0-d / (P,) tensor (its gradient flows; its values are read and checked inside the ops, one small
    host sync each). shard: a fastpair.distributed.Shard when zs are the batch gathered from a group."""
    device = zs[0].device
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=torch.float32).reshape(-1)
        t = t.expand(num_pairs).contiguous() if t.numel() == 1 else t
        known: list[float] = []
    else:
        known = [float(v) for v in temperature]
        if torch.compiler.is_compiling():  # a constant of the graph (dynamo does not trace lru_cache)
            t = torch.tensor(known, dtype=torch.float32, device=device)
        else:
            t = _const(tuple(known), torch.float32, str(device))
    sizes, rank, group = [], 0, ""
    if shard is not None:  # the forward op finds the group by name (the backward communicates nothing)
        group = f"{id(shard.group)}"
        _GROUPS[group] = shard.group
        sizes, rank = list(shard.sizes), shard.rank
    try:
        loss, pair_losses, accuracy, *_ = pairwise_nce_fwd(zs, t, known, mask, [float(w) for w in weights],
                                                           normalize, stats, sizes, rank, group)
    finally:  # no reference may outlive the call: a group destroyed at exit with one held aborts the process
        _GROUPS.pop(group, None)
    return loss, pair_losses, accuracy
