"""Tile configurations of the Triton kernels: the autotuner's candidates, why each is there, and the
filter that drops those that cannot help at a given size.

Triton's autotuner times every kept config the first time a key is seen in a process (a few seconds,
once per bucket) and keeps the fastest. Key: N and D bucketed to powers of two (`buckets`), the flags that
change the work per tile, and, added by Triton, the dtypes of the tensor arguments, so the kernels neither
re-tune nor recompile for every batch size. Candidates are few on purpose. H100 timings behind them:
bench/results/nvidia-h100-80gb-hbm3-2026-11-24-tune.log (bf16, N=32768).
"""

from __future__ import annotations

import functools

import triton

from . import interpreter
from .jit import fwd_kernel, grad_panel_kernel

INTERPRET = interpreter()  # the interpreter's tiles are chosen at import, as the kernels' mode is


def buckets(n: int, d: int) -> tuple[int, int]:
    """The autotuning key's sizes: N and D rounded up to powers of two (D at least 16, tl.dot's minimum)."""
    return triton.next_power_of_2(n), max(16, triton.next_power_of_2(d))


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# Not yet timed on an A100: the Ampere notes below are shared-memory arithmetic.
FWD_GPU_CONFIGS = [
    # H100 winner at D=512 (9.07 ms): 128 x 256 logit tiles halve the row block's reloads per column
    # sweep; 8 warps hold the fp32 tile. 3 stages of (128 + 256) x 64 bf16 = 144 KiB: fits H100 (227 KiB)
    # and A100 (163 KiB) in 16-bit; in fp32 2 stages on an H100, none on an A100 (see keep).
    _config(128, 256, 64, 8, 3),
    # H100 at D=512: 9.30 ms (2% behind), the choice at D <= 128 in the sweep; 96 KiB of stages in 16-bit,
    # so the fp32 (tf32) and Ampere configuration.
    _config(128, 128, 64, 4, 3),
    # Twice the programs for mid-size N: with 128-row blocks, N = 4096 launches 32 x 3 programs on the fast
    # path, fewer than the 132 SMs of an H100 (108 on an A100); a 4th stage for Ampere's cp.async pipeline.
    _config(64, 128, 64, 4, 4),
]
PANEL_GPU_CONFIGS = [
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
FWD_CONFIGS = [_config(16, 16, 16, 1, 1)] if INTERPRET else FWD_GPU_CONFIGS
PANEL_CONFIGS = [_config(16, 16, 16, 1, 1)] if INTERPRET else PANEL_GPU_CONFIGS
SMALL_N = 2048  # at or below: no tuning (one config), whose cost would exceed any gain at this size
LARGE_N = 2**17  # above: no tuning either (each timed run takes seconds); the first config that fits


def keep(configs, n_bucket: int, d_bucket: int, elem_bytes: int, shared_memory: int) -> list:
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
    return keep(configs, nargs["N_BUCKET"], nargs["D_BUCKET"], z.element_size(),
                 _shared_memory(z.device.index if z.device.index is not None else 0))


fwd_tuned = triton.autotune(
    FWD_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "BOUND_ON_DEVICE", "ATOMIC_COLS", "STATS",
                      "SIGMOID"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["colsum_ptr"],  # the atomic column sums accumulate: zeroed before each timed run
)(fwd_kernel)
panel_tuned = triton.autotune(
    PANEL_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "BOUND_ON_DEVICE", "NEEDS_DT", "IDENTITY",
                        "SIGMOID", "NEEDS_DB"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["sgs_ptr", "sgb_ptr"],  # per-tile partials: a timed config with smaller tiles writes more
)(grad_panel_kernel)
