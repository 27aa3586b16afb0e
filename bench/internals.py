"""The Triton internals the GPU tools reach into (bench/tune_gpu.py, the autotune record of bench/run.py).

They are no public API: when kernels/ is split (launchers in kernels/launch.py, tile configurations and
the autotuned kernels in kernels/tuning.py), only the two imports below are repointed.
"""

from __future__ import annotations

from fastpair.kernels import pairwise_nce as launch  # forward, backward, backward_panels, BACKWARD
from fastpair.kernels import pairwise_nce as tuning  # _fwd_tuned, _panel_tuned

forward = launch.forward
backward = launch.backward
backward_panels = launch.backward_panels


def set_backward(mode: str) -> None:
    """Which backward the Triton path launches: "panel" (the default) or "fused"."""
    launch.BACKWARD = mode


def autotune_choices() -> dict:
    """The tiles the autotuner chose in this process, per key (N bucket, D bucket, flags, dtypes)."""
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in (("forward", tuning._fwd_tuned), ("panel", tuning._panel_tuned))}
