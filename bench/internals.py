"""The Triton internals the GPU tools reach into (bench/tune_gpu.py, the autotune record of bench/run.py):
kernels/launch.py's host launchers and kernels/tuning.py's autotuned kernels. They are no public API."""

from __future__ import annotations

import torch
from fastpair.kernels import launch, tuning

from fastpair.numerics import LOG2E

forward = launch.forward
backward = launch.backward


def staged(zs, pairs, temperature: float) -> launch.Staged:
    """The kernels' operands for normalized inputs without a mask, one temperature for every pair."""
    scale2 = torch.full((len(pairs),), LOG2E / temperature, dtype=torch.float32, device=zs[0].device)
    return launch.stage(zs, None, scale2, pairs, normalize=True)


def autotune_choices() -> dict:
    """The tiles the autotuner chose in this process, per key (N bucket, D bucket, flags, dtypes)."""
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in (("forward", tuning.fwd_tuned), ("panel", tuning.panel_tuned))}
