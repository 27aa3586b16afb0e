"""Fused Triton kernels of pairwise_nce (installed as ``fastpair.kernels``): jit.py (kernels), tuning.py
(tile configurations), launch.py (host launchers), ops.py (torch.library custom ops, the entry point)."""

from __future__ import annotations

import os


def available() -> bool:
    """Whether Triton is importable (the kernels then run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # Triton missing or broken: the torch backend is used
        return False
    return True


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
