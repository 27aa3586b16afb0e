"""The benchmark, on CPU or CUDA: bench/providers.py's providers over the device's shapes, then the report.

    python -m bench.run --device cpu  [--quick] [--out bench/results] [--update-docs]
    python -m bench.run --device cuda [--quick] [--out bench/results] [--budget-s 420] [--only NAME ...]
    either, for a smoke run on other shapes: --n N [N ...] --d D [D ...] [--dtype bfloat16|float32]

What is measured: one forward + backward of M=3 pairwise InfoNCE (3 pairs) per provider, its median time
(bench/timing.py) and its peak memory growth (bench/memory.py); the floor is timed on the same inputs.
All providers of a shape run back to back, so the ratios of the report come from one run.
- CPU: float32, N in (1024, 4096, 16384) x D in (128, 512) (--quick: N=1024), the open_clip peers to 4096.
  Per provider, peak memory first (a fresh process), then the timing: median of rounds after warm-up calls,
  schedule cpu_rounds.
- CUDA: bf16 at D=512 for N=256 ... 65536 and at D=128 and D=1024 for N=4096 and 32768, fp32 at D=512
  for N=4096 and 32768 (--quick: bf16, D=512, N=4096 and 32768); before them, unless --quick, --n or --d,
  one step of fastpair-triton at N=2^20, D=512, bf16 (fits? time, memory; the process's first step). Per
  provider a warm-up step (compilation, autotuning), peak memory of one step, then do_bench medians of the
  full step, and for fastpair-triton(-det) and plain-pytorch of forward and backward too; at N <= 4096 also
  an eager back-to-back loop and the replay of a CUDA-graph capture (bench/timing.py). Running out of memory
  or failing (a peer's own limits) is recorded under "failed", and that provider is not run at larger N of
  the same D and dtype. fastpair-torch stops after N=16384: it is the CPU backend, its GPU cost is clear by
  then. Once --budget-s is spent (the N=2^20 step included) the run stops before the next shape. The tiles
  the autotuner chose are recorded.
The result JSON, Markdown and plot go to OUT/<device-slug>-<date>.{json,md,png} (bench/report.py).

A plain runner, not a pytest plugin: the benchmark is no test, and one runner serves both devices. CPU timing
is warm-up calls, then time.perf_counter around each round, median (what pytest-benchmark's pedantic mode
does, so the committed CPU results of earlier runs compare).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time

import torch

import fastpair
from bench import memory, providers, report
from bench.provenance import commit, cpu_name
from bench.timing import deterministic, time_cpu, time_cuda, time_cuda_graph, time_cuda_loop

CPU_NS, CPU_DS = (1024, 4096, 16384), (128, 512)
CUDA_PLAN = {  # dtype -> D -> N, in run order
    "bfloat16": {512: [256, 1024, 4096, 16384, 32768, 65536], 128: [4096, 32768], 1024: [4096, 32768]},
    "float32": {512: [4096, 32768]},
}
CUDA_QUICK = {"bfloat16": {512: [4096, 32768]}}
LATENCY_N = 4096  # at or below: the eager-loop and CUDA-graph views of the step too (bench/timing.py)
CUDA_ALL_MODES = ("fastpair-triton", "fastpair-triton-det", "plain-pytorch")  # forward and backward too
PEERS_X3 = ("open_clip-x3", "open_clip-siglip-x3")
MATERIALIZED = ("plain-pytorch", "torch-compile", "plain-sigmoid", "compile-sigmoid", "plain-gram") + PEERS_X3  # N x N
# On CPU the peers (the materialized formula again, in open_clip's code) stop at N=4096: at 16384 a step
# takes most of a minute on 2 cores and says nothing plain-pytorch does not.
# plain-gram holds N x N x 3 x 3 floats and a batched determinant: 9.7 GB at N=16384, past the CPU machine.
MAX_N = {"cpu": {**dict.fromkeys(PEERS_X3, 4096), "plain-gram": 4096},
         "cuda": {"fastpair-torch": 16384, "fastpair-torch-gram": 16384}}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_rounds(n: int, provider: str) -> tuple[int, int]:
    """(rounds, warm-up calls). At N=16384 a materializing provider takes minutes per shape on 2 cores,
    so it gets 2 rounds; earlier shapes already warmed the thread pools, torch.compile still needs its
    warm-up to compile the new shape."""
    if n <= 4096:
        return 5, 1
    if provider in MATERIALIZED:
        return 2, int(provider in ("torch-compile", "compile-sigmoid"))
    return 3, 0


def cases(device: str, quick: bool, ns=None, ds=None, dtype=None) -> list[tuple[str, int, int]]:
    """(dtype, N, D) in run order: on CPU N outer, D inner; on CUDA dtype, then D, then N."""
    if device == "cpu":
        if dtype not in (None, "float32"):
            raise SystemExit("the CPU benchmark runs float32 only")
        return [("float32", n, d) for n in ns or ((1024,) if quick else CPU_NS) for d in ds or CPU_DS]
    if ns or ds:
        return [(dtype or "bfloat16", n, d) for d in ds or (512,) for n in ns or (4096,)]
    plan = CUDA_QUICK if quick else CUDA_PLAN
    return [(dt, n, d) for dt, by_d in plan.items() for d, n_list in by_d.items() for n in n_list]


def measure(device: str, provider, n: int, d: int, dtype: str) -> dict:
    if device == "cpu":
        return _cpu_row(provider, n, d)
    return _cuda_row(provider, n, d, getattr(torch, dtype))


def _cpu_row(provider, n: int, d: int) -> dict:
    peak = None if provider.loss is None else memory.cpu_peak_mib(provider.name, n, d)
    rounds, warmup = cpu_rounds(n, provider.name)
    return dict(time_cpu(provider.step(providers.make_inputs(n, d)), rounds, warmup), peak_mib=peak)


def _cuda_row(provider, n: int, d: int, dtype) -> dict:
    zs = providers.make_inputs(n, d, dtype=dtype, device="cuda")
    if provider.loss is None:  # the floor: do_bench's own warm-up suffices, and it has no peak to report
        return time_cuda(provider, zs, ("full",), warmup=25, rep=100)
    modes = ("full", "forward", "backward") if provider.name in CUDA_ALL_MODES else ("full",)
    with deterministic(provider.deterministic):
        step = provider.step(zs)
        step()  # compilation and autotuning, outside the measurements
        peak = memory.cuda_peak_mib(step)
        row = time_cuda(provider, zs, modes)
        if n <= LATENCY_N:
            row.update(_latency_views(step))
    inputs_grads = 2 * sum(z.numel() * z.element_size() for z in zs) / 2**20
    return dict(row, peak_mib=peak, inputs_grads_mib=inputs_grads)


def _latency_views(step) -> dict:
    """loop_ms and graph_ms (or graph_error: why the step could not be captured)."""
    out = {"loop_ms": time_cuda_loop(step)}
    try:
        out["graph_ms"] = time_cuda_graph(step)
    except Exception as err:  # noqa: BLE001 - a host sync or CPU tensor in the step: recorded, not fatal
        torch.cuda.synchronize()
        out["graph_error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return out


def attempt(device: str, provider, n: int, d: int, dtype: str) -> tuple[dict | None, str | None]:
    """measure(), or the reason it could not: out of memory, or the provider's own error."""
    try:
        return measure(device, provider, n, d, dtype), None
    except torch.cuda.OutOfMemoryError:
        return None, f"oom at N={n}"
    except Exception as err:  # noqa: BLE001 - a peer's own limits, reported
        return None, f"{type(err).__name__}: {' '.join(str(err).split())[:160]} (N={n})"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def run(device: str, shape_list, only=None, budget_s: float = math.inf) -> dict:
    """Every provider at every shape; returns rows, skipped providers and failures."""
    provs, skipped = providers.for_device(device, only)
    rows, failed = [], {}
    start = time.perf_counter()
    for dtype, n, d in shape_list:
        if time.perf_counter() - start > budget_s:
            print(f"time budget of {budget_s} s spent; stopping before N={n} D={d} {dtype}", flush=True)
            break
        for p in provs:
            key = f"{p.name} D={d} {dtype}"
            if key in failed or n > MAX_N[device].get(p.name, n):
                continue
            row, error = attempt(device, p, n, d, dtype)
            if error:
                failed[key] = error
                print(f"{dtype} D={d} N={n:7d} {p.name:22s} {error}", flush=True)
                continue
            rows.append(dict(provider=p.name, n=n, d=d, dtype=dtype, **row))
            _print_row(rows[-1])
    return {"rows": rows, "skipped": skipped, "failed": failed}


def _print_row(r: dict) -> None:
    extra = "".join(f"  {mode} {r[f'{mode}_ms']:8.3f}" for mode in ("forward", "backward") if f"{mode}_ms" in r)
    peak = "" if r.get("peak_mib") is None else f"  peak {r['peak_mib']:9.1f} MiB"
    print(f"{r['dtype']} D={r['d']} N={r['n']:7d} {r['provider']:22s} full {r['full_ms']:9.3f} ms{extra}{peak}",
          flush=True)


def largest_batch(n: int = 2**20, d: int = 512) -> dict:
    """One full step of fastpair-triton at N = 2^20, D = 512, bf16: does it fit, how long, how much memory."""
    provider = providers.get("fastpair-triton", "cuda")
    zs = providers.make_inputs(n, d, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        provider.step(zs)()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        return dict(provider=provider.name, n=n, d=d, dtype="bfloat16", largest="oom", error=str(err)[:200])
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    total = torch.cuda.max_memory_allocated() / 2**30
    print(f"N=2^20 D={d} bf16 {provider.name}: one step {seconds:.1f} s (incl. compile), peak {peak:.0f} MiB "
          f"above the inputs, total {total:.1f} GiB", flush=True)
    return dict(provider=provider.name, n=n, d=d, dtype="bfloat16", largest="fits", step_s=seconds,
                peak_mib=peak, total_gib=total)


def meta(device: str) -> dict:
    if device == "cpu":
        head = dict(device=cpu_name(), kind="cpu", threads=torch.get_num_threads(), torch=torch.__version__)
        timer = "medians"
    else:
        import triton

        head = dict(device=torch.cuda.get_device_name(), kind="cuda", torch=torch.__version__,
                    triton=triton.__version__)
        timer = "medians of triton.testing.do_bench"
    return dict(head, fastpair=fastpair.__version__, commit=commit(), date=datetime.date.today().isoformat(),
                m=providers.M, timer=timer)


def _autotuned() -> dict:
    try:
        from bench.internals import autotune_choices

        return autotune_choices()
    except Exception as err:  # noqa: BLE001 - a moved internal must not cost the run's results
        return {"error": repr(err)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the smallest shapes only (a smoke run)")
    parser.add_argument("--out", default=OUT, help="folder of the results (default: bench/results)")
    parser.add_argument("--update-docs", action="store_true", help="replace docs/benchmarks.md's CPU results block")
    parser.add_argument("--only", nargs="*", default=None, help="provider names to run (the floor always runs)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget (default: 420 on CUDA, none on CPU)")
    parser.add_argument("--n", type=int, nargs="+", help="batch sizes instead of the device's plan")
    parser.add_argument("--d", type=int, nargs="+", help="embedding sizes instead of the device's plan")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    if args.device == "cuda":  # cuBLAS refuses deterministic algorithms without it (fastpair-triton-det)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    budget = args.budget_s if args.budget_s is not None else 420.0 if args.device == "cuda" else math.inf
    shape_list = cases(args.device, args.quick, args.n, args.d, args.dtype)
    largest, start = None, time.perf_counter()
    if args.device == "cuda" and not (args.quick or args.n or args.d):
        # first: its goal is the first step of a process, compilation included, and it must not be cut by
        # the budget, which the shapes then share
        largest = largest_batch()
        torch.cuda.empty_cache()
    spent = time.perf_counter() - start
    result = dict(meta=meta(args.device), **run(args.device, shape_list, args.only, budget - spent))
    if largest is not None:
        result["largest"] = largest
    if args.device == "cuda":
        result["autotuned"] = _autotuned()
    report.publish(result, args.out, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
