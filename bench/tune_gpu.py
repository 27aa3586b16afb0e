"""Time the Triton kernels' tile configurations at one shape (GPU only); prints a table per kernel.

    python -m bench.tune_gpu [--n 32768] [--d 512] [--dtype bfloat16] [--sections fwd,fused,panel,e2e]

Every configuration's output is compared with the first one's, so a fast but wrong tiling shows up.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from fastpair.kernels import pairwise_nce as K
from triton.testing import do_bench

PAIRS = list(itertools.combinations(range(3), 2))


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sections", default="fwd,fused,panel,e2e", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    n, d, dtype = args.n, args.d, getattr(torch, args.dtype)
    zs = [torch.randn(n, d, device="cuda", dtype=dtype) for _ in range(3)]
    scales = [1 / 0.07] * 3
    floor = do_bench(lambda: [torch.matmul(zs[p], zs[q].T) for p, q in PAIRS], return_mode="median")
    print(f"N={n} D={d} {args.dtype}: 3 S-matmuls (cuBLAS) {floor:.2f} ms; "
          f"12-GEMM floor ~ {4 * floor:.2f} ms")
    d_pad = max(16, 1 << (d - 1).bit_length())

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    if "fwd" in sections:
        sweep("forward (atomic fast path): BM BN BK warps stages -> ms, x(3 S-matmuls), max|dlse|",
              [(f"{bm:4d} {bn:4d} {bk:4d} {w:2d} {s:2d}",
                dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s))
               for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 4),
                                        (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (128, 128, 64, 8, 4)]
               if bk <= max(16, d)],
              lambda cfg: K.forward(zs, scales, PAIRS, None, True, False, False, cfg=cfg),
              lambda a, b: (a["lse"] - b["lse"]).abs().max().item(), floor)

    saved = K.forward(zs, scales, PAIRS, None, True, False, True)
    coef = torch.full((3,), 1.0 / (3 * 2 * n), device="cuda")
    if "fused" in sections:
        sweep("backward: BM BN BK BDO warps stages -> ms, x(12 S-sized matmuls = 4x the 3 above), "
              "max|ddx|/max|dx|",
              [(f"{bm:4d} {bn:4d} {bk:4d} {do:4d} {w:2d} {s:2d}",
                dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=do, num_warps=w, num_stages=s))
               for bm, bn, bk, do, w, s in [(64, 128, 64, 256, 8, 3), (64, 128, 64, 256, 8, 4),
                                            (128, 128, 64, 256, 8, 3), (128, 128, 64, 128, 8, 2),
                                            (64, 64, 64, 512, 8, 2)]
               if do <= d_pad and bk <= max(16, d)],
              lambda cfg: K.backward(saved, coef, PAIRS, 3, False, False, dtype, cfg=cfg)[0], rel, 4 * floor)
    if "panel" in sections:
        sweep("panel backward: BM BN BK warps stages rows -> ms, x(12 S-sized matmuls), max|ddx|/max|dx|",
              [(f"{bm:4d} {bn:4d} {bk:4d} {w:2d} {s:2d} {rows}",
                (dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, max(16, d)), num_warps=w, num_stages=s), rows))
               for bm, bn, bk, w, s, rows in [(128, 128, 64, 8, 3, None), (128, 128, 64, 4, 3, None),
                                              (128, 256, 64, 8, 3, None), (64, 128, 64, 4, 3, None),
                                              (256, 128, 64, 8, 3, None), (128, 128, 64, 8, 3, 1024),
                                              (128, 128, 64, 8, 3, 8192)]],
              lambda c: K.backward_panels(saved, coef, PAIRS, 3, False, False, dtype, cfg=c[0], panel_rows=c[1])[0],
              rel, 4 * floor)

    if "e2e" in sections:
        from fastpair import pairwise_nce

        leaves = [z.clone().requires_grad_() for z in zs]

        def step():
            for z in leaves:
                z.grad = None
            pairwise_nce(*leaves, backend="triton").backward()

        for mode in ("panel", "fused"):
            K.BACKWARD = mode
            ms = do_bench(step, warmup=20, rep=100, return_mode="median")
            print(f"end to end, backward={mode}: {ms:.3f} ms = {ms / (4 * floor):.2f}x the 12-GEMM floor",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
