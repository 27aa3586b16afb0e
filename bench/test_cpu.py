"""CPU benchmark: fwd+bwd of M=3 pairwise InfoNCE, fastpair's torch backend against the baselines.

Providers (bench/providers.py): fastpair-torch, plain-pytorch (materialized logits + F.cross_entropy),
torch-compile (of plain PyTorch), gemm-floor (the 12 N x N x D matmuls any exact O(N*D)-memory method
needs, with torch.matmul). All providers of one shape run back to back, so their ratios come from one run.
Peak memory growth per provider is measured in a fresh subprocess (bench/memory.py).
Run with `make bench`; `bench/report.py` turns the JSON into the tables, the plot and README's table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import fastpair
from bench.providers import PROVIDERS, gemm_floor, gemm_floor_inputs, make_inputs

SHAPES = [(n, d) for n in (1024, 4096, 16384) for d in (128, 512)]
ORDER = ["gemm-floor", "fastpair-torch", "torch-compile", "plain-pytorch"]
CASES = [(n, d, p) for n, d in SHAPES for p in ORDER]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rounds(n: int, provider: str) -> tuple[int, int]:
    """(rounds, warm-up rounds). At N=16384 a materializing provider takes minutes per shape on 2 cores,
    so it gets 2 rounds; earlier shapes already warmed the thread pools, torch.compile still needs its
    warm-up to compile the new shape."""
    if n <= 4096:
        return 5, 1
    if provider in ("plain-pytorch", "torch-compile"):
        return 2, int(provider == "torch-compile")
    return 3, 0


def _memory(provider: str, n: int, d: int) -> float | None:
    if provider == "gemm-floor":
        return None
    out = subprocess.run([sys.executable, "-m", "bench.memory", provider, str(n), str(d)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


@pytest.mark.parametrize("n,d,provider", CASES, ids=[f"N{n}-D{d}-{p}" for n, d, p in CASES])
def test_cpu_fwd_bwd(benchmark, n, d, provider):
    benchmark.group = f"M=3 fp32 fwd+bwd N={n} D={d}"
    benchmark.extra_info.update(
        provider=provider, n=n, d=d, m=3, dtype="float32", mode="full", device=cpu_name(),
        threads=torch.get_num_threads(), torch=torch.__version__, fastpair=fastpair.__version__,
        date=datetime.date.today().isoformat(), flops=4 * 2 * n * n * d * 3,
    )
    benchmark.extra_info["peak_growth_mib"] = _memory(provider, n, d)
    zs = make_inputs(n, d)
    rounds, warmup = _rounds(n, provider)
    if provider == "gemm-floor":
        xs, g = gemm_floor_inputs(zs)
        benchmark.pedantic(gemm_floor, args=(xs, g), rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:
        benchmark.pedantic(PROVIDERS[provider], args=(zs,), rounds=rounds, warmup_rounds=warmup, iterations=1)
