"""The small-batch step's host cost, measured on a CPU: what a GPU step at N = 32..4096 is bound by.

One training step of the loss alone (forward + backward; M = 3, N = 64, D = 512, a learnable temperature) on the
Triton path, its kernels run by Triton's interpreter for the counts and replaced by no-ops for the timing, so that
what is timed is the host's work (validation, dispatch, allocations, the launch calls, the autograd engine) and not
the interpreter's emulation. The baseline is the plain PyTorch step in the same process: materialized logits and
F.cross_entropy both ways for every pair, a learnable logit scale (open_clip's ClipLoss for M = 3), its ops run
for real at this size (each a few microseconds: host-bound like a GPU's).

Reported per objective: Triton launches, aten ops that compute (each a kernel on a GPU; tests/costs.py counts them,
inside custom ops too), their sum, and the median host time of `--reps` steps as a ratio to the plain step's,
rounds alternating between the two. One CPU thread; run it on a quiet machine (nothing else compiling or testing).
The goals (docs/design.md, "The small-batch step"): <= 20 kernels and <= 0.4x the plain step's host time for
InfoNCE; sigmoid and GRAM within 1.2x of InfoNCE's counts.

    python -m bench.host [--reps 300] [--rounds 5]   ->  bench/results/host-cpu-<date>.{json,md}
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

import argparse
import contextlib
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F
from triton.runtime import interpreter

import fastpair
from bench.provenance import ROOT, commit, cpu_name
from tests.costs import measure

M, N, D = 3, 64, 512
PAIRS = [(0, 1), (0, 2), (1, 2)]
MODULES = {"nce": fastpair.PairwiseNCE, "sigmoid": fastpair.PairwiseSigmoid, "gram": fastpair.GramNCE}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(N, D, generator=g).requires_grad_() for _ in range(M)]


def plain_step(zs):
    """open_clip's ClipLoss for every pair, as a user writes it: materialized logits, a learnable scale."""
    logit_scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())
    labels = torch.arange(N)

    def step():
        xs = [F.normalize(z, dim=1) for z in zs]
        scale = logit_scale.exp()
        loss = 0.0
        for p, q in PAIRS:
            logits = scale * xs[p] @ xs[q].T
            loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        (loss / len(PAIRS)).backward()

    return step


def module_step(objective: str, zs):
    module = MODULES[objective](M, backend="triton")

    def step():
        module(*zs).backward()

    return step


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch a no-op: the host's side of a launch (arguments, grid, dispatch) stays."""
    original = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = original


def median_us(step, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def counts(step) -> dict:
    step()  # first call: compiles, fills caches
    costs, _ = measure(step)
    return {"launches": costs.launches, "computing_ops": costs.kernels, "kernels": costs.launches + costs.kernels,
            "ops": costs.ops, "host_reads": len(costs.reads)}


def run(reps: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    zs = _inputs()
    plain = plain_step(zs)
    steps = {name: module_step(name, zs) for name in MODULES}
    result = {"plain": counts(plain)}
    for name, step in steps.items():
        result[name] = counts(step)
    times = {name: [] for name in ["plain", *steps]}
    for _ in range(rounds):  # alternating rounds: drift on a shared machine hits every provider alike
        times["plain"].append(median_us(plain, reps))
        with stubbed_launches():
            for name, step in steps.items():
                times[name].append(median_us(step, reps))
    for name, values in times.items():
        result[name]["host_us"] = statistics.median(values)
        result[name]["host_us_rounds"] = [round(v, 1) for v in values]
    for name in steps:
        result[name]["host_ratio_to_plain"] = result[name]["host_us"] / result["plain"]["host_us"]
        result[name]["kernels_ratio_to_nce"] = result[name]["kernels"] / result["nce"]["kernels"]
    return result


def report(result: dict, meta: dict) -> str:
    lines = [f"# Small-batch step, host cost ({meta['date']}, {meta['cpu']}, commit {meta['commit']})", "",
             f"One forward + backward of the loss, M = {M}, N = {N}, D = {D}, a learnable temperature, Triton path "
             "(launches stubbed for the timing), one CPU thread, medians of "
             f"{meta['rounds']} rounds x {meta['reps']} steps. Goals: InfoNCE <= 20 kernels and <= 0.4x the plain "
             "step's host time; sigmoid and GRAM within 1.2x of InfoNCE's counts.", "",
             "| step | Triton launches | aten ops computing | kernels in all | host us | x plain | kernels x InfoNCE |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result.items():
        ratio = f"{row['host_ratio_to_plain']:.2f}" if "host_ratio_to_plain" in row else "1"
        kernels = f"{row['kernels_ratio_to_nce']:.2f}" if "kernels_ratio_to_nce" in row else ""
        lines.append(f"| {name} | {row['launches']} | {row['computing_ops']} | {row['kernels']} | "
                     f"{row['host_us']:.0f} | {ratio} | {kernels} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "commit": commit(), "reps": args.reps,
            "rounds": args.rounds, "torch": torch.__version__, "M": M, "N": N, "D": D}
    result = run(args.reps, args.rounds)
    stem = os.path.join(args.out, f"host-cpu-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "result": result}, f, indent=1)
    text = report(result, meta)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
