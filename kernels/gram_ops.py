"""GRAM's tiled Triton path: the host side of kernels/gram_jit.py, as an autograd Function (the op: gram.py).

The embeddings are normalized by PyTorch (F.normalize, with autograd) and handed over as unit vectors; the
Function computes the per-column det C_j and adj(C_j) (fastpair.volumes), launches the forward sweep in both
directions, merges the columns across ranks, and hands the statistics to the shared epilogue. Its backward
launches the gradient panels (K panels of rows x N in the inputs' dtype, at most launch.PANEL_BYTES) and
multiplies them with cuBLAS (or PyTorch on CPU): dL/dx_a[panel] = sum_l G_l x_ol and
dL/dx_ol += G_l^T x_a[panel]; the column sums give dL/dC_j (fastpair.volumes.column_grad) and
dL/dx_ol += (dC + dC^T) X_j.

The temperature stays on the device (its 1/t is read by the kernels): a tensor is never read on the host,
and an invalid one gives a NaN loss, as on the pairwise kernels. Tiles: one configuration per precision
(no autotuning yet): TILES, BLOCK_K 32, 4 warps (fp32: BLOCK_K 8, 8 warps), 3 stages, maxnreg 255.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpair import distributed, epilogue
from fastpair._torch_gram import direction_hits
from fastpair.call import Call, gram_directions
from fastpair.numerics import LN2
from fastpair.tables import constant
from fastpair.targets import Groups, group_labels, top1_hits
from fastpair.volumes import column_grad, det_adj, gram, pairs_of

from . import launch, tuning
from .gram_jit import gram_fwd_kernel, gram_grad_kernel

# (BLOCK_M, BLOCK_N) per kernel: 64 anchor rows (the least for Hopper's wgmma and Blackwell's tcgen05) by 32
# columns, 4 warps, 3 stages: spill-free on sm_80, sm_90a and sm_100a for k <= 3 at every precision
# (make gpu-compile); a 64 x 64 tile spills on sm_80 (the k accumulators and the volume's terms per thread).
TILES = {0: (64, 32), 1: (64, 32), "grad": (64, 32)}
BLOCK_M = TILES["grad"][0]
WARPS, STAGES = 4, 3
MAXNREG = 255  # ptxas otherwise caps some variants at 128 or 168 registers per thread and spills


def launch_options(dtype: torch.dtype) -> dict:
    """num_warps, num_stages, maxnreg and BLOCK_K: fp32 inputs (3xTF32's split operands, or IEEE's FMA dots with
    their operands in registers) on 8 warps and BLOCK_K 8, spill-free with ids at k = 3 (make gpu-compile)."""
    warps = 8 if dtype == torch.float32 else WARPS
    return dict(BLOCK_K=block_k(dtype), num_warps=warps, num_stages=STAGES, maxnreg=MAXNREG)


def block_k(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float32 else 32


@dataclass(frozen=True)
class Staged:
    """The launch arguments every kernel shares."""

    x: torch.Tensor  # (1 + K, N, Dp) unit vectors, input dtype, rows padded to launch.ALIGN: the anchor first
    d: int
    c: torch.Tensor  # (N, K, K) fp32: C_j
    det: torch.Tensor  # (N,) fp32
    adj: torch.Tensor  # (N, K(K+1)/2) fp32: adj(C_j)'s upper triangle, volumes.pairs_of order
    valid: torch.Tensor | None  # (N,) int8: all M modalities present
    labels: torch.Tensor  # (N,) int32 group labels (arange without ids)
    sizes: torch.Tensor  # (N,) fp32: |P(i)| over the valid samples
    count: float  # n, the valid samples (a host number only when known without a sync: else N)
    scale: torch.Tensor  # (1,) fp32: 1/t
    precision: str

    @property
    def k(self) -> int:
        return self.x.shape[0] - 1


def gram_nce_triton(embeddings, call: Call):
    """(loss, direction losses (2,), direction accuracy (2,)) of a validated call on the Triton backend."""
    # unit vectors normalized in fp32, then in the inputs' dtype for the tiles (the volumes need ||x|| = 1)
    xs = [F.normalize(z.float(), dim=1, eps=1e-12).to(z.dtype) for z in embeddings]
    anchor, others = call.pairs[0][0], [q for _, q in call.pairs]
    t = call.temperature
    # a number as a cached device table (torch.tensor(..., device="cuda") would wait for the GPU: tables.py)
    temperature = t.tensor if t.tensor is not None else constant(t.values[:1], torch.float32, str(xs[0].device))
    return GramTriton.apply(call, temperature, xs[anchor], *(xs[o] for o in others))


class GramTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: Call, temperature, xa, *xo):
        with torch.autocast(device_type=xa.device.type, enabled=False):
            return _forward(ctx, call, temperature, xa, xo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_losses, _grad_accuracy):
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            return _backward(ctx, grad_loss)


def _stage(call: Call, temperature: torch.Tensor, xa, xo) -> Staged:
    n, d = xa.shape
    stacked = launch._stack([xa, *xo])  # (1 + K, N, Dp): rows padded, input dtype
    if tuning.INTERPRET and stacked.dtype == torch.bfloat16:
        stacked = stacked.float()  # Triton's interpreter misreads bf16 loads (as launch.stage says)
    c = gram([x.float() for x in xo])
    det, adj = det_adj(c)
    packed = torch.stack([adj[:, l, m] for l, m in pairs_of(len(xo))], dim=1).contiguous()
    # the kernels take labels for every call: each sample its own group without ids
    labels = torch.arange(n, device=xa.device) if call.ids is None else group_labels(call.ids)
    groups = Groups.of(labels, gram_directions(call).mask, (0, 0), call.label_smoothing, det)
    # eps / n needs n: the batch's N without a mask; with one, read once (the count is small and the
    # smoothing needs it; without smoothing it is not used and no read happens)
    count = float(n) if groups.valid is None or call.label_smoothing == 0.0 else float(groups.count)
    valid = None if groups.valid is None else groups.valid.to(torch.int8)
    return Staged(x=stacked, d=d, c=c, det=det.contiguous(), adj=packed, valid=valid,
                  labels=labels.to(torch.int32), sizes=groups.sizes, count=max(count, 1.0),
                  scale=torch.reciprocal(temperature.float()).reshape(1),
                  precision=launch.input_precision(stacked.dtype))


def _args(s: Staged):
    placeholder = s.labels  # an int tensor where a pointer is unused (HAS_MASK False)
    return (s.x, s.det, s.adj, s.valid if s.valid is not None else placeholder, s.labels, s.sizes,
            s.scale)


def _forward(ctx, call: Call, temperature, xa, xo):
    n = xa.shape[0]
    r0, r1 = call.rows(n)
    s = _stage(call, temperature, xa, xo)
    identity = call.identity_targets
    flags = dict(K=s.k, HAS_MASK=s.valid is not None, IDENTITY=identity, STATS=call.return_stats,
                 INPUT_PRECISION=s.precision, **launch_options(s.x.dtype))
    eps = float(call.label_smoothing)
    out = {}
    for direction, length in ((0, r1 - r0), (1, n)):
        block_m, block_n = TILES[direction]
        block = block_m if direction == 0 else block_n
        lse = torch.empty(length, dtype=torch.float32, device=xa.device)
        tgt, best = torch.empty_like(lse), torch.empty_like(lse)
        arg = torch.empty(length, dtype=torch.int32, device=xa.device)
        if length:
            gram_fwd_kernel[(-(-length // block),)](
                *_args(s), lse, tgt, best, arg, eps, s.count, n, r0, r1 - r0, s.d, s.x.stride(1),
                DIRECTION=direction, BLOCK_M=block_m, BLOCK_N=block_n, **flags)
        out[direction] = (lse, tgt, best, arg)
    (lse_row, t_row, _, arg_row), (lse_col, t_col, best_col, arg_col) = out[0], out[1]
    if call.shard is not None:  # every rank's anchors: the columns' statistics of the whole batch
        lse_col = distributed.merge_column_log2sumexp2(call.shard, lse_col[None])[0]
        t_col = distributed.all_reduce(call.shard, t_col[None])[0]
        if call.return_stats:
            arg_col = distributed.merge_first_argmax(call.shard, best_col, arg_col.long())
    lse_c = lse_col[r0:r1]
    hits = None
    if call.return_stats:  # the rows' hits from their first best column; the columns' from theirs
        rows = torch.arange(r0, r1, device=xa.device)
        row_hits = top1_hits(call.ids, arg_row.long(), rows)
        hits = direction_hits(call, row_hits, arg_col, s.valid, r0, r1, torch.float32)
    done = epilogue.finish(gram_directions(call), n, torch.stack([lse_row, lse_c]),
                           torch.zeros(2, r1 - r0, dtype=torch.float32, device=xa.device),
                           torch.stack([t_row, t_col[r0:r1]]), hits, unit=LN2, directions=1, lone_zero=True)
    ctx.call, ctx.staged, ctx.coef = call, s, done.coef
    ctx.learn_t = temperature.requires_grad
    ctx.t_meta = (temperature.dtype, temperature.device, temperature.shape)
    ctx.in_dtype = xa.dtype
    ctx.save_for_backward(lse_row, lse_col)  # the unit vectors are in the staged stack, kept in ctx.staged
    accuracy = done.accuracy[:, 0].contiguous()
    ctx.mark_non_differentiable(done.pair_losses, accuracy)
    return done.loss, done.pair_losses, accuracy


def panel_rows(n: int, k: int) -> int:
    """Rows per backward panel: its k panels of rows x N (fp32 sized, whatever the dtype) within
    launch.PANEL_BYTES, a multiple of the tile height (at least one tile)."""
    return max(BLOCK_M, (launch.PANEL_BYTES // (4 * k * max(n, 1))) // BLOCK_M * BLOCK_M)


def _backward(ctx, grad_loss):
    call, s = ctx.call, ctx.staged
    k = s.k
    lse_row, lse_col = ctx.saved_tensors
    n, device = s.x.shape[1], s.x.device
    r0, r1 = call.rows(n)
    coef = (grad_loss.float() * ctx.coef.float()).contiguous()  # (2,): rows, columns
    xa_d, *xo_d = (x[:, :s.d] for x in s.x)  # views of the staged unit vectors
    grad_a = torch.zeros(n, s.d, dtype=torch.float32, device=device)
    grad_o = [torch.zeros_like(grad_a) for _ in range(k)]
    parts = 1 + len(pairs_of(k))
    sums = torch.zeros(parts, n, dtype=torch.float32, device=device)
    wv = torch.zeros((), dtype=torch.float32, device=device)
    panel = panel_rows(n, k)
    block_m, block_n = TILES["grad"]
    flags = dict(K=k, HAS_MASK=s.valid is not None, IDENTITY=call.identity_targets, BLOCK_M=block_m,
                 BLOCK_N=block_n, INPUT_PRECISION=s.precision, **launch_options(s.x.dtype))
    for row0 in range(r0, r1, panel):
        rows = min(panel, r1 - row0)
        grid = (-(-rows // block_m), -(-n // block_n))
        g = torch.empty(k, rows, n, dtype=s.x.dtype, device=device)
        part = torch.empty(grid[0], parts, n, dtype=torch.float32, device=device)
        tiles = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device)
        gram_grad_kernel[grid](*_args(s), coef, lse_row, lse_col, g, part, tiles, float(call.label_smoothing),
                               s.count, row0, rows, r0, n, s.d, s.x.stride(1), **flags)
        for l in range(k):  # dL/ds_l = G_l: two GEMMs each, in the inputs' dtype (fp32 accumulation)
            grad_a[row0:row0 + rows] += torch.mm(g[l], xo_d[l])
            grad_o[l] += torch.mm(g[l].T, xa_d[row0:row0 + rows])
        sums += part.sum(dim=0)
        wv = wv + tiles.sum()
    dc = column_grad(s.c, sums[0], sums[1:].T)
    dc = dc + dc.transpose(1, 2)  # C = X X^T: dL/dX_j = (dC + dC^T) X_j
    for l, g in enumerate(grad_o):
        for m, x in enumerate(xo_d):
            g.addcmul_(dc[:, l, m, None], x.float())
    grad_t = None
    if ctx.learn_t and ctx.needs_input_grad[1]:  # dS/dt = V / t^2
        dtype, t_device, shape = ctx.t_meta
        grad_t = (wv * s.scale[0] ** 2).to(dtype=dtype, device=t_device).reshape(shape)
    return (None, grad_t, grad_a.to(ctx.in_dtype), *(g.to(ctx.in_dtype) for g in grad_o))
