"""Time the Triton kernels' tile configurations at one shape (GPU only); prints a table per kernel.

    python -m bench.tune_gpu [--n 32768] [--d 512] [--dtype bfloat16] [--sections fwd,panel,e2e]

The candidates are kernels/tuning.py's (and, for comparison, the two tiles the 2026-11-24 sweep liked,
which spill). Times are medians of triton.testing.do_bench, each against the benchmark's 12-GEMM floor
(bench/providers.py) timed at the same shape: a forward against a quarter of it (S once per pair), a
backward and a whole step against all of it. Every configuration's output is compared with the first
one's, so a fast but wrong tiling shows up. The kernel internals come from bench/internals.py.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from bench import internals as K
from bench.providers import PAIRS, TEMPERATURE, gemm_floor, get, make_inputs
from fastpair.flops import flop_count


def sweep(title: str, configs, run, error, share: float) -> None:
    """Time run(config) for each (label, config); print ms, ms / share and error(out, first out)."""
    print(title)
    ref = None
    for label, cfg in configs:
        try:
            out = run(cfg)
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=20, rep=100, return_mode="median")
        except Exception as err:  # noqa: BLE001 - report configs that do not compile or fit
            print(f"  {label} -> failed: {type(err).__name__}: {str(err)[:100]}")
            continue
        ref = out if ref is None else ref
        print(f"  {label} -> {ms:8.3f} ms  {ms / share:5.2f}x  {error(out, ref):.2e}", flush=True)


def candidates(d: int, elem_bytes: int) -> list[tuple[str, dict]]:
    """(label, launch options) of every tile candidate of kernels/tuning.py at this D and dtype, and of the two
    tiles the 2026-11-24 H100 sweep liked, which spill (bench/results/compile-*): what spilling costs."""
    from fastpair.kernels import tuning

    legacy = [tuning._config(128, 256, 64, 8, 3, None), tuning._config(128, 128, 64, 4, 3, None)]
    out = []
    for c in tuning.GPU_CONFIGS + legacy:
        bk = min(c.kwargs["BLOCK_K"] * 2 // elem_bytes, max(16, d))
        options = dict(c.kwargs, BLOCK_K=bk, num_warps=c.num_warps, num_stages=c.num_stages)
        if c.maxnreg is not None:
            options["maxnreg"] = c.maxnreg
        label = f"{c.kwargs['BLOCK_M']:4d} {c.kwargs['BLOCK_N']:4d} {bk:4d} {c.num_warps:2d} {c.num_stages:2d}"
        out.append((label + (f" ({c.maxnreg})" if c.maxnreg else " (spills)"), options))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sections", default="fwd,panel,e2e", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    n, d, dtype = args.n, args.d, getattr(torch, args.dtype)
    leaves = make_inputs(n, d, dtype=dtype, device="cuda")
    zs = [z.detach() for z in leaves]
    staged = K.staged(zs, PAIRS, TEMPERATURE)
    floor = do_bench(gemm_floor(zs), warmup=25, rep=100, return_mode="median")
    print(f"N={n} D={d} {args.dtype}: 12-GEMM floor (cuBLAS) {floor:.2f} ms, "
          f"{flop_count(n, d, len(PAIRS)) / floor / 1e9:.1f} TFLOP/s")

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    configs = candidates(d, zs[0].element_size())
    if "fwd" in sections:
        sweep("forward (atomic fast path): BM BN BK warps stages -> ms, x(floor / 4: S once per pair), max|dlse|",
              configs, lambda cfg: K.forward(staged, True, False, False, cfg=cfg),
              lambda a, b: (a.lse - b.lse).abs().max().item(), floor / 4)

    table = K.forward(staged, True, False, True).lse  # two directions: the backward's (2P, N) statistics
    coef = torch.full((len(PAIRS),), 1.0 / (len(PAIRS) * 2 * n), device="cuda")  # mean over pairs, both ways
    if "panel" in sections:
        sweep("backward panels: BM BN BK warps stages (maxnreg) rows -> ms, x(the floor), max|ddx|/max|dx|",
              [(f"{label} {rows}", (cfg, rows)) for label, cfg in configs for rows in (None, 1024)],
              lambda c: K.backward(staged, table, coef, True, False, cfg=c[0], panel_rows=c[1])[0],
              rel, floor)

    if "e2e" in sections:
        ms = do_bench(get("fastpair-triton", "cuda").step(leaves), warmup=20, rep=100, return_mode="median")
        print(f"end to end: {ms:.3f} ms = {ms / floor:.2f}x the 12-GEMM floor", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
