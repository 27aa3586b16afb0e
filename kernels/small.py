"""The one-program machinery every objective's small-batch kernel shares (N <= 64, one process).

At the batch sizes this paper trains at, a GPU step is bound by host work: the tiled path's sweep, panels,
GEMMs and epilogue are each cheap on the device and each a launch and a dispatch on the host. A small-batch
kernel instead holds each pair's N x N logits in registers, one pair at a time, and writes the loss, its
statistics and every gradient in one launch. What differs between objectives is the elementwise function of
the logits and the gradient G = dL/dS it leaves; what is shared lives here:

- `pair_logits`: S / scale = diag(r_p) Z_p Z_q^T diag(r_q), with the inverse norms r summed in the same D loop;
- `hit_rate`: both directions' first-argmax top-1 hits over the valid samples;
- a scratch buffer (fp32) holding, per pair k, G_k / t_k (N x N), the inverse norms per modality and three
  words per pair: c_k * total (the epilogue's coefficient before its normalization by the weights' total),
  sum_ij G_ij S_ij / t_k and sum_ij G_ij;
- `parameter_grads`: dL/dt_k = -(c_k / total) sum G S / t_k, dL/db_k = (c_k / total) sum G (summed over pairs
  for a shared parameter);
- `embedding_grads`: dx_i = sum_k (c_k / total) sum_j (G_ij / t_k) y_j, and with normalization
  dz_i = r_i (dx_i - x_i <x_i, dx_i>), <x_i, dx_i> summed over D in a pass of its own; with MIX (GRAM, whose
  pairs share their first side and whose second sides meet in each sample's Gram matrix) a per-sample mix of
  the second sides too, from P x P coefficient vectors after the three words per pair;
- on the host, `arguments` and `result`: the launch's shared keyword arguments and the op's Result.

G is stored in fp32, so no 16-bit gradient panel can flush to zero, and no atomics are used: the result is
the same bits every run. Numeric temperatures, biases and weights are kernel arguments (no device table,
nothing a CUDA graph could lose); a parameter tensor is read through a pointer and checked in the kernel.
The objectives' kernels: infonce_small.py, sigmoid_small.py, gram_small.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpair.call import Call, PerPair
from fastpair.op import Needs, Result

from . import tuning
from .launch import input_precision

MAX_N = 64  # the largest batch held in one program (its N x N tiles in registers)


MAX_N_IEEE = 32  # fp32 on the FMA units (IEEE asked for): at 64 rows the program spills on sm_90
MAX_N_BEFORE_HOPPER = 32  # sm_80 and sm_89 (mma.sync's register-held operands): at 64 rows the program spills


def takes(call: Call, zs) -> bool:
    """Whether a one-program kernel computes the call: one process, N at most the rows the device's program
    holds without spilling registers (`max_rows`)."""
    return call.shard is None and zs[0].shape[0] <= max_rows(zs[0])


def max_rows(z: torch.Tensor) -> int:
    """MAX_N, or fewer where the compile report found the program spilling: IEEE fp32, GPUs before Hopper."""
    rows = MAX_N
    if z.dtype == torch.float32 and input_precision(z.dtype) == "ieee":
        rows = min(rows, MAX_N_IEEE)
    if z.device.type == "cuda":
        rows = min(rows, max_block(_capability(z.device.index)))
    return rows


def max_block(capability: int) -> int:
    """The largest BLOCK_N launched on a GPU of this compute capability (80, 90, ...)."""
    return MAX_N if capability >= 90 else MAX_N_BEFORE_HOPPER


@functools.cache
def _capability(index: int | None) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@triton.jit
def pair_logits(zp, zq, stride_pn, stride_pd, stride_qn, stride_qd, offs_n, N, D,
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
def pair_valid(mask_ptr, stride_maskm, stride_maskn, offs_n, N, p: tl.constexpr, q: tl.constexpr,
               HAS_MASK: tl.constexpr):
    """The pair's valid samples: inside the batch and, with a mask, present in both modalities."""
    valid = offs_n < N
    if HAS_MASK:
        present_p = tl.load(mask_ptr + p * stride_maskm + offs_n * stride_maskn, mask=valid, other=0)
        present_q = tl.load(mask_ptr + q * stride_maskm + offs_n * stride_maskn, mask=valid, other=0)
        valid = valid & (present_p != 0) & (present_q != 0)
    return valid


@triton.jit
def parameter_ok(ptr, FROM_PTR: tl.constexpr, COUNT: tl.constexpr, POSITIVE: tl.constexpr):
    """Whether a parameter tensor's COUNT values are valid (finite, and > 0 for a temperature); True for
    numbers (checked on the host). Checked here, not on the host (a sync): an invalid one gives NaN losses."""
    ok = True
    if FROM_PTR:
        for k in tl.static_range(COUNT):
            value = tl.load(ptr + k)
            ok = ok & (tl.abs(value) < float("inf"))
            if POSITIVE:
                ok = ok & (value > 0.0)
    return ok


@triton.jit
def parameter_value(ptr, values, k: tl.constexpr, FROM_PTR: tl.constexpr, SHARED: tl.constexpr):
    """Pair k's value: from the tensor (its one value when shared) or the numbers."""
    if FROM_PTR:
        return tl.load(ptr) if SHARED else tl.load(ptr + k)
    return values[k]


@triton.jit
def sample_keys(ids_ptr, stride_idsn, offs_n, N, HAS_IDS: tl.constexpr):
    """Positives share a key: a sample's own index, or its id."""
    keys = offs_n
    if HAS_IDS:
        keys = tl.load(ids_ptr + offs_n * stride_idsn, mask=offs_n < N, other=-1)
    return keys


@triton.jit
def tile_offsets(offs_n, BLOCK_N: tl.constexpr):
    """Element offsets of a row-major BLOCK_N x BLOCK_N tile."""
    return offs_n[:, None] * BLOCK_N + offs_n[None, :]


@triton.jit
def masked_lse(s_masked, valid, axis: tl.constexpr):
    """The log-sum-exp of every valid row (axis 1) or column (axis 0) of logits masked to -inf, 0 elsewhere (so
    that no -inf - -inf appears)."""
    top = tl.where(valid, tl.max(s_masked, axis=axis), 0.0)
    if axis == 1:
        total = tl.sum(tl.exp(s_masked - top[:, None]), axis=1)
    else:
        total = tl.sum(tl.exp(s_masked - top[None, :]), axis=0)
    return tl.where(valid, top + tl.log(tl.maximum(total, 1.0)), 0.0)  # the sum is >= 1 where valid


@triton.jit
def hit_rate(s_masked, same, offs_n, valid, axis: tl.constexpr, BLOCK_N: tl.constexpr):
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
    n = tl.sum(valid.to(tl.float32))
    return tl.sum(tl.where(valid, hit, 0.0)) / tl.maximum(n, 1.0)


@triton.jit
def store_pair_grad(scratch_ptr, k: tl.constexpr, g, s, scale, coef, rp, rq, p: tl.constexpr, q: tl.constexpr,
                    offs_n, NUM_P: tl.constexpr, NUM_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    NEEDS_DZ: tl.constexpr):
    """Pair k's share of the scratch (see the module's docstring): G / t, the inverse norms, c_k total,
    sum G S / t and sum G."""
    c_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N + NUM_M * BLOCK_N
    tl.store(c_base + NUM_P + k, tl.sum(tl.sum(g * s, axis=1)) * scale)
    tl.store(c_base + 2 * NUM_P + k, tl.sum(tl.sum(g, axis=1)))
    store_coef(scratch_ptr, k, coef, NUM_P, NUM_M, BLOCK_N)
    if NEEDS_DZ:
        store_grad_tile(scratch_ptr, k, g * scale, offs_n, BLOCK_N)
        store_inverse_norms(scratch_ptr, p, rp, offs_n, NUM_P, BLOCK_N)
        store_inverse_norms(scratch_ptr, q, rq, offs_n, NUM_P, BLOCK_N)


@triton.jit
def store_grad_tile(scratch_ptr, k: tl.constexpr, g_over_t, offs_n, BLOCK_N: tl.constexpr):
    """Pair k's G / t_k (BLOCK_N x BLOCK_N) into the scratch."""
    tl.store(scratch_ptr + k * BLOCK_N * BLOCK_N + tile_offsets(offs_n, BLOCK_N), g_over_t)


@triton.jit
def store_inverse_norms(scratch_ptr, m: tl.constexpr, r, offs_n, NUM_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Modality m's inverse norms into the scratch (after the P tiles)."""
    tl.store(scratch_ptr + NUM_P * BLOCK_N * BLOCK_N + m * BLOCK_N + offs_n, r)


@triton.jit
def store_coef(scratch_ptr, k: tl.constexpr, coef, NUM_P: tl.constexpr, NUM_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Pair k's c_k total (the embeddings' gradient reads G_k / t_k times c_k total / total)."""
    tl.store(scratch_ptr + NUM_P * BLOCK_N * BLOCK_N + NUM_M * BLOCK_N + k, coef)


@triton.jit
def parameter_grads(scratch_ptr, out_ptr, total, WHICH: tl.constexpr, SIGN: tl.constexpr, NUM_P: tl.constexpr,
                    NUM_M: tl.constexpr, BLOCK_N: tl.constexpr, SHARED: tl.constexpr):
    """dL/dt (WHICH 1, SIGN -1: -(c_k / total) sum G S / t_k) or dL/db (WHICH 2, SIGN 1: (c_k / total) sum G),
    per pair or summed over the pairs for a shared parameter."""
    c_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N + NUM_M * BLOCK_N
    shared = 0.0
    for k in tl.static_range(NUM_P):
        grad = SIGN * tl.load(c_base + k) / total * tl.load(c_base + WHICH * NUM_P + k)
        if SHARED:
            shared += grad
        else:
            tl.store(out_ptr + k, grad)
    if SHARED:
        tl.store(out_ptr, shared)


@triton.jit
def embedding_grads(zs, stride_zn, stride_zd, dz_ptr, stride_dzm, stride_dzn, scratch_ptr, total, offs_n, N, D,
                    PAIRS: tl.constexpr, NUM_M: tl.constexpr, NORMALIZE: tl.constexpr, MIX: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dL/dz_m for every modality. With normalization, <x_i, dx_i> is summed over D first (one pass), as the
    torch backend does: taken from the same dx, so that dz vanishes exactly where it should (D = 1). MIX: the
    pairs' second sides also mix per sample (GRAM's column term, see `_mix_term`)."""
    NUM_P: tl.constexpr = len(PAIRS)
    r_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)[:, None]
    for m in tl.static_range(NUM_M):
        r_m = tl.load(r_base + m * BLOCK_N + offs_n)
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                dx, x = _dx_chunk(zs, stride_zn, stride_zd, scratch_ptr, total, r_m, offs_n, d0 + offs_d, N, D, m,
                                  PAIRS, NUM_M, MIX, BLOCK_N, INPUT_PRECISION)
                dot += tl.sum(x * dx, axis=1)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dx, x = _dx_chunk(zs, stride_zn, stride_zd, scratch_ptr, total, r_m, offs_n, dd, N, D, m, PAIRS, NUM_M,
                              MIX, BLOCK_N, INPUT_PRECISION)
            if NORMALIZE:
                dx = r_m[:, None] * (dx - x * dot[:, None])
            out = dz_ptr + m * stride_dzm + rows * stride_dzn + dd[None, :]
            tl.store(out, dx.to(dz_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (dd[None, :] < D))


@triton.jit
def _dx_chunk(zs, stride_zn, stride_zd, scratch_ptr, total, r_m, offs_n, dd, N, D, m: tl.constexpr,
              PAIRS: tl.constexpr, NUM_M: tl.constexpr, MIX: tl.constexpr, BLOCK_N: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """(dL/dx_m, x_m) on columns dd: every pair's c_k G / t_k against the other side's unit vectors."""
    NUM_P: tl.constexpr = len(PAIRS)
    rows = offs_n.to(tl.int64)[:, None]
    inside = (offs_n[:, None] < N) & (dd[None, :] < D)
    dx = tl.zeros((BLOCK_N, dd.shape[0]), dtype=tl.float32)
    for k in tl.static_range(NUM_P):  # (pairs by index: a name bound in a static_range body is no constexpr)
        if PAIRS[k][0] == m:
            dx = _dx_term(dx, zs, stride_zn, stride_zd, scratch_ptr, total, offs_n, dd, N, D, k, PAIRS[k][1], False,
                          NUM_P, NUM_M, BLOCK_N, INPUT_PRECISION)
        elif PAIRS[k][1] == m:
            dx = _dx_term(dx, zs, stride_zn, stride_zd, scratch_ptr, total, offs_n, dd, N, D, k, PAIRS[k][0], True,
                          NUM_P, NUM_M, BLOCK_N, INPUT_PRECISION)
            if MIX:
                dx = _mix_term(dx, zs, stride_zn, stride_zd, scratch_ptr, offs_n, dd, N, D, k, PAIRS, NUM_M, BLOCK_N)
    own = tl.load(zs[m] + rows * stride_zn[m] + dd[None, :] * stride_zd[m], mask=inside, other=0.0)
    return dx, own.to(tl.float32) * r_m[:, None]


@triton.jit
def _dx_term(dx, zs, stride_zn, stride_zd, scratch_ptr, total, offs_n, dd, N, D, k: tl.constexpr, o: tl.constexpr,
             TRANSPOSED: tl.constexpr, NUM_P: tl.constexpr, NUM_M: tl.constexpr, BLOCK_N: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """dx + (c_k / total) G_k / t_k (its transpose for the pair's second side) times modality o's unit vectors."""
    r_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N
    c_base = r_base + NUM_M * BLOCK_N
    rows = offs_n.to(tl.int64)[:, None]
    inside = (offs_n[:, None] < N) & (dd[None, :] < D)
    g = tl.load(scratch_ptr + k * BLOCK_N * BLOCK_N + tile_offsets(offs_n, BLOCK_N)) * (tl.load(c_base + k) / total)
    other = tl.load(zs[o] + rows * stride_zn[o] + dd[None, :] * stride_zd[o], mask=inside, other=0.0)
    y = other.to(tl.float32) * tl.load(r_base + o * BLOCK_N + offs_n)[:, None]
    if TRANSPOSED:
        g = tl.trans(g)
    return tl.dot(g, y, dx, input_precision=INPUT_PRECISION)


@triton.jit
def _mix_term(dx, zs, stride_zn, stride_zd, scratch_ptr, offs_n, dd, N, D, k: tl.constexpr, PAIRS: tl.constexpr,
              NUM_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx + sum_l mix[k, l] * (pair l's second side's unit vectors), per sample: mix (P, P, BLOCK_N) after the
    three words per pair. GRAM's dL/dX_j = (dC_j + dC_j^T) X_j, X_j the second sides of sample j."""
    NUM_P: tl.constexpr = len(PAIRS)
    for l in tl.static_range(NUM_P):  # (pairs by index, as in _dx_chunk)
        dx = _mixed(dx, zs, stride_zn, stride_zd, scratch_ptr, offs_n, dd, N, D, k * NUM_P + l, PAIRS[l][1], NUM_P,
                    NUM_M, BLOCK_N)
    return dx


@triton.jit
def _mixed(dx, zs, stride_zn, stride_zd, scratch_ptr, offs_n, dd, N, D, entry: tl.constexpr, o: tl.constexpr,
           NUM_P: tl.constexpr, NUM_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx + mix[entry] * modality o's unit vectors on columns dd."""
    r_base = scratch_ptr + NUM_P * BLOCK_N * BLOCK_N
    mix_base = r_base + NUM_M * BLOCK_N + 3 * NUM_P
    rows = offs_n.to(tl.int64)[:, None]
    inside = (offs_n[:, None] < N) & (dd[None, :] < D)
    coef = tl.load(mix_base + entry * BLOCK_N + offs_n) * tl.load(r_base + o * BLOCK_N + offs_n)
    other = tl.load(zs[o] + rows * stride_zn[o] + dd[None, :] * stride_zd[o], mask=inside, other=0.0)
    return dx + coef[:, None] * other.to(tl.float32)


# --- the host side -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outputs:
    """What a small-batch kernel writes (fp32 unless noted); an unneeded one is a placeholder."""

    loss: torch.Tensor  # 0-d
    pair_losses: torch.Tensor  # (P,)
    accuracy: torch.Tensor  # (P, 2)
    dz: torch.Tensor  # (M, N, D) in the inputs' dtype
    dt: torch.Tensor  # the temperature tensor's shape
    db: torch.Tensor  # the bias tensor's shape


def _parameter(prefix: str, parameter: PerPair | None, numbers, placeholder) -> dict:
    """A temperature's (numbers: 1/t) or a bias's (numbers: b) kernel arguments."""
    from_ptr = parameter is not None and parameter.values is None
    tensor = parameter.tensor.detach().float().reshape(-1) if from_ptr else placeholder
    return {f"{prefix}_ptr": tensor, f"{prefix}_values": numbers,
            f"{prefix.upper()}_FROM_PTR": from_ptr, f"{prefix.upper()}_SHARED": from_ptr and tensor.numel() == 1}


def arguments(call: Call, zs, needs: Needs, stats: tuple[tuple, tuple] | None = None,
              mix: bool = False) -> tuple[dict, Outputs]:
    """The keyword arguments every small-batch kernel takes, and the outputs they point at. stats: the shapes of
    the two statistics ((P,), (P, 2) by default); mix: room in the scratch for `_mix_term`'s coefficients."""
    z = zs[0]
    n, d = z.shape
    num_m, num_p = len(zs), len(call.pairs)
    block_n = max(16, triton.next_power_of_2(n))
    if tuning.INTERPRET and z.dtype == torch.bfloat16:  # numpy has no bf16: the interpreter reads fp32 copies
        zs = [t.float() for t in zs]
    f32 = dict(dtype=torch.float32, device=z.device)
    loss = torch.empty((), **f32)
    t, b = call.temperature, call.bias
    needs_dt = needs.temperature and t.values is None
    needs_db = needs.bias and b is not None and b.values is None
    stats = stats or ((num_p,), (num_p, 2))
    out = Outputs(loss=loss, pair_losses=torch.empty(stats[0], **f32), accuracy=torch.empty(stats[1], **f32),
                  dz=torch.empty((num_m, n, d), dtype=zs[0].dtype, device=z.device) if needs.z else loss,
                  dt=torch.empty(t.tensor.shape, **f32) if needs_dt else loss,
                  db=torch.empty(b.tensor.shape, **f32) if needs_db else loss)
    words = num_p * block_n * block_n + num_m * block_n + 3 * num_p + (num_p * num_p * block_n if mix else 0)
    precision = input_precision(z.dtype)  # the gradient's dots take fp32 G: 3xTF32 unless fp32 asked for IEEE
    mask, ids = call.mask, call.ids
    args = dict(
        zs=tuple(zs), stride_zn=tuple(x.stride(0) for x in zs), stride_zd=tuple(x.stride(1) for x in zs),
        **_parameter("t", t, (1.0,) * num_p if t.values is None else tuple(1.0 / v for v in t.values), loss),
        weights=tuple(float(w) for w in call.weights),
        mask_ptr=mask if mask is not None else loss,
        stride_maskm=mask.stride(0) if mask is not None else 0, stride_maskn=mask.stride(1) if mask is not None else 0,
        ids_ptr=ids if ids is not None else loss, stride_idsn=ids.stride(0) if ids is not None else 0,
        loss_ptr=out.loss, pair_loss_ptr=out.pair_losses, acc_ptr=out.accuracy, dz_ptr=out.dz,
        stride_dzm=out.dz.stride(0) if needs.z else 0, stride_dzn=out.dz.stride(1) if needs.z else 0,
        dt_ptr=out.dt, scratch_ptr=torch.empty(words if needs.any else 1, **f32), N=n, D=d,
        PAIRS=tuple(call.pairs), NUM_M=num_m, NORMALIZE=call.normalize, HAS_MASK=mask is not None,
        HAS_IDS=ids is not None, NEEDS_DZ=needs.z, NEEDS_DT=needs_dt, BLOCK_N=block_n,
        BLOCK_D=_forward_chunk(block_n, d, z.element_size()), BLOCK_DG=_gradient_chunk(block_n, d, z.element_size()),
        INPUT_PRECISION=precision,
        GRAD_PRECISION=precision if z.dtype == torch.float32 else "tf32x3", num_warps=_warps(block_n))
    if b is not None:
        args.update(_parameter("b", b, (0.0,) * num_p if b.values is None else tuple(b.values), loss),
                    db_ptr=out.db, NEEDS_DB=needs_db)
    return args, out


def _forward_chunk(block_n: int, d: int, elem: int) -> int:
    """The logits' D chunk: 64 columns while the two operand tiles are small (BLOCK_N x elem < 128 bytes a row),
    32 below 256 bytes (fp32 at N = 32, 16-bit at N = 64), else 16 (fp32 at N = 64), so that sm_90 compiles
    the kernels without spills (held by tests/test_compile_budgets.py)."""
    if block_n * elem >= 256:
        return 16
    return 32 if d <= 32 or block_n * elem >= 128 else 64


def _gradient_chunk(block_n: int, d: int, elem: int) -> int:
    """The gradient pass's D chunk, by the same register arithmetic: its fp32 dx accumulator and operand tiles
    beside the BLOCK_N x BLOCK_N G tile."""
    if block_n >= 64 or (block_n >= 32 and elem == 4):
        return 16
    return 32 if d <= 32 else 64


def _warps(block_n: int) -> int:
    """8 warps from BLOCK_N = 32 up: the N x N fp32 tiles spread over 256 threads."""
    return 4 if block_n <= 16 else 8


def result(call: Call, zs, needs: Needs, out: Outputs) -> Result:
    """The op's Result: the loss, its statistics and the gradients asked for, in their dtypes."""
    grads: tuple = ()
    if needs.z:
        grads = tuple(out.dz.to(zs[0].dtype).unbind(0))
    if needs.temperature:
        grads = (*grads, out.dt.to(call.temperature.tensor.dtype))
    if needs.bias:
        grads = (*grads, out.db.to(call.bias.tensor.dtype))
    return Result(out.loss, (out.pair_losses, out.accuracy), grads)
