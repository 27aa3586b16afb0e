"""GPU benchmark: fastpair's Triton kernels against PyTorch, torch.compile, the peers and the cuBLAS floor.

    python -m bench.gpu [--quick] [--out bench/results] [--budget-s 420]

Providers (M = 3 modalities, so 3 pairs): fastpair-triton (fastest path), fastpair-triton-det (under
torch.use_deterministic_algorithms(True): atomic-free), fastpair-torch (the blocked PyTorch backend),
plain-pytorch (materialized logits + F.cross_entropy), torch-compile (of plain), open_clip ClipLoss x3,
Inf-CL cal_inf_loss x6 (one direction per call; needs D a multiple of its head_dim), memeff
MemoryEfficientCLIPLoss(stable=False) x3, and gemm-floor (the 12 N x N x D matmuls with cuBLAS).
Peers are optional imports: a missing one is reported as skipped, never faked. Modes: forward, backward
(of a retained graph), full. Times are medians of triton.testing.do_bench; peak memory is
torch.cuda.max_memory_allocated during one full step, above the inputs. A provider that runs out of
memory at some N is recorded as "oom" and not run at larger N.
Writes <out>/<device>-<date>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under deterministic algorithms

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastpair  # noqa: E402
from bench import providers  # noqa: E402  (the same 12-GEMM floor as the CPU benchmark)
from bench.report import slug, write_results  # noqa: E402
from fastpair import pairwise_nce  # noqa: E402
from fastpair.reference import pairwise_nce_reference  # noqa: E402

T = 0.07
M = 3
PAIRS = list(itertools.combinations(range(M), 2))


def _peer(name):
    try:
        if name == "open_clip":
            from open_clip.loss import ClipLoss

            return ClipLoss()
        if name == "inf_cl":
            from inf_cl import cal_inf_loss

            return cal_inf_loss
        if name == "memeff":
            from memeff import MemoryEfficientCLIPLoss

            return MemoryEfficientCLIPLoss(temperature=T, stable=False)
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed here"
        return err
    raise KeyError(name)


def make_providers():
    compiled = torch.compile(lambda *z: pairwise_nce_reference(*z, temperature=T, upcast=False))
    providers = {
        "fastpair-triton": lambda zs: pairwise_nce(*zs, temperature=T, backend="triton"),
        "fastpair-triton-det": "deterministic",
        "fastpair-torch": lambda zs: pairwise_nce(*zs, temperature=T, backend="torch"),
        "plain-pytorch": lambda zs: pairwise_nce_reference(*zs, temperature=T, upcast=False),
        "torch-compile": lambda zs: compiled(*zs),
    }
    skipped = {}
    clip = _peer("open_clip")
    if callable(clip):
        def open_clip_loss(zs):
            xs = [F.normalize(z, dim=-1) for z in zs]
            return sum(clip(xs[p], xs[q], 1.0 / T) for p, q in PAIRS) / len(PAIRS)
        providers["open_clip-x3"] = open_clip_loss
    else:
        skipped["open_clip-x3"] = repr(clip)
    inf = _peer("inf_cl")
    if callable(inf):
        def inf_cl_loss(zs):
            d = zs[0].shape[1]
            head = 256 if d % 256 == 0 else 128 if d % 128 == 0 else None
            if head is None:
                raise ValueError("inf-cl needs D a multiple of 128 or 256")
            xs = [F.normalize(z, dim=-1) for z in zs]
            total = sum(inf(xs[p], xs[q], scale=1.0 / T, head_dim=head) + inf(xs[q], xs[p], scale=1.0 / T,
                                                                               head_dim=head) for p, q in PAIRS)
            return total / (2 * len(PAIRS))
        providers["inf_cl-x6"] = inf_cl_loss
    else:
        skipped["inf_cl-x6"] = repr(inf)
    mem = _peer("memeff")
    if callable(mem):
        providers["memeff-x3"] = lambda zs: sum(mem(zs[p], zs[q]) for p, q in PAIRS) / len(PAIRS)
    else:
        skipped["memeff-x3"] = repr(mem)
    return providers, skipped


def inputs(n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(M)]


def gemm_floor(n, d, dtype):
    from triton.testing import do_bench

    xs = [z.detach() for z in inputs(n, d, dtype, seed=1)]
    g = torch.randn(n, n, device="cuda", dtype=dtype)
    return do_bench(lambda: providers.gemm_floor(xs, g), warmup=25, rep=100, return_mode="median")


def time_provider(fn, n, d, dtype, modes):
    from triton.testing import do_bench

    zs = inputs(n, d, dtype)
    out = {}

    def full():
        for z in zs:
            z.grad = None
        fn(zs).backward()

    full()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    full()
    torch.cuda.synchronize()
    out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["inputs_grads_mib"] = 2 * sum(z.numel() * z.element_size() for z in zs) / 2**20
    if "full" in modes:
        out["full_ms"] = do_bench(full, warmup=5, rep=40, return_mode="median")
    if "forward" in modes:
        out["forward_ms"] = do_bench(lambda: fn(zs), warmup=5, rep=40, return_mode="median")
    if "backward" in modes:
        loss = fn(zs)
        out["backward_ms"] = do_bench(lambda: loss.backward(retain_graph=True), warmup=5, rep=40,
                                      grad_to_none=zs, return_mode="median")
    return out


def run(shapes, dtypes, modes, budget_s, only=None):
    providers, skipped = make_providers()
    rows, failed = [], {}
    start = time.perf_counter()
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for d, ns in shapes:
            for n in ns:
                if time.perf_counter() - start > budget_s:
                    print(f"time budget of {budget_s} s spent; stopping before N={n} D={d} {dtype_name}")
                    return rows, skipped, failed
                floor = gemm_floor(n, d, dtype)
                rows.append(dict(provider="gemm-floor", n=n, d=d, dtype=dtype_name, full_ms=floor,
                                 tflops=4 * 2 * n * n * d * M / floor / 1e9))
                for name, fn in providers.items():
                    if only and name not in only:
                        continue
                    key = (name, d, dtype_name)
                    if key in failed:
                        continue
                    det = fn == "deterministic"
                    if name == "fastpair-torch" and n > 16384:
                        continue  # the blocked PyTorch path is the CPU backend; its GPU cost is clear by then
                    own_modes = modes if name in ("fastpair-triton", "fastpair-triton-det", "plain-pytorch") \
                        else ("full",)
                    try:
                        torch.use_deterministic_algorithms(det, warn_only=False)
                        call = providers["fastpair-triton"] if det else fn
                        res = time_provider(call, n, d, dtype, own_modes)
                    except torch.cuda.OutOfMemoryError:
                        failed[key] = f"oom at N={n}"
                        res = None
                    except Exception as err:  # noqa: BLE001 - a peer's own limits, reported
                        failed[key] = f"{type(err).__name__}: {str(err)[:160]} (N={n})"
                        res = None
                    finally:
                        torch.use_deterministic_algorithms(False)
                        torch.cuda.empty_cache()
                    if res is not None:
                        res.update(provider=name, n=n, d=d, dtype=dtype_name,
                                   tflops=4 * 2 * n * n * d * M / res["full_ms"] / 1e9 if "full_ms" in res else None,
                                   vs_floor=res.get("full_ms", math.nan) / floor)
                        rows.append(res)
                        print(f"{dtype_name} D={d} N={n:7d} {name:22s} full {res.get('full_ms', math.nan):9.3f} ms "
                              f"({res['vs_floor']:.2f}x floor)  fwd {res.get('forward_ms', math.nan):8.3f}  "
                              f"bwd {res.get('backward_ms', math.nan):8.3f}  peak {res['peak_mib']:9.1f} MiB",
                              flush=True)
    return rows, skipped, failed


def largest_batch(n: int = 2**20, d: int = 512) -> dict:
    """One full step of fastpair-triton at N = 2^20, D = 512, bf16: does it fit, how long, how much memory."""
    zs = inputs(n, d, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        pairwise_nce(*zs, temperature=T, backend="triton").backward()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        return dict(provider="fastpair-triton", n=n, d=d, dtype="bfloat16", largest="oom", error=str(err)[:200])
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"N=2^20 D={d} bf16 fastpair-triton: one step {seconds:.1f} s (incl. compile), peak {peak:.0f} MiB above "
          f"the inputs, total {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return dict(provider="fastpair-triton", n=n, d=d, dtype="bfloat16", largest="fits", step_s=seconds,
                peak_mib=peak, total_gib=torch.cuda.max_memory_allocated() / 2**30)


def autotune_choices() -> dict:
    """The tiles the autotuner chose per key in this run (key: N bucket, D bucket, flags, dtypes)."""
    from fastpair.kernels import pairwise_nce as K

    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in (("forward", K._fwd_tuned), ("panel", K._panel_tuned))}


def markdown(result) -> str:
    meta = result["meta"]
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fastpair {meta['fastpair']}, "
             f"{meta['date']}; M=3, fwd+bwd unless noted; medians of triton.testing.do_bench", ""]
    groups = {}
    for r in result["rows"]:
        if "largest" in r:
            lines += [f"N = 2^20, D = {r['d']}, bf16, fastpair-triton: {r['largest']}"
                      + (f", one full step {r['step_s']:.1f} s (first call, compilation included), "
                         f"{r['total_gib']:.1f} GiB peak on the device" if r["largest"] == "fits" else ""), ""]
            continue
        groups.setdefault((r["dtype"], r["d"]), []).append(r)
    for (dtype, d), rows in groups.items():
        providers = []
        for r in rows:
            if r["provider"] not in providers:
                providers.append(r["provider"])
        ns = sorted({r["n"] for r in rows})
        lines += [f"### {dtype}, D={d}: full step ms (x floor)", "",
                  "| provider | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---|" + "---:|" * len(ns)]
        for p in providers:
            cells = []
            for n in ns:
                r = next((x for x in rows if x["provider"] == p and x["n"] == n), None)
                if r is None:
                    cells.append("-")
                elif p == "gemm-floor":
                    cells.append(f"{r['full_ms']:.2f}")
                else:
                    cells.append(f"{r['full_ms']:.2f} ({r['vs_floor']:.2f}x)")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        biggest = max((r for r in rows if "inputs_grads_mib" in r), key=lambda r: r["n"], default=None)
        note = f" (inputs + grads: {biggest['inputs_grads_mib']:.0f} MiB at N={biggest['n']})" if biggest else ""
        lines += ["", f"Peak memory above the inputs during one step, MiB{note}:", "",
                  "| provider | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
        for p in providers:
            if p == "gemm-floor":
                continue
            cells = []
            for n in ns:
                r = next((x for x in rows if x["provider"] == p and x["n"] == n), None)
                cells.append("-" if r is None else f"{r['peak_mib']:.0f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped (not installed):", *[f"- {k}: {v}" for k, v in result["skipped"].items()], ""]
    if result["failed"]:
        lines += ["Stopped (out of memory or the peer's own limit):",
                  *[f"- {k}: {v}" for k, v in result["failed"].items()], ""]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["d"]) for r in result["rows"] if "largest" not in r})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (dtype, d) in zip(axes[0], groups):
        rows = [r for r in result["rows"] if r["dtype"] == dtype and r["d"] == d and "largest" not in r]
        for p in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["n"], r["full_ms"]) for r in rows if r["provider"] == p and "full_ms" in r)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                    linestyle="--" if p == "gemm-floor" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"{dtype}, D={d}, M=3")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['meta']['device']} {result['meta']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the goal shape and a few others only")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--only", nargs="*", default=None, help="provider names to run (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    import triton

    modes = ("full", "forward", "backward")
    if args.quick:
        plan = [("bfloat16", [(512, [4096, 32768])])]
    else:
        plan = [("bfloat16", [(512, [1024, 4096, 16384, 32768, 65536]), (128, [4096, 32768]), (1024, [4096, 32768])]),
                ("float32", [(512, [4096, 32768])])]
    rows, skipped, failed = [], {}, {}
    start = time.perf_counter()
    for dtype_name, shapes in plan:
        left = args.budget_s - (time.perf_counter() - start)
        r, s, f = run(shapes, [dtype_name], modes, left, args.only)
        rows += r
        skipped.update(s)
        failed.update(f)
    if not args.quick:
        rows.append(largest_batch())
    device = torch.cuda.get_device_name()
    result = dict(meta=dict(device=device, torch=torch.__version__, triton=triton.__version__,
                            fastpair=fastpair.__version__, date=datetime.date.today().isoformat()),
                  rows=rows, autotuned=autotune_choices(), skipped=skipped,
                  failed={f"{k[0]} D={k[1]} {k[2]}": v for k, v in failed.items()})
    write_results(os.path.join(args.out, f"{slug(device)}-{result['meta']['date']}"), result, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
