"""Fused Triton kernels of pairwise_nce (installed as ``fastpair.kernels``).

Not implemented yet: the fused forward/backward kernels are planned (see README, "Not yet").
Until they land, ``available()`` is False, ``backend="auto"`` uses the exact torch backend on every
device, and ``backend="triton"`` raises NotImplementedError.
"""


def available() -> bool:
    """Whether the fused Triton backend can run here (always False in this version)."""
    return False
