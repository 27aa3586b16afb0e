"""Peak memory growth of one fwd+bwd of a provider, measured in a fresh process.

CPU: after inputs are made and a warm-up call has run (thread pools; at the same shape for
torch.compile, which compiles per shape, at N <= 256 otherwise), the kernel's peak-RSS mark is reset
(/proc/self/clear_refs, "5") and the growth of VmHWM over VmRSS during one more call is reported. The
growth includes the gradients the call allocates (M * N * D elements). CUDA: torch.cuda.max_memory_allocated
over the allocation before the call.

    python -m bench.memory PROVIDER N D [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from bench.providers import PROVIDERS, make_inputs


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def measure(provider: str, n: int, d: int, device: str = "cpu", dtype=torch.float32) -> float:
    fn = PROVIDERS[provider]
    zs = make_inputs(n, d, dtype=dtype, device=device)
    fn(zs if provider == "torch-compile" else make_inputs(min(n, 256), d, dtype=dtype, device=device))
    for z in zs:
        z.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(zs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn(zs)
    return _status_mib("VmHWM") - base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("provider", choices=sorted(PROVIDERS))
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    growth = measure(args.provider, args.n, args.d, args.device, getattr(torch, args.dtype))
    print(json.dumps({"provider": args.provider, "n": args.n, "d": args.d, "peak_growth_mib": round(growth, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
