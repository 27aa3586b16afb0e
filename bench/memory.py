"""Peak memory growth of one forward + backward of a provider, above what was allocated before the call.

CPU, in a fresh process (so that no earlier provider's freed pages or caches count): after the inputs are
made and a warm-up call has run (thread pools; at the same shape for a provider that compiles per shape,
at N <= 256 otherwise), the kernel's peak-RSS mark is reset (/proc/self/clear_refs, "5") and the growth
of VmHWM over VmRSS during one more call is reported. The growth includes the gradients the call
allocates (M * N * D elements). CUDA, in the benchmark's process after its warm-up call:
torch.cuda.max_memory_allocated over torch.cuda.memory_allocated before the call.

    python -m bench.memory PROVIDER N D     (the CPU probe; prints one JSON line)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from bench.providers import get, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_peak_mib(provider: str, n: int, d: int) -> float:
    """Run the CPU probe for provider at (n, d) in a fresh process; its peak growth in MiB."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", provider, str(n), str(d)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench.memory {provider} {n} {d} failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_peak_mib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _measure_cpu(name: str, n: int, d: int) -> float:
    provider = get(name, "cpu")
    zs = make_inputs(n, d)
    provider.step(zs if provider.compiles else make_inputs(min(n, 256), d))()
    step = provider.step(zs)
    for z in zs:
        z.grad = None
    gc.collect()
    return cpu_step_growth(step)


def cpu_step_growth(step) -> float:
    """This process's peak-RSS growth (MiB) during step(): the peak mark reset, VmHWM over VmRSS before."""
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _status_mib("VmHWM") - base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("provider")
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    args = parser.parse_args(argv)
    growth = _measure_cpu(args.provider, args.n, args.d)
    print(json.dumps({"provider": args.provider, "n": args.n, "d": args.d, "peak_mib": round(growth, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
