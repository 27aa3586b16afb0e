"""Tile configurations of the Triton kernels: the candidates, which of them a launch is offered on its GPU
(`offered`: those that compile without spilling there), and the filter by size and shared memory (`keep`).

Triton's autotuner times every kept config the first time a key is seen in a process and keeps the fastest.
Key: N and D bucketed to powers of two (`buckets`), the flags that change the work per tile (the input
precision among them), and, added by Triton, the dtypes of the tensor arguments, so the kernels neither
re-tune nor recompile for every batch size. Candidates are few on purpose.

Registers decide the candidates. A BLOCK_M x BLOCK_N tile of fp32 logits over 32 * num_warps threads is that
many logits per thread (LPT) in registers before the epilogue's temporaries (exp2 terms, per-column norms and
masks, the softplus of the sigmoid objective, 3xTF32's operand halves), and ptxas has 255 registers per
thread: past that it spills to local memory inside the column loop. The compile report (python -m
bench.compile; bench/results/compile-2026-12-02.md) compiled every launch variant at 16, 32, 64 and 128 LPT
for sm_80, sm_90a and sm_100a: at 128 LPT (the 128 x 256 / 8 warps and 128 x 128 / 4 warps tiles timed
fastest on an H100 on 2026-11-24, bench/results/nvidia-h100-80gb-hbm3-2026-11-24-tune.log) most variants
spill, up to 3.6 KB per thread in the forward and 2.7 KB in the panels; at 64 LPT the InfoNCE forward
without a mask and the panels are spill-free on A100 and H100 (16-bit and TF32); the sigmoid objective's
and a mask's forward epilogue, 3xTF32 and Blackwell's tensor-memory layout (a thread holds a whole row of
the tile, so per-column vectors cost BLOCK_N registers each) need 32 or 16. `offered` encodes those
findings; `make test` compiles them again (tests/test_compile_budgets.py). Every candidate states maxnreg:
left alone, ptxas sometimes caps registers to fit one more block per SM and spills to get there (seen at
168 registers on sm_80).

Not yet timed on a GPU: only the H100 run above, whose winners spill; `make gpu-check` times these.
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


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, maxnreg: int | None = 255) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def logits_per_thread(config: triton.Config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


# BLOCK_K is written for 16-bit inputs (128 bytes of a row per K step); fp32 inputs take half (keep).
T64 = _config(128, 128, 64, 8, 3)  # 64 LPT: two warpgroups of 64 x 128 (wgmma m64n128 on Hopper)
T32 = _config(128, 64, 64, 8, 3)  # 32 LPT: half the columns; with 128 rows, half the forward's atomics of 64 x 128
T32N = _config(128, 32, 64, 4, 4)  # 32 LPT, narrow: 32 columns a thread in Blackwell's row-per-thread layout
T16 = _config(128, 32, 64, 8, 3)  # 16 LPT: the heaviest epilogues (3xTF32 with a mask on Ampere)
S = _config(64, 64, 64, 4, 4)  # 32 LPT, 64 rows: twice the row blocks at small N, where programs are few
FMA = _config(128, 32, 32, 8, 3)  # IEEE fp32: FMA dots hold their operands in registers, so 16-wide K steps
GPU_CONFIGS = [T64, T32, T32N, T16, S, FMA]


def offered(kernel: str, family: int, precision: str, heavy: bool) -> list[triton.Config]:
    """The candidates a launch may run, best expected first (the first is taken where N is too large to
    time them): kernel "fwd" or "panel"; family the compute capability's major (8 Ampere, 9 Hopper, 10+
    Blackwell); precision "16-bit", "tf32", "tf32x3" or "ieee" (fp32 on FMA units, asked for explicitly);
    heavy a forward with the sigmoid objective or a mask. Each rule is a finding of the compile report:
    the configs it leaves out spill there."""
    if precision == "ieee":  # FMA dots keep their operands in registers (T16 spilled 12-32 bytes)
        return [FMA]
    if kernel == "panel":
        if family < 10 and precision != "tf32x3":
            return [T64, T32, S]
        return [T32, T32N, S]
    if not heavy:
        return [T32, S] if (family, precision) == (8, "tf32x3") else [T64, T32, S]
    if (family, precision) == (8, "tf32x3"):
        return [T16]
    if family >= 10:
        return [T32N, T16]
    return [T32, T16] if precision == "tf32x3" else [T32, T32N, S]


def precision_class(elem_bytes: int, input_precision: str) -> str:
    return "16-bit" if elem_bytes == 2 else input_precision


# Interpreter: the smallest legal tiles, one config (the CPU emulation's time grows with the tile)
INTERPRETER_CONFIGS = [_config(16, 16, 16, 1, 1, None)]
FWD_CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS
PANEL_CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS
SMALL_N = 2048  # at or below: no tuning (one config), whose cost would exceed any gain at this size
LARGE_N = 2**17  # above: no tuning either (each timed run takes seconds); the first config that fits


def keep(configs: list[triton.Config], n_bucket: int, d_bucket: int, elem_bytes: int,
         shared_memory: int) -> list[triton.Config]:
    """The candidates worth timing at one key, from those offered: BLOCK_K no wider than D (wider only loads
    masked zeros) and halved for fp32 rows; no more pipeline stages of the (BLOCK_M + BLOCK_N) x BLOCK_K
    operand tiles than shared memory holds (an estimate: fp32 inputs, or Ampere's 163 KiB, lose stages or
    the config); at small N only the tile with the fewest rows (more programs than SMs matters more there
    than tile efficiency, and one candidate means no tuning time); at huge N the first (timing a candidate
    there would take minutes)."""
    kept = []
    for c in configs:
        bk = min(c.kwargs["BLOCK_K"] * 2 // elem_bytes, d_bucket)
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        stages = min(c.num_stages, shared_memory // ((bm + bn) * bk * elem_bytes))
        if stages >= 2:  # one stage would mean no overlap of loads and math: not a candidate
            kept.append(_config(bm, bn, bk, c.num_warps, stages, c.maxnreg))
    if not kept:  # a GPU with little shared memory: the smallest tile, unpipelined
        c = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        bk = min(c.kwargs["BLOCK_K"] * 2 // elem_bytes, d_bucket)
        kept = [_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bk, c.num_warps, 1, c.maxnreg)]
    if n_bucket <= SMALL_N:
        kept = [min(kept, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]))]
    elif n_bucket > LARGE_N:
        kept = kept[:1]
    return kept


@functools.lru_cache(maxsize=16)
def _device(device_index: int) -> tuple[int, int]:
    """(compute capability major, shared memory per block) of a CUDA device."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        import torch

        return torch.cuda.get_device_capability(device_index)[0], int(props["max_shared_mem"])
    except Exception:  # an unknown driver: the smallest of the GPUs the configs were written for
        return 8, 163 * 1024


def _prune(kernel: str):
    """The autotuner's pruning for one kernel: what `offered` gives this GPU and launch, then `keep`."""

    def prune(configs, nargs, **kwargs):
        z = nargs["z_ptr"]
        family, shared = _device(z.device.index if z.device.index is not None else 0)
        return keep(offered_for(kernel, family, z.element_size(), kwargs), nargs["N_BUCKET"], nargs["D_BUCKET"],
                    z.element_size(), shared)

    return prune


def offered_for(kernel: str, family: int, elem_bytes: int, flags: dict) -> list[triton.Config]:
    """`offered` for a launch's constexpr flags (INPUT_PRECISION, SIGMOID, HAS_MASK)."""
    heavy = kernel == "fwd" and bool(flags["SIGMOID"] or flags["HAS_MASK"])
    return offered(kernel, family, precision_class(elem_bytes, flags["INPUT_PRECISION"]), heavy)


fwd_tuned = triton.autotune(
    FWD_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "BOUND_ON_DEVICE", "ATOMIC_COLS", "STATS",
                      "SIGMOID", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune("fwd")},
    reset_to_zero=["colsum_ptr"],  # the atomic column sums accumulate: zeroed before each timed run
)(fwd_kernel)
panel_tuned = triton.autotune(
    PANEL_CONFIGS, key=["N_BUCKET", "D_BUCKET", "HAS_MASK", "BOUNDED", "BOUND_ON_DEVICE", "NEEDS_DT", "IDENTITY",
                        "SIGMOID", "NEEDS_DB", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune("panel")},
    reset_to_zero=["sgs_ptr", "sgb_ptr"],  # per-tile partials: a timed config with smaller tiles writes more
)(grad_panel_kernel)
