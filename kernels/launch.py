"""Host side of the Triton kernels: stage the operands, allocate, pick grids, launch (kernels: jit.py).

`forward` sweeps the logit tiles once per launch for every pair and returns O(N) statistics; `backward`
turns saved statistics into dL/dx with one gradient-panel launch and two GEMMs per (pair, row panel);
`input_grads` applies the normalization backward. Rows [row0, row0 + rows) of S (one rank's share under a
process group) or all N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from fastpair.numerics import NORM_EPS
from fastpair.tables import constant

from . import tuning
from .jit import fwd_kernel, grad_panel_kernel, input_grad_kernel

PANEL_BYTES = 256 * 2**20  # workspace for one row panel of W (the only O(rows * N) buffer)
# Rows of the stacked inputs are padded to a multiple of 16 elements: the JIT specializes the row stride on its
# divisibility by 16, and an unaligned one compiles to scalar loads that need more registers (they spilled at
# D = 100 in the compile report) and more time; padded, every D compiles as an aligned one.
ALIGN = 16


@dataclass(frozen=True)
class Staged:
    """The kernels' operands for one call."""

    z: torch.Tensor  # (M, N, width), the inputs stacked in their dtype, zero-padded to a multiple of ALIGN
    valid: torch.Tensor  # (M, N) int8 mask, or a 1-element placeholder
    has_mask: bool
    rnorm: torch.Tensor  # (M, N) fp32: 1 / max(||z||, eps), or ones when not normalizing
    scale2: torch.Tensor  # (P,) fp32: log2(e) / t per pair, on the device
    pairs: tuple[tuple[int, int], ...]
    in_dtype: torch.dtype  # the inputs' dtype (z may be fp32 in the interpreter for bf16, see stage)
    bias: torch.Tensor | None = None  # (P,) fp32: the sigmoid objective's b per pair (None: InfoNCE)
    # 0-d int32 on the device, 1 when the logits are bounded: set when the temperature is a tensor, whose
    # values the host does not read (a read would wait for the GPU); None: the host passes `bounded`
    flag: torch.Tensor | None = None
    d: int = 0  # the inputs' D (z's width is D rounded up to ALIGN)

    @property
    def sigmoid(self) -> bool:
        return self.bias is not None

    @property
    def bias_or_any(self) -> torch.Tensor:
        """A pointer for the kernels' bias argument, which InfoNCE launches never read."""
        return self.scale2 if self.bias is None else self.bias

    @property
    def flag_or_any(self) -> torch.Tensor:
        """A pointer for the kernels' flag argument, unread unless BOUND_ON_DEVICE: an int32 placeholder
        (a pointer of another type would be another compilation of the kernel)."""
        return constant((0,), torch.int32, str(self.z.device)) if self.flag is None else self.flag


@dataclass(frozen=True)
class Swept:
    """The forward's statistics of rows [row0, row0 + rows), base 2: per swept direction (p, q) (and
    (q, p) on the two-direction path) the row log2-sum-exp2, S2_ii and the first argmax (int32, global
    index); on the fast path the column sums of exp2(S2) over these rows, (P, N)."""

    lse: torch.Tensor
    diag: torch.Tensor
    args: torch.Tensor | None
    colsum: torch.Tensor | None
    on_device: bool = False  # both directions swept and colsum kept: staged.flag says which statistics hold


def stage(zs, mask, scale2: torch.Tensor, pairs, normalize: bool, rnorm=None, bias=None, flag=None) -> Staged:
    """Stack the inputs (padded with zero columns to a multiple of ALIGN), cast the mask, and compute the
    inverse norms (or take the forward's `rnorm`). Zero columns change no dot product and no norm."""
    z = _stack(zs)
    in_dtype = z.dtype
    if tuning.INTERPRET and z.dtype == torch.bfloat16:
        # Triton's interpreter misreads bf16 loads (numpy has no bf16). bf16 x bf16 products are exact in
        # fp32, so fp32 operands give the same logits; only the bf16 rounding of G in the backward dot
        # differs. bf16 kernel numerics are therefore tested on a GPU.
        z = z.float()
    if rnorm is None and normalize:  # fp32 norms without an fp32 copy of the inputs
        rnorm = 1.0 / torch.linalg.vector_norm(z, dim=2, dtype=torch.float32).clamp_min(NORM_EPS)
    elif rnorm is None:
        rnorm = torch.ones(z.shape[:2], dtype=torch.float32, device=z.device)
    if mask is None:
        valid = torch.empty(1, dtype=torch.int8, device=z.device)
    else:
        valid = mask.to(torch.int8).contiguous()
    return Staged(z, valid, mask is not None, rnorm, scale2, tuple(pairs), in_dtype, bias, flag, zs[0].shape[1])


def _stack(zs) -> torch.Tensor:
    """(M, N, width) in one copy; width = D rounded up to ALIGN, the extra columns zero."""
    (n, d), width = zs[0].shape, -(-zs[0].shape[1] // ALIGN) * ALIGN
    if width == d:
        return torch.stack([t.contiguous() for t in zs])
    z = zs[0].new_empty(len(zs), n, width)
    z[:, :, d:] = 0
    for k, t in enumerate(zs):
        z[k, :, :d] = t
    return z


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. 16-bit inputs: "ieee" (their products are exact in the fp32 accumulator on
    the tensor cores either way). fp32 inputs follow torch's setting for fp32 matmuls:
    - "tf32" where torch allows TF32 (fp32_precision "tf32", allow_tf32 = True, set_float32_matmul_precision
      "high" or "medium"): one tensor-core product, 10-bit mantissas;
    - "ieee" where IEEE fp32 was asked for explicitly (fp32_precision "ieee", allow_tf32 = False or
      set_float32_matmul_precision("highest")): FMA units, no tensor cores, several times slower;
    - otherwise (torch's default, fp32_precision "none"), "tf32x3": each operand split into a TF32 high
      part and a TF32 remainder, a*b ~ hi*hi + hi*lo + lo*hi on the tensor cores, about fp32's accuracy
      (the dropped lo*lo term is below 2^-22 relative) at three tensor-core products.
    torch.backends.cuda.matmul.allow_tf32 is not read: it raises once fp32_precision has been set."""
    if dtype != torch.float32:
        return "ieee"
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: the legacy flag alone, whose default False cannot mean "explicitly IEEE"
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return {"tf32": "tf32", "ieee": "ieee"}.get(precision, "tf32x3")


def forward(staged: Staged, bounded: bool, stats: bool, deterministic: bool, row0: int = 0,
            rows: int | None = None, cfg=None) -> Swept:
    """One launch for all pairs. bounded: normalized inputs and every 1/t <= exp_bound(float32)
    (fastpair.numerics). InfoNCE: the fast path (one direction per pair, column sums by fp32 atomics)
    unless statistics, unbounded logits or torch.use_deterministic_algorithms ask for the atomic-free
    two-direction sweep. With staged.flag (a temperature tensor) the fast path is taken where the flag
    says so on the device: both directions are launched, and Swept holds both kinds of column statistics
    (ops._statistics picks with the flag). The sigmoid objective (staged.bias) needs no column statistics: one
    direction per pair, both only for the column argmax of statistics."""
    z, pairs = staged.z, staged.pairs
    _, n, d = z.shape
    rows = n if rows is None else rows
    device = z.device
    eligible = not stats and not deterministic and not staged.sigmoid
    on_device = staged.flag is not None and eligible
    atomic = (bounded or on_device) and eligible
    directed = [(p, q, k) for k, (p, q) in enumerate(pairs)]
    if stats or on_device or not (atomic or staged.sigmoid):
        directed = [t for k, (p, q) in enumerate(pairs) for t in ((p, q, k), (q, p, k))]
    num_dir = len(directed)
    lse = torch.empty(num_dir, rows, dtype=torch.float32, device=device)
    diag = torch.empty(num_dir, rows, dtype=torch.float32, device=device)
    args = torch.empty(num_dir, rows, dtype=torch.int32, device=device) if stats else lse
    colsum = torch.zeros(len(pairs), n, dtype=torch.float32, device=device) if atomic else lse
    # cfg: explicit tiles (bench/tune_gpu.py); by default the autotuned kernel picks them
    kernel, tiles = (tuning.fwd_tuned, {}) if cfg is None else (fwd_kernel, cfg)
    kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_dir)](
        z, staged.rnorm, staged.valid, staged.scale2, staged.bias_or_any,
        constant(tuple(directed), torch.int32, str(device)), staged.flag_or_any, lse, diag, args, colsum,
        n, row0, rows, d, z.stride(0), z.stride(1), *tuning.buckets(n, d),
        HAS_MASK=staged.has_mask, BOUNDED=bounded and not on_device and not staged.sigmoid,
        BOUND_ON_DEVICE=on_device, ATOMIC_COLS=atomic, STATS=stats, SIGMOID=staged.sigmoid,
        INPUT_PRECISION=input_precision(staged.in_dtype), **tiles,
    )
    return Swept(lse, diag, args if stats else None, colsum if atomic else None, on_device)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b; 16-bit operands are multiplied by cuBLAS with fp32 accumulation and output."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        try:  # aten::addmm.dtype (CUDA, recent torch): bf16/fp16 operands, fp32 accumulator, no copies
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError, NotImplementedError):  # CPU (interpreter) or an older torch
            out.addmm_(a.float(), b.float())


def _panel_shape(n: int, span: int, elem_bytes: int, cfg, panel_rows) -> tuple[int, int, int]:
    """(panel height, smallest BLOCK_M, smallest BLOCK_N) a launch may use. The height is a multiple of
    every candidate BLOCK_M, so that the autotuner may pick any of them, and at most PANEL_BYTES of W."""
    configs = [c.kwargs for c in tuning.PANEL_CONFIGS] if cfg is None else [cfg]
    step = max(c["BLOCK_M"] for c in configs)
    height = panel_rows or max(step, min(n, PANEL_BYTES // (n * elem_bytes)))
    height = max(1, min(span, -(-height // step) * step))
    return height, min(c["BLOCK_M"] for c in configs), min(c["BLOCK_N"] for c in configs)


def backward(staged: Staged, lse: torch.Tensor, coef: torch.Tensor, bounded: bool, needs_dt: bool,
             identity: bool = True, row0: int = 0, rows: int | None = None, cfg=None, panel_rows=None,
             needs_db: bool = False):
    """dL/dx times r = 1/max(||z||, eps) per row (fp32, (M, N, D)), and per pair sum_ij G_ij S2_ij and
    sum_ij G_ij (each None unless needs_dt / needs_db).

    lse: (2P, N) base-2 statistics (row 2k: pair k's rows, read at rows [row0, row0 + rows); row 2k+1:
    its columns, read everywhere; unread by the sigmoid objective); coef: (P,) the incoming gradient times
    the epilogue's coefficients; identity: G holds the -T of identity targets (otherwise the caller adds
    the targets' part).
    Per pair and row panel, one launch writes the panel of W = diag(r_p) G diag(r_q) / t (recomputing S),
    then two GEMMs take it to both gradients: the 4 N x N x D passes of the floor per pair, plus writing
    and twice reading W. Deterministic: no atomics, fixed summation order (cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG under torch.use_deterministic_algorithms, as PyTorch says). Under a process
    group, the gradient of this rank's rows of x_p and their contribution to every row of x_q."""
    z, pairs = staged.z, staged.pairs
    m, n, d = z.shape
    first, last = row0, row0 + (n if rows is None else rows)
    device = z.device
    height, min_m, min_n = _panel_shape(n, last - first, z.element_size(), cfg, panel_rows)
    w = torch.empty(height, n, dtype=z.dtype, device=device)
    dxw = torch.zeros(m, n, d, dtype=torch.float32, device=device)
    panels = triton.cdiv(last - first, height)
    # one row of per-tile partial sums (of G S2 for dt, of G for db) per launch, zeroed once (a launch whose
    # tiles came out larger writes fewer), summed per pair after the loop; an unneeded one is never read
    # rows of 16 bytes' multiples: every launch's row pointer is then 16-byte aligned, as the JIT specializes
    # pointers on it (an unaligned row would compile the kernel a second time)
    tiles_max = 4 * triton.cdiv(triton.cdiv(height, min_m) * triton.cdiv(n, min_n), 4)
    part, part_b = (torch.zeros(len(pairs) * panels, tiles_max, dtype=torch.float32, device=device) if needed
                    else None for needed in (needs_dt, needs_db))
    pair_table = constant(pairs, torch.int32, str(device))
    kernel, tiles = (tuning.panel_tuned, {}) if cfg is None else (grad_panel_kernel, cfg)
    for k, (p, q) in enumerate(pairs):
        for i, start in enumerate(range(first, last, height)):
            r = min(height, last - start)
            sums = [dxw if t is None else t[k * panels + i] for t in (part, part_b)]  # dxw: a pointer, unread
            kernel[lambda meta, r=r: (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
                z, staged.rnorm, staged.valid, staged.scale2, staged.bias_or_any, coef, lse, staged.flag_or_any, w,
                *sums, pair_table, k, start, r, n, d, z.stride(0), z.stride(1), *tuning.buckets(n, d),
                HAS_MASK=staged.has_mask, BOUNDED=bounded and staged.flag is None and not staged.sigmoid,
                BOUND_ON_DEVICE=staged.flag is not None and not staged.sigmoid, NEEDS_DT=needs_dt,
                IDENTITY=identity, SIGMOID=staged.sigmoid, NEEDS_DB=needs_db,
                INPUT_PRECISION=input_precision(staged.in_dtype), **tiles,
            )
            _accumulate(dxw[p, start:start + r], w[:r], z[q])
            _accumulate(dxw[q], w[:r].T, z[p, start:start + r])
    sgs, sgb = (None if t is None else t.view(len(pairs), -1).sum(dim=1) for t in (part, part_b))
    return dxw, sgs, sgb  # dL/dx * r: W carries r_p r_q


def input_grads(dxw: torch.Tensor, staged: Staged, normalize: bool) -> torch.Tensor:
    """dL/dz (M, N, D) in the input dtype from dL/dx * r (M, N, width), one fused pass."""
    z = staged.z
    m, n, width = z.shape
    d = staged.d
    out = torch.empty(m, n, d, dtype=staged.in_dtype, device=z.device)
    block_d = max(16, triton.next_power_of_2(d))
    warps = 4 if block_d <= 512 else 8
    # 16 fp32 values of each of dL/dx, z and x per thread (at 64, D = 1024 spilled: bench/results/compile-*)
    block_r = 16 if tuning.INTERPRET else max(1, 16 * 32 * warps // block_d)
    input_grad_kernel[(triton.cdiv(m * n, block_r),)](
        dxw, z, staged.rnorm, out, m * n, d, width, NORMALIZE=normalize, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=warps,
    )
    return out
